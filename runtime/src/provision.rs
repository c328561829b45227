//! Finding the ONNX Runtime shared library, with no manual step:
//! `ORT_DYLIB_PATH`, else the cache (`$ATTUNE_CACHE` or `~/.cache/attune`), else the pinned
//! wheel fetched from PyPI through the ordinary client (`pip download`), unpacked, checked
//! against the wheel's own RECORD hashes and its reported version, then cached.
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The ONNX Runtime release attune is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `onnxruntime` (CPU execution provider)
    Cpu,
    /// `onnxruntime-gpu` (CUDA 13 execution provider, and CPU)
    Gpu,
}

impl Flavor {
    fn package(self) -> &'static str {
        match self {
            Flavor::Cpu => "onnxruntime",
            Flavor::Gpu => "onnxruntime-gpu",
        }
    }
    fn dir_name(self) -> String {
        match self {
            Flavor::Cpu => format!("onnxruntime-{ORT_VERSION}"),
            Flavor::Gpu => format!("onnxruntime-{ORT_VERSION}-gpu"),
        }
    }
}

/// Where the library came from.
#[derive(Clone, Debug)]
pub struct OrtLibrary {
    pub path: PathBuf,
    pub origin: &'static str,
}

/// attune's cache folder.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("ATTUNE_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("attune"));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| Error::Provision("neither ATTUNE_CACHE nor HOME is set".into()))?;
    Ok(PathBuf::from(home).join(".cache/attune"))
}

/// The library to load for `flavor`, fetching it on first use.
pub fn locate(flavor: Flavor) -> Result<OrtLibrary> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        if !path.is_file() {
            return Err(Error::Provision(format!(
                "ORT_DYLIB_PATH is {}, which is not a file",
                path.display()
            )));
        }
        return Ok(OrtLibrary {
            path,
            origin: "ORT_DYLIB_PATH",
        });
    }
    let dir = cache_dir()?.join(flavor.dir_name());
    let lib = dir.join(format!("libonnxruntime.so.{ORT_VERSION}"));
    if dir.join(VERIFIED).is_file() && lib.is_file() {
        return Ok(OrtLibrary {
            path: lib,
            origin: "cache",
        });
    }
    fetch(flavor, &dir)?;
    Ok(OrtLibrary {
        path: lib,
        origin: "fetched",
    })
}

const VERIFIED: &str = ".verified";

/// Downloads the pinned wheel with pip and installs its libraries into `dir`.
/// Concurrent callers (parallel tests) wait on a lock; the folder appears atomically.
pub fn fetch(flavor: Flavor, dir: &Path) -> Result<()> {
    let root = dir.parent().expect("cache folder has a parent");
    fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let lock_path = root.join(format!(".{}.lock", flavor.dir_name()));
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    if dir.join(VERIFIED).is_file() {
        return Ok(()); // another process finished it while we waited
    }
    let spec = format!("{}=={ORT_VERSION}", flavor.package());
    eprintln!(
        "attune: fetching ONNX Runtime ({spec}) from PyPI with pip; it is cached in {}",
        dir.display()
    );
    let staging = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(root)
        .map_err(|e| Error::io(root, e))?;
    let wheel_dir = staging.path().join("wheel");
    let python = find_python()?;
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
        ])
        .arg(&wheel_dir)
        .arg(&spec)
        .output()
        .map_err(|e| Error::Provision(format!("could not run {python} -m pip: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(6)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(Error::Provision(format!(
            "`{python} -m pip download {spec}` failed:\n{}\n(set ORT_DYLIB_PATH to an existing libonnxruntime.so.{ORT_VERSION} to skip the download)",
            tail.join("\n")
        )));
    }
    let wheel = fs::read_dir(&wheel_dir)
        .map_err(|e| Error::io(&wheel_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Provision(format!("pip downloaded no wheel for {spec}")))?;
    let lib_dir = staging.path().join("lib");
    let installed = unpack_libraries(&wheel, &lib_dir)?;
    let main = lib_dir.join(format!("libonnxruntime.so.{ORT_VERSION}"));
    if !main.is_file() {
        return Err(Error::Provision(format!(
            "{} holds no libonnxruntime.so.{ORT_VERSION}",
            wheel.display()
        )));
    }
    check_version(&main)?;
    fs::write(
        lib_dir.join(VERIFIED),
        format!("{spec}\n{}\n", installed.join("\n")),
    )
    .map_err(|e| Error::io(&lib_dir, e))?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?; // a stale, unverified folder
    }
    fs::rename(&lib_dir, dir).map_err(|e| Error::io(dir, e))?;
    eprintln!(
        "attune: ONNX Runtime {ORT_VERSION} ready ({})",
        installed.join(", ")
    );
    Ok(())
}

fn find_python() -> Result<String> {
    for candidate in ["python3", "python"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(candidate.to_string());
        }
    }
    Err(Error::Provision(format!(
        "python3 with pip is needed once to fetch onnxruntime=={ORT_VERSION} from PyPI; install it, or set ORT_DYLIB_PATH to libonnxruntime.so.{ORT_VERSION}"
    )))
}

/// Extracts `onnxruntime/capi/lib*.so*` from the wheel, each checked against the sha256
/// the wheel's RECORD lists for it. Returns the file names.
fn unpack_libraries(wheel: &Path, out: &Path) -> Result<Vec<String>> {
    let bad = |msg: String| Error::Provision(format!("{}: {msg}", wheel.display()));
    let file = File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a valid wheel: {e}")))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let record_name = names
        .iter()
        .find(|n| n.ends_with(".dist-info/RECORD"))
        .ok_or_else(|| bad("has no RECORD".into()))?;
    let mut record = String::new();
    zip.by_name(record_name)
        .map_err(|e| bad(e.to_string()))?
        .read_to_string(&mut record)
        .map_err(|e| bad(e.to_string()))?;
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let wanted = names
        .iter()
        .filter(|n| n.starts_with("onnxruntime/capi/lib") && n.contains(".so"));
    let mut installed = Vec::new();
    for name in wanted {
        let expected = record
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name},sha256="))
                    .and_then(|r| r.split(',').next())
            })
            .ok_or_else(|| bad(format!("RECORD lists no hash for {name}")))?
            .to_string();
        let mut bytes = Vec::new();
        zip.by_name(name)
            .map_err(|e| bad(e.to_string()))?
            .read_to_end(&mut bytes)
            .map_err(|e| bad(e.to_string()))?;
        let actual = base64_url(&Sha256::digest(&bytes));
        if actual != expected {
            return Err(bad(format!(
                "{name} does not match its RECORD hash (corrupt download?)"
            )));
        }
        let file_name = name.rsplit('/').next().expect("has a name").to_string();
        let target = out.join(&file_name);
        fs::write(&target, &bytes).map_err(|e| Error::io(&target, e))?;
        installed.push(file_name);
    }
    Ok(installed)
}

/// Loads the library just to ask its version.
fn check_version(lib: &Path) -> Result<()> {
    // SAFETY: loading ONNX Runtime runs no code beyond its initialisers; it is unloaded again.
    let library = unsafe { libloading::Library::new(lib) }
        .map_err(|e| Error::Provision(format!("{} does not load: {e}", lib.display())))?;
    type GetApiBase = unsafe extern "C" fn() -> *const ort::sys::OrtApiBase;
    let get: libloading::Symbol<GetApiBase> = unsafe { library.get(b"OrtGetApiBase") }
        .map_err(|_| Error::Provision(format!("{} is not ONNX Runtime", lib.display())))?;
    let version = unsafe {
        let base = get();
        std::ffi::CStr::from_ptr(((*base).GetVersionString)())
            .to_string_lossy()
            .into_owned()
    };
    if version != ORT_VERSION {
        return Err(Error::Provision(format!(
            "{} reports version {version}, expected {ORT_VERSION}",
            lib.display()
        )));
    }
    Ok(())
}

/// URL-safe base64 without padding (the encoding of wheel RECORD hashes).
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_url_matches_known_values() {
        assert_eq!(super::base64_url(b"f"), "Zg");
        assert_eq!(super::base64_url(b"fo"), "Zm8");
        assert_eq!(super::base64_url(b"foo"), "Zm9v");
        assert_eq!(super::base64_url(&[0xfb, 0xff]), "-_8");
    }
}
