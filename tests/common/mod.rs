//! Shared helpers for the end-to-end tests: fixtures, the CLI, independent proto checks.
#![allow(dead_code)]
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use attune_compiler::onnx::{self, ModelProto, TensorProto, tensor_proto::DataLocation};
use prost::Message;

mod lowering;
pub mod mutate;
#[allow(unused_imports)]
pub use lowering::*;

/// The committed tiny exports (see models/export/unets.py).
pub const FIXTURES: [&str; 9] = [
    "sd15_legacy",
    "sd15_dynamo",
    "sd2_legacy",
    "sdxl_legacy",
    "sd15_op14_legacy",
    "sd15_olive_legacy",
    "sd15_classic_legacy",
    "sd15_fp16_legacy",
    "noattn_legacy",
];

/// The diffusion-transformer fixtures (`models/export/dits.py`).
pub const DITS: [&str; 6] = [
    "pixart_legacy",
    "sd3_legacy",
    "sd3_dynamo",
    "sd35_legacy",
    "sd35_dynamo",
    "flux_dynamo",
];

/// `--dim` flags for the fixtures' test size (batch 2, 16x16 latents, 77 tokens).
pub const DIMS: [&str; 8] = [
    "--dim",
    "batch=2",
    "--dim",
    "height=16",
    "--dim",
    "width=16",
    "--dim",
    "sequence=77",
];

/// A model of `graph` as torch's legacy exporter writes one (IR 8, opset 17).
pub fn model_of(graph: onnx::GraphProto) -> ModelProto {
    ModelProto {
        ir_version: 8,
        producer_name: "pytorch".into(),
        opset_import: vec![onnx::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

/// Writes an f32 `.safetensors` file of (key, shape, values) tensors as `DIR/NAME.safetensors`.
pub fn write_f32_safetensors(
    dir: &Path,
    name: &str,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> PathBuf {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<_> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), view.unwrap())
        })
        .collect();
    let path = dir.join(format!("{name}.safetensors"));
    fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("models").join(name).join("unet.onnx")
}

pub fn spec(name: &str) -> serde_json::Value {
    let text = fs::read_to_string(root().join("models").join(name).join("spec.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Two runs of one function through different graphs: compiled graphs are canonicalised
/// (constants folded, CSE), so ONNX Runtime's own fusions find more and round differently
/// (bit-identical with its optimizer at the basic level, which `canonical` tests check).
/// The usual CUDA deployment's flags.
#[allow(dead_code)] // not every test binary compiles for CUDA
pub const CUDA_FP16_FLASH: [&str; 6] = [
    "--target",
    "cuda",
    "--precision",
    "fp16",
    "--attention",
    "flash",
];

pub const SAME_FUNCTION: f64 = 1e-6;

/// `got` computes what `want` does, within [`SAME_FUNCTION`] (rel L2).
pub fn assert_same_function(want: &attune_runtime::HostTensor, got: &attune_runtime::HostTensor) {
    let c = attune_runtime::compare::compare("out", want, got).unwrap();
    assert!(c.rel_l2 <= SAME_FUNCTION, "{c:?}");
}

/// The most memory one run of the binary may take in the tests (the suite stays under 2 GB).
pub const MAX_RSS_BYTES: u64 = 2 << 30;

/// Runs the attune binary (verifying the graph after every pass), and fails the test if the
/// run peaked over [`MAX_RSS_BYTES`] of resident memory.
pub fn attune(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_attune"));
    cmd.args(args);
    run_measured(&mut cmd)
}

/// Runs `cmd` to completion with its output captured; asserts its peak RSS is under
/// [`MAX_RSS_BYTES`] (read from the kernel's accounting of the child, `wait4`).
#[allow(clippy::zombie_processes)] // reaped by wait4, which std does not see
pub fn run_measured(cmd: &mut Command) -> Output {
    use std::io::Read as _;
    let mut child = cmd
        .env("ATTUNE_VERIFY", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run attune");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut e = Vec::new();
        err.read_to_end(&mut e).map(|_| e)
    });
    let mut stdout = Vec::new();
    out.read_to_end(&mut stdout).unwrap();
    let stderr = reader.join().unwrap().unwrap();
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let peak = usage.ru_maxrss as u64 * 1024;
    assert!(
        peak < MAX_RSS_BYTES,
        "{:?} peaked at {} MiB of resident memory (limit {} MiB)",
        cmd,
        peak >> 20,
        MAX_RSS_BYTES >> 20
    );
    use std::os::unix::process::ExitStatusExt as _;
    Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout,
        stderr,
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Copies a fixture folder (model, data, spec) into `dir`; returns the model path there.
pub fn copy_fixture(name: &str, dir: &Path) -> PathBuf {
    let src = root().join("models").join(name);
    for f in ["unet.onnx", "unet.onnx.data"] {
        fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    dir.join("unet.onnx")
}

/// Decodes a model with every tensor's data moved into `raw_data` (external data read here,
/// independently of the compiler's own loader) so two models compare field for field.
pub fn normalized(path: &Path) -> ModelProto {
    let mut m = ModelProto::decode(fs::read(path).unwrap().as_slice()).unwrap();
    let dir = path.parent().unwrap();
    let g = m.graph.as_mut().unwrap();
    for t in &mut g.initializer {
        inline_tensor(t, dir);
    }
    m
}

fn inline_tensor(t: &mut TensorProto, dir: &Path) {
    if t.data_location == DataLocation::External as i32 {
        let get = |k: &str| onnx::metadata(&t.external_data, k).map(str::to_string);
        let mut f = fs::File::open(dir.join(get("location").unwrap())).unwrap();
        let offset: u64 = get("offset").map(|o| o.parse().unwrap()).unwrap_or(0);
        let len: usize = get("length").unwrap().parse().unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0; len];
        f.read_exact(&mut buf).unwrap();
        t.raw_data = buf.into();
        t.external_data.clear();
        t.data_location = DataLocation::Default as i32;
    }
}

/// Every file in a folder with its contents (to prove nothing changed or appeared).
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// `attune compile MODEL -o OUT FLAGS...`, succeeding or not.
pub fn compile_to(model: &Path, out: &Path, flags: &[&str]) -> std::process::Output {
    let mut args = vec![
        "compile",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(flags);
    attune(&args)
}

/// `attune compile MODEL -o DIR/cN.onnx FLAGS...`, which must succeed; (output, stdout).
pub fn compile_into(dir: &Path, model: &Path, flags: &[&str]) -> (PathBuf, String) {
    let out = dir.join(format!("c{}.onnx", fs::read_dir(dir).unwrap().count()));
    let o = compile_to(model, &out, flags);
    assert!(
        o.status.success(),
        "{flags:?}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    (out, stdout(&o))
}

/// `attune run` on ORT CPU with the model's inputs saved in `inputs` (`<name>.npy`) and
/// `extra` arguments; every output by name.
pub fn run_outputs(
    model: &Path,
    inputs: &Path,
    extra: &[String],
) -> Vec<(String, attune_runtime::HostTensor)> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = vec![
        "run".to_string(),
        model.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    // Every input of the model saved there (SD3's pooled text embedding too).
    let m = attune_compiler::import::read(model).unwrap();
    let names: Vec<String> = m
        .graph
        .inputs
        .iter()
        .map(|io| io.info.name.clone())
        .collect();
    let mut files: Vec<PathBuf> = names
        .iter()
        .map(|n| inputs.join(format!("{n}.npy")))
        .filter(|p| p.exists())
        .collect();
    files.sort();
    for f in files {
        let name = f.file_stem().unwrap().to_str().unwrap().to_string();
        args.push(format!("--input={name}={}", f.display()));
    }
    args.extend(extra.iter().cloned());
    let o = attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let mut outs: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                attune_runtime::npy::read(&p).unwrap(),
            )
        })
        .collect();
    outs.sort_by(|a, b| a.0.cmp(&b.0));
    outs
}

/// The `out_sample` output of [`run_outputs`].
pub fn run_unet(model: &Path, inputs: &Path, extra: &[String]) -> attune_runtime::HostTensor {
    run_outputs(model, inputs, extra)
        .into_iter()
        .find(|(n, _)| n == "out_sample")
        .expect("out_sample")
        .1
}

/// An f32 `.npy` file (a reference), or a panic naming it.
pub fn read_f32(path: &Path) -> ndarray::ArrayD<f32> {
    match attune_runtime::npy::read(path).unwrap() {
        attune_runtime::HostTensor::F32(a) => a,
        other => panic!("{}: {:?}", path.display(), other.dtype()),
    }
}

/// The largest elementwise difference of two arrays of one shape.
pub fn max_abs(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest difference, in 1/255 steps, between a written PNG and diffusers' float image
/// of it ([1, H, W, 3] or [H, W, 3] in [0, 1]); the shapes must agree.
pub fn worst_pixel(png: &Path, want: ndarray::ArrayViewD<f32>) -> f32 {
    let got = attune_runtime::image::read_png(png).unwrap();
    let shape = want.shape();
    assert_eq!(
        [got.height, got.width, 3],
        shape[shape.len() - 3..],
        "{}",
        png.display()
    );
    got.pixels
        .iter()
        .zip(want.iter())
        .map(|(&g, &w)| (f32::from(g) - w * 255.0).abs())
        .fold(0.0, f32::max)
}

/// A command that failed cleanly (exit 2, no panic), saying each of `expected`.
pub fn assert_refused(args: &[&str], expected: &[&str]) {
    let o = attune(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for e in expected {
        assert!(err.contains(e), "expected '{e}' in: {err}");
    }
}

/// `attune generate DIR` of PROMPT from `latents` (4 DDIM steps, CFG 7.5 unless `extra` says
/// otherwise) writing OUT.png and OUT.npy; the final latents and the PNG.
pub fn generate_from(
    dir: &Path,
    prompt: &str,
    latents: &Path,
    out: &Path,
    extra: &[String],
) -> (ndarray::ArrayD<f32>, PathBuf) {
    let (png, saved) = (out.with_extension("png"), out.with_extension("npy"));
    let mut args: Vec<String> = [
        "generate",
        dir.to_str().unwrap(),
        "--prompt",
        prompt,
        "--steps",
        "4",
        "--scheduler",
        "ddim",
        "--latents",
        latents.to_str().unwrap(),
        "--save-latents",
        saved.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--quiet",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().cloned());
    let o = attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    (read_f32(&saved), png)
}

/// Final latents within `tol` (relative L2) of `refs/final_latents.npy` and the PNG within
/// 2/255 of `refs/image.npy` (diffusers' image).
pub fn assert_like_reference(
    refs: &Path,
    latents: ndarray::ArrayD<f32>,
    png: &Path,
    tol: f64,
    what: &str,
) {
    use attune_runtime::HostTensor;
    let want = read_f32(&refs.join("final_latents.npy"));
    let c = attune_runtime::compare::compare(
        "final latents",
        &HostTensor::F32(want),
        &HostTensor::F32(latents),
    )
    .unwrap();
    assert!(c.rel_l2 <= tol, "{what}: {c:?}");
    let image = read_f32(&refs.join("image.npy"));
    let worst = worst_pixel(png, image.index_axis(ndarray::Axis(0), 0));
    assert!(worst <= 2.0, "{what}: a pixel {worst}/255 off");
}

/// A deterministic f32 test input of `shape`: sin(k·i) for a mix i of the indices.
pub fn wave(shape: &[usize], k: f32) -> attune_runtime::HostTensor {
    attune_runtime::HostTensor::F32(ndarray::ArrayD::from_shape_fn(
        ndarray::IxDyn(shape),
        |ix| {
            let i: usize = (0..shape.len()).map(|a| (a + 3) * ix[a]).sum();
            (i as f32 * k).sin()
        },
    ))
}

/// Two f32 arrays within `tol` relative L2 of each other.
pub fn assert_rel_l2(want: ndarray::ArrayD<f32>, got: ndarray::ArrayD<f32>, tol: f64, what: &str) {
    use attune_runtime::HostTensor;
    let c = attune_runtime::compare::compare(what, &HostTensor::F32(want), &HostTensor::F32(got))
        .unwrap();
    assert!(c.rel_l2 <= tol, "{what}: {c:?}");
}

/// `attune sample` of `unet` with a models/sample case's prompts and latents (and pooled text
/// where the case has it), `steps` steps at `guidance`.
pub fn sample_case(
    unet: &Path,
    case: &str,
    out: &Path,
    steps: usize,
    guidance: &str,
    extra: &[&str],
) -> Output {
    let dir = root().join("models/sample").join(case);
    let file = |f: &str| dir.join(f).display().to_string();
    let mut args: Vec<String> = vec!["sample".into(), "--unet".into(), unet.display().to_string()];
    let inputs = [
        ("--cond", "cond.npy"),
        ("--uncond", "uncond.npy"),
        ("--latents", "latents.npy"),
        ("--pooled-cond", "pooled_cond.npy"),
        ("--pooled-uncond", "pooled_uncond.npy"),
    ];
    for (flag, f) in inputs {
        if dir.join(f).exists() {
            args.extend([flag.to_string(), file(f)]);
        }
    }
    args.extend([
        "--steps".into(),
        steps.to_string(),
        "--guidance".into(),
        guidance.into(),
    ]);
    args.extend(["--out".into(), out.display().to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    attune(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Exit 2 (an error attune reports, not a crash), the message naming every one of `expected`.
pub fn assert_clean_error(o: &Output, expected: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for e in expected {
        assert!(err.contains(e), "expected '{e}' in: {err}");
    }
}

/// `--scheduler ddim` for a pipeline folder whose config is PNDM's: models/export/pipelines.py
/// made its references with `DDIMScheduler.from_config` of that config (attune runs it as PLMS).
pub fn reference_scheduler(folder: &Path) -> Vec<&'static str> {
    let config = folder.join("scheduler/scheduler_config.json");
    let pndm = fs::read_to_string(config).is_ok_and(|t| t.contains("\"PNDMScheduler\""));
    if pndm {
        vec!["--scheduler", "ddim"]
    } else {
        vec![]
    }
}
