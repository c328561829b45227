use attune_runtime::provision::{self, Flavor};

#[derive(clap::Args)]
pub struct Args {
    /// Also fetch the CUDA build (onnxruntime-gpu)
    #[arg(long)]
    cuda: bool,
    /// Also install the CUDA 13 / cuDNN 9 libraries (nvidia-* pip packages) into the cache
    #[arg(long)]
    cuda_libs: bool,
}

/// Fetches and caches the ONNX Runtime libraries ahead of time.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let mut flavors = vec![Flavor::Cpu];
    if args.cuda {
        flavors.push(Flavor::Gpu);
    }
    for flavor in flavors {
        let lib = provision::locate(flavor)?;
        println!(
            "onnxruntime {} ({flavor:?}): {} [{}]",
            provision::ORT_VERSION,
            lib.path.display(),
            lib.origin
        );
    }
    if args.cuda_libs {
        let dir = attune_runtime::cuda::install_libraries()?;
        println!("CUDA libraries: {}", dir.display());
    }
    Ok(0)
}
