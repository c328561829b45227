//! Running fixtures: ONNX Runtime CPU against tract and against onnxruntime's Python API,
//! re-exported models, input errors, CUDA real-or-error, and the run/bench/diff/demo CLI.
mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use attune_compiler::export::{self, ExportOptions, WeightsMode};
use attune_compiler::import;
use attune_compiler::onnx::{self, tensor_shape_proto::dimension::Value as DimValue};
use attune_runtime::compare::compare;
use attune_runtime::inputs::{self, Dims};
use attune_runtime::ort_backend::OrtOptions;
use attune_runtime::{Backend, Ep, HostTensor, npy};
use common::*;
use prost::Message;

/// The fixture's committed inputs, in the model's order.
fn fixture_inputs(name: &str) -> Vec<(String, HostTensor)> {
    let model = import::read(&fixture(name)).unwrap();
    let dir = root().join("models").join(name).join("inputs");
    inputs::input_specs(&model)
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                npy::read(&dir.join(format!("{}.npy", s.name))).unwrap(),
            )
        })
        .collect()
}

fn reference(name: &str) -> HostTensor {
    npy::read(&root().join("models").join(name).join("ref/out_sample.npy")).unwrap()
}

fn run(model: &Path, ep: Ep, inputs: &[(String, HostTensor)]) -> Vec<(String, HostTensor)> {
    Backend::open(model, ep, &OrtOptions::default())
        .unwrap()
        .run(inputs)
        .unwrap()
}

fn input_args(name: &str) -> Vec<String> {
    let dir = root().join("models").join(name).join("inputs");
    fixture_inputs(name)
        .iter()
        .map(|(n, _)| format!("--input={n}={}", dir.join(format!("{n}.npy")).display()))
        .collect()
}

#[test]
fn every_fixture_matches_onnxruntime_python_and_tract() {
    for name in FIXTURES {
        let inputs = fixture_inputs(name);
        let ort = run(&fixture(name), Ep::Cpu, &inputs);
        assert_eq!(ort[0].0, "out_sample");
        // The references were computed on another CPU: ONNX Runtime's kernels differ by
        // instruction set (8e-7 in f32, one f16 rounding: 5e-4, measured on an AMD EPYC).
        let tol = if name.contains("fp16") { 2e-3 } else { 2e-6 };
        let vs_python = compare("out_sample", &reference(name), &ort[0].1).unwrap();
        assert!(
            vs_python.rel_l2 <= tol,
            "{name}: ORT CPU vs onnxruntime Python: {vs_python:?}"
        );
        let tract = Backend::open(&fixture(name), Ep::Tract, &OrtOptions::default())
            .and_then(|mut b| b.run(&inputs));
        if name == "sd15_fp16_legacy" {
            // tract 0.23 cannot type an f16 Gemm: a clear error, not a wrong answer. When a
            // tract release fixes it, this fails and the fixture joins the comparison.
            let err = tract
                .expect_err("tract ran the f16 model; compare it like the others now")
                .to_string();
            assert!(err.contains("Gemm") && err.contains("F16"), "{err}");
            continue;
        }
        let vs_tract = compare("out_sample", &ort[0].1, &tract.unwrap()[0].1).unwrap();
        assert!(
            vs_tract.rel_l2 <= 1e-5,
            "{name}: ORT CPU vs tract: {vs_tract:?}"
        );
    }
}

#[test]
fn re_exported_models_run_with_identical_outputs() {
    for name in FIXTURES {
        let inputs = fixture_inputs(name);
        let original = run(&fixture(name), Ep::Cpu, &inputs);
        let model = import::read(&fixture(name)).unwrap();
        for (mode, opts) in [
            ("copy", ExportOptions::default()),
            (
                "link",
                ExportOptions {
                    weights: WeightsMode::Link,
                    inline: false,
                },
            ),
            (
                "inline",
                ExportOptions {
                    inline: true,
                    ..Default::default()
                },
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("re.onnx");
            export::write(&model, &out, &opts).unwrap();
            let got = run(&out, Ep::Cpu, &inputs);
            assert_eq!(
                got[0].1, original[0].1,
                "{name} ({mode}): outputs differ after re-export"
            );
        }
    }
}

#[test]
fn cli_run_writes_what_onnxruntime_python_computed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = vec![
        "run".to_string(),
        fixture("sd15_dynamo").display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(input_args("sd15_dynamo"));
    let o = attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let got = npy::read(&out.join("out_sample.npy")).unwrap();
    let c = compare("out_sample", &reference("sd15_dynamo"), &got).unwrap();
    assert!(c.rel_l2 <= 1e-6, "{c:?}");
}

#[test]
fn random_inputs_follow_dims_and_seed() {
    let model = import::read(&fixture("sd15_dynamo")).unwrap();
    let specs = inputs::input_specs(&model);
    // The dynamo export names its spatial dims `8*height`: --dim height=2 makes them 16.
    let dims = Dims::parse(&[
        "batch=2".into(),
        "height=2".into(),
        "width=3".into(),
        "sequence=5".into(),
    ])
    .unwrap();
    let a = inputs::prepare(&specs, vec![], &dims, 1).unwrap();
    assert_eq!(a[0].1.shape(), [2, 4, 16, 24]);
    assert_eq!(a[2].1.shape(), [2, 5, 32]);
    assert_eq!(a, inputs::prepare(&specs, vec![], &dims, 1).unwrap());
    assert_ne!(a, inputs::prepare(&specs, vec![], &dims, 2).unwrap());
    // A missing dim names the flag to give.
    let err = inputs::prepare(
        &specs,
        vec![],
        &Dims::parse(&["batch=2".into()]).unwrap(),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--dim height=N") && err.contains("input 'sample'"),
        "{err}"
    );
    // Given inputs fix their symbols for the random ones.
    let sample = a[0].clone();
    let b = inputs::prepare(
        &specs,
        vec![sample],
        &Dims::parse(&["sequence=7".into()]).unwrap(),
        1,
    )
    .unwrap();
    assert_eq!(b[1].1.shape(), [2]);
    assert_eq!(b[2].1.shape(), [2, 7, 32]);
}

#[test]
fn bad_inputs_are_clear_errors_listing_the_model_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let inputs_dir = root().join("models/sd15_legacy/inputs");
    let wrong_dtype = dir.path().join("i64.npy");
    npy::write(
        &wrong_dtype,
        &HostTensor::I64(ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 4, 16, 16]))),
    )
    .unwrap();
    let wrong_rank = dir.path().join("rank.npy");
    npy::write(
        &wrong_rank,
        &HostTensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[4, 16, 16]))),
    )
    .unwrap();
    let wrong_channels = dir.path().join("ch.npy");
    npy::write(
        &wrong_channels,
        &HostTensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 3, 16, 16]))),
    )
    .unwrap();
    let corrupt = dir.path().join("corrupt.npy");
    fs::write(
        &corrupt,
        &fs::read(inputs_dir.join("sample.npy")).unwrap()[..100],
    )
    .unwrap();
    let cases = [
        (
            format!("nosuch={}", inputs_dir.join("sample.npy").display()),
            "the model has no input 'nosuch'",
        ),
        (
            format!("sample={}", wrong_dtype.display()),
            "input 'sample': got i64 data, the model declares f32",
        ),
        (
            format!("sample={}", wrong_rank.display()),
            "input 'sample': got rank 3",
        ),
        (
            format!("sample={}", wrong_channels.display()),
            "input 'sample': dim 1 is 3, the model declares 4",
        ),
        (
            format!("sample={}", corrupt.display()),
            "not a valid .npy file",
        ),
        (
            format!("sample={}", dir.path().join("missing.npy").display()),
            "missing.npy",
        ),
    ];
    let model = fixture("sd15_legacy");
    for (input, expected) in cases {
        let out = dir.path().join("out");
        let mut args = vec![
            "run",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--input",
            &input,
        ];
        args.extend(DIMS);
        let o = attune(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{input}: {err}");
        assert!(err.contains(expected), "{input}: {err}");
        if !expected.contains(".npy") {
            assert!(
                err.contains("sample f32[batch,4,height,width]"),
                "error must list the inputs: {err}"
            );
        }
        assert!(!out.exists(), "{input}: output written");
    }
}

#[test]
fn onnxruntime_failures_are_reported_once_as_attune_errors() {
    // 15x15 latents cannot pass the UNet's down/up sampling: ORT fails inside a Concat. Its
    // own log line of that failure (an ANSI-coloured `[E:onnxruntime:...]`) must not precede
    // attune's error, which already carries ORT's message.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = fixture("sd15_legacy");
    let o = attune(&[
        "run",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dim",
        "batch=2",
        "--dim",
        "height=15",
        "--dim",
        "width=15",
        "--dim",
        "sequence=7",
    ]);
    assert_clean_error(&o, &["error: running", "/unet/up_blocks.2/Concat"]);
    let err = stderr(&o);
    assert!(!err.contains("onnxruntime:"), "ORT's log leaked: {err}");
    assert_eq!(err.matches("Concat node").count(), 1, "{err}");
    assert!(!out.exists(), "output written");
}

#[test]
fn cuda_is_real_or_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = vec![
        "run".to_string(),
        fixture("sd15_legacy").display().to_string(),
        "--ep".into(),
        "cuda".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(input_args("sd15_legacy"));
    let o = attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // SAFETY: probing for the driver library only.
    let has_driver = unsafe { libloading::Library::new("libcuda.so.1") }.is_ok();
    if has_driver {
        // A GPU machine: it must have run on CUDA and said so.
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("nodes on CUDAExecutionProvider"),
            "{}",
            stdout(&o)
        );
    } else {
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("libcuda.so.1") && err.contains("no usable NVIDIA GPU"),
            "{err}"
        );
        assert!(
            !out.exists(),
            "nothing may be written when CUDA is unavailable"
        );
    }
}

#[test]
fn numeric_diff_passes_identical_models_and_fails_changed_ones() {
    let dir = tempfile::tempdir().unwrap();
    // A copy with one weight scaled: same structure, different numbers.
    let mut model = import::read(&fixture("sd15_legacy")).unwrap();
    let name = "unet.conv_out.weight";
    let t = model
        .graph
        .initializer(model.graph.value_id(name).unwrap())
        .unwrap()
        .clone();
    let scaled: Vec<u8> = t
        .bytes()
        .unwrap()
        .chunks(4)
        .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 1.5).to_le_bytes())
        .collect();
    model
        .graph
        .set_initializer(attune_compiler::weights::Tensor::new(
            name,
            attune_compiler::onnx::DataType::Float,
            t.dims().to_vec(),
            scaled.into(),
        ));
    let changed = dir.path().join("changed.onnx");
    export::write(&model, &changed, &ExportOptions::default()).unwrap();
    let a = fixture("sd15_legacy");
    let mut same = vec![
        "diff",
        a.to_str().unwrap(),
        a.to_str().unwrap(),
        "--numeric",
    ];
    same.extend(DIMS);
    let o = attune(&same);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("no structural differences"));
    let mut differ = vec![
        "diff",
        a.to_str().unwrap(),
        changed.to_str().unwrap(),
        "--numeric",
        "--ep",
        "tract",
    ];
    differ.extend(DIMS);
    let o = attune(&differ);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("unet.conv_out.weight (data)") && text.contains("NO"),
        "{text}"
    );
}

/// `--dim` flags for a small run of the fixtures (batch 1, 8x8 latents, 4 tokens).
const SMALL_DIMS: [&str; 8] = [
    "--dim",
    "batch=1",
    "--dim",
    "height=8",
    "--dim",
    "width=8",
    "--dim",
    "sequence=4",
];

#[test]
fn bench_and_demo_commands_run() {
    let a = fixture("sd15_legacy");
    let dims = SMALL_DIMS;
    let mut args = vec![
        "bench",
        a.to_str().unwrap(),
        "--vs",
        a.to_str().unwrap(),
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
    ];
    args.extend(dims);
    let o = attune(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["models"].as_array().unwrap().len(), 2);
    assert_eq!(v["models"][0]["latency"]["iters"], 3);
    assert!(v["ratios"][0].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_kb"].as_u64().unwrap() > 0);
    // The same model on the same inputs: its output agrees with A's exactly.
    assert!(v["models"][0]["rel_l2_vs_a"].is_null());
    assert_eq!(v["models"][1]["rel_l2_vs_a"].as_f64(), Some(0.0));

    // --profile: ORT traces per model, time per op type side by side; tract has no profiler.
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("prof");
    let mut args = vec![
        "bench",
        a.to_str().unwrap(),
        "--iters",
        "1",
        "--warmup",
        "1",
        "--profile",
        profile.to_str().unwrap(),
        "--profile-runs",
        "2",
    ];
    args.extend(dims);
    let o = attune(&args);
    let text = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        text.contains("time per op type") && text.contains("Conv (CPU)"),
        "{text}"
    );
    let traces = fs::read_dir(&profile).unwrap().count();
    assert_eq!(traces, 1, "one trace for one model");
    args.extend(["--ep", "tract"]);
    let o = attune(&args);
    assert!(
        !o.status.success() && stderr(&o).contains("tract: no profiler"),
        "{}",
        stderr(&o)
    );

    let o = std::process::Command::new(env!("CARGO_BIN_EXE_attune"))
        .args(["demo", "--iters", "2"])
        .current_dir(root())
        .output()
        .unwrap();
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    for section in [
        "== compile models/pipelines/sd15_tiny",
        "== what the passes changed, by component",
        "== generate",
        "== time per image",
    ] {
        assert!(text.contains(section), "{text}");
    }
    // The compiled pipeline's image is diffusers' within 2/255 (the reference's noise).
    let line = text
        .lines()
        .find(|l| l.starts_with("against diffusers' image"))
        .expect("a comparison with the reference");
    let worst: Vec<f32> = line
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(',').strip_suffix("/255")?.parse().ok())
        .collect();
    assert_eq!(worst.len(), 2, "{line}");
    assert!(worst.iter().all(|w| *w <= 2.0), "{line}");
    assert!(text.contains("MultiHeadAttention"), "{text}");
}

/// Writes a model of Identity nodes: f32 `inputs` (name, dims), `(from, to)` per node.
fn identity_model(path: &Path, inputs: &[(&str, Vec<DimValue>)], nodes: &[(&str, &str)]) {
    let graph = onnx::GraphProto {
        name: "g".into(),
        input: inputs
            .iter()
            .map(|(n, dims)| onnx::tensor_info(n, onnx::DataType::Float, Some(dims.clone())))
            .collect(),
        output: nodes
            .iter()
            .map(|(_, to)| onnx::tensor_info(to, onnx::DataType::Float, None))
            .collect(),
        node: nodes
            .iter()
            .map(|(from, to)| onnx::NodeProto {
                input: vec![from.to_string()],
                output: vec![to.to_string()],
                name: format!("/{to}/Identity"),
                op_type: "Identity".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let model = model_of(graph);
    fs::write(path, model.encode_to_vec()).unwrap();
}

/// A .npy file of `header`'s shape and element type with no data after the header.
fn npy_without_data(path: &Path, descr: &str, shape: &str) {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    header.push_str(&" ".repeat((64 - (10 + header.len() + 1) % 64) % 64));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    fs::write(path, bytes).unwrap();
}

#[test]
fn input_files_with_overflowing_shapes_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("sd15_legacy");
    // 2^62 * 4 elements wrap to 0 (matching the empty data) without checked arithmetic.
    let npy_file = dir.path().join("overflow.npy");
    npy_without_data(&npy_file, "<f4", "(4611686018427387904, 4, 1, 1)");
    // No elements, but a dim ndarray cannot index.
    let st_file = dir.path().join("zero_huge.safetensors");
    let header =
        r#"{"sample":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    fs::write(&st_file, bytes).unwrap();
    let out = dir.path().join("out");
    let npy_arg = format!("sample={}", npy_file.display());
    for (input, tensor) in [
        (npy_arg.as_str(), ""),
        (st_file.to_str().unwrap(), "tensor 'sample'"),
    ] {
        let mut args = vec![
            "run",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(["--input", input]);
        args.extend(DIMS);
        let file = input.trim_start_matches("sample=");
        assert_clean_error(
            &attune(&args),
            &[file, tensor, "too large to hold in memory"],
        );
    }
    assert!(!out.exists());
}

#[test]
fn unrepresentable_dim_sizes_are_errors_naming_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // 2^32 x 2^32 latents: the element count overflows isize (ndarray's "Shape too large").
    let unet = fixture("sd15_legacy");
    let mut args = vec![
        "run",
        unet.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(["--dim", "batch=1", "--dim", "sequence=77"]);
    args.extend(["--dim", "height=4294967296", "--dim", "width=4294967296"]);
    assert_clean_error(
        &attune(&args),
        &[
            "input 'sample'",
            "[1, 4, 4294967296, 4294967296]",
            "more than 4 GiB",
        ],
    );
    // The same through `sample --height/--width`.
    let s = root().join("models/controller/sample");
    let (cond, uncond) = (s.join("cond.npy"), s.join("uncond.npy"));
    let o = attune(&[
        "sample",
        "--unet",
        unet.to_str().unwrap(),
        "--cond",
        cond.to_str().unwrap(),
        "--uncond",
        uncond.to_str().unwrap(),
        "--height",
        "4294967296",
        "--width",
        "4294967296",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_error(
        &o,
        &["--height 4294967296", "input 'sample'", "more than 4 GiB"],
    );
    // A dim expression that comes out negative, a huge and a negative fixed dim in the model.
    let cases = [
        (
            DimValue::DimParam("s0-5".into()),
            "dim 's0-5' comes to -3; sizes cannot be negative",
        ),
        (DimValue::DimValue(1 << 62), "[4611686018427387904, 4]"),
        // A negative declared size: refused by the verifier (the ort crate panicked on it).
        (DimValue::DimValue(-5), "declares a negative dim (-5)"),
    ];
    for (dim, expected) in cases {
        let model = dir.path().join("m.onnx");
        identity_model(
            &model,
            &[("x", vec![dim, DimValue::DimValue(4)])],
            &[("x", "y")],
        );
        let o = attune(&[
            "run",
            model.to_str().unwrap(),
            "--dim",
            "s0=2",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_clean_error(&o, &["input 'x'", expected]);
    }
    assert!(!out.exists());
}

#[test]
fn deeply_nested_dim_expressions_are_errors_not_stack_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("deep.onnx");
    let deep = format!("{}a{}", "(".repeat(100_000), ")".repeat(100_000));
    identity_model(
        &model,
        &[("x", vec![DimValue::DimParam(deep)])],
        &[("x", "y")],
    );
    let out = dir.path().join("out");
    let o = attune(&[
        "run",
        model.to_str().unwrap(),
        "--dim",
        "a=1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_error(&o, &["input 'x'", "nests parentheses more than 64 deep"]);
    assert!(
        !stderr(&o).contains(&"(".repeat(100)),
        "the expression is abbreviated"
    );
}

#[test]
fn sample_rejects_empty_or_mismatched_prompts_naming_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, shape: &[usize]| {
        let path = dir.path().join(name);
        npy::write(
            &path,
            &HostTensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(shape))),
        )
        .unwrap();
        path.display().to_string()
    };
    let (cond0, uncond1) = (
        write("cond0.npy", &[0, 77, 32]),
        write("uncond1.npy", &[1, 77, 32]),
    );
    let (cond2, uncond5) = (
        write("cond2.npy", &[2, 77, 32]),
        write("uncond5.npy", &[1, 5, 32]),
    );
    let unet = fixture("sd15_legacy");
    let out = dir.path().join("out");
    let cases = [
        (
            &cond0,
            &uncond1,
            vec![format!("--cond {cond0}"), "is empty".into()],
        ),
        (
            &cond2,
            &uncond5,
            vec![format!("--uncond {uncond5}"), format!("--cond {cond2}")],
        ),
    ];
    for (cond, uncond, expected) in cases {
        let o = attune(&[
            "sample",
            "--unet",
            unet.to_str().unwrap(),
            "--cond",
            cond,
            "--uncond",
            uncond,
            "--ep",
            "tract",
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_clean_error(&o, &expected.iter().map(String::as_str).collect::<Vec<_>>());
    }
    assert!(!out.exists());
}

#[test]
fn sample_rejects_malformed_attention_outputs_and_step_counts() {
    let dir = tempfile::tempdir().unwrap();
    // A "UNet" whose captured map `attn.bad` is the rank-1 timestep (--save-maps indexed it).
    let unet = dir.path().join("unet.onnx");
    let sym = |s: &str| DimValue::DimParam(s.into());
    identity_model(
        &unet,
        &[
            (
                "sample",
                vec![
                    sym("batch"),
                    DimValue::DimValue(4),
                    sym("height"),
                    sym("width"),
                ],
            ),
            ("timestep", vec![sym("batch")]),
            (
                "encoder_hidden_states",
                vec![sym("batch"), sym("sequence"), DimValue::DimValue(32)],
            ),
        ],
        &[("sample", "out_sample"), ("timestep", "attn.bad")],
    );
    let cond = dir.path().join("cond.npy");
    npy::write(
        &cond,
        &HostTensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 4, 32]))),
    )
    .unwrap();
    let out = dir.path().join("out");
    let args = |steps: &'static str| {
        vec![
            "sample".to_string(),
            format!("--unet={}", unet.display()),
            format!("--cond={}", cond.display()),
            format!("--uncond={}", cond.display()),
            "--height=8".into(),
            "--width=8".into(),
            "--ep=tract".into(),
            format!("--steps={steps}"),
            "--save-maps=0".into(),
            format!("--out={}", out.display()),
        ]
    };
    let run = |args: Vec<String>| attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_clean_error(
        &run(args("1")),
        &["output 'attn.bad' is [2], expected attention maps [2, query tokens, text tokens]"],
    );
    // A step count whose controller schedule (steps + 1 rows) would overflow.
    let controller = dir.path().join("c.toml");
    fs::write(&controller, "[local_blend]\nwords = [[0]]\n").unwrap();
    let mut huge = args("18446744073709551615");
    huge.push(format!("--controller={}", controller.display()));
    assert_clean_error(
        &run(huge),
        &["--steps 18446744073709551615: must be within 1..=1000"],
    );
    assert!(!out.exists());
}

/// 1..=6 as f32 [2, 3].
fn one_to_six() -> HostTensor {
    HostTensor::F32(
        ndarray::ArrayD::from_shape_vec(
            ndarray::IxDyn(&[2, 3]),
            (1..=6).map(|v| v as f32).collect(),
        )
        .unwrap(),
    )
}

#[test]
fn outputs_that_are_inputs_come_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // (passthru, chain) models with x of `dims`.
    let models = |tag: &str, dims: Vec<DimValue>| {
        // The graph output is the graph input itself: ORT hands the input's buffer back.
        let passthru = dir.path().join(format!("passthru_{tag}.onnx"));
        let graph = onnx::GraphProto {
            name: "g".into(),
            input: vec![onnx::tensor_info(
                "x",
                onnx::DataType::Float,
                Some(dims.clone()),
            )],
            output: vec![onnx::tensor_info(
                "x",
                onnx::DataType::Float,
                Some(dims.clone()),
            )],
            ..Default::default()
        };
        fs::write(&passthru, model_of(graph).encode_to_vec()).unwrap();
        // An Identity chain returning the input (ORT may alias Identity's output to its input).
        let chain = dir.path().join(format!("chain_{tag}.onnx"));
        identity_model(&chain, &[("x", dims)], &[("x", "a"), ("a", "b")]);
        [passthru, chain]
    };
    let dynamic = models(
        "dynamic",
        vec![DimValue::DimParam("n".into()), DimValue::DimValue(3)],
    );
    // Runs in fixed buffers (IoBinding, as CUDA graphs run) need fixed sizes.
    let fixed = models("fixed", vec![DimValue::DimValue(2), DimValue::DimValue(3)]);
    let x = one_to_six();
    let inputs = vec![("x".to_string(), x.clone())];
    let cases = dynamic
        .iter()
        .map(|m| (m, false))
        .chain(fixed.iter().flat_map(|m| [(m, false), (m, true)]));
    for (model, bind_io) in cases {
        let opts = OrtOptions {
            bind_io,
            ..OrtOptions::default()
        };
        let mut backend = Backend::open(model, Ep::Cpu, &opts).unwrap();
        // Twice: the IoBinding path reuses its buffers from the first run.
        for _ in 0..2 {
            let outputs = backend.run(&inputs).unwrap();
            assert!(!outputs.is_empty());
            for (name, t) in &outputs {
                assert_eq!(
                    t,
                    &x,
                    "{} output '{name}' (bind_io {bind_io})",
                    model.display()
                );
            }
        }
        let outputs = run(model, Ep::Tract, &inputs);
        assert!(
            outputs.iter().all(|(_, t)| t == &x),
            "tract {}",
            model.display()
        );
    }
    let passthru = &dynamic[0];
    // Through the CLI, as the audit saw it.
    let npy_in = dir.path().join("x.npy");
    npy::write(&npy_in, &x).unwrap();
    let out = dir.path().join("out");
    let o = attune(&[
        "run",
        passthru.to_str().unwrap(),
        &format!("--input=x={}", npy_in.display()),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(npy::read(&out.join("x.npy")).unwrap(), x);
}

/// `attune run` of a tiny model with `env` set, ORT_DYLIB_PATH unset unless given, and no
/// python on PATH (so a damaged cache cannot be fetched again from the network).
fn run_with_env(model: &Path, env: &[(&str, &Path)]) -> Output {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_attune"));
    cmd.args(["run", model.to_str().unwrap(), "--dim", "n=2", "--out"])
        .arg(out.path().join("o"))
        .env_remove("ORT_DYLIB_PATH")
        .env("PATH", "/nonexistent");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn damaged_onnxruntime_libraries_are_errors_naming_them_not_crashes() {
    use attune_runtime::provision::{self, Flavor, ORT_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("id.onnx");
    identity_model(
        &model,
        &[(
            "x",
            vec![DimValue::DimParam("n".into()), DimValue::DimValue(3)],
        )],
        &[("x", "y")],
    );
    let lib = provision::locate(Flavor::Cpu).unwrap();
    let lib_name = format!("libonnxruntime.so.{ORT_VERSION}");

    // ORT_DYLIB_PATH at a truncated copy: the user's file, checked, not loaded.
    let truncated = dir.path().join("truncated.so");
    fs::copy(&lib.path, &truncated).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let o = run_with_env(&model, &[("ORT_DYLIB_PATH", &truncated)]);
    assert_clean_error(&o, &["ORT_DYLIB_PATH", "truncated.so", "truncated"]);
    let o = run_with_env(&model, &[("ORT_DYLIB_PATH", &model)]);
    assert_clean_error(&o, &["id.onnx", "not an ELF shared library"]);

    if lib.origin == "ORT_DYLIB_PATH" {
        eprintln!("ORT_DYLIB_PATH is set: no cache to copy, cache checks skipped");
        return;
    }
    // Copies of the cache (never the real one), damaged in turn.
    let source = lib.path.parent().unwrap();
    let old_marker =
        format!("onnxruntime=={ORT_VERSION}\n{lib_name}\nlibonnxruntime_providers_shared.so\n");
    let fresh_cache = |name: &str| {
        let cache = dir.path().join(name);
        let flavor_dir = cache.join(source.file_name().unwrap());
        fs::create_dir_all(&flavor_dir).unwrap();
        for entry in fs::read_dir(source).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                fs::copy(&p, flavor_dir.join(p.file_name().unwrap())).unwrap();
            }
        }
        // The marker older versions wrote: names only (upgraded on first use).
        fs::write(flavor_dir.join(".verified"), &old_marker).unwrap();
        (cache.clone(), flavor_dir.join(&lib_name))
    };
    let truncate = |p: &Path| {
        let f = fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(4096).unwrap();
    };

    // An older marker and a truncated library: the ELF check catches it (SIGBUS before).
    let (cache, copy) = fresh_cache("old_marker");
    truncate(&copy);
    let o = run_with_env(&model, &[("ATTUNE_CACHE", &cache)]);
    assert_clean_error(&o, &[copy.to_str().unwrap(), "is truncated"]);

    // An intact copy runs and records size and hash; truncated after, its size gives it away.
    let (cache, copy) = fresh_cache("recorded");
    let o = run_with_env(&model, &[("ATTUNE_CACHE", &cache)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let marker = fs::read_to_string(copy.with_file_name(".verified")).unwrap();
    assert!(marker.contains(&format!("{lib_name} size=")) && marker.contains("sha256="));
    let o = run_with_env(&model, &[("ATTUNE_CACHE", &cache)]);
    assert!(o.status.success(), "{}", stderr(&o));
    truncate(&copy);
    let o = run_with_env(&model, &[("ATTUNE_CACHE", &cache)]);
    assert_clean_error(&o, &[copy.to_str().unwrap(), "4096 bytes, but was"]);

    // Same size, other bytes: the recorded hash gives it away.
    let (cache, copy) = fresh_cache("changed");
    let o = run_with_env(&model, &[("ATTUNE_CACHE", &cache)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut bytes = fs::read(&copy).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&copy, bytes).unwrap();
    let o = run_with_env(&model, &[("ATTUNE_CACHE", &cache)]);
    assert_clean_error(&o, &[copy.to_str().unwrap(), "sha256"]);
}

#[test]
fn bench_vs_converts_inputs_for_each_model_and_names_one_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let a = fixture("sd15_legacy");
    let (fp16, _) = compile_into(dir.path(), &a, &["--precision", "fp16"]);
    let (fixed, _) = compile_into(
        dir.path(),
        &a,
        &["--fix-shapes", "batch=1,height=8,width=8,sequence=4"],
    );
    let (other_size, _) = compile_into(
        dir.path(),
        &a,
        &["--fix-shapes", "batch=2,height=8,width=8,sequence=4"],
    );
    let dims = SMALL_DIMS;
    // D: the same UNet as Olive exports it (its own dim names, an int64 timestep, which
    // takes A's whole-numbered timesteps).
    let olive = fixture("sd15_olive_legacy");
    let mut args = vec![
        "bench",
        a.to_str().unwrap(),
        "--vs",
        fp16.to_str().unwrap(),
        "--vs",
        fixed.to_str().unwrap(),
        "--vs",
        olive.to_str().unwrap(),
        "--iters",
        "2",
        "--warmup",
        "1",
        "--json",
    ];
    args.extend(dims);
    let o = attune(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rel = |i: usize| v["models"][i]["rel_l2_vs_a"].as_f64().unwrap();
    assert!(rel(1) < 1e-2, "fp16 B: {}", rel(1));
    assert!(rel(2) < 1e-4, "fixed-shape C: {}", rel(2));
    assert!(rel(3) < 1e-6, "Olive's export D: {}", rel(3));

    // Fixed to other sizes than --dim gives: an error naming the model.
    let mut args = vec![
        "bench",
        a.to_str().unwrap(),
        "--vs",
        other_size.to_str().unwrap(),
        "--iters",
        "1",
    ];
    args.extend(dims);
    let o = attune(&args);
    assert_clean_error(
        &o,
        &["model B", other_size.to_str().unwrap(), "input 'sample'"],
    );

    // A --vs model with an input the first lacks: made like any random input.
    let x = || vec![DimValue::DimParam("n".into()), DimValue::DimValue(3)];
    let (one, two) = (dir.path().join("one.onnx"), dir.path().join("two.onnx"));
    identity_model(&one, &[("x", x())], &[("x", "y")]);
    identity_model(&two, &[("x", x()), ("extra", x())], &[("x", "y")]);
    let o = attune(&[
        "bench",
        one.to_str().unwrap(),
        "--vs",
        two.to_str().unwrap(),
        "--iters",
        "1",
        "--dim",
        "n=2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The other way round the first model's inputs do not fit the second.
    let o = attune(&[
        "bench",
        two.to_str().unwrap(),
        "--vs",
        one.to_str().unwrap(),
        "--iters",
        "1",
        "--dim",
        "n=2",
    ]);
    assert_clean_error(&o, &["model B", "one.onnx", "no input 'extra'"]);
}

#[test]
fn bad_run_option_values_are_errors_naming_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("id.onnx");
    identity_model(
        &model,
        &[(
            "x",
            vec![DimValue::DimParam("n".into()), DimValue::DimValue(3)],
        )],
        &[("x", "y")],
    );
    let m = model.to_str().unwrap();
    for tol in ["--tol=NaN", "--tol=-1", "--tol=inf"] {
        let o = attune(&["diff", m, m, "--numeric", tol, "--dim", "n=2"]);
        assert_clean_error(&o, &["--tol"]);
    }
    let o = attune(&["diff", m, m, "--numeric", "--tol=0", "--dim", "n=2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", m, "--dim", "n=2", "--warmup", "0"];
        args.extend(extra);
        attune(&args)
    };
    assert_clean_error(&bench(&["--iters", "0"]), &["--iters", "'0'"]);
    assert_clean_error(
        &bench(&["--iters", "1", "--profile-runs", "0"]),
        &["--profile-runs"],
    );
    assert_clean_error(
        &bench(&["--iters", "1", "--threads", "100000"]),
        &["--threads 100000", "at most 1024"],
    );
    let o = bench(&["--iters", "1", "--threads", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for ep in ["tract", "cpu"] {
        assert_clean_error(
            &bench(&["--iters", "1", "--ep", ep, "--cuda-graph"]),
            &["--cuda-graph: CUDA graphs need the CUDA execution provider"],
        );
    }
    // The library refuses too, whatever the caller.
    let opts = OrtOptions {
        cuda_graph: true,
        ..OrtOptions::default()
    };
    let err = Backend::open(&model, Ep::Tract, &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--ep cuda"), "{err}");

    // 27 models would run out of letters.
    let mut args = vec!["bench", m, "--iters", "1", "--dim", "n=2"];
    for _ in 0..26 {
        args.extend(["--vs", m]);
    }
    assert_clean_error(&attune(&args), &["at most 26 models", "27"]);
    args.truncate(args.len() - 2);
    let o = attune(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("\nZ "), "{}", stdout(&o));
}
