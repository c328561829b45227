pub mod bench;
pub mod compile;
pub mod demo;
pub mod diff;
pub mod exec;
pub mod inspect;
pub mod lora_adapter;
pub mod numeric;
pub mod recipe;
pub mod run;
pub mod sample;
pub mod setup;

use std::path::{Path, PathBuf};

use attune_compiler::{Model, import};

/// Reads a model and verifies it (schema, shapes, sizes: what a backend would crash on), with
/// the path in the error (once: the importer's errors about the model file itself start with it).
pub fn load(path: &Path) -> anyhow::Result<Model> {
    let model = read(path)?;
    attune_compiler::verify::verify_model(&model)
        .map_err(|e| anyhow::anyhow!("invalid model {}: {e}", path.display()))?;
    Ok(model)
}

/// Reads a model without verifying it.
fn read(path: &Path) -> anyhow::Result<Model> {
    import::read(path).map_err(|e| {
        let msg = e.to_string();
        let prefix = format!("{}: ", path.display());
        match msg.strip_prefix(&prefix) {
            Some(rest) => anyhow::anyhow!("cannot read model {}: {rest}", path.display()),
            None => anyhow::Error::new(e).context(format!("cannot read model {}", path.display())),
        }
    })
}

/// Human-readable count: 1.2 K, 3.4 M, 5.6 G.
/// Refuses an output that is the same file as one the command reads; `outputs` are
/// (what the output is, its file), `read` (the flag it came from, its file).
pub fn refuse_outputs_over_inputs(
    outputs: &[(String, PathBuf)],
    read: &[(String, PathBuf)],
) -> anyhow::Result<()> {
    for (what, out) in outputs {
        if let Some((flag, input)) = read
            .iter()
            .find(|(_, p)| attune_compiler::export::same_file(out, p))
        {
            anyhow::bail!(
                "{what} {} is the same file as {flag} {}: it would be overwritten; choose another --out",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

pub fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Human-readable size in bytes.
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
