//! attune: compile and run exported diffusion-model ONNX graphs.
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod cmd;
mod progress;

#[derive(Parser)]
#[command(
    name = "attune",
    version,
    about = "Compiler and runtime for exported diffusion-model ONNX graphs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Command {
    /// Show a model's inputs/outputs, ops, parameters, opsets, exporter and module tree
    Inspect(cmd::inspect::Args),
    /// Compare two models: structural diff, or outputs on the same inputs with --numeric
    Diff(cmd::diff::Args),
    /// Rewrite a model and write it (with no passes: a faithful round trip)
    Compile(cmd::compile::Args),
    /// Run a model on ONNX Runtime (CPU/CUDA) or tract and write its outputs as .npy
    Run(cmd::run::Args),
    /// Time a model (optionally against another, alternating), with session time and RSS
    Bench(cmd::bench::Args),
    /// Fetch and cache the ONNX Runtime library ahead of time
    Setup(cmd::setup::Args),
    /// Denoise latents with DDIM, Euler, DPM-Solver++ or flow-matching Euler steps and
    /// classifier-free guidance, configured from a diffusers scheduler_config.json
    ///
    /// Drives the attention-control hooks of a model compiled with --hooks each step, and with
    /// --reference compares the final latents with a reference's.
    Sample(cmd::sample::Args),
    /// Generate images from prompts with a pipeline folder (tokenizer, text encoder, denoiser,
    /// VAE decoder): SD 1.x/2.x pipelines
    Generate(cmd::sample::generate::Args),
    /// Convert LoRA files into an adapter for a model compiled with --lora-mode adapter
    LoraAdapter(cmd::lora_adapter::Args),
    /// Compile a shipped fixture, diff it structurally and numerically, and time it
    Demo(cmd::demo::Args),
}

fn main() {
    // Behave like other command-line tools when the reader of stdout goes away (`| head`).
    // SAFETY: setting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let sub = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    let result = match cli.command {
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Diff(a) => cmd::diff::run(a),
        Command::Compile(a) => cmd::compile::run(a, &sub),
        Command::Run(a) => cmd::run::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Setup(a) => cmd::setup::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::LoraAdapter(a) => cmd::lora_adapter::run(a),
        Command::Sample(a) => cmd::sample::run(a),
        Command::Generate(a) => cmd::sample::generate::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
