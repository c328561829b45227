//! Running fixtures: ONNX Runtime CPU against tract and against onnxruntime's Python API,
//! re-exported models, input errors, CUDA real-or-error, and the run/bench/diff/demo CLI.
mod common;

use std::fs;
use std::path::Path;

use attune_compiler::export::{self, ExportOptions, WeightsMode};
use attune_compiler::import;
use attune_runtime::compare::compare;
use attune_runtime::inputs::{self, Dims};
use attune_runtime::ort_backend::OrtOptions;
use attune_runtime::{Backend, Ep, HostTensor, npy};
use common::*;

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
        let vs_python = compare("out_sample", &reference(name), &ort[0].1).unwrap();
        assert!(
            vs_python.rel_l2 <= 1e-6,
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
                got[0].1,
                reference(name),
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

#[test]
fn bench_and_demo_commands_run() {
    let a = fixture("sd15_legacy");
    let dims = [
        "--dim",
        "batch=1",
        "--dim",
        "height=8",
        "--dim",
        "width=8",
        "--dim",
        "sequence=4",
    ];
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
        "== compile",
        "== structural diff",
        "== numeric diff",
        "== timing",
    ] {
        assert!(text.contains(section), "{text}");
    }
}
