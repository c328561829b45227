//! Attention analysis and substitution on the real exports.
mod common;

use std::fs;
use std::path::Path;

use attune_compiler::analysis::{Shapes, attention};
use attune_compiler::export::{self, ExportOptions};
use attune_compiler::onnx::{ModelProto, TypeProto, ValueInfoProto, type_proto};
use attune_compiler::pass::{PassCx, PassManager, PassReport};
use attune_compiler::{Model, diff, import, verify};
use attune_passes::attention::{AttentionPass, FeatureMap, Mode, Target};
use attune_passes::glob::Globs;
use attune_runtime::compare::compare;
use attune_runtime::ort_backend::OrtOptions;
use attune_runtime::{Backend, Ep, HostTensor, inputs, npy};
use common::*;
use prost::Message;

const WITH_ATTENTION: [&str; 5] = [
    "sd15_legacy",
    "sd15_dynamo",
    "sd2_legacy",
    "sdxl_legacy",
    "sd15_classic_legacy",
];

fn analyze(name: &str) -> attention::AttentionAnalysis {
    let m = import::read(&fixture(name)).unwrap();
    attention::analyze(&m, &Shapes::infer(&m))
}

fn compile(name: &str, mode: Mode, layers: Option<&str>) -> (Model, PassReport) {
    let mut m = import::read(&fixture(name)).unwrap();
    let report = attention_pass(&mut m, mode, Target::Cpu, layers);
    (m, report)
}

/// Runs the attention pass (verified) on `m`; its report.
fn attention_pass(m: &mut Model, mode: Mode, target: Target, layers: Option<&str>) -> PassReport {
    let mut pm = PassManager::new();
    pm.add(AttentionPass {
        mode,
        target,
        layers: layers.map(Globs::parse),
        keep_unfused: None,
        keep_joint_unfused: false,
    });
    pm.run(m, &mut PassCx { verify: true }).unwrap().remove(0)
}

fn fixture_inputs(name: &str, model: &Model) -> Vec<(String, HostTensor)> {
    let dir = root().join("models").join(name).join("inputs");
    inputs::input_specs(model)
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                npy::read(&dir.join(format!("{}.npy", s.name))).unwrap(),
            )
        })
        .collect()
}

/// Writes the model and runs it on ORT CPU with the fixture's inputs.
fn run_cpu(name: &str, model: &Model) -> HostTensor {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    export::write(model, &path, &ExportOptions::default()).unwrap();
    let inputs = fixture_inputs(name, model);
    Backend::open(&path, Ep::Cpu, &OrtOptions::default())
        .unwrap()
        .run(&inputs)
        .unwrap()
        .remove(0)
        .1
}

fn reference(name: &str) -> HostTensor {
    npy::read(&root().join("models").join(name).join("ref/out_sample.npy")).unwrap()
}

#[test]
fn analysis_finds_every_site_with_heads_scale_and_blocks() {
    let expected = [
        ("sd15_legacy", 14, 7),
        ("sd15_dynamo", 14, 7),
        ("sd2_legacy", 14, 7),
        ("sdxl_legacy", 16, 8),
        ("sd15_classic_legacy", 8, 4),
        ("sd15_fp16_legacy", 8, 4),
    ];
    for (name, sites, blocks) in expected {
        let a = analyze(name);
        assert!(a.unrecognised.is_empty(), "{name}: {:?}", a.unrecognised);
        assert_eq!((a.sites.len(), a.blocks.len()), (sites, blocks), "{name}");
        for s in &a.sites {
            // diffusers' default scale, read from the graph (not assumed).
            assert!(
                (s.scale - (s.head_dim as f64).powf(-0.5)).abs() < 1e-6,
                "{name} {}: {}",
                s.path,
                s.scale
            );
            let cross = s.path.ends_with("attn2");
            assert_eq!(s.kind == attention::Kind::Cross, cross, "{name} {}", s.path);
            assert!(s.block.is_some() && s.q.weight.is_some());
        }
        for b in &a.blocks {
            assert!(
                b.attn1.is_some() && b.attn2.is_some() && b.input.is_some(),
                "{name} {}",
                b.path
            );
            assert_eq!(b.residual_adds.len(), 3, "{name} {}: residual adds", b.path);
        }
    }
    // SD2-style per-level head counts: 2 heads at 32 channels, 4 heads at 64.
    let sd2: Vec<(i64, i64)> = analyze("sd2_legacy")
        .sites
        .iter()
        .map(|s| (s.heads, s.head_dim))
        .collect();
    assert!(sd2.contains(&(2, 16)) && sd2.contains(&(4, 16)), "{sd2:?}");
    // Symbolic token counts: full resolution at the first level, cross keys = text tokens.
    let first = &analyze("sd15_legacy").sites[1];
    assert_eq!(
        first.query_tokens.as_ref().unwrap().to_string(),
        "height*width"
    );
    assert_eq!(first.key_tokens.as_ref().unwrap().to_string(), "sequence");
    assert!(analyze("noattn_legacy").sites.is_empty());
}

#[test]
fn legacy_and_dynamo_exports_give_the_same_records() {
    let key = |name: &str| -> Vec<(String, &'static str, i64, i64, String)> {
        analyze(name)
            .sites
            .iter()
            .map(|s| {
                (
                    s.path.clone(),
                    s.kind.name(),
                    s.heads,
                    s.head_dim,
                    format!("{:.6}", s.scale),
                )
            })
            .collect()
    };
    assert_eq!(key("sd15_legacy"), key("sd15_dynamo"));
}

#[test]
fn flash_and_onnx_keep_outputs_on_ort_cpu() {
    for name in WITH_ATTENTION {
        for mode in [Mode::Flash, Mode::Onnx] {
            let (m, report) = compile(name, mode, None);
            assert!(
                report.skipped.is_empty(),
                "{name} {mode:?}: {:?}",
                report.skipped
            );
            assert_eq!(report.rewritten.len(), analyze(name).sites.len());
            // Nothing the rewrite orphaned is left behind.
            let g = &m.graph;
            assert!(g.node_ids().all(|n| {
                g.node(n)
                    .outputs
                    .iter()
                    .flatten()
                    .any(|v| !g.value(*v).consumers.is_empty() || g.is_graph_output(*v))
            }));
            assert!(
                g.node_ids().all(|n| !g.node(n).is("Softmax")),
                "{name} {mode:?}: a softmax survived"
            );
            let c = compare("out_sample", &reference(name), &run_cpu(name, &m)).unwrap();
            assert!(c.rel_l2 <= 1e-5, "{name} {mode:?}: {c:?}");
        }
    }
}

#[test]
fn onnx_mode_raises_the_opset_and_ir_version() {
    let (m, report) = compile("sd15_legacy", Mode::Onnx, None);
    assert_eq!(m.opset(""), Some(23));
    assert_eq!(m.proto.ir_version, 11);
    assert!(
        report.notes.iter().any(|n| n == "default opset 17 -> 23"),
        "{:?}",
        report.notes
    );
    verify::verify(&m).unwrap();
}

/// Snapshot of the structural diff; on a mismatch the new rendering is left next to it.
fn check_snapshot(file: &str, got: &str) {
    let path = root().join("tests/snapshots").join(file);
    let want = fs::read_to_string(&path).unwrap_or_default();
    if want != got {
        fs::write(path.with_extension("txt.new"), got).unwrap();
        panic!(
            "{file} differs from the snapshot; see {}.new",
            path.display()
        );
    }
}

#[test]
fn structural_diff_snapshots() {
    for (name, mode, file) in [
        (
            "sd15_legacy",
            Mode::Flash,
            "attention_flash_sd15_legacy.txt",
        ),
        ("sd15_dynamo", Mode::Onnx, "attention_onnx_sd15_dynamo.txt"),
    ] {
        let before = import::read(&fixture(name)).unwrap();
        let (after, _) = compile(name, mode, None);
        check_snapshot(file, &diff::diff(&before, &after).render());
    }
}

#[test]
fn linear_attention_runs_and_reports_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("linear.onnx");
    let model = fixture("sd15_legacy");
    for map in ["relu", "elu1"] {
        let mut flags = vec!["--attention", "linear", "--linear-feature-map", map];
        flags.extend(DIMS);
        let o = compile_to(&model, &out, &flags);
        let text = stdout(&o);
        assert!(o.status.success(), "{text}{}", stderr(&o));
        assert!(
            text.contains("attention: 14 rewritten")
                && text.contains("measured change of the outputs"),
            "{text}"
        );
        let line = text.lines().find(|l| l.starts_with("out_sample")).unwrap();
        let rel_l2: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(
            rel_l2 > 1e-4 && rel_l2.is_finite(),
            "{map}: linear attention must change the output measurably: {line}"
        );
    }
    // Without inputs to measure on, it refuses before writing anything.
    let refused = dir.path().join("refused.onnx");
    let o = compile_to(
        &fixture("sd15_legacy"),
        &refused,
        &["--attention", "linear"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--dim height=N"), "{}", stderr(&o));
    assert!(!refused.exists());
    // The library pass itself rewrites every site.
    let (_, report) = compile("sd15_dynamo", Mode::Linear(FeatureMap::Elu1), None);
    assert_eq!(report.rewritten.len(), 14);
}

#[test]
fn keep_mode_and_models_without_attention_are_no_ops() {
    let before = import::read(&fixture("sd15_legacy")).unwrap();
    let (kept, report) = compile("sd15_legacy", Mode::Keep, None);
    assert!(diff::diff(&before, &kept).is_empty());
    assert!(report.notes[0].contains("keep"), "{:?}", report.notes);
    let before = import::read(&fixture("noattn_legacy")).unwrap();
    let (after, report) = compile("noattn_legacy", Mode::Flash, None);
    assert!(diff::diff(&before, &after).is_empty());
    assert_eq!(
        report.notes,
        ["no attention found in the graph: nothing to do"]
    );
    assert_eq!(
        run_cpu("noattn_legacy", &after),
        run_cpu("noattn_legacy", &before)
    );
}

#[test]
fn layer_selection_rewrites_only_matching_sites() {
    let (m, report) = compile("sd15_legacy", Mode::Flash, Some("up_blocks.*,*.attn1"));
    assert_eq!(report.rewritten.len(), 8 + 3); // up_blocks: 8 sites; attn1 elsewhere: 3
    assert_eq!(report.skipped.len(), 3);
    assert!(
        report
            .skipped
            .iter()
            .all(|s| s.reason == "not selected by --attention-layers up_blocks.*,*.attn1")
    );
    assert!(
        report
            .skipped
            .iter()
            .all(|s| !s.site.starts_with("up_blocks") && s.site.ends_with("attn2"))
    );
    let c = compare(
        "out_sample",
        &reference("sd15_legacy"),
        &run_cpu("sd15_legacy", &m),
    )
    .unwrap();
    assert!(c.rel_l2 <= 1e-5, "{c:?}");
}

/// sd15_legacy with one edit to its proto, read back through the importer.
fn edited(edit: impl FnOnce(&mut ModelProto)) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_fixture("sd15_legacy", dir.path());
    let mut proto = ModelProto::decode(fs::read(&path).unwrap().as_slice()).unwrap();
    edit(&mut proto);
    fs::write(&path, proto.encode_to_vec()).unwrap();
    let m = import::read(Path::new(&path)).unwrap();
    (dir, m)
}

#[test]
fn sites_the_ops_cannot_take_are_skipped_with_the_reason() {
    const SITE: &str = "/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1";
    // 1. A run-time temperature instead of a constant scale.
    let (_dir, mut m) = edited(|p| {
        let g = p.graph.as_mut().unwrap();
        g.node
            .iter_mut()
            .find(|n| n.name == format!("{SITE}/Mul"))
            .unwrap()
            .input[1] = "temperature".into();
        let scalar = type_proto::Tensor {
            elem_type: 1,
            shape: Some(Default::default()),
        };
        g.input.push(ValueInfoProto {
            name: "temperature".into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(scalar)),
                ..Default::default()
            }),
            ..Default::default()
        });
    });
    let report = attention_pass(&mut m, Mode::Flash, Target::Cpu, None);
    assert_eq!(report.rewritten.len(), 13, "{report:?}");
    assert_eq!(report.skipped.len(), 1);
    let s = &report.skipped[0];
    assert_eq!(
        s.site,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    );
    assert!(
        s.reason.contains("scale factor") && s.reason.contains("not a constant"),
        "{}",
        s.reason
    );

    // 2. A head count that does not divide the hidden size (3 heads of 32 channels).
    let (_dir, mut m) = edited(|p| {
        let g = p.graph.as_mut().unwrap();
        let c = g
            .node
            .iter_mut()
            .find(|n| n.name == format!("{SITE}/Constant_4"))
            .unwrap();
        let t = c.attribute[0].t.as_mut().unwrap();
        t.raw_data = 3i64.to_le_bytes().to_vec().into();
    });
    let report = attention_pass(&mut m, Mode::Flash, Target::Cpu, None);
    assert_eq!(report.rewritten.len(), 13);
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    assert!(
        report.skipped[0].reason.contains("head"),
        "{}",
        report.skipped[0].reason
    );
}

#[test]
fn inspect_lists_attention_in_text_and_json() {
    let o = attune(&[
        "inspect",
        fixture("sd15_dynamo").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let sites = v["attention"].as_array().unwrap();
    assert_eq!(sites.len(), 14);
    assert_eq!(
        sites[0]["path"],
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    );
    assert_eq!(sites[0]["kind"], "self");
    assert_eq!(sites[1]["kind"], "cross");
    assert_eq!(v["layer_norms_written_out"], 0);
    // The opset-14 export: the same sites, its LayerNorms written out (so no blocks yet).
    let o = attune(&[
        "inspect",
        fixture("sd15_op14_legacy").to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["attention"].as_array().unwrap().len(), 14);
    assert_eq!(v["layer_norms_written_out"], 21);
    let o = attune(&["inspect", fixture("sd15_op14_legacy").to_str().unwrap()]);
    assert!(
        stdout(&o).contains("note: 21 LayerNorms are written out (opset 14"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        (sites[0]["heads"].as_i64(), sites[0]["head_dim"].as_i64()),
        (Some(2), Some(16))
    );
    let o = attune(&["inspect", fixture("sd15_legacy").to_str().unwrap()]);
    let text = stdout(&o);
    assert!(
        text.contains("attention   14 sites in 7 transformer blocks"),
        "{text}"
    );
    assert!(
        text.contains("mid_block.attentions.0.transformer_blocks.0.attn2"),
        "{text}"
    );
}

#[test]
fn fp16_export_with_cast_wrappers_is_recognised_and_ep_rules_apply() {
    const NAME: &str = "sd15_fp16_legacy";
    let a = analyze(NAME);
    assert!(a.unrecognised.is_empty(), "{:?}", a.unrecognised);
    assert_eq!(a.sites.len(), 8);
    // The CPU execution provider's fused kernels are float32-only: every site skipped, saying why.
    let mut m = import::read(&fixture(NAME)).unwrap();
    let report = attention_pass(&mut m, Mode::Flash, Target::Cpu, None);
    assert!(report.rewritten.is_empty());
    assert_eq!(report.skipped.len(), 8);
    assert!(
        report
            .skipped
            .iter()
            .all(|s| s.reason.contains("needs float32; this site is f16")),
        "{:?}",
        report.skipped
    );
    // For CUDA they are rewritten; ORT CPU can still execute the result, within fp16 precision.
    for mode in [Mode::Flash, Mode::Onnx] {
        let mut m = import::read(&fixture(NAME)).unwrap();
        let report = attention_pass(&mut m, mode, Target::Cuda, None);
        assert_eq!(report.rewritten.len(), 8, "{mode:?}: {:?}", report.skipped);
        let c = compare("out_sample", &reference(NAME), &run_cpu(NAME, &m)).unwrap();
        assert!(c.rel_l2 <= 2e-3, "{mode:?}: {c:?}");
    }
}

#[test]
fn a_diffusion_transformers_attention_is_found_and_fused() {
    // PixArt-α (patchified tokens, adaLN-single blocks): its position table and unpatchify are
    // Einsums, which shape inference must follow to see the heads split.
    const NAME: &str = "pixart_legacy";
    let a = analyze(NAME);
    assert!(a.unrecognised.is_empty(), "{:?}", a.unrecognised);
    assert_eq!((a.sites.len(), a.blocks.len()), (4, 2));
    for mode in [Mode::Flash, Mode::Onnx] {
        let (m, report) = compile(NAME, mode, None);
        assert_eq!(report.rewritten.len(), 4, "{report:?}");
        let c = compare("out_sample", &reference(NAME), &run_cpu(NAME, &m)).unwrap();
        assert!(c.rel_l2 <= 1e-5, "{mode:?}: {c:?}");
    }
}

#[test]
fn sd3s_joint_attention_is_found_and_fused() {
    // SD3's MM-DiT attends over the image and text tokens concatenated (each stream projected
    // by its own weights); SD3.5 normalises every head of Q and K (RMS qk-norm) and adds an
    // image-only self-attention. Both exporters.
    use attention::Operand::{Heads, Joint, Tokens};
    for name in ["sd3_legacy", "sd3_dynamo", "sd35_legacy", "sd35_dynamo"] {
        let qk_norm = name.starts_with("sd35");
        let a = analyze(name);
        assert!(a.unrecognised.is_empty(), "{name}: {:?}", a.unrecognised);
        let kinds: Vec<(&str, attention::Kind)> =
            a.sites.iter().map(|s| (s.path.as_str(), s.kind)).collect();
        let mut expected = vec![("transformer_blocks.0.attn", attention::Kind::Joint)];
        if qk_norm {
            expected.push(("transformer_blocks.0.attn2", attention::Kind::SelfAttention));
        }
        expected.push(("transformer_blocks.1.attn", attention::Kind::Joint));
        assert_eq!(kinds, expected, "{name}");
        for s in &a.sites {
            assert_eq!((s.heads, s.head_dim), (2, 8), "{name} {}", s.path);
            assert!(
                (s.scale - 8f64.powf(-0.5)).abs() < 1e-6,
                "{name}: {}",
                s.scale
            );
            // What the fused op reads: the projections themselves where nothing happens per
            // head, the normalised heads where qk-norm does.
            let [q, k, v] = s.operands;
            let context = s.context.as_ref();
            assert_eq!(
                context.is_some(),
                s.kind == attention::Kind::Joint,
                "{name}"
            );
            match (s.kind, qk_norm) {
                (attention::Kind::Joint, false) => {
                    let c = context.unwrap();
                    assert_eq!(q, Joint(s.q.output, c.q.output), "{name}");
                    assert_eq!(k, Joint(s.k.output, c.k.output), "{name}");
                }
                _ => assert!(matches!((q, k), (Heads(_), Heads(_))), "{name} {q:?} {k:?}"),
            }
            match context {
                Some(c) => assert_eq!(v, Joint(s.v.output, c.v.output), "{name}"),
                None => assert_eq!(v, Tokens(s.v.output), "{name}"),
            }
        }
        for mode in [Mode::Flash, Mode::Onnx] {
            let (m, report) = compile(name, mode, None);
            assert_eq!(report.rewritten.len(), a.sites.len(), "{name}: {report:?}");
            assert!(
                m.graph.node_ids().all(|n| !m.graph.node(n).is("Softmax")),
                "{name} {mode:?}"
            );
            let c = compare("out_sample", &reference(name), &run_cpu(name, &m)).unwrap();
            assert!(c.rel_l2 <= 1e-5, "{name} {mode:?}: {c:?}");
            // The streams' head splits and their Concats are gone (no Transpose is left in
            // the attention modules); qk-norm's heads keep their split (the norm reads it) and
            // are merged back for the fused op: Q and K of two streams, 3 each per joint site,
            // 2 each for the image-only one.
            let transposes = m
                .graph
                .node_ids()
                .filter(|n| {
                    let node = m.graph.node(*n);
                    node.is("Transpose") && node.module.contains(".attn")
                })
                .count();
            assert_eq!(transposes, if qk_norm { 2 * 6 + 4 } else { 0 }, "{name}");
        }
        // Linear attention changes the function; it runs and says by how much.
        let (m, _) = compile(name, Mode::Linear(FeatureMap::Elu1), None);
        let c = compare("out_sample", &reference(name), &run_cpu(name, &m)).unwrap();
        assert!(c.rel_l2 > 1e-4 && c.rel_l2 < 0.2, "{name}: {c:?}");
    }
}

#[test]
fn fluxs_attention_with_rotary_embeddings_is_traced_and_fused() {
    // Flux splits heads without a transpose, normalises them (RMS), joins the streams (text
    // first) and rotates Q and K (RoPE) before transposing for the scores: no exporter form
    // matches, so the projections are found by tracing back from what the scores read.
    const NAME: &str = "flux_dynamo";
    let a = analyze(NAME);
    assert!(a.unrecognised.is_empty(), "{:?}", a.unrecognised);
    let sites: Vec<(&str, attention::Kind, &str)> = a
        .sites
        .iter()
        .map(|s| (s.path.as_str(), s.kind, s.form))
        .collect();
    assert_eq!(
        sites,
        [
            (
                "transformer_blocks.0.attn",
                attention::Kind::Joint,
                "traced"
            ),
            (
                "single_transformer_blocks.0.attn",
                attention::Kind::SelfAttention,
                "traced"
            ),
        ]
    );
    let g = &import::read(&fixture(NAME)).unwrap().graph;
    let module = |p: &attention::Projection| g.node(p.matmul).module.clone();
    let joint = &a.sites[0];
    let context = joint.context.as_ref().unwrap();
    assert_eq!(
        [
            &joint.q, &joint.k, &joint.v, &context.q, &context.k, &context.v
        ]
        .map(module),
        [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj"
        ]
        .map(|p| format!("transformer_blocks.0.attn.{p}"))
    );
    for s in &a.sites {
        assert_eq!((s.heads, s.head_dim), (2, 8), "{}", s.path);
        // Rotated Q and K are read as they are.
        assert!(
            matches!(
                s.operands[..2],
                [attention::Operand::Heads(_), attention::Operand::Heads(_)]
            ),
            "{}: {:?}",
            s.path,
            s.operands
        );
    }
    for mode in [Mode::Flash, Mode::Onnx] {
        let (m, report) = compile(NAME, mode, None);
        assert_eq!(report.rewritten.len(), 2, "{report:?}");
        let c = compare("out_sample", &reference(NAME), &run_cpu(NAME, &m)).unwrap();
        assert!(c.rel_l2 <= 1e-5, "{mode:?}: {c:?}");
    }
    let (m, _) = compile(NAME, Mode::Linear(FeatureMap::Elu1), None);
    let c = compare("out_sample", &reference(NAME), &run_cpu(NAME, &m)).unwrap();
    assert!(c.rel_l2 > 1e-4 && c.rel_l2 < 0.2, "{c:?}");
}
