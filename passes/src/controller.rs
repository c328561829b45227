//! Attention-control hooks as graph inputs and outputs, driven at run time:
//! - `capture`: every hooked cross-attention site outputs its head-averaged probabilities
//!   `attn.<path>` [batch, query tokens, text tokens];
//! - `p2p`: Prompt-to-Prompt on the conditional half of a CFG batch [uncond × P, cond × P]
//!   (prompt 0 the source): cross sites take `p2p.<path>.alpha` [P-1, T] (blend weight of the
//!   edit per text token), `.mapper` [P-1, T, T] (replace: a word map; refine: one-hot) and
//!   `.equalizer` [P-1 or 1, T] (reweight); edited maps = alpha·((source ⊗ mapper)·equalizer)
//!   + (1-alpha)·own. Self sites take `p2p.<path>.self_gate` (scalar): edited self maps become
//!   the source's where gate = 1 and the site has at most 16·16 query tokens;
//! - `masactrl`: self sites take `masactrl.<path>.gate` (scalar): where 1, every image of a
//!   half attends to the keys/values of the first image of that half (MasaCtrl).
//! Every input defaults to "no control" (alpha 0, identity mapper, equalizer 1, gates 0):
//! a graph fed nothing computes exactly what the original does. Capture and P2P need the
//! probabilities, so their sites must stay unfused; MasaCtrl works on fused sites too.
use attune_compiler::analysis::attention::{self, AttentionSite, Kind};
use attune_compiler::analysis::{ElemTypes, Shapes};
use attune_compiler::ir::{Model, NodeId, Use, ValueId};
use attune_compiler::onnx::{self, DataType, tensor_shape_proto};
use attune_compiler::pass::{Pass, PassCx, PassReport, Skipped};
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::weights::Tensor;
use attune_compiler::{Error, Result};

use crate::emit::Emitter;
use crate::glob::Globs;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Capture,
    P2p,
    MasaCtrl,
}

impl Hook {
    /// Does it need the attention probabilities (an unfused site)?
    pub fn needs_probabilities(self) -> bool {
        matches!(self, Hook::Capture | Hook::P2p)
    }
}

pub struct ControllerPass {
    pub hooks: Vec<Hook>,
    /// Only sites whose module path matches get hooks (all when `None`).
    pub layers: Option<Globs>,
    /// Text tokens the default mapper/equalizer/alpha are sized for (SD: 77).
    pub words: i64,
}

/// Self-replace applies to sites with at most this many query tokens (P2P: 16·16).
const SELF_REPLACE_MAX_TOKENS: i64 = 16 * 16;

pub fn input_name(kind: &str, path: &str, what: &str) -> String {
    format!("{kind}.{path}.{what}")
}

impl Pass for ControllerPass {
    fn name(&self) -> &'static str {
        "hooks"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        let selected = |path: &str| self.layers.as_ref().is_none_or(|g| g.matches(path));
        if self.words < 1 {
            return Err(Error::Graph(format!(
                "--hooks-words {}: must be at least 1",
                self.words
            )));
        }
        let shapes = Shapes::infer(model);
        // Types of the export's values; patches only add values, so they stay valid.
        let types = ElemTypes::infer(&model.graph)?;
        let found = attention::analyze(model, &shapes);
        for u in &found.unrecognised {
            report.skipped.push(Skipped {
                site: u.path.clone(),
                reason: format!("unrecognised attention: {}", u.reason),
            });
        }
        let wants = |h: Hook| self.hooks.contains(&h);
        if wants(Hook::Capture) || wants(Hook::P2p) {
            for site in found.sites.iter().filter(|s| selected(&s.path)) {
                let mut patch = Patch::new(model);
                match probability_hooks(
                    &mut patch,
                    model,
                    &types,
                    site,
                    wants(Hook::Capture),
                    wants(Hook::P2p),
                    self.words,
                ) {
                    Ok(what) if !what.is_empty() => {
                        patch.into_parts().apply(model)?;
                        report.rewritten.push(format!(
                            "{} ({}): {}",
                            site.path,
                            site.kind.name(),
                            what.join(", ")
                        ));
                    }
                    Ok(_) => {}
                    Err(why) => report.skipped.push(Skipped {
                        site: site.path.clone(),
                        reason: why,
                    }),
                }
            }
        }
        if wants(Hook::MasaCtrl) {
            // Self-attention modules of the transformer blocks, fused or not.
            let modules: Vec<String> = found
                .blocks
                .iter()
                .map(|b| format!("{}.attn1", b.path))
                .filter(|p| selected(p))
                .collect();
            for path in modules {
                let mut patch = Patch::new(model);
                match masactrl(&mut patch, model, &types, &path) {
                    Ok(()) => {
                        patch.into_parts().apply(model)?;
                        report
                            .rewritten
                            .push(format!("{path} (self): masactrl gate"));
                    }
                    Err(why) => report.skipped.push(Skipped {
                        site: path,
                        reason: why,
                    }),
                }
            }
        }
        if report.rewritten.is_empty() {
            report.notes.push("no attention site took a hook".into());
        }
        Ok(report)
    }
}

/// A float input with a default, declared with `dims` (`None` = a symbol).
fn input(
    p: &mut Patch,
    name: &str,
    dims: &[Option<i64>],
    default_dims: Vec<i64>,
    default: Vec<f32>,
) -> In {
    use tensor_shape_proto::dimension::Value;
    let dim = |(i, d): (usize, &Option<i64>)| match d {
        Some(v) => Value::DimValue(*v),
        None if i == 0 => Value::DimParam("edits".into()),
        None => Value::DimParam(format!("{name}_{i}")),
    };
    let dims = dims.iter().enumerate().map(dim).collect();
    let info = onnx::tensor_info(name, DataType::Float, Some(dims));
    let bytes: Vec<u8> = default.iter().flat_map(|v| v.to_le_bytes()).collect();
    In::New(p.graph_input(
        info,
        Some(Tensor::new(
            name,
            DataType::Float,
            default_dims,
            bytes.into(),
        )),
    ))
}

/// A float input cast to the probabilities' type when that is not f32.
fn typed(e: &mut Emitter, x: In, dtype: DataType, tag: &str) -> In {
    if dtype == DataType::Float {
        x
    } else {
        e.op("Cast", tag, vec![x], vec![attr::int("to", dtype as i64)])
    }
}

/// The element type of the first of `values` whose type is known (f32 if none).
fn float_type(types: &ElemTypes, values: &[ValueId]) -> DataType {
    values
        .iter()
        .find_map(|v| types.get(*v))
        .and_then(|t| DataType::try_from(t).ok())
        .unwrap_or(DataType::Float)
}

fn probability_hooks(
    p: &mut Patch,
    model: &Model,
    types: &ElemTypes,
    site: &AttentionSite,
    capture: bool,
    p2p: bool,
    words: i64,
) -> std::result::Result<Vec<&'static str>, String> {
    let g = &model.graph;
    let dtype = float_type(types, &[site.probs, site.q.output]);
    let cross = site.kind == Kind::Cross;
    if !cross && !p2p {
        return Ok(Vec::new()); // capture is for cross-attention maps
    }
    let after = Some(site.softmax);
    let mut e = Emitter::new(p, &site.path, after);
    let probs = In::Value(site.probs);
    // As [batch, heads, q, k] (the classic form keeps heads in the batch).
    let shape = e.op("Shape", "probs_shape", vec![probs.clone()], vec![]);
    let four = site.form == "classic";
    let probs4 = if four {
        let (s, en) = (e.i64s("hooks_qk_start", &[1]), e.i64s("hooks_qk_end", &[3]));
        let qk = e.op("Slice", "probs_qk", vec![shape.clone(), s, en], vec![]);
        let lead = e.i64s("hooks_batch_heads", &[-1, site.heads]);
        let target = e.op(
            "Concat",
            "probs4_shape",
            vec![lead, qk],
            vec![attr::int("axis", 0)],
        );
        e.op("Reshape", "probs4", vec![probs.clone(), target], vec![])
    } else {
        probs.clone()
    };
    let mut what = Vec::new();
    if capture && cross {
        let opset = model.opset("").unwrap_or(13);
        let mean = e.reduce(
            "ReduceMean",
            "heads_mean",
            probs4.clone(),
            &[1],
            false,
            opset,
        );
        e.p.graph_output(
            mean,
            &format!("attn.{}", site.path),
            dtype,
            &site.path,
            after,
        );
        what.push("capture");
    }
    if !p2p {
        return Ok(what);
    }
    // Split the batch: [uncond × P, source, edits × (P-1)].
    let shape4 = e.op("Shape", "probs4_shape_dims", vec![probs4.clone()], vec![]);
    let (z1, two, one1, max1) = (
        e.i64s("hooks_zero", &[0]),
        e.i64s("hooks_two", &[2]),
        e.i64s("hooks_one", &[1]),
        e.i64s("hooks_end", &[i64::MAX]),
    );
    let batch = e.op(
        "Slice",
        "batch",
        vec![shape4.clone(), z1.clone(), one1.clone()],
        vec![],
    );
    let half = e.op("Div", "prompts", vec![batch, two], vec![]);
    let half1 = e.op("Add", "prompts_plus_one", vec![half.clone(), one1], vec![]);
    let uncond = e.op(
        "Slice",
        "uncond",
        vec![probs4.clone(), z1.clone(), half.clone(), z1.clone()],
        vec![],
    );
    let source = e.op(
        "Slice",
        "source",
        vec![probs4.clone(), half, half1.clone(), z1.clone()],
        vec![],
    );
    let edits = e.op(
        "Slice",
        "edits",
        vec![probs4.clone(), half1, max1, z1],
        vec![],
    );
    let one = In::New(e.p.f32_scalar("hooks_one_f", 1.0));
    let one = typed(&mut e, one, dtype, "one_cast");
    let (blend, new_edits) = if cross {
        let w = words;
        let alpha = input(
            e.p,
            &input_name("p2p", &site.path, "alpha"),
            &[None, Some(w)],
            vec![1, w],
            vec![0.0; w as usize],
        );
        let eye: Vec<f32> = (0..w * w)
            .map(|i| if i / w == i % w { 1.0 } else { 0.0 })
            .collect();
        let mapper = input(
            e.p,
            &input_name("p2p", &site.path, "mapper"),
            &[None, Some(w), Some(w)],
            vec![1, w, w],
            eye,
        );
        let equalizer = input(
            e.p,
            &input_name("p2p", &site.path, "equalizer"),
            &[None, Some(w)],
            vec![1, w],
            vec![1.0; w as usize],
        );
        let (alpha, mapper, equalizer) = (
            typed(&mut e, alpha, dtype, "alpha_cast"),
            typed(&mut e, mapper, dtype, "mapper_cast"),
            typed(&mut e, equalizer, dtype, "equalizer_cast"),
        );
        let (ax1, ax12) = (e.i64s("hooks_axis1", &[1]), e.i64s("hooks_axes12", &[1, 2]));
        let mapper4 = e.op("Unsqueeze", "mapper4", vec![mapper, ax1], vec![]);
        let mapped = e.op("MatMul", "mapped", vec![source.clone(), mapper4], vec![]);
        let eq4 = e.op(
            "Unsqueeze",
            "equalizer4",
            vec![equalizer, ax12.clone()],
            vec![],
        );
        let weighted = e.op("Mul", "reweighted", vec![mapped, eq4], vec![]);
        (
            e.op("Unsqueeze", "alpha4", vec![alpha, ax12], vec![]),
            weighted,
        )
    } else {
        let gate = input(
            e.p,
            &input_name("p2p", &site.path, "self_gate"),
            &[],
            vec![],
            vec![0.0],
        );
        let gate = typed(&mut e, gate, dtype, "gate_cast");
        // Only maps with at most 16x16 query tokens are replaced.
        let (q_start, q_end) = (e.i64s("hooks_q_start", &[2]), e.i64s("hooks_q_end", &[3]));
        let nq = e.op(
            "Slice",
            "query_tokens",
            vec![shape4, q_start, q_end],
            vec![],
        );
        let limit = e.i64s("hooks_self_limit", &[SELF_REPLACE_MAX_TOKENS + 1]);
        let small = e.op("Less", "small_enough", vec![nq, limit], vec![]);
        let small = e.op(
            "Cast",
            "small_enough_f",
            vec![small],
            vec![attr::int("to", dtype as i64)],
        );
        (
            e.op("Mul", "self_gate_effective", vec![gate, small], vec![]),
            source.clone(),
        )
    };
    let keep = e.op("Sub", "keep_own", vec![one, blend.clone()], vec![]);
    let taken = e.op("Mul", "taken", vec![new_edits, blend], vec![]);
    let own = e.op("Mul", "own", vec![edits, keep], vec![]);
    let edited = e.op("Add", "edited", vec![taken, own], vec![]);
    let merged4 = e.op(
        "Concat",
        "controlled",
        vec![uncond, source, edited],
        vec![attr::int("axis", 0)],
    );
    let merged = if four {
        e.op("Reshape", "controlled_probs", vec![merged4, shape], vec![])
    } else {
        merged4
    };
    // The value product reads the controlled probabilities.
    let slot = g
        .node(site.probs_matmul)
        .inputs
        .iter()
        .position(|i| *i == Some(site.probs))
        .expect("reads the probabilities");
    let In::New(name) = merged else {
        unreachable!("ops make new values")
    };
    e.p.rewire_inputs(vec![(site.probs_matmul, slot)], name);
    what.push(if cross {
        "p2p alpha/mapper/equalizer"
    } else {
        "p2p self_gate"
    });
    Ok(what)
}

/// MasaCtrl: gate·K[src] + (1-gate)·K for the site's key and value projections.
fn masactrl(
    p: &mut Patch,
    model: &Model,
    types: &ElemTypes,
    path: &str,
) -> std::result::Result<(), String> {
    let g = &model.graph;
    let projection = |leaf: &str| -> Option<ValueId> {
        let module = format!("{path}.{leaf}");
        // The projection's output: the last node of the module in graph order (MatMul, or its bias Add).
        let nodes: Vec<NodeId> = g
            .topo_order()
            .ok()?
            .into_iter()
            .filter(|n| g.node(*n).module == module)
            .collect();
        let last = *nodes.last()?;
        g.node(last).outputs.first().copied().flatten()
    };
    let (k, v) = (
        projection("to_k").ok_or(format!("no {path}.to_k projection"))?,
        projection("to_v").ok_or(format!("no {path}.to_v projection"))?,
    );
    let dtype = float_type(types, &[k]);
    let producer = g.value(k).producer.map(|(n, _)| n);
    let mut e = Emitter::new(p, path, producer);
    let gate = input(
        e.p,
        &input_name("masactrl", path, "gate"),
        &[],
        vec![],
        vec![0.0],
    );
    let gate = typed(&mut e, gate, dtype, "masactrl_gate_cast");
    let one = In::New(e.p.f32_scalar("masactrl_one", 1.0));
    let one = typed(&mut e, one, dtype, "masactrl_one_cast");
    let keep = e.op("Sub", "masactrl_keep", vec![one, gate.clone()], vec![]);
    // Source index of every batch row: 0 for the first half, half for the second.
    let shape = e.op("Shape", "masactrl_batch_shape", vec![In::Value(k)], vec![]);
    let (z1, one1, two) = (
        e.i64s("masactrl_zero", &[0]),
        e.i64s("masactrl_one_i", &[1]),
        e.i64s("masactrl_two", &[2]),
    );
    let batch = e.op("Slice", "masactrl_batch", vec![shape, z1, one1], vec![]);
    let half = e.op("Div", "masactrl_half", vec![batch, two], vec![]);
    let zeros = e.op(
        "ConstantOfShape",
        "masactrl_first_half",
        vec![half.clone()],
        vec![int64_fill(0)],
    );
    let seconds = e.op(
        "Add",
        "masactrl_second_half",
        vec![zeros.clone(), half],
        vec![],
    );
    let src = e.op(
        "Concat",
        "masactrl_source_index",
        vec![zeros, seconds],
        vec![attr::int("axis", 0)],
    );
    for (x, tag) in [(k, "key"), (v, "value")] {
        let from_source = e.op(
            "Gather",
            &format!("masactrl_{tag}_source"),
            vec![In::Value(x), src.clone()],
            vec![attr::int("axis", 0)],
        );
        let a = e.op(
            "Mul",
            &format!("masactrl_{tag}_taken"),
            vec![from_source, gate.clone()],
            vec![],
        );
        let b = e.op(
            "Mul",
            &format!("masactrl_{tag}_own"),
            vec![In::Value(x), keep.clone()],
            vec![],
        );
        let mixed = e.op("Add", &format!("masactrl_{tag}"), vec![a, b], vec![]);
        // Readers inside the attention (the head split, shape arithmetic, a fused op) read the mix.
        let readers: Vec<(NodeId, usize)> = g
            .value(x)
            .consumers
            .iter()
            .filter_map(|u| match u {
                Use::Input(n, s) => Some((*n, *s)),
                Use::Subgraph(_) => None,
            })
            .collect();
        let In::New(name) = mixed else {
            unreachable!("ops make new values")
        };
        e.p.rewire_inputs(readers, name);
    }
    Ok(())
}

fn int64_fill(v: i64) -> onnx::AttributeProto {
    let t = onnx::TensorProto {
        data_type: DataType::Int64 as i32,
        dims: vec![1],
        raw_data: v.to_le_bytes().to_vec().into(),
        ..Default::default()
    };
    onnx::AttributeProto {
        name: "value".into(),
        r#type: onnx::attribute_proto::AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    }
}
