//! Making the CUDA execution provider real or an error: the NVIDIA driver must load, and the
//! CUDA 13 / cuDNN 9 libraries ONNX Runtime's CUDA provider links against are found (on
//! LD_LIBRARY_PATH, in attune's cache, or in the `nvidia-*` pip packages of python3) and
//! loaded up front, so a missing one is named instead of ORT falling back to the CPU.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Fails unless the NVIDIA driver library loads (no GPU, no driver: a clear error, no fallback).
pub fn check_driver() -> Result<()> {
    // SAFETY: loading the driver library runs only its initialisers.
    match unsafe { libloading::Library::new("libcuda.so.1") } {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::Cuda(format!(
            "the NVIDIA driver library libcuda.so.1 cannot be loaded ({e}); this machine has no usable NVIDIA GPU/driver. \
             Use --ep cpu (or tract) here"
        ))),
    }
}

/// Loads every CUDA/cuDNN library ORT's CUDA provider needs, from the first folder that has
/// it; names all that are missing.
pub fn preload_libraries() -> Result<()> {
    let dirs = search_dirs();
    let mut missing = Vec::new();
    for name in ort::ep::cuda::CUDA_DYLIBS
        .iter()
        .chain(ort::ep::cuda::CUDNN_DYLIBS)
    {
        let found = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
        let loaded = match found {
            Some(path) => load_global(&path),
            // Also accept what the dynamic loader finds by itself (ldconfig paths).
            None => load_global(Path::new(name)),
        };
        if !loaded {
            missing.push(*name);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(Error::Cuda(format!(
        "missing CUDA 13 / cuDNN 9 libraries: {}. Looked in LD_LIBRARY_PATH, the system loader paths and: {}. \
         Install them with `attune setup --cuda --cuda-libs` (pip packages nvidia-cuda-runtime, nvidia-cublas, \
         nvidia-cudnn-cu13, nvidia-cufft, nvidia-curand, nvidia-cuda-nvrtc) or put them on LD_LIBRARY_PATH",
        missing.join(", "),
        if looked.is_empty() {
            "(nothing else)".into()
        } else {
            looked.join(", ")
        }
    )))
}

fn load_global(path: &Path) -> bool {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: CUDA libraries run only their initialisers; kept loaded for ORT to link against.
    match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// Folders that may hold the libraries: LD_LIBRARY_PATH, attune's cache (`cuda-libs`, made
/// by `attune setup --cuda-libs`), and python3's site-packages `nvidia/*/lib`.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    let mut roots = Vec::new();
    if let Ok(cache) = crate::provision::cache_dir() {
        roots.push(cache.join("cuda-libs"));
    }
    if let Ok(out) = Command::new("python3").args(["-c", "import site,sys; print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]))"]).output() {
        roots.extend(String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from));
    }
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root.join("nvidia")) else {
            continue;
        };
        for e in entries.flatten() {
            for sub in ["lib", "cu13/lib"] {
                let lib = e.path().join(sub);
                if lib.is_dir() {
                    dirs.push(lib);
                }
            }
        }
    }
    dirs
}

/// pip packages that hold the CUDA 13 / cuDNN 9 libraries.
pub const CUDA_PACKAGES: &[&str] = &[
    "nvidia-cuda-runtime",
    "nvidia-cublas",
    "nvidia-cudnn-cu13",
    "nvidia-cufft",
    "nvidia-curand",
    "nvidia-cuda-nvrtc",
];

/// Installs the CUDA libraries into attune's cache with pip.
pub fn install_libraries() -> Result<PathBuf> {
    let target = crate::provision::cache_dir()?.join("cuda-libs");
    eprintln!(
        "attune: installing {} into {} with pip",
        CUDA_PACKAGES.join(" "),
        target.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--upgrade",
            "--target",
        ])
        .arg(&target)
        .args(CUDA_PACKAGES)
        .status()
        .map_err(|e| Error::Provision(format!("could not run python3 -m pip: {e}")))?;
    if !status.success() {
        return Err(Error::Provision(format!(
            "pip install {} failed",
            CUDA_PACKAGES.join(" ")
        )));
    }
    Ok(target)
}
