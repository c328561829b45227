//! ONNX Runtime's optimised graph, kept between processes.
//!
//! ORT's full optimisation on the CPU (its NCHWc layout above all, which reorders every
//! convolution's weights) is most of a large session's start: 12-17 s of an SD1.5 UNet's,
//! against 2-3 s at the extended level, and the same work every time for one model on one
//! machine. The first session saves the graph ORT made; later ones load it with ORT's
//! optimisation off. ORT says the saved graph fits only the CPU it was made on, so the key holds
//! the CPU's model and flags, with the model's bytes and its data files' sizes and times.
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A model's place in the cache.
pub struct Entry {
    /// `root/<key>/`: the saved `model.onnx` and `model.onnx.data`.
    pub dir: PathBuf,
    /// Whether a previous session saved it.
    pub hit: bool,
}

/// The saved graph's file name in an entry.
pub const MODEL: &str = "model.onnx";
/// Its weights, next to it.
pub const DATA: &str = "model.onnx.data";

impl Entry {
    pub fn model(&self) -> PathBuf {
        self.dir.join(MODEL)
    }
}

/// The entry of `model` under `root` for sessions made with `settings` (provider, level, ORT
/// library: anything that changes the optimised graph).
pub fn entry(root: &Path, model: &Path, settings: &str) -> Result<Entry> {
    let mut hash = Sha256::new();
    hash.update(settings.as_bytes());
    hash.update(cpu_identity().as_bytes());
    let mut file = std::fs::File::open(model).map_err(|e| Error::file(model, e.to_string()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::file(model, e.to_string()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    // External data lives next to the model: any change of a file there makes a new entry.
    let folder = model.parent().unwrap_or(Path::new("."));
    let mut files: Vec<(String, u64, u128)> = std::fs::read_dir(folder)
        .map_err(|e| Error::file(folder, e.to_string()))?
        .filter_map(|e| {
            let e = e.ok()?;
            let meta = e.metadata().ok()?;
            let modified = meta
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            meta.is_file().then(|| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    meta.len(),
                    modified.as_nanos(),
                )
            })
        })
        .collect();
    files.sort();
    for (name, len, modified) in files {
        hash.update(format!("{name}\0{len}\0{modified}\n").as_bytes());
    }
    let key: String = hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = root.join(key);
    let hit = dir.join(MODEL).is_file() && dir.join(DATA).is_file();
    Ok(Entry { dir, hit })
}

/// The CPU's model name and feature flags (what ORT's layout choices depend on).
fn cpu_identity() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    format!(
        "{} {} | {} | {}",
        std::env::consts::ARCH,
        field("model name"),
        field("flags"),
        field("Features")
    )
}

/// A folder to save into, renamed into place by [`publish`] once the session is made (so a
/// crash never leaves a half-written entry that looks whole).
pub fn staging(entry: &Entry) -> Result<PathBuf> {
    let tmp = entry
        .dir
        .with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, e.to_string()))?;
    Ok(tmp)
}

/// Moves a staged entry into place; another process that saved the same one first wins.
pub fn publish(staged: &Path, entry: &Entry) {
    if std::fs::rename(staged, &entry.dir).is_err() {
        let _ = std::fs::remove_dir_all(staged);
    }
}

/// Marks an entry used now (the least recently used go first when the cache is full).
pub fn touch(entry: &Entry) {
    if let Ok(f) = std::fs::File::options().write(true).open(entry.model()) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// The most the cache holds: `$ATTUNE_SESSION_CACHE_GB` GB, else 16.
pub fn limit() -> u64 {
    let gb = std::env::var("ATTUNE_SESSION_CACHE_GB")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|g| g.is_finite() && *g >= 0.0)
        .unwrap_or(16.0);
    (gb * 1e9) as u64
}

/// Removes the least recently used entries of `root` beyond `max` bytes, never `keep` (every
/// recompiled model makes a new entry, as large as its weights).
pub fn prune(root: &Path, keep: &Entry, max: u64) {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return;
    };
    let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = dirs
        .filter_map(|d| {
            let dir = d.ok()?.path();
            let e = Entry {
                dir: dir.clone(),
                hit: true,
            };
            let used = std::fs::metadata(e.model()).ok()?.modified().ok()?;
            Some((used, size(&e), dir))
        })
        .collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut total = 0u64;
    for (_, bytes, dir) in entries {
        total += bytes;
        if total > max && dir != keep.dir {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Removes an entry ORT could not load (a disk error, a file removed by hand).
pub fn discard(entry: &Entry) {
    let _ = std::fs::remove_dir_all(&entry.dir);
}

/// The bytes of an entry (for the report).
pub fn size(entry: &Entry) -> u64 {
    [MODEL, DATA]
        .iter()
        .filter_map(|f| std::fs::metadata(entry.dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_the_model_its_folder_and_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let model = dir.path().join("m/model.onnx");
        std::fs::create_dir_all(model.parent().unwrap()).unwrap();
        std::fs::write(&model, b"graph").unwrap();
        let a = entry(&root, &model, "cpu all").unwrap();
        assert!(!a.hit);
        assert_eq!(a.dir, entry(&root, &model, "cpu all").unwrap().dir);
        assert_ne!(a.dir, entry(&root, &model, "cpu extended").unwrap().dir);
        std::fs::write(model.with_file_name("model.onnx_data"), b"weights").unwrap();
        let b = entry(&root, &model, "cpu all").unwrap();
        assert_ne!(
            a.dir, b.dir,
            "a data file next to the model changes the key"
        );
        std::fs::write(&model, b"other graph").unwrap();
        assert_ne!(b.dir, entry(&root, &model, "cpu all").unwrap().dir);
        let c = entry(&root, &model, "cpu all").unwrap();
        let staged = staging(&c).unwrap();
        std::fs::write(staged.join(MODEL), b"x").unwrap();
        std::fs::write(staged.join(DATA), b"y").unwrap();
        publish(&staged, &c);
        assert!(!staged.exists());
        assert!(entry(&root, &model, "cpu all").unwrap().hit);
        assert_eq!(size(&c), 2);

        // Full: the least recently used go, never the one just made.
        let d = entry(&root, &model, "cpu extended").unwrap();
        let staged = staging(&d).unwrap();
        std::fs::write(staged.join(MODEL), b"xx").unwrap();
        std::fs::write(staged.join(DATA), b"yy").unwrap();
        publish(&staged, &d);
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        for e in [&c, &d] {
            let f = std::fs::File::options()
                .write(true)
                .open(e.model())
                .unwrap();
            f.set_modified(old).unwrap();
        }
        touch(&c);
        prune(&root, &d, 5);
        assert!(
            c.dir.exists() && d.dir.exists(),
            "the entry just made stays"
        );
        prune(&root, &c, 5);
        assert!(c.dir.exists(), "the most recently used stays");
        assert!(
            !d.dir.exists(),
            "c (2 bytes, used now) + d (4) is over 5: d goes"
        );
    }
}
