use std::path::PathBuf;

use attune_compiler::export;
use attune_passes::lora::LoraSource;
use attune_passes::lora::adapter;

#[derive(clap::Args)]
pub struct Args {
    /// A model compiled with --lora-mode adapter
    model: PathBuf,
    /// LoRA files, FILE or FILE:MULTIPLIER (several concatenate along the rank)
    #[arg(required = true, value_name = "LORA[:M]")]
    loras: Vec<String>,
    /// The adapter file to write (.safetensors), for `attune run --adapter`
    #[arg(short, long)]
    output: PathBuf,
}

/// Converts LoRA files into the A/B inputs of a model's LoRA branches.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let sources = args
        .loras
        .iter()
        .map(|l| LoraSource::parse(l).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Never over a file this command reads (the model, its data, a LoRA), a folder or a device.
    let model = super::load(&args.model)?;
    let inputs: Vec<PathBuf> = std::iter::once(args.model.clone())
        .chain(model.data_files.iter().map(|f| f.path.clone()))
        .chain(sources.iter().map(|s| s.path.clone()))
        .collect();
    export::check_output(&args.output, &inputs)?;
    let (tensors, skipped) = adapter::adapter_tensors(&model, &sources)?;
    for s in &skipped {
        println!("  - {}: {}", s.site, s.reason);
    }
    if tensors.is_empty() {
        anyhow::bail!(
            "no layer of these LoRAs has a branch in {} (compile it with --lora-mode adapter)",
            args.model.display()
        );
    }
    adapter::write(&args.output, &tensors)?;
    println!(
        "wrote {} ({} tensors for {} layers)",
        args.output.display(),
        tensors.len(),
        tensors.len() / 2
    );
    Ok(0)
}
