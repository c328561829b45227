//! Attention-control hooks as graph inputs and outputs, driven at run time:
//! - `capture`: every hooked cross-attention site outputs its head-averaged probabilities
//!   `attn.<path>` [batch, query tokens, text tokens];
//! - `p2p`: Prompt-to-Prompt on the conditional half of a CFG batch [uncond × P, cond × P]
//!   (prompt 0 the source): cross sites take `p2p.<path>.alpha` [P-1, T] (blend weight of the
//!   edit per text token), `.mapper` [P-1, T, T] (replace: a word map; refine: one-hot) and
//!   `.equalizer` [P-1 or 1, T] (reweight); edited maps =
//!   alpha·((source ⊗ mapper)·equalizer) + (1-alpha)·own. Self sites take
//!   `p2p.<path>.self_gate` (scalar): edited self maps become the source's where gate = 1
//!   and the site has at most 16·16 query tokens (the edits take the source's queries and
//!   keys);
//! - `masactrl`: self sites take `masactrl.<path>.gate` (scalar): where 1, every image of a
//!   half attends to the keys/values of the first image of that half (MasaCtrl);
//! - `pag`: self sites take `pag.<path>.gate` [rows]: where 1, the row's attention output is
//!   V (perturbed-attention guidance, `pag`).
//!
//! Every input defaults to "no control" (alpha 0, identity mapper, equalizer 1, gates 0):
//! a graph fed nothing computes exactly what the original does. Capture and P2P read the
//! cross-attention probabilities, so those sites must stay unfused; the self-attention
//! controls act on the projections, so self sites fuse.
use std::collections::BTreeMap;

use attune_compiler::analysis::attention::{self, AttentionSite, Kind};
use attune_compiler::analysis::{Dim, ElemTypes, Shapes};
use attune_compiler::ir::{Graph, Model, NodeId, ValueId};
use attune_compiler::onnx::{self, DataType, tensor_shape_proto};
use attune_compiler::pass::{Pass, PassCx, PassReport, Skipped};
use attune_compiler::patch::{In, Patch};
use attune_compiler::weights::Tensor;
use attune_compiler::{Error, Result};

use crate::emit::Emitter;
use crate::glob::Globs;

pub mod pag;

/// PAG's sites without --hooks-layers: diffusers' PAG pipelines' default
/// `pag_applied_layers = "mid"`.
pub const PAG_DEFAULT_LAYERS: &str = "mid_block.*.attn1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Capture,
    P2p,
    MasaCtrl,
    /// Perturbed-attention guidance's identity-map gates (`pag`).
    Pag,
}

pub struct ControllerPass {
    pub hooks: Vec<Hook>,
    /// Only sites whose module path matches get hooks (all when `None`).
    pub layers: Option<Globs>,
    /// Text tokens the default mapper/equalizer/alpha are sized for (SD: 77).
    pub words: i64,
}

/// The most text tokens a hook site takes (the default mapper is words² per site; text
/// encoders in use have at most 512).
const MAX_WORDS: i64 = 1024;

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
        if !(1..=MAX_WORDS).contains(&self.words) {
            return Err(Error::Graph(format!(
                "--hooks-words {}: must be 1 to {MAX_WORDS}",
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
        // MM-DiT attention mixes image and text tokens in one softmax: capture takes its
        // image-to-text maps, but neither P2P's edits nor the self-attention controls are
        // defined for it.
        if wants(Hook::P2p) || wants(Hook::MasaCtrl) {
            for site in found.sites.iter().filter(|s| s.kind == Kind::Joint) {
                if selected(&site.path) {
                    report.skipped.push(Skipped {
                        site: site.path.clone(),
                        reason: "joint attention (image and text tokens in one softmax): p2p and \
                                 masactrl control UNet-style self- and cross-attention"
                            .into(),
                    });
                }
            }
        }
        // P2P's word inputs are `words` long, so the text the cross sites read must be too.
        let mut text_symbols = BTreeMap::new();
        if wants(Hook::Capture) || wants(Hook::P2p) {
            for site in found.sites.iter().filter(|s| selected(&s.path)) {
                let mut p2p = wants(Hook::P2p);
                if p2p && site.kind == Kind::Cross {
                    match text_tokens(site, self.words) {
                        Ok(Some(symbol)) => {
                            text_symbols.insert(symbol, self.words);
                        }
                        Ok(None) => {}
                        Err(why) => {
                            report.skipped.push(Skipped {
                                site: site.path.clone(),
                                reason: format!("p2p: {why}"),
                            });
                            p2p = false;
                        }
                    }
                }
                let mut patch = Patch::new(model);
                match probability_hooks(
                    &mut patch,
                    model,
                    &types,
                    site,
                    wants(Hook::Capture),
                    p2p,
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
        // Self-attention modules of the transformer blocks, fused or not.
        let controls: Vec<SelfControl> = [
            (Hook::P2p, SelfControl::P2pSelf),
            (Hook::MasaCtrl, SelfControl::MasaCtrl),
        ]
        .into_iter()
        .filter(|(h, _)| wants(*h))
        .map(|(_, c)| c)
        .collect();
        if !controls.is_empty() {
            let modules: Vec<String> = found
                .blocks
                .iter()
                .map(|b| format!("{}.attn1", b.path))
                .filter(|p| selected(p))
                .collect();
            for path in modules {
                let mut what = Vec::new();
                for &control in &controls {
                    let mut patch = Patch::new(model);
                    match self_control(&mut patch, model, &types, &path, control) {
                        Ok(()) => {
                            patch.into_parts().apply(model)?;
                            what.push(control.report());
                        }
                        Err(why) => report.skipped.push(Skipped {
                            site: path.clone(),
                            reason: why,
                        }),
                    }
                }
                if !what.is_empty() {
                    report
                        .rewritten
                        .push(format!("{path} (self): {}", what.join(", ")));
                }
            }
        }
        if wants(Hook::Pag) {
            self.gate_pag(model, &found, &mut report)?;
        }
        if !text_symbols.is_empty() {
            crate::lower::fix_shapes::fix_declarations(&mut model.graph, &text_symbols);
            report.notes.push(format!(
                "text length fixed to --hooks-words {} ({}), the length of the P2P inputs",
                self.words,
                text_symbols.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        if report.rewritten.is_empty() {
            report.notes.push("no attention site took a hook".into());
        }
        Ok(report)
    }
}

impl ControllerPass {
    /// PAG's gates at the selected self-attention sites; a glob that selects none is an error
    /// (the gates would silently do nothing).
    fn gate_pag(
        &self,
        model: &mut Model,
        found: &attention::AttentionAnalysis,
        report: &mut PassReport,
    ) -> Result<()> {
        let layers = self
            .layers
            .clone()
            .unwrap_or_else(|| Globs::parse(PAG_DEFAULT_LAYERS));
        let self_sites: Vec<String> = found
            .blocks
            .iter()
            .map(|b| format!("{}.attn1", b.path))
            .filter(|p| {
                found
                    .sites
                    .iter()
                    .all(|s| s.path != *p || s.kind == Kind::SelfAttention)
            })
            .collect();
        let others = self.hooks.iter().any(|h| *h != Hook::Pag);
        for glob in layers.each() {
            let hits_self = self_sites.iter().any(|p| glob.matches(p));
            let hits_any = found.sites.iter().any(|s| glob.matches(&s.path));
            if !(hits_self || others && hits_any) {
                let listed: Vec<&str> = self_sites.iter().take(8).map(String::as_str).collect();
                return Err(Error::Graph(format!(
                    "--hooks-layers {glob}: matches no self-attention site for pag (globs match whole module paths: diffusers' pag_applied_layers \"mid\" is mid_block.*.attn1 here); the sites are {}{}",
                    listed.join(", "),
                    if self_sites.len() > listed.len() {
                        ", ..."
                    } else {
                        ""
                    }
                )));
            }
        }
        let mut gated = 0;
        for path in self_sites.iter().filter(|p| layers.matches(p)) {
            let mut patch = Patch::new(model);
            match pag::gate(&mut patch, model, path) {
                Ok(()) => {
                    patch.into_parts().apply(model)?;
                    report.rewritten.push(format!("{path} (self): pag gate"));
                    gated += 1;
                }
                Err(why) => report.skipped.push(Skipped {
                    site: path.clone(),
                    reason: format!("pag: {why}"),
                }),
            }
        }
        if gated == 0 {
            return Err(Error::Graph(format!(
                "--hooks pag: no self-attention site matching {layers} could take a gate (see the skipped sites)"
            )));
        }
        if self.layers.is_none() {
            report.notes.push(format!(
                "pag at {PAG_DEFAULT_LAYERS} (diffusers' default pag_applied_layers \"mid\"; choose with --hooks-layers)"
            ));
        }
        Ok(())
    }
}

/// The dim symbol of a cross site's text tokens, which P2P ties to `words` (None when the
/// count is already `words`); an error when the count is another fixed number.
fn text_tokens(site: &AttentionSite, words: i64) -> std::result::Result<Option<String>, String> {
    match &site.key_tokens {
        Some(Dim::Known(n)) if *n == words => Ok(None),
        Some(Dim::Known(n)) => Err(format!(
            "it reads {n} text tokens, but the P2P inputs take --hooks-words {words}"
        )),
        Some(d) => match d.symbols().collect::<Vec<_>>()[..] {
            [(symbol, 1)] if *d == Dim::symbol(symbol) => Ok(Some(symbol.to_string())),
            _ => Err(format!(
                "its text length {d} is not one dim symbol that --hooks-words {words} can fix"
            )),
        },
        None => Err(format!(
            "its text length is unknown, so it cannot be tied to --hooks-words {words}"
        )),
    }
}

/// A float input with a default, declared with `dims` (`None` = a symbol: `rows` first).
fn input(
    p: &mut Patch,
    name: &str,
    dims: &[Option<i64>],
    rows: &str,
    default_dims: Vec<i64>,
    default: Vec<f32>,
) -> In {
    use tensor_shape_proto::dimension::Value;
    let dim = |(i, d): (usize, &Option<i64>)| match d {
        Some(v) => Value::DimValue(*v),
        None if i == 0 => Value::DimParam(rows.into()),
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
        e.cast(tag, x, dtype)
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

/// `attn.<path>` of a joint attention: its image queries' probabilities over the text keys,
/// averaged over heads, [batch, image tokens, text tokens] (the probabilities are
/// [batch, heads, tokens, tokens] over both streams joined, in the export's order).
fn joint_capture(p: &mut Patch, model: &Model, site: &AttentionSite, dtype: DataType) {
    let context = site
        .context
        .as_ref()
        .expect("joint sites have a second stream");
    let after = Some(site.softmax);
    let mut e = Emitter::new(p, &site.path, after);
    let tokens = |e: &mut Emitter, x: ValueId, tag: &str| {
        let shape = e.op("Shape", &format!("{tag}_shape"), vec![In::Value(x)], vec![]);
        let (one, two) = (e.i64s("joint_one", &[1]), e.i64s("joint_two", &[2]));
        e.op(
            "Slice",
            &format!("{tag}_tokens"),
            vec![shape, one, two],
            vec![],
        )
    };
    let (zero, end) = (e.i64s("joint_zero", &[0]), e.i64s("joint_end", &[i64::MAX]));
    // Rows: the image tokens; columns: the text tokens, wherever each stream sits.
    let (starts, ends) = if context.first {
        let text = tokens(&mut e, context.q.output, "text");
        (vec![text.clone(), zero], vec![end, text])
    } else {
        let image = tokens(&mut e, site.q.output, "image");
        (vec![zero, image.clone()], vec![image, end])
    };
    let starts = e.concat("image_to_text_starts", starts, 0);
    let ends = e.concat("image_to_text_ends", ends, 0);
    let axes = e.i64s("joint_axes", &[2, 3]);
    let maps = e.op(
        "Slice",
        "image_to_text",
        vec![In::Value(site.probs), starts, ends, axes],
        vec![],
    );
    capture_output(&mut e, model, site, maps, dtype);
}

/// `attn.<path>`: the probabilities [batch, heads, q, k] averaged over heads.
fn capture_output(
    e: &mut Emitter,
    model: &Model,
    site: &AttentionSite,
    probs: In,
    dtype: DataType,
) {
    let opset = model.opset("").unwrap_or(13);
    let mean = e.reduce("ReduceMean", "heads_mean", probs, &[1], false, opset);
    let name = format!("attn.{}", site.path);
    e.p.graph_output(mean, &name, dtype, &site.path, Some(site.softmax));
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
    if site.kind == Kind::Joint && capture {
        joint_capture(p, model, site, dtype);
        return Ok(vec!["capture (image queries over text keys)"]);
    }
    if site.kind != Kind::Cross {
        return Ok(Vec::new()); // self sites are controlled through their projections
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
        let target = e.concat("probs4_shape", vec![lead, qk], 0);
        e.op("Reshape", "probs4", vec![probs.clone(), target], vec![])
    } else {
        probs.clone()
    };
    let mut what = Vec::new();
    if capture {
        capture_output(&mut e, model, site, probs4.clone(), dtype);
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
    // Edited maps = alpha·((source ⊗ mapper)·equalizer) + (1-alpha)·own.
    let w = words;
    let alpha = input(
        e.p,
        &input_name("p2p", &site.path, "alpha"),
        &[None, Some(w)],
        "edits",
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
        "edits",
        vec![1, w, w],
        eye,
    );
    let equalizer = input(
        e.p,
        &input_name("p2p", &site.path, "equalizer"),
        &[None, Some(w)],
        "edits",
        vec![1, w],
        vec![1.0; w as usize],
    );
    let (alpha, mapper, equalizer) = (
        typed(&mut e, alpha, dtype, "alpha_cast"),
        typed(&mut e, mapper, dtype, "mapper_cast"),
        typed(&mut e, equalizer, dtype, "equalizer_cast"),
    );
    let (ax1, ax12) = (e.i64s("hooks_axis1", &[1]), e.i64s("hooks_axes12", &[1, 2]));
    let mapper4 = e.unsqueeze("mapper4", mapper, &ax1);
    let mapped = e.op("MatMul", "mapped", vec![source.clone(), mapper4], vec![]);
    let eq4 = e.unsqueeze("equalizer4", equalizer, &ax12);
    let new_edits = e.op("Mul", "reweighted", vec![mapped, eq4], vec![]);
    let blend = e.unsqueeze("alpha4", alpha, &ax12);
    let keep = e.op("Sub", "keep_own", vec![one, blend.clone()], vec![]);
    let taken = e.op("Mul", "taken", vec![new_edits, blend], vec![]);
    let own = e.op("Mul", "own", vec![edits, keep], vec![]);
    let edited = e.op("Add", "edited", vec![taken, own], vec![]);
    let merged4 = e.concat("controlled", vec![uncond, source, edited], 0);
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
        .ok_or("the value product does not read the probabilities")?;
    let In::New(name) = merged else {
        unreachable!("ops make new values")
    };
    e.p.rewire_inputs(vec![(site.probs_matmul, slot)], name);
    what.push("p2p alpha/mapper/equalizer");
    Ok(what)
}

/// A self-attention control: which projections of the module take which batch rows.
#[derive(Clone, Copy)]
enum SelfControl {
    /// P2P self-replace: the edits' queries and keys become the source's, so their maps
    /// (softmax(Q·Kᵀ)) are the source's while the values stay their own.
    P2pSelf,
    /// MasaCtrl: every image of a half takes the keys and values of the half's first image.
    MasaCtrl,
}

impl SelfControl {
    fn input(self, path: &str) -> String {
        match self {
            SelfControl::P2pSelf => input_name("p2p", path, "self_gate"),
            SelfControl::MasaCtrl => input_name("masactrl", path, "gate"),
        }
    }
    fn leaves(self) -> [&'static str; 2] {
        match self {
            SelfControl::P2pSelf => ["to_q", "to_k"],
            SelfControl::MasaCtrl => ["to_k", "to_v"],
        }
    }
    fn tag(self) -> &'static str {
        match self {
            SelfControl::P2pSelf => "p2p_self",
            SelfControl::MasaCtrl => "masactrl",
        }
    }
    fn report(self) -> &'static str {
        match self {
            SelfControl::P2pSelf => "p2p self_gate",
            SelfControl::MasaCtrl => "masactrl gate",
        }
    }
}

/// The output of the projection module `module`: its last node in graph order (the MatMul,
/// or its bias Add).
fn projection(g: &Graph, order: &[NodeId], module: &str) -> Option<ValueId> {
    let last = order.iter().rev().find(|n| g.node(**n).module == module)?;
    g.node(*last).outputs.first().copied().flatten()
}

/// `x ← gate·x[source] + (1-gate)·x` for the control's two projections of the self-attention
/// module `path` (exact at gates 0 and 1), with every reader of a projection (the head split,
/// shape arithmetic, a fused attention op) reading the mix. Acting on the projections, not on
/// the probabilities, it works on fused sites and costs [batch, tokens, channels] tensors.
fn self_control(
    p: &mut Patch,
    model: &Model,
    types: &ElemTypes,
    path: &str,
    control: SelfControl,
) -> std::result::Result<(), String> {
    let g = &model.graph;
    let order = g.topo_order().map_err(|e| e.to_string())?;
    let [a, b] = control.leaves().map(|leaf| {
        projection(g, &order, &format!("{path}.{leaf}"))
            .ok_or(format!("no {path}.{leaf} projection"))
    });
    let xs = [a?, b?];
    let dtype = float_type(types, &xs);
    // Emitted after the later projection.
    let after = xs
        .iter()
        .filter_map(|v| g.value(*v).producer.map(|(n, _)| n))
        .max_by_key(|n| order.iter().position(|o| o == n));
    let tag = control.tag();
    let mut e = Emitter::new(p, path, after);
    let gate = input(e.p, &control.input(path), &[], "", vec![], vec![0.0]);
    let mut gate = typed(&mut e, gate, dtype, &format!("{tag}_gate_cast"));
    let shape = e.op(
        "Shape",
        &format!("{tag}_shape"),
        vec![In::Value(xs[0])],
        vec![],
    );
    let (z1, one1, two) = (
        e.i64s(&format!("{tag}_zero"), &[0]),
        e.i64s(&format!("{tag}_one_i"), &[1]),
        e.i64s(&format!("{tag}_two"), &[2]),
    );
    let batch = e.op(
        "Slice",
        &format!("{tag}_batch"),
        vec![shape.clone(), z1.clone(), one1.clone()],
        vec![],
    );
    let half = e.op(
        "Div",
        &format!("{tag}_half"),
        vec![batch.clone(), two.clone()],
        vec![],
    );
    // The batch row each row takes its projections from.
    let source = match control {
        SelfControl::MasaCtrl => {
            // 0 for the first half, `half` for the second.
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
            e.concat("masactrl_source_index", vec![zeros, seconds], 0)
        }
        SelfControl::P2pSelf => {
            // [uncond × P, source, edits × (P-1)]: min(row, P), so the edits read row P.
            let rows = e.squeeze("p2p_self_rows", batch, &z1);
            let zero = e.i64("p2p_self_zero_s", 0);
            let one = e.i64("p2p_self_one_s", 1);
            let row = e.op("Range", "p2p_self_row", vec![zero, rows, one], vec![]);
            let source = e.op("Min", "p2p_self_source_index", vec![row, half], vec![]);
            // P2P replaces self maps only at sites with at most 16x16 query tokens.
            let tokens = e.op("Slice", "p2p_self_tokens", vec![shape, one1, two], vec![]);
            let limit = e.i64s("hooks_self_limit", &[SELF_REPLACE_MAX_TOKENS + 1]);
            let small = e.op("Less", "small_enough", vec![tokens, limit], vec![]);
            let small = e.cast("small_enough_f", small, dtype);
            gate = e.op("Mul", "self_gate_effective", vec![gate, small], vec![]);
            source
        }
    };
    let one = In::New(e.p.f32_scalar(&format!("{tag}_one"), 1.0));
    let one = typed(&mut e, one, dtype, &format!("{tag}_one_cast"));
    let keep = e.op(
        "Sub",
        &format!("{tag}_keep"),
        vec![one, gate.clone()],
        vec![],
    );
    for (x, leaf) in xs.into_iter().zip(control.leaves()) {
        let from_source = e.gather(
            &format!("{tag}_{leaf}_source"),
            In::Value(x),
            source.clone(),
            0,
        );
        let taken = e.op(
            "Mul",
            &format!("{tag}_{leaf}_taken"),
            vec![from_source, gate.clone()],
            vec![],
        );
        let own = e.op(
            "Mul",
            &format!("{tag}_{leaf}_own"),
            vec![In::Value(x), keep.clone()],
            vec![],
        );
        let mixed = e.op("Add", &format!("{tag}_{leaf}"), vec![taken, own], vec![]);
        let readers = g.input_uses(x);
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
