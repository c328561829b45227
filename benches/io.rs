//! Import and export of a large model: time and peak RSS of each phase.
//!
//!     python models/export/unets.py --full sd15 --out models/large/sd15   # once, 3.4 GB, not committed
//!     cargo bench --bench io [-- MODEL]
use std::path::PathBuf;
use std::time::Instant;

use attune_compiler::export::{self, ExportOptions, WeightsMode};
use attune_compiler::{import, summary};
use attune_runtime::bench::{reset_peak, rss};

fn mib(kb: u64) -> String {
    format!("{:.0} MiB", kb as f64 / 1024.0)
}

fn main() {
    let model = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/large/sd15/unet.onnx"));
    if !model.is_file() {
        eprintln!(
            "{} not found; generate it with: python models/export/unets.py --full sd15 --out models/large/sd15",
            model.display()
        );
        std::process::exit(1);
    }
    let out_dir = tempfile::tempdir_in(model.parent().unwrap()).unwrap();
    let base = rss();
    println!("model: {}", model.display());
    println!(
        "{:<28} {:>10} {:>14} {:>14}",
        "phase", "time", "RSS after", "peak RSS"
    );

    let mut import_ms = Vec::new();
    let mut m = None;
    for _ in 0..3 {
        drop(m.take());
        reset_peak();
        let start = Instant::now();
        m = Some(import::read(&model).unwrap());
        import_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let m = m.unwrap();
    let r = rss();
    import_ms.sort_by(f64::total_cmp);
    println!(
        "{:<28} {:>7.0} ms {:>14} {:>14}",
        "import (best of 3)",
        import_ms[0],
        mib(r.current_kb),
        mib(r.peak_kb)
    );
    let s = summary::summarize(&m);
    println!(
        "  {} nodes, {} parameters, {} of initializers; process RSS before import {}",
        s.nodes,
        s.parameters.count,
        s.parameters.initializer_bytes,
        mib(base.current_kb)
    );

    for (label, opts) in [
        ("export --weights copy", ExportOptions::default()),
        (
            "export --weights link",
            ExportOptions {
                weights: WeightsMode::Link,
                inline: false,
            },
        ),
    ] {
        let out = out_dir
            .path()
            .join(format!("{}.onnx", label.replace([' ', '-'], "_")));
        reset_peak();
        let start = Instant::now();
        export::write(&m, &out, &opts).unwrap();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let r = rss();
        println!(
            "{label:<28} {ms:>7.0} ms {:>14} {:>14}",
            mib(r.current_kb),
            mib(r.peak_kb)
        );
    }
}
