//! Finding the ONNX Runtime shared library, with no manual step:
//! `ORT_DYLIB_PATH`, else the cache (`$ATTUNE_CACHE` or `~/.cache/attune`), else the pinned
//! wheel fetched from PyPI through the ordinary client (`pip download`), unpacked, checked
//! against the wheel's own RECORD hashes and its reported version, then cached.
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
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

/// The library to load for `flavor`, fetching it on first use, and again when the cached copy
/// no longer matches what was installed (a truncated or changed file would crash the process
/// when loaded, with SIGBUS, instead of giving an error).
pub fn locate(flavor: Flavor) -> Result<OrtLibrary> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        // The user owns this file: attune neither hashes nor replaces it, but checks that it is
        // a whole ELF library before loading it, so a truncated copy is an error naming it.
        let path = PathBuf::from(p);
        if !path.is_file() {
            return Err(Error::Provision(format!(
                "ORT_DYLIB_PATH is {}, which is not a file",
                path.display()
            )));
        }
        check_elf(&path).map_err(|msg| {
            Error::Provision(format!("ORT_DYLIB_PATH is {}, which {msg}", path.display()))
        })?;
        return Ok(OrtLibrary {
            path,
            origin: "ORT_DYLIB_PATH",
        });
    }
    let dir = cache_dir()?.join(flavor.dir_name());
    let lib = dir.join(format!("libonnxruntime.so.{ORT_VERSION}"));
    match check_cache(&dir) {
        Ok(()) => {
            return Ok(OrtLibrary {
                path: lib,
                origin: "cache",
            });
        }
        Err(None) => fetch(flavor, &dir)?,
        Err(Some(damage)) => {
            eprintln!("attune: {damage}; fetching ONNX Runtime again");
            fetch(flavor, &dir).map_err(|e| {
                let e = match e {
                    Error::Provision(msg) => msg,
                    other => other.to_string(),
                };
                Error::Provision(format!("{damage}, and fetching it again failed: {e}"))
            })?;
        }
    }
    Ok(OrtLibrary {
        path: lib,
        origin: "fetched",
    })
}

/// The marker of a verified install: the wheel spec, then one line per library with the size,
/// modification time and sha256 it had when installed (`NAME size=N mtime=S.NS sha256=HEX`).
/// Older markers list names only; they are upgraded on first use.
const VERIFIED: &str = ".verified";

/// One library as `.verified` records it.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    name: String,
    size: u64,
    mtime: String,
    sha256: String,
}

impl Record {
    fn line(&self) -> String {
        format!(
            "{} size={} mtime={} sha256={}",
            self.name, self.size, self.mtime, self.sha256
        )
    }

    /// `None` for a name-only line (an older marker).
    fn parse(line: &str) -> Option<Record> {
        let mut parts = line.split_whitespace();
        let name = parts.next()?.to_string();
        let (mut size, mut mtime, mut sha256) = (None, None, None);
        for part in parts {
            match part.split_once('=') {
                Some(("size", v)) => size = v.parse().ok(),
                Some(("mtime", v)) => mtime = Some(v.to_string()),
                Some(("sha256", v)) => sha256 = Some(v.to_string()),
                _ => {}
            }
        }
        Some(Record {
            name,
            size: size?,
            mtime: mtime?,
            sha256: sha256?,
        })
    }

    /// Records `path` as it is now (hashing it).
    fn of(path: &Path) -> Result<Record> {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(Record {
            name: file_name(path),
            size: bytes.len() as u64,
            mtime: mtime(path)?,
            sha256: hex(&Sha256::digest(&bytes)),
        })
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn mtime(path: &Path) -> Result<String> {
    let modified = fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|e| Error::io(path, e))?;
    let since = modified
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(format!("{}.{:09}", since.as_secs(), since.subsec_nanos()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Is the cached install in `dir` whole? `Err(None)`: nothing is installed there (no marker);
/// `Err(Some(why))`: it is damaged, `why` naming the file. Every library is checked for its
/// recorded size; one whose modification time changed is hashed again (so an intact cache
/// costs no hashing), and its new time recorded when the hash still matches.
fn check_cache(dir: &Path) -> std::result::Result<(), Option<String>> {
    let marker = dir.join(VERIFIED);
    let Ok(text) = fs::read_to_string(&marker) else {
        return Err(None);
    };
    let mut lines = text.lines();
    let spec = lines.next().unwrap_or_default().to_string();
    let main = format!("libonnxruntime.so.{ORT_VERSION}");
    let mut records = Vec::new();
    let mut rewrite = false;
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let name = line.split_whitespace().next().unwrap_or_default();
        let path = dir.join(name);
        let meta = fs::metadata(&path)
            .map_err(|e| Some(format!("cached library {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(Some(format!(
                "cached library {} is not a file",
                path.display()
            )));
        }
        let now = |path: &Path| Record::of(path).map_err(|e| Some(format!("cached library {e}")));
        let record = match Record::parse(line) {
            Some(r) => {
                if meta.len() != r.size {
                    return Err(Some(format!(
                        "cached library {} is {} bytes, but was {} when installed (truncated or changed)",
                        path.display(),
                        meta.len(),
                        r.size
                    )));
                }
                if mtime(&path).ok().as_ref() == Some(&r.mtime) {
                    r
                } else {
                    let current = now(&path)?;
                    if current.sha256 != r.sha256 {
                        return Err(Some(format!(
                            "cached library {} does not match the sha256 recorded when it was installed",
                            path.display()
                        )));
                    }
                    rewrite = true;
                    current
                }
            }
            None => {
                // An older marker: check the file is a whole library, then record it.
                check_elf(&path)
                    .map_err(|msg| Some(format!("cached library {} {msg}", path.display())))?;
                rewrite = true;
                now(&path)?
            }
        };
        records.push(record);
    }
    if !records.iter().any(|r| r.name == main) {
        return Err(Some(format!("{} lists no {main}", marker.display())));
    }
    if rewrite {
        // Best effort: a read-only cache is still used, and checked again next time.
        let _ = write_marker(dir, &spec, &records);
    }
    Ok(())
}

/// Writes `.verified` atomically (concurrent readers see the old or the new marker).
fn write_marker(dir: &Path, spec: &str, records: &[Record]) -> Result<()> {
    let lines: Vec<String> = records.iter().map(Record::line).collect();
    let text = format!("{spec}\n{}\n", lines.join("\n"));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(|e| Error::io(dir, e))?;
    let marker = dir.join(VERIFIED);
    tmp.persist(&marker)
        .map_err(|e| Error::io(&marker, e.error))?;
    Ok(())
}

/// Checks that `path` is a whole 64-bit little-endian ELF file: every segment and the section
/// header table its headers describe lie inside the file. Loading a truncated library maps
/// pages past its end and dies with SIGBUS; this turns that into an error. The message
/// completes "PATH ...".
fn check_elf(path: &Path) -> std::result::Result<(), String> {
    let mut f = File::open(path).map_err(|e| format!("cannot be opened: {e}"))?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot be read: {e}"))?
        .len();
    let mut h = [0u8; 64];
    if len < 64 || f.read_exact(&mut h).is_err() {
        return Err(format!("is {len} bytes, too short for a shared library"));
    }
    if &h[..4] != b"\x7fELF" {
        return Err("is not an ELF shared library".into());
    }
    if h[4] != 2 || h[5] != 1 {
        return Err("is not a 64-bit little-endian ELF library".into());
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let (phoff, shoff) = (u64_at(&h, 0x20), u64_at(&h, 0x28));
    let (phentsize, phnum) = (u16_at(&h, 0x36), u16_at(&h, 0x38));
    let (shentsize, shnum) = (u16_at(&h, 0x3a), u16_at(&h, 0x3c));
    let ph_end = phoff.saturating_add(phentsize * phnum);
    let mut need = ph_end.max(shoff.saturating_add(shentsize * shnum));
    if ph_end <= len && phentsize >= 56 {
        let mut table = vec![0u8; (phentsize * phnum) as usize];
        f.seek(SeekFrom::Start(phoff))
            .and_then(|_| f.read_exact(&mut table))
            .map_err(|e| format!("cannot be read: {e}"))?;
        for ph in table.chunks_exact(phentsize as usize) {
            need = need.max(u64_at(ph, 8).saturating_add(u64_at(ph, 32)));
        }
    }
    if len < need {
        return Err(format!(
            "is truncated: {len} bytes, but its ELF headers describe {need}"
        ));
    }
    Ok(())
}

/// Downloads the pinned wheel with pip and installs its libraries into `dir`.
/// Concurrent callers (parallel tests) wait on a lock; the folder appears atomically.
pub fn fetch(flavor: Flavor, dir: &Path) -> Result<()> {
    let root = dir.parent().expect("cache folder has a parent");
    fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let lock_path = root.join(format!(".{}.lock", flavor.dir_name()));
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    if check_cache(dir).is_ok() {
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
    let records = installed
        .iter()
        .map(|name| Record::of(&lib_dir.join(name)))
        .collect::<Result<Vec<_>>>()?;
    write_marker(&lib_dir, &spec, &records)?;
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
