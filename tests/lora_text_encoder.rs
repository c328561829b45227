//! LoRA files' text-encoder keys fused into the text encoders they belong to, against
//! diffusers and peft (models/export/lora_text_encoder.py: `pipe.load_lora_weights(file)` and
//! `pipe.fuse_lora(lora_scale)` on the tiny pipelines in torch, checked there against peft and
//! kohya's rule). Files and references: models/loras/text_encoder/ (manifest.json).
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use attune_compiler::import;
use attune_compiler::pass::{PassCx, PassManager};
use attune_passes::lora::file::{self, Component};
use attune_passes::lora::{LoraPass, LoraSource, detect_component};
use attune_runtime::HostTensor;
use common::*;

/// Worst absolute difference allowed against the torch reference (outputs are O(1)).
const TOL: f32 = 1e-4;

fn dir() -> PathBuf {
    root().join("models/loras/text_encoder")
}

fn lora(name: &str) -> PathBuf {
    dir().join(name)
}

fn component_model(pipeline: &str, component: &str) -> PathBuf {
    root()
        .join("models/pipelines")
        .join(pipeline)
        .join(component)
        .join("model.onnx")
}

fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.to_f64()
        .iter()
        .zip(b.to_f64())
        .map(|(x, y)| (x - y).abs() as f32)
        .fold(0.0, f32::max)
}

/// Runs `model` on the reference inputs and compares every output with `case`'s reference
/// (the same names: last_hidden_state, pooler_output or text_embeds, hidden_states.N); the
/// worst difference.
fn compare_case(model: &Path, inputs: &str, case: &str) -> f32 {
    let outs = run_outputs(model, &dir().join(inputs), &[]);
    let refs: Vec<String> = fs::read_dir(dir().join(case))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            p.file_stem().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    let names: Vec<&String> = outs.iter().map(|(n, _)| n).collect();
    assert_eq!(refs.len(), outs.len(), "{case}: outputs {names:?}");
    let mut worst = 0f32;
    for (name, got) in &outs {
        let want = attune_runtime::npy::read(&dir().join(case).join(format!("{name}.npy")))
            .unwrap_or_else(|e| panic!("{case}: no reference for output {name}: {e}"));
        let d = max_abs_diff(&want, got);
        eprintln!("{case} {name}: max |diff| {d:.2e}");
        assert!(d <= TOL, "{case} {name}: max |diff| {d}");
        worst = worst.max(d);
    }
    worst
}

#[test]
fn text_encoder_loras_of_every_layout_fuse_like_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    // (pipeline, component, --lora, extra flags, reference case)
    let cases: [(&str, &str, &str, &[&str], &str); 6] = [
        (
            "sd15_tiny",
            "text_encoder",
            "peft_mixed.safetensors",
            &[],
            "peft_mixed_x1.0",
        ),
        (
            "sd15_tiny",
            "text_encoder",
            "peft_mixed.safetensors:0.5",
            &[],
            "peft_mixed_x0.5",
        ),
        (
            "sd15_tiny",
            "text_encoder",
            "kohya_te.safetensors",
            &["--lora-component", "text_encoder"],
            "kohya_te_x1.0",
        ),
        (
            "sd15_tiny",
            "text_encoder",
            "kohya_te.safetensors:0.5",
            &[],
            "kohya_te_x0.5",
        ),
        (
            "sdxl_tiny",
            "text_encoder",
            "sdxl_kohya.safetensors",
            &[],
            "sdxl_kohya_text_encoder",
        ),
        (
            "sdxl_tiny",
            "text_encoder_2",
            "sdxl_kohya.safetensors",
            &["--lora-component", "text_encoder_2"],
            "sdxl_kohya_text_encoder_2",
        ),
    ];
    for (pipeline, component, spec, extra, case) in cases {
        let spec = lora(spec).display().to_string();
        let mut flags = vec!["--lora", spec.as_str()];
        flags.extend(extra);
        let (out, report) = compile_into(tmp.path(), &component_model(pipeline, component), &flags);
        // q/k/v/out_proj and fc1/fc2 of both layers, nothing left over.
        assert!(
            report.contains("lora: 12 rewritten, 0 skipped"),
            "{case}: {report}"
        );
        assert!(
            report.contains("+ encoder.layers.1.self_attn.out_proj <- ")
                || report.contains("+ text_model.encoder.layers.1.self_attn.out_proj <- "),
            "{case}: {report}"
        );
        compare_case(&out, "inputs", case);
    }
}

#[test]
fn without_the_lora_the_reference_is_not_met() {
    // The comparison can fail: the unfused encoder is far from the LoRA references.
    let outs = run_outputs(
        &component_model("sd15_tiny", "text_encoder"),
        &dir().join("inputs"),
        &[],
    );
    for case in ["peft_mixed_x1.0", "kohya_te_x0.5"] {
        let (_, got) = outs.iter().find(|(n, _)| n == "last_hidden_state").unwrap();
        let want =
            attune_runtime::npy::read(&dir().join(case).join("last_hidden_state.npy")).unwrap();
        let d = max_abs_diff(&want, got);
        assert!(d > 0.5, "{case}: {d}");
    }
}

#[test]
fn a_mixed_file_on_the_unet_fuses_its_unet_layers_and_notes_the_text_encoders() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = lora("peft_mixed.safetensors").display().to_string();
    let kohya = lora("kohya_te.safetensors").display().to_string();
    let (out, report) = compile_into(
        tmp.path(),
        &component_model("sd15_tiny", "unet"),
        &["--lora", &peft, "--lora", &kohya],
    );
    // Every attention projection of the UNet (8 attentions x q/k/v/out), diffusers' `lora.down`
    // names; the text encoders' layers are theirs, not failures.
    assert!(report.contains("lora: 32 rewritten, 0 skipped"), "{report}");
    assert!(
        report.contains(
            "note: peft_mixed.safetensors: 12 layers for text_encoder (fused when text_encoder \
             is compiled, --lora-component text_encoder): encoder.layers.0.mlp.fc1, "
        ),
        "{report}"
    );
    assert!(
        report.contains(
            "note: kohya_te.safetensors has no layer for unet, the component this graph is"
        ),
        "{report}"
    );
    assert!(!report.contains("not in this graph"), "{report}");
    compare_case(&out, "unet_inputs", "unet_peft_mixed");
}

#[test]
fn the_component_is_detected_said_and_listed() {
    let te = import::read(&component_model("sd15_tiny", "text_encoder")).unwrap();
    let te2 = import::read(&component_model("sdxl_tiny", "text_encoder_2")).unwrap();
    let unet = import::read(&component_model("sd15_tiny", "unet")).unwrap();
    assert_eq!(detect_component(&te), Component::TextEncoder);
    // A second text encoder cannot be told from a first: it is said.
    assert_eq!(detect_component(&te2), Component::TextEncoder);
    assert_eq!(detect_component(&unet), Component::Denoiser);

    use Component::*;
    let counts = |f: &str| {
        file::components(&lora(f))
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        counts("peft_mixed.safetensors"),
        [(Denoiser, 32), (TextEncoder, 12)]
    );
    assert_eq!(counts("kohya_te.safetensors"), [(TextEncoder, 12)]);
    assert_eq!(
        counts("sdxl_kohya.safetensors"),
        [(TextEncoder, 12), (TextEncoder2, 12)]
    );
    assert_eq!(Component::from_folder("transformer"), Some(Denoiser));
    assert_eq!(Component::from_folder("text_encoder_2"), Some(TextEncoder2));
    assert_eq!(Component::from_folder("vae_decoder"), None);

    // The pass a folder compile makes per component: the second encoder's layers only.
    let mut m = import::read(&component_model("sdxl_tiny", "text_encoder_2")).unwrap();
    let mut pm = PassManager::new();
    pm.add(LoraPass::for_component(
        vec![LoraSource {
            path: lora("sdxl_kohya.safetensors"),
            multiplier: 1.0,
        }],
        TextEncoder2,
        true,
    ));
    let report = pm
        .run(&mut m, &mut PassCx { verify: true })
        .unwrap()
        .remove(0);
    assert_eq!(report.rewritten.len(), 12, "{report:?}");
    assert!(
        report
            .rewritten
            .iter()
            .all(|r| r.contains("sdxl_kohya.safetensors:lora_te2_")),
        "{report:?}"
    );
    assert_eq!(report.notes.len(), 1, "{report:?}");
    assert!(
        report.notes[0].contains("12 layers for text_encoder "),
        "{report:?}"
    );
}

#[test]
fn a_file_for_another_component_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let kohya = lora("kohya_te.safetensors").display().to_string();
    let te = component_model("sd15_tiny", "text_encoder");
    // Said to be the second encoder: the file's layers are the first's.
    let (_, report) = compile_into(
        tmp.path(),
        &te,
        &["--lora", &kohya, "--lora-component", "text_encoder_2"],
    );
    assert!(report.contains("lora: 0 rewritten, 0 skipped"), "{report}");
    assert!(
        report.contains("note: kohya_te.safetensors has no layer for text_encoder_2"),
        "{report}"
    );
    assert!(
        report.contains("kohya_te.safetensors: 12 layers for text_encoder (fused when"),
        "{report}"
    );
    // A bad component name is refused by name.
    let o = compile_to(
        &te,
        &tmp.path().join("x.onnx"),
        &["--lora", &kohya, "--lora-component", "vae"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("'vae'"), "{}", stderr(&o));
    assert!(!tmp.path().join("x.onnx").exists());
}

/// A kohya text-encoder file: rank 2 factors for `modules` ((name, in, out)), small values.
fn kohya_te_file(dir: &Path, name: &str, layers: &[(&str, usize, usize)]) -> PathBuf {
    let mut tensors = Vec::new();
    for (i, (module, inp, out)) in layers.iter().enumerate() {
        let key = format!("lora_te_text_model_encoder_{module}");
        let values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|j| ((i * 31 + j) as f32 * 0.37).sin() * 0.1)
                .collect()
        };
        tensors.push((
            format!("{key}.lora_down.weight"),
            vec![2, *inp],
            values(2 * inp),
        ));
        tensors.push((
            format!("{key}.lora_up.weight"),
            vec![*out, 2],
            values(2 * out),
        ));
    }
    write_f32_safetensors(dir, name, &tensors)
}

#[test]
fn unmatched_text_encoder_layers_are_named_and_refused_when_strict() {
    let tmp = tempfile::tempdir().unwrap();
    let file = kohya_te_file(
        tmp.path(),
        "extra_layer",
        &[
            ("layers_0_self_attn_q_proj", 16, 16),
            // The tiny encoder has two layers.
            ("layers_5_self_attn_q_proj", 16, 16),
        ],
    );
    let spec = file.display().to_string();
    let te = component_model("sd15_tiny", "text_encoder");
    let out_dir = tempfile::tempdir().unwrap();
    let (_, report) = compile_into(out_dir.path(), &te, &["--lora", &spec]);
    assert!(report.contains("lora: 1 rewritten, 1 skipped"), "{report}");
    assert!(
        report.contains(
            "- extra_layer.safetensors:lora_te_text_model_encoder_layers_5_self_attn_q_proj: no \
             layer 'text_model_encoder_layers_5_self_attn_q_proj' in this graph (text_encoder)"
        ),
        "{report}"
    );
    let out = out_dir.path().join("strict.onnx");
    let o = compile_to(&te, &out, &["--lora", &spec, "--lora-strict"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(
        stderr(&o).contains(
            "1 LoRA layers match no layer of this graph: \
             extra_layer.safetensors:lora_te_text_model_encoder_layers_5_self_attn_q_proj"
        ),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

#[test]
fn a_text_encoder_key_that_does_not_fit_its_layer_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    // fc1 is 16 -> 64; this down factor takes 17 inputs.
    let file = kohya_te_file(tmp.path(), "bad_shape", &[("layers_1_mlp_fc1", 17, 64)]);
    let spec = file.display().to_string();
    let out = tmp.path().join("o.onnx");
    let o = compile_to(
        &component_model("sd15_tiny", "text_encoder"),
        &out,
        &["--lora", &spec],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for want in [
        "bad_shape.safetensors",
        "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight",
        "encoder.layers.1.mlp.fc1",
    ] {
        assert!(err.contains(want), "expected '{want}' in: {err}");
    }
    assert!(!out.exists());
    // The same file compiling the UNet is the text encoder's business: noted, no error.
    let (_, report) = compile_into(
        tmp.path(),
        &component_model("sd15_tiny", "unet"),
        &["--lora", &spec],
    );
    assert!(
        report.contains("bad_shape.safetensors: 1 layer for text_encoder"),
        "{report}"
    );
}
