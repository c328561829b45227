use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, anyhow};
use attune_compiler::export::{self, ExportOptions, WeightsMode};
use attune_compiler::pass::{PassCx, PassManager, PassReport};
use attune_passes::folder;
use attune_passes::lora::adapter;
use attune_passes::pipeline::{self, LoraModeArg, Options, TargetArg, Weights};

use super::exec::{EpArg, ExecArgs, InputArgs, OptArg};
use crate::progress::Progress;

#[derive(clap::Args)]
pub struct Args {
    /// The .onnx model to compile, or a pipeline folder (diffusers/optimum ONNX layout, with
    /// model_index.json): each component gets the passes that apply to it
    model: PathBuf,
    /// Output .onnx path (its data file is written next to it); for a pipeline folder, a folder
    /// (new, empty, or an earlier compile's, which is replaced whole)
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    options: Options,
    /// Write all tensors inside the .onnx (models under 2 GB)
    #[arg(long)]
    inline: bool,
    /// Verify the graph after every pass (always on in debug builds and with ATTUNE_VERIFY set)
    #[arg(long)]
    verify: bool,
    /// Inputs on which passes that change the model's function (linear attention) are measured
    #[command(flatten)]
    measure: InputArgs,
    /// A recipe (TOML) holding the whole conversion; flags given here override it
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// No progress bars and no pass reports (errors still go to stderr)
    #[arg(short, long)]
    quiet: bool,
    /// Also write the graph after these passes, as OUT's name + `.after-PASS.onnx`
    /// (comma-separated pass names, as the reports print them)
    #[arg(long, value_delimiter = ',', value_name = "PASS")]
    dump_after: Vec<String>,
    /// Run the pipeline up to this pass and write what it made (bisecting a pipeline)
    #[arg(long, value_name = "PASS")]
    stop_after: Option<String>,
}

/// The pipeline `options` ask for.
pub fn build(options: &Options) -> anyhow::Result<PassManager> {
    pipeline::build(options).map_err(|e| anyhow!(e))
}

/// Prints what each pass did.
pub fn print_reports(reports: &[PassReport]) {
    print_indented(reports, "");
}

/// Each pass's report, its lines after `indent`.
fn print_indented(reports: &[PassReport], indent: &str) {
    for r in reports {
        println!(
            "{indent}{}: {} rewritten, {} skipped ({:.1} ms)",
            r.pass,
            r.rewritten.len(),
            r.skipped.len(),
            r.time.as_secs_f64() * 1e3
        );
        for s in &r.rewritten {
            println!("{indent}  + {s}");
        }
        for s in &r.skipped {
            println!("{indent}  - {}: {}", s.site, s.reason);
        }
        for n in &r.notes {
            println!("{indent}  note: {n}");
        }
    }
}

/// `OUT.onnx` → `OUT.after-PASS.onnx`
fn dump_path(output: &std::path::Path, pass: &str) -> PathBuf {
    output.with_extension(format!("after-{pass}.onnx"))
}

/// `OUT.onnx` → `OUT.adapter.safetensors`
pub fn adapter_path(output: &std::path::Path) -> PathBuf {
    output.with_extension("adapter.safetensors")
}

pub fn run(mut args: Args, matches: &clap::ArgMatches) -> anyhow::Result<i32> {
    if let Some(path) = &args.recipe {
        let recipe = Options::from_recipe(path).map_err(anyhow::Error::msg)?;
        super::recipe::check_finite(&recipe, path)?;
        args.options = super::recipe::merge(recipe, &args.options, matches)?;
    }
    if args.model.is_dir() {
        return run_folder(&args);
    }
    // Every file this command reads; no output may replace one. Checked before any work.
    let inputs = args.read_files()?;
    let adapter_out = (args.options.lora_options.mode == LoraModeArg::Adapter
        && !args.options.lora.is_empty())
    .then(|| adapter_path(&args.output));
    for out in std::iter::once(&args.output).chain(&adapter_out) {
        export::check_output(out, &inputs)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
    }
    let start = Instant::now();
    let progress = Progress::start(&format!("loading {}", args.model.display()), args.quiet);
    let mut model = super::load(&args.model)?;
    // Inputs for measuring a function-changing rewrite are settled before anything is written.
    let measure_inputs = if args.options.changes_function() {
        Some(args.measure.prepare(&args.model).context(
            "linear attention changes the model's outputs and attune measures by how much: give --dim NAME=V (or --input) for the inputs",
        )?)
    } else {
        None
    };
    let loaded = start.elapsed();
    let mut cx = PassCx {
        verify: args.verify
            || cfg!(debug_assertions)
            || std::env::var_os("ATTUNE_VERIFY").is_some(),
    };
    let mut pipeline = pipeline::build(&args.options).map_err(|e| match &args.recipe {
        Some(recipe) => anyhow!(super::recipe::name_key(&e, recipe, matches).unwrap_or(e)),
        None => anyhow!(e),
    })?;
    pipeline.stop_after = args.stop_after.clone();
    pipeline.dump_after = args.dump_after.clone();
    let export_options = ExportOptions {
        weights: match args.options.weights {
            Weights::Copy => WeightsMode::Copy,
            Weights::Link => WeightsMode::Link,
        },
        inline: args.inline,
    };
    let mut dumped = Vec::new();
    let reports = pipeline.run_observed(
        &mut model,
        &mut cx,
        &mut |pass| progress.step(pass),
        &mut |pass, m| {
            let path = dump_path(&args.output, pass);
            export::write_guarded(
                m,
                &path,
                &export_options,
                &export::Guard {
                    inputs: &inputs,
                    companions: &[],
                },
                &mut |_, _| {},
            )?;
            dumped.push(path);
            Ok(())
        },
    )?;
    if !args.quiet {
        for path in &dumped {
            progress.suspend(|| println!("dumped {}", path.display()));
        }
    }
    let say = !args.quiet;
    if say {
        progress.suspend(|| print_reports(&reports));
    }
    // The adapter's tensors are built (and the LoRAs' shapes checked) before anything is
    // written: a bad LoRA leaves no output behind. It is placed with the model, all or nothing.
    let adapter = match &adapter_out {
        Some(path) => {
            let (tensors, skipped) =
                adapter::adapter_tensors(&model, &args.options.lora_sources())?;
            let bytes = adapter::serialize(path, &tensors)?;
            Some((path.clone(), tensors.len(), skipped, bytes))
        }
        None => None,
    };
    progress.step(&format!("writing {}", args.output.display()));
    let companions: Vec<(PathBuf, Vec<u8>)> = adapter
        .iter()
        .map(|(path, _, _, bytes)| (path.clone(), bytes.clone()))
        .collect();
    let written = export::write_guarded(
        &model,
        &args.output,
        &export_options,
        &export::Guard {
            inputs: &inputs,
            companions: &companions,
        },
        &mut |done, total| progress.bytes(done, total),
    )
    .with_context(|| format!("cannot write {}", args.output.display()))?;
    progress.finish();
    if say {
        println!("wrote {}", written.model.display());
        if let Some((path, size)) = &written.data_file {
            println!("  data   {} ({})", path.display(), super::bytes(*size));
        }
        for (path, how) in &written.linked {
            println!("  {how}   {}", path.display());
        }
        if written.clamped > 0 {
            println!(
                "  {} weight values beyond the fp16 range were clamped to ±65504",
                written.clamped
            );
        }
        if let Some((path, count, skipped, _)) = adapter {
            println!(
                "  adapter {} ({count} tensors; run with --adapter)",
                path.display()
            );
            for s in skipped {
                println!("  - {}: {}", s.site, s.reason);
            }
        }
    }
    if !say {
        return Ok(0);
    }
    println!(
        "  load {:.0} ms, total {:.0} ms",
        loaded.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3
    );
    if let Some(inputs) = measure_inputs {
        let exec = ExecArgs {
            ep: EpArg::Cpu,
            input: InputArgs::default(),
            threads: None,
            opt_level: OptArg::All,
            session_cache: false,
        };
        // A CUDA-target output may hold ops only CUDA runs: measure its CPU-target twin (same
        // passes, no CUDA fusions), which computes the same function.
        let twin = tempfile::tempdir()?;
        let measured = match args.options.target {
            TargetArg::Cpu => Ok(args.output.clone()),
            TargetArg::Cuda => cpu_twin(&args, twin.path()),
        };
        // The output is written and complete: measuring it is a report, so a model ONNX
        // Runtime cannot run is said, not an error.
        let compared = measured.and_then(|measured| {
            let results = super::numeric::compare_on(&args.model, &measured, &exec, &inputs)?;
            Ok((measured, results))
        });
        match compared {
            Ok((measured, results)) => {
                let what = if measured == args.output {
                    ""
                } else {
                    ", its CPU-target twin"
                };
                println!("measured change of the outputs (ONNX Runtime CPU{what}, these inputs):");
                print!("{}", super::numeric::render(&results, None).0);
            }
            Err(e) => println!("change of the outputs not measured on the CPU: {e:#}"),
        }
    }
    Ok(0)
}

impl Args {
    /// The files besides the model that the command reads: LoRAs, the recipe, --input and
    /// --adapter files.
    fn read_files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = self.options.lora.iter().map(|l| l.file.clone()).collect();
        files.extend(self.recipe.iter().cloned());
        // --input files (a folder's .npy files each) and the --adapter file.
        files.extend(self.measure.read_files()?.into_iter().map(|(_, file)| file));
        Ok(files)
    }
}

/// The model compiled with the same passes for `--target cpu`, written (weights linked) in `dir`.
fn cpu_twin(args: &Args, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let options = Options {
        target: TargetArg::Cpu,
        ..args.options.clone()
    };
    let mut model = super::load(&args.model)?;
    build(&options)?.run(&mut model, &mut PassCx::default())?;
    let out = dir.join("cpu_twin.onnx");
    let opts = ExportOptions {
        weights: WeightsMode::Link,
        inline: false,
    };
    export::write(&model, &out, &opts)?;
    Ok(out)
}

/// `attune compile DIR -o OUT_DIR`: a pipeline folder, component by component.
fn run_folder(args: &Args) -> anyhow::Result<i32> {
    if !args.dump_after.is_empty() || args.stop_after.is_some() {
        anyhow::bail!(
            "--dump-after and --stop-after work on one graph: give the component's model, e.g. attune compile {}/unet/model.onnx",
            args.model.display()
        );
    }
    if args.output.extension().is_some_and(|e| e == "onnx") {
        anyhow::bail!(
            "{} is a pipeline folder: it compiles to a new folder, not to {}",
            args.model.display(),
            args.output.display()
        );
    }
    if args.inline && args.options.weights == Weights::Link {
        anyhow::bail!("--inline and --weights link: choose one");
    }
    let start = Instant::now();
    let pipeline = folder::Pipeline::read(&args.model)?;
    let denoiser = pipeline.denoiser().model.clone();
    // A function-changing rewrite (linear attention, the denoiser's) is measured, as for one
    // graph: its inputs are settled before anything is written.
    let measure_inputs = if args.options.changes_function() {
        Some(args.measure.prepare(&denoiser).context(
            "linear attention changes the denoiser's outputs and attune measures by how much: give --dim NAME=V (or --input) for its inputs",
        )?)
    } else {
        None
    };
    let progress = Progress::start(&format!("reading {}", args.model.display()), args.quiet);
    let mut current = String::new();
    let job = folder::Job {
        input: &args.model,
        output: &args.output,
        options: &args.options,
        export: ExportOptions {
            weights: match args.options.weights {
                Weights::Copy => WeightsMode::Copy,
                Weights::Link => WeightsMode::Link,
            },
            inline: args.inline,
        },
        verify: args.verify
            || cfg!(debug_assertions)
            || std::env::var_os("ATTUNE_VERIFY").is_some(),
    };
    let report = folder::compile(&job, &mut |event| match event {
        folder::Event::Component(name) => current = name.to_string(),
        folder::Event::Pass(pass) => progress.step(&format!("{current}: {pass}")),
        folder::Event::Bytes(done, total) => progress.bytes(done, total),
        folder::Event::Copying => progress.step("copying the other files"),
    })?;
    progress.finish();
    if args.quiet {
        return Ok(0);
    }
    print_folder_report(&report);
    println!("  total {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
    if let Some(inputs) = measure_inputs {
        let compiled = args.output.join(denoiser.strip_prefix(&args.model)?);
        let exec = ExecArgs {
            ep: EpArg::Cpu,
            input: InputArgs::default(),
            threads: None,
            opt_level: OptArg::All,
            session_cache: false,
        };
        match args.options.target {
            TargetArg::Cuda => println!(
                "change of the denoiser's outputs not measured (a CUDA-target graph; measure its CPU-target twin with attune compile {} --target cpu)",
                denoiser.display()
            ),
            TargetArg::Cpu => {
                match super::numeric::compare_on(&denoiser, &compiled, &exec, &inputs) {
                    Ok(results) => {
                        println!(
                            "measured change of the denoiser's outputs (ONNX Runtime CPU, these inputs):"
                        );
                        print!("{}", super::numeric::render(&results, None).0);
                    }
                    Err(e) => println!("change of the outputs not measured on the CPU: {e:#}"),
                }
            }
        }
    }
    Ok(0)
}

/// Each component's passes (what they changed and skipped), the options it did not get and
/// why, its files; then what was copied.
pub(super) fn print_folder_report(r: &folder::FolderReport) {
    println!("{} -> {}", r.class, r.output.display());
    for c in &r.components {
        println!(
            "{} ({}): {} -> {} nodes, {} -> {}",
            c.name,
            c.role.name(),
            c.nodes.0,
            c.nodes.1,
            super::bytes(c.bytes.0),
            super::bytes(c.bytes.1)
        );
        print_indented(&c.passes, "  ");
        for n in &c.not_applied {
            println!("  not applied: {}: {}", n.option, n.reason);
        }
        for n in &c.notes {
            println!("  note: {n}");
        }
        for (path, size) in &c.files {
            println!("  wrote {} ({})", path.display(), super::bytes(*size));
        }
        for (path, how) in &c.linked {
            println!("  {how} {}", path.display());
        }
        if c.clamped > 0 {
            println!(
                "  {} weight values beyond the fp16 range were clamped to ±65504",
                c.clamped
            );
        }
        if let Some((path, count, skipped)) = &c.adapter {
            println!(
                "  adapter {} ({count} tensors; run with --adapter)",
                path.display()
            );
            for s in skipped {
                println!("    - {}: {}", s.site, s.reason);
            }
        }
    }
    let total: u64 = r.copied.iter().map(|(_, n)| n).sum();
    println!(
        "copied {} files as they are ({})",
        r.copied.len(),
        super::bytes(total)
    );
    // By top-level entry: `tokenizer/ (4 files, 1.5 MiB)`.
    let mut groups: Vec<(String, usize, u64)> = Vec::new();
    for (path, size) in &r.copied {
        let mut parts = path.components();
        let first = parts
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        let key = match (first, parts.next()) {
            (Some(dir), Some(_)) => format!("{dir}/"),
            (Some(file), None) => file,
            _ => continue,
        };
        match groups.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, n, b)) => {
                *n += 1;
                *b += size;
            }
            None => groups.push((key, 1, *size)),
        }
    }
    for (key, n, b) in groups {
        let files = if n == 1 {
            String::new()
        } else {
            format!("{n} files, ")
        };
        println!("  {key} ({files}{})", super::bytes(b));
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}
