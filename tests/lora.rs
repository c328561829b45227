//! LoRA fusion and adapters against the reference implementations' outputs
//! (models/export/loras.py: kohya's definition, diffusers + peft, LyCORIS).
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use attune_compiler::export::{self, ExportOptions};
use attune_compiler::onnx::DataType;
use attune_compiler::pass::{PassCx, PassManager, PassReport};
use attune_compiler::{Model, import};
use attune_passes::lora::{LoraPass, LoraSource};
use attune_runtime::compare::compare;
use attune_runtime::{HostTensor, npy};
use common::*;

fn lora(name: &str) -> PathBuf {
    root()
        .join("models/loras")
        .join(format!("{name}.safetensors"))
}

fn lora_ref(name: &str) -> HostTensor {
    npy::read(&root().join("models/loras/ref").join(format!("{name}.npy"))).unwrap()
}

fn fuse(model: &str, loras: &[(&str, f32)]) -> (Model, PassReport) {
    let mut m = import::read(&fixture(model)).unwrap();
    let sources = loras
        .iter()
        .map(|(n, mult)| LoraSource {
            path: lora(n),
            multiplier: *mult,
        })
        .collect();
    let mut pm = PassManager::new();
    pm.add(LoraPass {
        sources,
        strict: false,
        component: None,
    });
    let report = pm
        .run(&mut m, &mut PassCx { verify: true })
        .unwrap()
        .remove(0);
    (m, report)
}

/// Runs on ORT CPU with sd15_legacy's committed inputs (and extra arguments).
fn run_cli(model: &Path, extra: &[&str]) -> HostTensor {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    run_unet(model, &root().join("models/sd15_legacy/inputs"), &extra)
}

fn run_model(m: &Model) -> HostTensor {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    export::write(m, &path, &ExportOptions::default()).unwrap();
    run_cli(&path, &[])
}

fn assert_close(got: &HostTensor, want: &HostTensor, tol: f64, what: &str) {
    let c = compare("out_sample", want, got).unwrap();
    assert!(c.rel_l2 <= tol, "{what}: {c:?}");
}

#[test]
fn every_format_fuses_like_its_reference() {
    let formats = [
        ("kohya", 106),
        ("kohya_sgm", 106),
        ("peft", 106),
        ("peft_rslora", 106),
        ("diffusers_legacy", 56),
        ("locon_tucker", 124),
        ("loha", 124),
        ("lokr", 124),
    ];
    for (name, layers) in formats {
        let (m, report) = fuse("sd15_legacy", &[(name, 1.0)]);
        assert_eq!(
            report.rewritten.len(),
            layers,
            "{name}: {:?}",
            report.skipped
        );
        assert_close(&run_model(&m), &lora_ref(name), 1e-4, name);
    }
}

#[test]
fn text_encoder_keys_are_noted_as_the_text_encoders() {
    let (_, report) = fuse("sd15_legacy", &[("kohya", 1.0)]);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(
        report.notes,
        [
            "kohya.safetensors: 1 layer for text_encoder (fused when text_encoder is compiled, \
          --lora-component text_encoder): lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        ]
    );
}

#[test]
fn several_files_with_multipliers_add_up() {
    let (m, report) = fuse("sd15_legacy", &[("kohya", 0.8), ("loha", 0.5)]);
    assert_eq!(report.rewritten.len(), 106 + 124);
    assert_close(
        &run_model(&m),
        &lora_ref("kohya+loha"),
        1e-4,
        "kohya:0.8 + loha:0.5",
    );
}

#[test]
fn dynamo_export_fuses_the_same() {
    // sd15_dynamo holds the same weights as sd15_legacy, so the same reference applies.
    for name in ["kohya", "lokr"] {
        let (m, report) = fuse("sd15_dynamo", &[(name, 1.0)]);
        assert!(
            report.rewritten.len() >= 106,
            "{name}: {:?}",
            report.skipped
        );
        assert_close(&run_model(&m), &lora_ref(name), 1e-4, name);
    }
}

#[test]
fn cli_fuses_with_linked_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fused.onnx");
    let spec = format!("{}:0.8", lora("kohya").display());
    let spec2 = format!("{}:0.5", lora("loha").display());
    let o = compile_to(
        &fixture("sd15_legacy"),
        &out,
        &["--lora", &spec, "--lora", &spec2, "--weights", "link"],
    );
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    assert!(text.contains("lora: 230 rewritten, 0 skipped"), "{text}");
    // Changed tensors went to the second data file; the original data is hard-linked.
    assert!(
        dir.path().join("unet.onnx.data").exists() && dir.path().join("fused.onnx.data").exists()
    );
    assert_close(&run_cli(&out, &[]), &lora_ref("kohya+loha"), 1e-4, "cli");
}

#[test]
fn adapters_switch_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapted.onnx");
    let (a, b) = (
        format!("{}:0.8", lora("kohya").display()),
        format!("{}:0.5", lora("locon_tucker").display()),
    );
    let o = compile_to(
        &fixture("sd15_legacy"),
        &out,
        &["--lora-mode", "adapter", "--lora", &a, "--lora", &b],
    );
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let adapter = dir.path().join("adapted.adapter.safetensors");
    // Without an adapter: the base model.
    assert_same_function(&run_cli(&fixture("sd15_legacy"), &[]), &run_cli(&out, &[]));
    // With it: what fusing the same two files gives.
    let (fused, _) = fuse("sd15_legacy", &[("kohya", 0.8), ("locon_tucker", 0.5)]);
    assert_close(
        &run_cli(&out, &["--adapter", adapter.to_str().unwrap()]),
        &run_model(&fused),
        1e-5,
        "adapter vs fused",
    );
    // Another LoRA for the same compiled graph (any rank per layer).
    let peft = dir.path().join("peft.adapter.safetensors");
    let o = attune(&[
        "lora-adapter",
        out.to_str().unwrap(),
        lora("peft").to_str().unwrap(),
        "-o",
        peft.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_close(
        &run_cli(&out, &["--adapter", peft.to_str().unwrap()]),
        &lora_ref("peft"),
        1e-4,
        "peft adapter",
    );
    // LoHa has no low-rank branch form: a clear error.
    let o = attune(&[
        "lora-adapter",
        out.to_str().unwrap(),
        lora("loha").to_str().unwrap(),
        "-o",
        dir.path().join("x.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("LoHa and LoKr layers can only be fused"),
        "{}",
        stderr(&o)
    );
}

fn reference(name: &str) -> HostTensor {
    npy::read(&root().join("models").join(name).join("ref/out_sample.npy")).unwrap()
}

/// Stores every adaptable weight as f16 (the fusion tests only; the graph is not run).
fn to_f16(m: &mut Model) -> Vec<attune_passes::lora::Target> {
    let targets: Vec<_> = attune_passes::lora::targets(m)
        .into_values()
        .flatten()
        .collect();
    for t in &targets {
        let w = m.graph.initializer(t.weight).unwrap();
        let halves: Vec<u8> = w
            .bytes()
            .unwrap()
            .chunks(4)
            .flat_map(|c| {
                half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()
            })
            .collect();
        let mut h = w.with_data(halves.into());
        h.proto.data_type = DataType::Float16 as i32;
        m.graph.set_initializer(h);
    }
    targets
}

#[test]
fn fp16_weights_are_fused_in_f32_and_rounded_once() {
    // sd15_legacy with its linear/conv weights stored as f16.
    let mut m = import::read(&fixture("sd15_legacy")).unwrap();
    let targets = to_f16(&mut m);
    let base = m
        .graph
        .initializers()
        .map(|(_, t)| (t.name().to_string(), t.clone()))
        .collect::<std::collections::BTreeMap<_, _>>();
    let mut pm = PassManager::new();
    pm.add(LoraPass {
        sources: vec![LoraSource {
            path: lora("kohya"),
            multiplier: 1.0,
        }],
        strict: false,
        component: None,
    });
    pm.run(&mut m, &mut PassCx::default()).unwrap();
    // The same fusion in f32 on the upcast weights, rounded to f16 once at the end.
    let (f32_fused, _) = fuse("sd15_legacy", &[("kohya", 1.0)]);
    let mut checked = 0;
    for t in &targets {
        let name = m.graph.value(t.weight).name.clone();
        let fused16 = m.graph.initializer(t.weight).unwrap();
        assert_eq!(fused16.data_type(), DataType::Float16 as i32);
        let orig32 = import::read(&fixture("sd15_legacy")).unwrap();
        let o = orig32
            .graph
            .initializer(orig32.graph.value_id(&name).unwrap())
            .unwrap()
            .bytes()
            .unwrap()
            .into_owned();
        let f = f32_fused
            .graph
            .initializer(f32_fused.graph.value_id(&name).unwrap())
            .unwrap()
            .bytes()
            .unwrap()
            .into_owned();
        let b16 = base[&name].bytes().unwrap().into_owned();
        let got = fused16.bytes().unwrap();
        for i in 0..o.len() / 4 {
            let at =
                |v: &[u8], k: usize| f32::from_le_bytes(v[k * 4..k * 4 + 4].try_into().unwrap());
            let delta = at(&f, i) - at(&o, i);
            let upcast =
                half::f16::from_le_bytes(b16[i * 2..i * 2 + 2].try_into().unwrap()).to_f32();
            let want = half::f16::from_f32(upcast + delta);
            let have = half::f16::from_le_bytes(got[i * 2..i * 2 + 2].try_into().unwrap());
            // One rounding: bit-equal, except where the sum sits on a rounding tie (the delta
            // here is recovered from the f32 fusion, so it carries f32 noise).
            let sum = upcast + delta;
            let tie = (have.to_f32() + want.to_f32()) / 2.0;
            let on_tie = (sum - tie).abs() <= 1e-6 * sum.abs()
                && (have.to_bits() as i32 - want.to_bits() as i32).abs() == 1;
            assert!(
                have == want || on_tie,
                "{name}[{i}]: {have} vs {want} (upcast {upcast}, delta {delta}, sum {sum})"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, targets.len());
}

#[test]
fn unmatched_layers_are_reported_or_refused_when_strict() {
    // The no-attention UNet has none of the attention layers this LoRA adapts.
    let mut m = import::read(&fixture("noattn_legacy")).unwrap();
    let mut pm = PassManager::new();
    pm.add(LoraPass {
        sources: vec![LoraSource {
            path: lora("diffusers_legacy"),
            multiplier: 1.0,
        }],
        strict: false,
        component: None,
    });
    let report = pm.run(&mut m, &mut PassCx::default()).unwrap().remove(0);
    assert!(report.rewritten.is_empty());
    assert_eq!(report.skipped.len(), 56);
    assert!(
        report.skipped[0].reason.starts_with(
            "no layer 'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k' in this graph"
        ),
        "{:?}",
        report.skipped[0]
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    let o = compile_to(
        &fixture("noattn_legacy"),
        &out,
        &[
            "--lora",
            lora("diffusers_legacy").to_str().unwrap(),
            "--lora-strict",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--lora-strict: 56 LoRA layers match no layer of this graph"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

/// Writes a copy of the kohya file with an edit applied to its tensors.
fn edited_kohya(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> PathBuf {
    let bytes = fs::read(lora("kohya")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.shape().to_vec(),
                v.data()
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            )
        })
        .collect();
    edit(&mut tensors);
    write_f32_safetensors(dir, name, &tensors)
}

#[test]
fn bad_lora_files_are_clear_errors_and_write_nothing() {
    const LAYER: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    fs::write(&truncated, &fs::read(lora("kohya")).unwrap()[..1000]).unwrap();
    let cases: Vec<(PathBuf, String)> = vec![
        (truncated, "not a valid .safetensors file".into()),
        (
            edited_kohya(dir.path(), "nan", |t| {
                t.iter_mut()
                    .find(|(n, ..)| n == &format!("{LAYER}.lora_up.weight"))
                    .unwrap()
                    .2[3] = f32::NAN
            }),
            format!(
                "key '{LAYER}.lora_up.weight' (layer down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q) holds a non-finite value"
            ),
        ),
        (
            edited_kohya(dir.path(), "shape", |t| {
                let up = t
                    .iter_mut()
                    .find(|(n, ..)| n == &format!("{LAYER}.lora_up.weight"))
                    .unwrap();
                up.1 = vec![16, 8];
            }),
            format!(
                "layer {LAYER} (graph layer down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q)"
            ),
        ),
        (
            edited_kohya(dir.path(), "duplicate", |t| {
                // The same layer once more under its PEFT name.
                let down = t
                    .iter()
                    .find(|(n, ..)| n == &format!("{LAYER}.lora_down.weight"))
                    .unwrap()
                    .clone();
                t.push((
                    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
                        .into(),
                    down.1,
                    down.2,
                ));
            }),
            "both adapt layer down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q".into(),
        ),
    ];
    for (file, expected) in cases {
        let out_dir = tempfile::tempdir().unwrap();
        let model_dir = tempfile::tempdir().unwrap();
        let model = copy_fixture("sd15_legacy", model_dir.path());
        let before = snapshot(model_dir.path());
        let o = compile_to(
            &model,
            &out_dir.path().join("o.onnx"),
            &["--lora", file.to_str().unwrap()],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&expected) && !err.contains("panicked"),
            "expected '{expected}' in: {err}"
        );
        assert!(
            err.contains(file.file_name().unwrap().to_str().unwrap()),
            "error must name the file: {err}"
        );
        assert_eq!(fs::read_dir(out_dir.path()).unwrap().count(), 0);
        assert_eq!(before, snapshot(model_dir.path()));
    }
}

#[test]
fn a_fused_weight_that_overflows_its_dtype_is_an_error_naming_the_layer() {
    let mut m = import::read(&fixture("sd15_legacy")).unwrap();
    to_f16(&mut m);
    let mut pm = PassManager::new();
    pm.add(LoraPass {
        sources: vec![LoraSource {
            path: lora("kohya"),
            multiplier: 1e7,
        }],
        strict: false,
        component: None,
    });
    let err = pm
        .run(&mut m, &mut PassCx::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fusing LoRA into layer down_blocks.0")
            && err.contains("which is not finite in f16"),
        "{err}"
    );
    // Multipliers themselves must be finite numbers, however they are spelled.
    for m in ["inf", "NaN", "-INF"] {
        let o = attune(&[
            "compile",
            fixture("sd15_legacy").to_str().unwrap(),
            "-o",
            "/nonexistent/o.onnx",
            "--lora",
            &format!("{}:{m}", lora("kohya").display()),
        ]);
        assert!(
            stderr(&o).contains(&format!("multiplier '{m}' is not a finite number")),
            "{}",
            stderr(&o)
        );
    }
}

/// (key, shape) of the tensors of a crafted LoRA file.
type Keys = Vec<(String, Vec<usize>)>;

/// Writes an f32 `.safetensors` file of (key, shape) tensors filled with small values.
fn crafted_lora(dir: &Path, name: &str, tensors: &[(String, Vec<usize>)]) -> PathBuf {
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            (
                k.clone(),
                shape.clone(),
                (0..n).map(crafted_value).collect(),
            )
        })
        .collect();
    write_f32_safetensors(dir, name, &tensors)
}

/// The i-th value of a crafted factor (none zero).
fn crafted_value(i: usize) -> f32 {
    ((i as f32 + 1.0) * 0.37).sin() * 0.1
}

/// Compiles sd15_legacy with a LoRA (and flags), which must fail with an error holding every
/// `expected` text and the file's name, and write nothing.
fn assert_refused(file: &Path, flags: &[&str], expected: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    let model_dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("sd15_legacy", model_dir.path());
    let before = snapshot(model_dir.path());
    let mut args = vec!["--lora", file.to_str().unwrap()];
    args.extend(flags);
    let o = compile_to(&model, &out_dir.path().join("o.onnx"), &args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{flags:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for e in expected
        .iter()
        .copied()
        .chain([file.file_name().unwrap().to_str().unwrap()])
    {
        assert!(err.contains(e), "{flags:?}: expected '{e}' in: {err}");
    }
    assert_eq!(
        fs::read_dir(out_dir.path()).unwrap().count(),
        0,
        "{flags:?}: an output was written"
    );
    assert_eq!(before, snapshot(model_dir.path()));
}

#[test]
fn factors_of_too_few_or_empty_dims_are_errors_naming_the_key() {
    const L: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k";
    const C: &str = "lora_unet_down_blocks_0_resnets_0_conv1";
    let dir = tempfile::tempdir().unwrap();
    let k = |part: &str| format!("{L}.{part}");
    let c = |part: &str| format!("{C}.{part}");
    let cases: Vec<(&str, Keys, String)> = vec![
        (
            "scalar_down",
            vec![
                (k("lora_down.weight"), vec![]),
                (k("lora_up.weight"), vec![32, 1]),
            ],
            format!("key '{}'", k("lora_down.weight")),
        ),
        (
            "vector_up",
            vec![
                (k("lora_down.weight"), vec![1, 32]),
                (k("lora_up.weight"), vec![32]),
            ],
            format!("key '{}'", k("lora_up.weight")),
        ),
        (
            "empty_rank",
            vec![
                (k("lora_down.weight"), vec![0, 32]),
                (k("lora_up.weight"), vec![32, 0]),
            ],
            format!("key '{}'", k("lora_down.weight")),
        ),
        (
            "vector_lokr",
            vec![(c("lokr_w1"), vec![4]), (c("lokr_w2"), vec![8, 8, 3, 3])],
            format!("key '{}'", c("lokr_w1")),
        ),
        (
            "scalar_hada",
            vec![
                (c("hada_w1_a"), vec![]),
                (c("hada_w1_b"), vec![4, 288]),
                (c("hada_w2_a"), vec![32, 4]),
                (c("hada_w2_b"), vec![4, 288]),
            ],
            format!("key '{}'", c("hada_w1_a")),
        ),
        (
            "vector_tucker",
            vec![
                (c("lora_down.weight"), vec![4, 32]),
                (c("lora_mid.weight"), vec![4]),
                (c("lora_up.weight"), vec![32, 4]),
            ],
            format!("key '{}'", c("lora_mid.weight")),
        ),
        (
            "alpha_vector",
            vec![
                (k("lora_down.weight"), vec![4, 32]),
                (k("lora_up.weight"), vec![32, 4]),
                (k("alpha"), vec![2]),
            ],
            format!("key '{}'", k("alpha")),
        ),
    ];
    for (name, tensors, expected) in cases {
        let file = crafted_lora(dir.path(), name, &tensors);
        for flags in [&[][..], &["--lora-mode", "adapter"][..]] {
            assert_refused(&file, flags, &[&expected]);
        }
    }
}

#[test]
fn factors_that_do_not_fit_the_layers_kernel_are_errors_naming_the_layer() {
    const C: &str = "lora_unet_down_blocks_0_resnets_0_conv1";
    let layer = format!("layer {C} (graph layer down_blocks.0.resnets.0.conv1)");
    let c = |part: &str| format!("{C}.{part}");
    let dir = tempfile::tempdir().unwrap();
    // conv1 is [32, 32, 3, 3]; lokr_w1 4x4 leaves w2 an 8x8x3x3 block.
    let lokr_tucker = |t2: Vec<usize>| {
        vec![
            (c("lokr_w1"), vec![4, 4]),
            (c("lokr_w2_a"), vec![2, 8]),
            (c("lokr_w2_b"), vec![2, 8]),
            (c("lokr_t2"), t2),
        ]
    };
    let cases: Vec<(&str, Keys, Vec<String>)> = vec![
        (
            "lokr_t2_1x1",
            lokr_tucker(vec![2, 2, 1, 1]),
            vec![c("lokr_t2"), "[2, 2, 1, 1]".into(), "[3, 3]".into()],
        ),
        (
            "lokr_t2_5x5",
            lokr_tucker(vec![2, 2, 5, 5]),
            vec![c("lokr_t2"), "[2, 2, 5, 5]".into(), "[3, 3]".into()],
        ),
        (
            // As many values as a 3x3 kernel, laid out differently.
            "lokr_t2_9x1",
            lokr_tucker(vec![2, 2, 9, 1]),
            vec![c("lokr_t2"), "[2, 2, 9, 1]".into(), "[3, 3]".into()],
        ),
        (
            "lokr_w2_1x1",
            vec![(c("lokr_w1"), vec![4, 4]), (c("lokr_w2"), vec![8, 8, 1, 1])],
            vec![c("lokr_w2"), "[8, 8, 1, 1]".into(), "8x72".into()],
        ),
        (
            "lokr_w2_9x1",
            vec![(c("lokr_w1"), vec![4, 4]), (c("lokr_w2"), vec![8, 8, 9, 1])],
            vec![c("lokr_w2"), "[8, 8, 9, 1]".into(), "[_, 8, 3, 3]".into()],
        ),
        (
            "lora_down_9x1",
            vec![
                (c("lora_down.weight"), vec![4, 32, 9, 1]),
                (c("lora_up.weight"), vec![32, 4, 1, 1]),
            ],
            vec![
                c("lora_down.weight"),
                "[4, 32, 9, 1]".into(),
                "[_, 32, 3, 3]".into(),
            ],
        ),
        (
            "loha_t2_1x1",
            vec![
                (c("hada_w1_a"), vec![4, 32]),
                (c("hada_w1_b"), vec![4, 32]),
                (c("hada_t1"), vec![4, 4, 3, 3]),
                (c("hada_w2_a"), vec![4, 32]),
                (c("hada_w2_b"), vec![4, 32]),
                (c("hada_t2"), vec![4, 4, 1, 1]),
            ],
            vec![c("hada_t2"), "[4, 4, 1, 1]".into(), "[3, 3]".into()],
        ),
    ];
    for (name, tensors, expected) in cases {
        let file = crafted_lora(dir.path(), name, &tensors);
        let expected: Vec<&str> = expected
            .iter()
            .map(String::as_str)
            .chain([layer.as_str()])
            .collect();
        assert_refused(&file, &[], &expected);
    }
    // The same Tucker LoKr with the layer's 3x3 kernel fuses.
    let file = crafted_lora(dir.path(), "lokr_t2_3x3", &lokr_tucker(vec![2, 2, 3, 3]));
    let mut m = import::read(&fixture("sd15_legacy")).unwrap();
    let mut pm = PassManager::new();
    pm.add(LoraPass {
        sources: vec![LoraSource {
            path: file,
            multiplier: 1.0,
        }],
        strict: true,
        component: None,
    });
    let report = pm.run(&mut m, &mut PassCx { verify: true }).unwrap();
    assert_eq!(report[0].rewritten.len(), 1, "{:?}", report[0]);
}

#[test]
fn adapter_mode_checks_the_loras_before_writing_anything() {
    const LAYER: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let dir = tempfile::tempdir().unwrap();
    // Readable files whose factors do not fit (the branches are built, the tensors are not).
    let wrong_shape = edited_kohya(dir.path(), "shape", |t| {
        t.iter_mut()
            .find(|(n, ..)| n == &format!("{LAYER}.lora_up.weight"))
            .unwrap()
            .1 = vec![16, 8];
    });
    assert_refused(
        &wrong_shape,
        &["--lora-mode", "adapter"],
        &[&format!(
            "layer {LAYER} (graph layer down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q)"
        )],
    );
    assert_refused(
        &lora("loha"),
        &["--lora-mode", "adapter"],
        &["LoHa and LoKr layers can only be fused"],
    );
}

/// A rank-1 LoRA of layer `proj` (4x4).
fn proj_lora_keys() -> Keys {
    vec![
        ("lora_unet_proj.lora_down.weight".into(), vec![1, 4]),
        ("lora_unet_proj.lora_up.weight".into(), vec![4, 1]),
    ]
}

/// A model of one `MatMul(x, w)` at module `proj` (node `/proj/MatMul`), `w` [4, 4] of
/// `dtype` holding `w`; `output: false` leaves the MatMul without output.
fn matmul_model(dtype: DataType, w: &[f64], output: bool) -> Model {
    use attune_compiler::onnx::{self, tensor_shape_proto::dimension::Value as Dim};
    let raw: Vec<u8> = match dtype {
        DataType::Double => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => w.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(),
    };
    let graph = onnx::GraphProto {
        name: "g".into(),
        input: vec![onnx::tensor_info(
            "x",
            dtype,
            Some(vec![Dim::DimValue(1), Dim::DimValue(4)]),
        )],
        output: vec![onnx::tensor_info(
            if output { "y" } else { "x" },
            dtype,
            None,
        )],
        initializer: vec![onnx::TensorProto {
            name: "w".into(),
            data_type: dtype as i32,
            dims: vec![4, 4],
            raw_data: raw.into(),
            ..Default::default()
        }],
        node: vec![onnx::NodeProto {
            input: vec!["x".into(), "w".into()],
            output: if output { vec!["y".into()] } else { vec![] },
            name: "/proj/MatMul".into(),
            op_type: "MatMul".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let proto = model_of(graph);
    let dir = tempfile::tempdir().unwrap();
    import::from_proto(
        proto,
        &mut attune_compiler::weights::ExternalData::new(dir.path()),
    )
    .unwrap()
}

fn fuse_into(m: &mut Model, file: &Path) -> attune_compiler::Result<Vec<PassReport>> {
    let mut pm = PassManager::new();
    pm.add(LoraPass {
        sources: vec![LoraSource {
            path: file.into(),
            multiplier: 1.0,
        }],
        strict: true,
        component: None,
    });
    pm.run(m, &mut PassCx { verify: false })
}

fn weight_values(m: &Model) -> Vec<f64> {
    let t = m.graph.initializer(m.graph.value_id("w").unwrap()).unwrap();
    let bytes = t.bytes().unwrap();
    if t.data_type() == DataType::Double as i32 {
        bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()).into())
            .collect()
    }
}

#[test]
fn f64_weights_fuse_like_f32_ones_and_stay_f64() {
    let dir = tempfile::tempdir().unwrap();
    let file = crafted_lora(dir.path(), "proj", &proj_lora_keys());
    // Values exact in f32, but for one: 0.1 shows f64 weights keep their own precision.
    let mut w: Vec<f64> = (0..16).map(|i| i as f64 * 0.25).collect();
    w[5] = 0.1;
    let (mut m32, mut m64) = (
        matmul_model(DataType::Float, &w, true),
        matmul_model(DataType::Double, &w, true),
    );
    fuse_into(&mut m32, &file).unwrap();
    let report = fuse_into(&mut m64, &file).unwrap();
    assert_eq!(report[0].rewritten.len(), 1, "{:?}", report[0]);
    let t = m64
        .graph
        .initializer(m64.graph.value_id("w").unwrap())
        .unwrap();
    assert_eq!(t.data_type(), DataType::Double as i32);
    assert_eq!(t.bytes().unwrap().len(), 16 * 8);
    let (f32s, f64s) = (weight_values(&m32), weight_values(&m64));
    // ΔW[o, i] = up[o]·down[i] (rank 1, no alpha: scale 1); MatMul stores W [in, out].
    for (at, (a, b)) in f32s.iter().zip(&f64s).enumerate() {
        let (i, o) = (at / 4, at % 4);
        let delta = crafted_value(o) * crafted_value(i);
        assert_eq!(*a as f32, w[at] as f32 + delta, "f32 element {at}");
        // f64: W + ΔW in f64, not (W rounded to f32) + ΔW.
        assert_eq!(*b, w[at] + f64::from(delta), "f64 element {at}");
        if at != 5 {
            assert_eq!(*b as f32, *a as f32, "element {at}: f64 {b} vs f32 {a}");
        }
    }
    // Adapter tensors of f64 branches are written as F64.
    let tensors = [attune_passes::lora::adapter::AdapterTensor {
        name: "a".into(),
        dims: vec![2],
        data: vec![0.5, -1.25],
        dtype: DataType::Double,
    }];
    let out = dir.path().join("a.safetensors");
    attune_passes::lora::adapter::write(&out, &tensors).unwrap();
    let bytes = fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = st.tensor("a").unwrap();
    assert_eq!(a.dtype(), safetensors::Dtype::F64);
    assert_eq!(
        a.data(),
        [0.5f64.to_le_bytes(), (-1.25f64).to_le_bytes()].concat()
    );
}

#[test]
fn malformed_layers_are_errors_or_skips_naming_them() {
    use attune_passes::glob::Globs;
    use attune_passes::lora::adapter::AdapterPass;
    let dir = tempfile::tempdir().unwrap();
    let file = crafted_lora(dir.path(), "proj", &proj_lora_keys());
    let adapter = |m: &mut Model| {
        let mut pm = PassManager::new();
        pm.add(AdapterPass {
            sources: vec![],
            layers: Some(Globs::parse("*")),
        });
        pm.run(m, &mut PassCx { verify: false })
    };
    // A weight with a negative dim (as built in memory; the importer refuses such files).
    let negative = || {
        let mut m = matmul_model(DataType::Float, &[0.0; 16], true);
        let w = m.graph.initializer(m.graph.value_id("w").unwrap()).unwrap();
        let mut bad = w.with_data(Vec::new().into());
        bad.proto.dims = vec![-1, 4];
        m.graph.set_initializer(bad);
        m
    };
    for err in [
        fuse_into(&mut negative(), &file).unwrap_err().to_string(),
        adapter(&mut negative()).unwrap_err().to_string(),
    ] {
        assert!(
            err.contains("tensor 'w'") && err.contains("negative dim") && err.contains("proj"),
            "{err}"
        );
    }
    // A MatMul without output takes no branch, and says why.
    let mut m = matmul_model(DataType::Float, &[0.0; 16], false);
    let report = adapter(&mut m).unwrap().remove(0);
    assert!(report.rewritten.is_empty(), "{report:?}");
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert_eq!(report.skipped[0].site, "proj");
    assert!(
        report.skipped[0]
            .reason
            .contains("node '/proj/MatMul' (MatMul at proj) has no output"),
        "{:?}",
        report.skipped[0]
    );
}

/// `name`'s LoRA file fused into `model` (with its attention fused too) computes the file's
/// reference, with `rewritten` layers adapted; as a run-time adapter, the base model without
/// it and the reference with it.
fn fuses_and_adapts(model: &str, name: &str, rewritten: usize) {
    let inputs = root().join("models").join(model).join("inputs");
    let file = lora(name);
    let file = file.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let compiled = |out: &str, flags: &[&str]| {
        let out = dir.path().join(out);
        let o = compile_to(&fixture(model), &out, flags);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        (out, stdout(&o))
    };
    let (fused, text) = compiled(
        "fused.onnx",
        &["--lora", file, "--lora-strict", "--attention", "flash"],
    );
    let report = format!("lora: {rewritten} rewritten, 0 skipped");
    assert!(text.contains(&report), "{model}: {text}");
    let got = run_unet(&fused, &inputs, &[]);
    assert_close(&got, &lora_ref(name), 1e-5, model);
    let (adapted, _) = compiled("adapted.onnx", &["--lora-mode", "adapter", "--lora", file]);
    let base = run_unet(&adapted, &inputs, &[]);
    assert_close(&base, &reference(model), 1e-6, model);
    let adapter = dir.path().join("adapted.adapter.safetensors");
    let with = run_unet(
        &adapted,
        &inputs,
        &["--adapter".into(), adapter.display().to_string()],
    );
    assert_close(&with, &lora_ref(name), 1e-5, model);
}

#[test]
fn an_sd3_lora_fuses_and_adapts_like_diffusers_and_peft() {
    // diffusers' SD3 format (`transformer.<module>` keys) on both streams' attention
    // projections, feed-forwards and adaLN projections (Gemm), on both exporters' graphs
    // (same weights), with the joint attention fused too.
    for model in ["sd3_legacy", "sd3_dynamo"] {
        fuses_and_adapts(model, "sd3_peft", 25);
    }
}

#[test]
fn a_kohya_flux_lora_splits_its_fused_layers_like_kohya() {
    // Black Forest Labs' names: each fused Q/K/V (and a single block's Q/K/V + MLP input)
    // is one kohya layer whose up rows are diffusers' modules: 13 layers adapt 20.
    fuses_and_adapts("flux_dynamo", "flux_kohya", 20);
    let dir = tempfile::tempdir().unwrap();
    let qkv = "lora_unet_double_blocks_0_img_attn_qkv";
    let uneven = crafted_lora(
        dir.path(),
        "uneven.safetensors",
        &[
            (format!("{qkv}.lora_down.weight"), vec![4, 16]),
            (format!("{qkv}.lora_up.weight"), vec![47, 4]),
        ],
    );
    assert_refused(
        &uneven,
        &[],
        &[
            qkv,
            "47 output rows do not split into transformer_blocks_0_attn_to_q",
        ],
    );
    let linear1 = "lora_unet_single_blocks_0_linear1";
    let loha = crafted_lora(
        dir.path(),
        "loha.safetensors",
        &["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
            .map(|p| (format!("{linear1}.{p}"), vec![4, 4])),
    );
    assert_refused(
        &loha,
        &[],
        &[linear1, "only a plain LoRA (lora_down, lora_up)"],
    );
}
