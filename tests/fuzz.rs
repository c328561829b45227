//! Fuzz targets, one per reader (#22): seeded mutation runs in-process (cargo-fuzz was not
//! used: see README, "Hardening"). Each target mutates its committed seeds
//! (tests/fuzz_corpus/TARGET, plus the sd15_legacy fixture for the graph targets) and runs the
//! reader on the result; a panic is a finding, kept under target/fuzz-findings/ to replay.
//!
//! In the test suite each target runs [`DEFAULT_EXECS`] cases from a fixed seed.
//! `ATTUNE_FUZZ_SECS=N` runs each for N seconds instead, `ATTUNE_FUZZ_SEED` picks the seed,
//! and `ATTUNE_FUZZ_REPORT=FILE` appends one line of figures per target (benches/fuzz.sh).
mod common;

use std::cell::Cell;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use attune_compiler::onnx::ModelProto;
use attune_compiler::weights::ExternalData;
use attune_compiler::{import, pass::PassCx, summary, verify};
use attune_passes::lora::file::{self as lora_file, Component};
use attune_passes::pipeline::{self, Options};
use attune_runtime::{controller::Controller, npy, safetensors_io};
use common::mutate::{Rng, mutate, mutate_bytes, mutate_text};
use prost::Message;

/// Cases per target in the test suite (seconds at most).
const DEFAULT_EXECS: u64 = 60;

thread_local! {
    static FUZZING: Cell<bool> = const { Cell::new(false) };
}

/// Panics inside a fuzz case are findings, counted and kept, not printed as they happen.
fn quiet_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !FUZZING.get() {
                previous(info);
            }
        }));
    });
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = common::root().join("tests/fuzz_corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Runs `exec` on inputs from `generate` until the time or case budget is spent; prints
/// and reports the figures, then fails if any case panicked.
fn fuzz(target: &str, mut generate: impl FnMut(&mut Rng) -> Vec<u8>, exec: impl Fn(&[u8])) {
    quiet_panics();
    let secs: Option<u64> = std::env::var("ATTUNE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    let seed: u64 = std::env::var("ATTUNE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ target.len() as u64 | 1);
    let start = Instant::now();
    let (mut execs, mut findings) = (0u64, Vec::new());
    loop {
        match secs {
            Some(s) if start.elapsed() >= Duration::from_secs(s) => break,
            None if execs >= DEFAULT_EXECS => break,
            _ => {}
        }
        let input = generate(&mut rng);
        FUZZING.set(true);
        let r = panic::catch_unwind(AssertUnwindSafe(|| exec(&input)));
        FUZZING.set(false);
        execs += 1;
        if let Err(payload) = r {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let dir = common::root().join("target/fuzz-findings");
            std::fs::create_dir_all(&dir).unwrap();
            let keep = dir.join(format!("{target}-{seed}-{execs}"));
            std::fs::write(&keep, &input).unwrap();
            findings.push(format!("{}: {msg}", keep.display()));
        }
    }
    let line = format!(
        "{target}: {execs} executions in {:.1} s ({:.0}/s), seed {seed}, {} findings",
        start.elapsed().as_secs_f64(),
        execs as f64 / start.elapsed().as_secs_f64().max(1e-9),
        findings.len()
    );
    println!("{line}");
    if let Ok(report) = std::env::var("ATTUNE_FUZZ_REPORT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(report)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
    assert!(findings.is_empty(), "{line}:\n{}", findings.join("\n"));
}

/// The fixture whose graph the graph targets mutate (its weights stay in its folder).
fn fixture() -> (ModelProto, PathBuf) {
    let path = common::fixture("sd15_legacy");
    let m = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    (m, path.parent().unwrap().to_path_buf())
}

/// Imports (weights resolved in `base`) and verifies as every command does.
fn import_verified(bytes: &[u8], base: &Path) -> Option<attune_compiler::Model> {
    let proto = ModelProto::decode(bytes).ok()?;
    let model = import::from_proto(proto, &mut ExternalData::new(base)).ok()?;
    verify::verify_model(&model).ok()?;
    Some(model)
}

/// 1-3 structural mutations of the fixture's graph, or 1-4 byte ones of a seed's encoding.
fn graph_case(rng: &mut Rng, fixture: &ModelProto, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(2) == 0 {
        let mut m = fixture.clone();
        for _ in 0..1 + rng.below(3) {
            mutate(&mut m, rng);
        }
        return m.encode_to_vec();
    }
    let mut bytes = match rng.below(seeds.len() + 1) {
        0 => fixture.encode_to_vec(),
        i => seeds[i - 1].clone(),
    };
    for _ in 0..1 + rng.below(4) {
        mutate_bytes(&mut bytes, rng);
    }
    bytes
}

/// 1-4 byte (or, for text, number) mutations of one of the seeds.
fn bytes_case(rng: &mut Rng, seeds: &[Vec<u8>], text: bool) -> Vec<u8> {
    let mut bytes = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        if text {
            mutate_text(&mut bytes, rng);
        } else {
            mutate_bytes(&mut bytes, rng);
        }
    }
    bytes
}

#[test]
fn fuzz_onnx_import_and_verify() {
    let (m, base) = fixture();
    let seeds = corpus("onnx");
    fuzz(
        "onnx",
        |rng| graph_case(rng, &m, &seeds),
        |bytes| {
            if let Some(model) = import_verified(bytes, &base) {
                let _ = summary::summarize(&model);
            }
        },
    );
}

/// The pass families `compile` runs, as recipes (the LoRA file is the committed kohya one).
fn families() -> Vec<Options> {
    let lora = common::root().join("models/loras/kohya.safetensors");
    [
        "[attention]\nmode = \"flash\"\n[tome]\nratio = 0.5\n[hooks]\nkinds = [\"capture\", \"p2p\", \"masactrl\"]\n".to_string(),
        "target = \"cuda\"\nprecision = \"fp16\"\n[attention]\nmode = \"flash\"\n".to_string(),
        "target = \"cpu\"\nfix_shapes = \"batch=2,height=16,width=16,sequence=8\"\n[attention]\nmode = \"onnx\"\n".to_string(),
        "[tome]\nmode = \"todo\"\n".to_string(),
        format!("[[lora]]\nfile = \"{}\"\nscale = 0.8\n", lora.display()),
        "step_cache = \"deepcache\"\n".to_string(),
    ]
    .iter()
    .filter_map(|t| toml::from_str::<Options>(t).ok())
    .collect()
}

#[test]
fn fuzz_compile_with_each_pass_family() {
    let (m, base) = fixture();
    let families = families();
    assert_eq!(families.len(), 6, "every pass family parses");
    fuzz(
        "compile",
        |rng| {
            let mut case = vec![rng.below(families.len()) as u8];
            let mut g = m.clone();
            for _ in 0..1 + rng.below(3) {
                mutate(&mut g, rng);
            }
            case.extend(g.encode_to_vec());
            case
        },
        |case| {
            let Some((family, bytes)) = case.split_first() else {
                return;
            };
            let Some(mut model) = import_verified(bytes, &base) else {
                return;
            };
            let options = &families[*family as usize % families.len()];
            if let Ok(pm) = pipeline::build(options) {
                let _ = pm.run(&mut model, &mut PassCx { verify: true });
            }
        },
    );
}

/// A target whose reader takes a path: mutations of the `target` seeds, each written in turn
/// to one file named `name` in a temp folder and given to `read`.
fn fuzz_file(target: &str, name: &str, text: bool, read: impl Fn(&Path)) {
    let seeds = corpus(target);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    fuzz(
        target,
        |rng| bytes_case(rng, &seeds, text),
        |bytes| {
            std::fs::write(&path, bytes).unwrap();
            read(&path);
        },
    );
}

#[test]
fn fuzz_safetensors_lora_and_adapter() {
    fuzz_file("safetensors", "l.safetensors", false, |p| {
        let _ = lora_file::components(p);
        let _ = lora_file::read(p, 2, Component::Denoiser);
        let _ = safetensors_io::read_adapter(p);
    });
}

#[test]
fn fuzz_npy() {
    fuzz_file("npy", "t.npy", false, |p| drop(npy::read(p)));
}

#[test]
fn fuzz_recipe_and_controller_toml() {
    fuzz_file("toml", "r.toml", true, |p| {
        if let Ok(o) = Options::from_recipe(p) {
            let _ = pipeline::build(&o);
        }
        let _ = Controller::read(p);
    });
}
