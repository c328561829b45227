//! `attune demo`: the product on one screen. On a pipeline folder (the shipped tiny SD1.5
//! pipeline by default): compile the folder, show what each pass changed, generate from a
//! prompt with the original and the compiled pipeline, compare the images and time both. With
//! `--model`, one graph: compile, structural and numeric diff, timing at a real latent size.
use std::path::PathBuf;

use attune_passes::pipeline::AttentionArg;

mod graph;
mod pipeline;

#[derive(clap::Args)]
pub struct Args {
    /// The pipeline folder to compile and generate with
    #[arg(
        long,
        default_value = "models/pipelines/sd15_tiny",
        conflicts_with = "model"
    )]
    pipeline: PathBuf,
    /// One graph instead of a pipeline (e.g. models/sd15_legacy/unet.onnx): compile, structural
    /// and numeric diff on its fixture's inputs, timing at a --latent x --latent latent
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder for what the demo writes (default: a temporary folder, removed at exit)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Timed runs per model or pipeline (alternating)
    #[arg(long, default_value_t = 10, value_parser = super::bench::at_least_one)]
    iters: usize,
    /// With --model: side of the latent the timing runs at (the model's `sample` input, if its
    /// sides are symbolic; the numeric check uses the fixture's own inputs)
    #[arg(long, value_name = "N", default_value_t = 64)]
    latent: usize,
    /// Attention substitution to show (see `attune compile --help`)
    #[arg(long, value_enum, default_value_t = AttentionArg::Flash)]
    attention: AttentionArg,
    /// With a pipeline: the prompt [default: the folder's reference case, if it ships one]
    #[arg(long)]
    prompt: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    match &args.model {
        Some(model) => graph::run(&args, &model.clone()),
        None => pipeline::run(&args),
    }
}
