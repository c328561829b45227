//! The attention pass on the pipelines' other components (optimum's exports in
//! `models/pipelines/`, made by `models/export/pipelines.py`): the CLIP text encoders'
//! self-attention, whose causal mask is added to the scores, becomes the fused op's attention
//! bias; the VAE encoder's mid-block attention is found once its strided Downsample2D (an
//! explicit `Pad` before the conv) keeps the sizes known. Each compiled component computes
//! what the original does on ORT CPU (max abs 1e-5) on realistic inputs: the reference
//! prompts' token ids padded with each tokenizer's pad token, and images.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use attune_compiler::analysis::{Shapes, attention};
use attune_compiler::import;
use attune_compiler::onnx::ModelProto;
use attune_runtime::ort_backend::{OptLevel, OrtOptions};
use attune_runtime::{Backend, Ep, HostTensor, image, npy};
use common::*;
use ndarray::{ArrayD, IxDyn};
use prost::Message;

/// The largest difference allowed between the original's and the compiled outputs.
const MAX_ABS: f64 = 1e-5;

fn pipeline(name: &str) -> PathBuf {
    root().join("models/pipelines").join(name)
}

struct Component {
    pipeline: &'static str,
    name: &'static str,
    /// Attention sites it has (CLIP: one per layer; the VAE encoder: its mid block's).
    sites: usize,
    /// A mask on the scores (CLIP's causal mask).
    masked: bool,
}

const COMPONENTS: [Component; 5] = [
    Component {
        pipeline: "sd15_tiny",
        name: "text_encoder",
        sites: 2,
        masked: true,
    },
    Component {
        pipeline: "sdxl_tiny",
        name: "text_encoder",
        sites: 2,
        masked: true,
    },
    Component {
        pipeline: "sdxl_tiny",
        name: "text_encoder_2",
        sites: 2,
        masked: true,
    },
    Component {
        pipeline: "sd15_tiny",
        name: "vae_encoder",
        sites: 1,
        masked: false,
    },
    Component {
        pipeline: "sdxl_tiny",
        name: "vae_encoder",
        sites: 1,
        masked: false,
    },
];

impl Component {
    fn model(&self) -> PathBuf {
        pipeline(self.pipeline).join(self.name).join("model.onnx")
    }

    /// The inputs it runs on: the reference prompts' token ids (as transformers' CLIPTokenizer
    /// wrote them, padded to 77 with the folder's pad token), or the img2img reference's input
    /// image, alone and as a batch of two 32×48 images (upscaled, and mirrored).
    fn inputs(&self) -> Vec<Vec<(String, HostTensor)>> {
        let one = |name: &str, t: HostTensor| vec![(name.to_string(), t)];
        if self.name.starts_with("text_encoder") {
            let file = if self.name == "text_encoder_2" {
                "token_ids_2.npy"
            } else {
                "token_ids.npy"
            };
            let ids =
                npy::read(&pipeline(self.pipeline).join("reference/tokens").join(file)).unwrap();
            return vec![one("input_ids", ids)];
        }
        let png = pipeline("sd15_tiny").join("reference/img2img/input.png");
        let HostTensor::F32(x) = image::to_tensor(&image::read_png(&png).unwrap()) else {
            panic!("to_tensor gives f32");
        };
        let (h, w) = (x.shape()[2], x.shape()[3]);
        let big = ArrayD::from_shape_fn(IxDyn(&[2, 3, 32, 48]), |i| {
            let (y, xx) = (i[2] * h / 32, i[3] * w / 48);
            let xx = if i[0] == 1 { w - 1 - xx } else { xx };
            x[[0, i[1], y, xx]]
        });
        vec![
            one("sample", HostTensor::F32(x)),
            one("sample", HostTensor::F32(big)),
        ]
    }

    /// `--dim` sizes for the modes that measure the change they make (linear).
    fn dims(&self) -> Vec<&'static str> {
        if self.name.starts_with("text_encoder") {
            vec!["--dim", "batch_size=8", "--dim", "sequence_length=77"]
        } else {
            vec![
                "--dim",
                "batch_size=1",
                "--dim",
                "sample_height=16",
                "--dim",
                "sample_width=16",
            ]
        }
    }
}

fn run(model: &Path, inputs: &[(String, HostTensor)]) -> BTreeMap<String, HostTensor> {
    run_at(model, inputs, OptLevel::All)
}

fn run_at(
    model: &Path,
    inputs: &[(String, HostTensor)],
    opt_level: OptLevel,
) -> BTreeMap<String, HostTensor> {
    let opts = OrtOptions {
        opt_level,
        ..OrtOptions::default()
    };
    Backend::open(model, Ep::Cpu, &opts)
        .unwrap()
        .run(inputs)
        .unwrap()
        .into_iter()
        .collect()
}

/// The nodes of `op` (`domain.Op` outside the default domain) in the model, each with its
/// inputs' names ("" for an omitted one).
fn nodes_of(model: &Path, op: &str) -> Vec<Vec<String>> {
    let m = import::read(model).unwrap();
    let g = &m.graph;
    let (domain, op) = op.rsplit_once('.').unwrap_or(("", op));
    g.node_ids()
        .filter(|n| g.node(*n).op() == op && g.node(*n).domain() == domain)
        .map(|n| {
            g.node(n)
                .inputs
                .iter()
                .map(|v| v.map(|v| g.value(v).name.clone()).unwrap_or_default())
                .collect()
        })
        .collect()
}

/// The compiled model computes the original's outputs (every one, max abs), with ONNX
/// Runtime's graph optimisation off (each graph as written) and at its full level (which
/// fuses the original's attention as well).
fn assert_same_outputs(c: &Component, compiled: &Path, what: &str) {
    for (inputs, level) in c
        .inputs()
        .into_iter()
        .flat_map(|i| [(i.clone(), OptLevel::Disable), (i, OptLevel::All)])
    {
        let want = run_at(&c.model(), &inputs, level);
        let got = run_at(compiled, &inputs, level);
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        for (name, w) in &want {
            let cmp = attune_runtime::compare::compare(name, w, &got[name]).unwrap();
            eprintln!(
                "{}/{} {what} {name} {:?} (ORT {level:?}): max abs {:.2e}",
                c.pipeline, c.name, cmp.shape, cmp.max_abs
            );
            assert!(
                cmp.max_abs <= MAX_ABS,
                "{}/{} {what}: {cmp:?}",
                c.pipeline,
                c.name
            );
        }
    }
}

#[test]
fn the_analysis_finds_every_site_of_the_exports_as_they_are() {
    for c in &COMPONENTS {
        let m = import::read(&c.model()).unwrap();
        let found = attention::analyze(&m, &Shapes::infer(&m));
        let what = format!("{}/{}", c.pipeline, c.name);
        assert!(
            found.unrecognised.is_empty(),
            "{what}: {:?}",
            found.unrecognised
        );
        assert_eq!(found.sites.len(), c.sites, "{what}");
        for s in &found.sites {
            assert_eq!(s.kind, attention::Kind::SelfAttention, "{what}");
            // CLIP's causal mask, [batch, 1, query, key].
            assert_eq!(
                s.mask.map(|(_, rank)| rank),
                c.masked.then_some(4),
                "{what}"
            );
        }
    }
}

#[test]
fn flash_fuses_every_site_with_the_mask_as_attention_bias() {
    let tmp = tempfile::tempdir().unwrap();
    for c in &COMPONENTS {
        let (out, report) = compile_into(tmp.path(), &c.model(), &["--attention", "flash"]);
        let want = format!("attention: {} rewritten, 0 skipped", c.sites);
        assert!(
            report.contains(&want),
            "{}/{}: {report}",
            c.pipeline,
            c.name
        );
        let mha = nodes_of(&out, "com.microsoft.MultiHeadAttention");
        assert_eq!(mha.len(), c.sites, "{report}");
        for inputs in &mha {
            // query, key, value, bias, key_padding_mask, attention_bias
            let bias = inputs.get(5).filter(|b| !b.is_empty());
            assert_eq!(bias.is_some(), c.masked, "{inputs:?}");
            assert!((3..5).all(|i| inputs.get(i).is_none_or(String::is_empty)));
        }
        assert!(nodes_of(&out, "Softmax").is_empty(), "{report}");
        assert_same_outputs(c, &out, "flash");
        if c.masked {
            assert_the_mask_matters(c, &out);
        }
    }
}

/// The same fused graph without its attention bias computes something else: the mask the
/// outputs agree on is really applied (CLIP's causal mask changes every token but the last).
fn assert_the_mask_matters(c: &Component, compiled: &Path) {
    let mut m = ModelProto::decode(std::fs::read(compiled).unwrap().as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    for n in g
        .node
        .iter_mut()
        .filter(|n| n.op_type == "MultiHeadAttention")
    {
        n.input.truncate(3);
    }
    let unmasked = compiled.with_extension("unmasked.onnx");
    std::fs::write(&unmasked, m.encode_to_vec()).unwrap();
    for inputs in c.inputs() {
        let (want, got) = (run(&c.model(), &inputs), run(&unmasked, &inputs));
        let cmp = attune_runtime::compare::compare(
            "",
            &want["last_hidden_state"],
            &got["last_hidden_state"],
        )
        .unwrap();
        assert!(cmp.max_abs > 1e-2, "{}/{}: {cmp:?}", c.pipeline, c.name);
    }
}

#[test]
fn onnx_fuses_every_site_with_the_mask_as_attn_mask() {
    let tmp = tempfile::tempdir().unwrap();
    for c in &COMPONENTS {
        let (out, report) = compile_into(tmp.path(), &c.model(), &["--attention", "onnx"]);
        let want = format!("attention: {} rewritten, 0 skipped", c.sites);
        assert!(
            report.contains(&want),
            "{}/{}: {report}",
            c.pipeline,
            c.name
        );
        let att = nodes_of(&out, "Attention");
        assert_eq!(att.len(), c.sites, "{report}");
        for inputs in &att {
            // Q, K, V, attn_mask
            assert_eq!(
                inputs.len() == 4 && !inputs[3].is_empty(),
                c.masked,
                "{inputs:?}"
            );
        }
        assert!(nodes_of(&out, "Softmax").is_empty(), "{report}");
        assert_same_outputs(c, &out, "onnx");
    }
}

#[test]
fn linear_attention_leaves_masked_sites_as_exported_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    for c in &COMPONENTS {
        let mut flags = vec!["--attention", "linear"];
        flags.extend(c.dims());
        let (out, report) = compile_into(tmp.path(), &c.model(), &flags);
        let what = format!("{}/{}", c.pipeline, c.name);
        if c.masked {
            let want = format!("attention: 0 rewritten, {} skipped", c.sites);
            assert!(report.contains(&want), "{what}: {report}");
            assert_eq!(
                report
                    .matches("linear attention cannot apply the additive mask")
                    .count(),
                c.sites,
                "{what}: {report}"
            );
            // Nothing changed what it computes.
            assert_same_outputs(c, &out, "linear (skipped)");
        } else {
            // The VAE encoder's site has no mask: it becomes linear attention (another
            // function, measured by the pass), which still runs on every input.
            let want = format!("attention: {} rewritten, 0 skipped", c.sites);
            assert!(report.contains(&want), "{what}: {report}");
            for inputs in c.inputs() {
                let got = run(&out, &inputs);
                let want = run(&c.model(), &inputs);
                for (name, w) in &want {
                    assert_eq!(w.shape(), got[name].shape(), "{what} {name}");
                    assert!(got[name].to_f64().iter().all(|x| x.is_finite()));
                }
            }
        }
    }
}

#[test]
fn a_pipeline_folder_reports_every_component_fused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let src = pipeline("sd15_tiny");
    let o = compile_to(&src, &out, &["--attention", "flash"]);
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    // A component's lines: its heading and the indented lines under it.
    let section = |name: &str| {
        let mut lines = text
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{name} (")));
        let head = lines.next().unwrap_or_else(|| panic!("{name} in {text}"));
        let body: Vec<&str> = lines.take_while(|l| l.starts_with(' ')).collect();
        format!("{head}\n{}", body.join("\n"))
    };
    for (component, sites) in [
        ("text_encoder", 2),
        ("unet", 8),
        ("vae_decoder", 1),
        ("vae_encoder", 1),
    ] {
        let s = section(component);
        let want = format!("attention: {sites} rewritten, 0 skipped");
        assert!(s.contains(&want), "{s}");
        assert!(!s.contains("unrecognised"), "{s}");
    }
    // The batch of prompts the text encoder encodes, encoded alike by the folder's copy.
    let te = &COMPONENTS[0];
    assert_same_outputs(te, &out.join("text_encoder/model.onnx"), "folder flash");
}
