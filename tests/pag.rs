//! Perturbed-attention guidance: `--hooks pag` gates against diffusers' PAG attention
//! processors, and `generate --pag-scale` against diffusers' PAG pipelines
//! (models/export/pag.py).
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use attune_runtime::HostTensor;
use attune_runtime::compare::compare;
use common::*;
use ndarray::{ArrayD, IxDyn};

fn refs(name: &str) -> PathBuf {
    root().join("models/pag").join(name)
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(refs("manifest.json")).unwrap()).unwrap()
}

/// The case's inputs with every gate of `modules` set: 1 on the last row (the perturbed one).
fn gated_inputs(dir: &Path, case: &Path, modules: &[String]) -> PathBuf {
    let inputs = dir.join(format!("inputs-{}", fs::read_dir(dir).unwrap().count()));
    fs::create_dir_all(&inputs).unwrap();
    for f in fs::read_dir(case.join("inputs")).unwrap() {
        let f = f.unwrap().path();
        fs::copy(&f, inputs.join(f.file_name().unwrap())).unwrap();
    }
    let rows = read_f32(&case.join("inputs/sample.npy")).shape()[0];
    let gate = ArrayD::from_shape_fn(IxDyn(&[rows]), |ix| (ix[0] == rows - 1) as u8 as f32);
    for m in modules {
        let path = inputs.join(format!("pag.{m}.gate.npy"));
        attune_runtime::npy::write(&path, &HostTensor::F32(gate.clone())).unwrap();
    }
    inputs
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn gates_match_diffusers_pag_processors_fused_or_not_on_legacy_and_dynamo_exports() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest();
    for (fixture_name, entry) in m["unets"].as_object().unwrap() {
        let globs = entry["hooks_layers"].as_str().unwrap();
        let modules = strings(&entry["modules"]);
        for attention in ["keep", "flash"] {
            let (hooked, report) = compile_into(
                dir.path(),
                &fixture(fixture_name),
                &[
                    "--hooks",
                    "pag",
                    "--hooks-layers",
                    globs,
                    "--attention",
                    attention,
                ],
            );
            for module in &modules {
                assert!(
                    report.contains(&format!("{module} (self): pag gate")),
                    "{fixture_name} {attention}: {module} not gated: {report}"
                );
            }
            for case in ["cfg", "nocfg"] {
                let case_dir = refs(fixture_name).join(case);
                let inputs = gated_inputs(dir.path(), &case_dir, &modules);
                let got = run_unet(&hooked, &inputs, &[]);
                let want = attune_runtime::npy::read(&case_dir.join("out_sample.npy")).unwrap();
                let c = compare("out_sample", &want, &got).unwrap();
                assert!(c.rel_l2 <= 1e-4, "{fixture_name} {attention} {case}: {c:?}");
                // Fed no gates, the graph computes the export's own output.
                let plain = run_unet(&hooked, &case_dir.join("inputs"), &[]);
                let original = run_unet(&fixture(fixture_name), &case_dir.join("inputs"), &[]);
                let c = compare("out_sample", &original, &plain).unwrap();
                assert!(
                    c.rel_l2 <= 1e-6,
                    "{fixture_name} {attention} {case} ungated: {c:?}"
                );
                // The perturbed row really differs (a no-op gate could not pass).
                let moved = compare("out_sample", &want, &plain).unwrap();
                assert!(moved.rel_l2 > 1e-3, "{fixture_name} {case}: {moved:?}");
            }
        }
    }
}

#[test]
fn gates_on_fp16_cuda_lowered_unets_run_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest();
    let entry = &m["unets"]["sd15_legacy"];
    let modules = strings(&entry["modules"]);
    let (hooked, report) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &[
            "--hooks",
            "pag",
            "--hooks-layers",
            entry["hooks_layers"].as_str().unwrap(),
            "--target",
            "cuda",
            "--precision",
            "fp16",
            "--attention",
            "flash",
            "--keep-io-types",
        ],
    );
    assert!(report.contains("pag gate"), "{report}");
    let case_dir = refs("sd15_legacy").join("cfg");
    let inputs = gated_inputs(dir.path(), &case_dir, &modules);
    // The CUDA target's fused ops are contrib ops ONNX Runtime's CPU provider also runs
    // (those it does not are rewritten to standard ops first).
    let runnable = dir.path().join("runnable.onnx");
    with_cuda_ops_in_standard_ops(&hooked, &runnable);
    let got = run_unet(&runnable, &inputs, &[]);
    let want = attune_runtime::npy::read(&case_dir.join("out_sample.npy")).unwrap();
    let c = compare("out_sample", &want, &got).unwrap();
    assert!(c.rel_l2 <= 5e-3, "fp16 cuda-lowered: {c:?}");
}

/// `attune generate` of a PAG reference case on `folder`; the final latents.
fn generate(folder: &Path, case: &serde_json::Value, refs: &Path, out: &Path) -> ArrayD<f32> {
    let latents = refs.join("latents.npy");
    let saved = out.with_extension("npy");
    let (scale, adaptive, guidance) = (
        case["pag_scale"].to_string(),
        case["pag_adaptive_scale"].to_string(),
        case["guidance"].to_string(),
    );
    let mut args = vec![
        "generate",
        folder.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--steps",
        "4",
        "--scheduler",
        "ddim",
        "--guidance",
        &guidance,
        "--pag-scale",
        &scale,
        "--pag-adaptive-scale",
        &adaptive,
        "--latents",
        latents.to_str().unwrap(),
        "--save-latents",
        saved.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ];
    if case["negative_prompt"].is_string() {
        args.extend([
            "--negative-prompt",
            case["negative_prompt"].as_str().unwrap(),
        ]);
    }
    let o = attune(&args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    read_f32(&saved)
}

#[test]
fn generate_with_pag_gives_diffusers_pag_pipelines_images() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest();
    for (name, cases) in m["pipelines"].as_object().unwrap() {
        let folder = root().join("models/pipelines").join(name);
        for (case_name, case) in cases.as_object().unwrap() {
            let compiled = dir.path().join(format!("{name}-{case_name}"));
            let o = attune(&[
                "compile",
                folder.to_str().unwrap(),
                "-o",
                compiled.to_str().unwrap(),
                "--hooks",
                "pag",
                "--hooks-layers",
                case["hooks_layers"].as_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
            let case_refs = refs("pipelines").join(name).join(case_name);
            let png = dir.path().join(format!("{name}-{case_name}.png"));
            let got = generate(&compiled, case, &case_refs, &png);
            let want = read_f32(&case_refs.join("final_latents.npy"));
            assert_rel_l2(want, got, 1e-4, &format!("{name} {case_name}"));
            let image = read_f32(&case_refs.join("image.npy"));
            let worst = worst_pixel(&png, image.index_axis(ndarray::Axis(0), 0));
            assert!(worst <= 2.0, "{name} {case_name}: a pixel {worst}/255 off");
        }
    }
}

#[test]
fn pag_requests_that_cannot_work_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let unet = fixture("sd15_legacy");
    // A glob that picks no self-attention site: named, nothing written.
    let out = dir.path().join("none.onnx");
    let o = compile_to(
        &unet,
        &out,
        &[
            "--hooks",
            "pag",
            "--hooks-layers",
            "mid_block.*.attn1,*.attn2",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--hooks-layers *.attn2"), "{err}");
    assert!(err.contains("no self-attention site"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
    // Without --hooks-layers: diffusers' default, the mid block.
    let (hooked, report) = compile_into(dir.path(), &unet, &["--hooks", "pag"]);
    assert!(
        report.contains("mid_block.attentions.0.transformer_blocks.0.attn1 (self): pag gate"),
        "{report}"
    );
    assert!(report.contains("hooks: 1 rewritten"), "{report}");
    // --pag-scale on a UNet without gates.
    let s = root().join("models/controller/sample");
    let file = |f: &str| s.join(f).display().to_string();
    let sample = |model: &Path, extra: &[&str]| {
        let out = dir.path().join("sample");
        let (cond, uncond, latents) = (file("cond.npy"), file("uncond.npy"), file("latents.npy"));
        let mut args = vec!["sample", "--unet", model.to_str().unwrap(), "--steps", "2"];
        args.extend(["--cond", &cond, "--uncond", &uncond, "--latents", &latents]);
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(extra);
        attune(&args)
    };
    let o = sample(&unet, &["--pag-scale", "3"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("compile it with --hooks pag"), "{err}");
    let o = sample(&hooked, &["--pag-scale", "-1"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("-1"), "{}", stderr(&o));
    // A gated UNet samples with PAG, and its result differs from CFG alone.
    let o = sample(&hooked, &["--pag-scale", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let with_pag = read_f32(&dir.path().join("sample/latents.npy"));
    let o = sample(&hooked, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let without = read_f32(&dir.path().join("sample/latents.npy"));
    assert!(max_abs(&with_pag, &without) > 1e-3);
}
