//! Token merging inside the graph: ToMe for Stable Diffusion (tomesd's bipartite soft
//! matching, deterministic top-left dst slots) and ToDo (key/value downsampling of
//! self-attention). Built from standard ops (opset 16+: scatters with `add`), with
//! token counts, `r` and the partition computed from the `sample` input's shape, so dynamic
//! resolutions keep working; `static_hw` fixes the latent size so ONNX Runtime folds the
//! partition to constants.
//!
//! Per block, from its input x (before norm1), once: metric = x/‖x‖, dst = the top-left
//! token of every full sx×sy window, src = the rest; each src's best dst (max cosine); the r
//! most similar src are merged. merge(y) = [kept src, dst averaged with the src merged into
//! it]; unmerge(z) gathers every token back to its place (a merged src takes its dst's value).
//! Applied as `x + unmerge(attn1(merge(norm1(x))))`, and likewise around attn2 and the MLP
//! when asked.
//!
//! `partition` chooses the dst and src tokens, `merge` builds ToMe around a block, `todo`
//! ToDo's pooled keys and values.
use attune_compiler::analysis::attention::{self, TransformerBlock};
use attune_compiler::analysis::{Dim, Shapes};
use attune_compiler::ir::{Model, NodeId, ValueId};
use attune_compiler::onnx;
use attune_compiler::pass::{Pass, PassCx, PassReport, Skipped};
use attune_compiler::patch::{In, Patch};

use attune_compiler::{Error, Result};

use crate::cleanup;
use crate::emit::Emitter;

mod merge;
mod partition;
mod todo;

pub use partition::slot_input_name;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// ToMe: merge `ratio` of the tokens (tomesd's r = ⌊N·ratio⌋).
    Merge { ratio: f32 },
    /// ToDo: self-attention keys/values from the tokens pooled over factor×factor windows.
    Downsample { factor: i64, pool: Pool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    Average,
    /// The top-left token of each window.
    Nearest,
}

#[derive(Clone, Debug)]
pub struct TomeOptions {
    pub mode: Mode,
    /// Blocks whose tokens are at most this many times downsampled from the latent (1: the
    /// highest resolution only, tomesd's default).
    pub max_downsample: i64,
    pub sx: i64,
    pub sy: i64,
    pub merge_attn: bool,
    pub merge_crossattn: bool,
    pub merge_mlp: bool,
    /// Latent height × width the graph will run at (specialises the partition to constants).
    pub static_hw: Option<(i64, i64)>,
    /// Random dst slots (tomesd's use_rand), read from an int64 graph input per level,
    /// `tome_slots_ds<level>` [windows down, windows across] of values in [0, sx·sy);
    /// it defaults to zeros (the top-left slot), so callers choose when to randomise.
    pub random: bool,
}

impl Default for TomeOptions {
    fn default() -> Self {
        TomeOptions {
            mode: Mode::Merge { ratio: 0.5 },
            max_downsample: 1,
            sx: 2,
            sy: 2,
            merge_attn: true,
            merge_crossattn: false,
            merge_mlp: false,
            static_hw: None,
            random: false,
        }
    }
}

/// Bounds on strides and factors (tomesd uses 2; a grid cell wider than any latent merges
/// nothing) and on a static latent side (1024 px images have 128).
const MAX_GRID: i64 = 64;
const MAX_LATENT: i64 = 1 << 16;

impl TomeOptions {
    /// Errors for settings that mean nothing.
    pub fn check(&self) -> std::result::Result<(), String> {
        match self.mode {
            Mode::Merge { ratio } if !(0.0..1.0).contains(&ratio) => {
                return Err(format!("--tome {ratio}: the ratio must be in [0, 1)"));
            }
            Mode::Downsample { factor, .. } if !(1..=MAX_GRID).contains(&factor) => {
                return Err(format!("--todo-factor {factor}: must be 1 to {MAX_GRID}"));
            }
            _ => {}
        }
        if !(1..=MAX_GRID).contains(&self.sx) || !(1..=MAX_GRID).contains(&self.sy) {
            return Err(format!(
                "--tome-sx {} --tome-sy {}: strides must be 1 to {MAX_GRID}",
                self.sx, self.sy
            ));
        }
        if !(1..=MAX_GRID).contains(&self.max_downsample) {
            return Err(format!(
                "--tome-max-downsample {}: must be 1 to {MAX_GRID}",
                self.max_downsample
            ));
        }
        if let Some((h, w)) = self.static_hw
            && !((1..=MAX_LATENT).contains(&h) && (1..=MAX_LATENT).contains(&w))
        {
            return Err(format!(
                "--tome-static {h}x{w}: sizes must be 1 to {MAX_LATENT} latent pixels"
            ));
        }
        Ok(())
    }
}

pub struct TomePass {
    pub options: TomeOptions,
}

/// Scatters with `reduction` need opset 16.
const MIN_OPSET: i64 = 16;

impl Pass for TomePass {
    fn name(&self) -> &'static str {
        "tome"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let o = &self.options;
        o.check().map_err(Error::Graph)?;
        let mut report = PassReport::default();
        if o.mode == (Mode::Merge { ratio: 0.0 })
            || o.mode
                == (Mode::Downsample {
                    factor: 1,
                    pool: Pool::Nearest,
                })
            || o.mode
                == (Mode::Downsample {
                    factor: 1,
                    pool: Pool::Average,
                })
        {
            report
                .notes
                .push("ratio 0 / factor 1: nothing to merge, the graph is unchanged".into());
            return Ok(report);
        }
        let shapes = Shapes::infer(model);
        let found = attention::analyze(model, &shapes);
        let Some(sample) = latent_input(model) else {
            report.notes.push(
                "no 4-D latent input (`sample`) to read the token grid from: nothing to do".into(),
            );
            return Ok(report);
        };
        // Levels come from the symbolic sizes (static sizes only fix the grid's constants).
        let latent_tokens = shapes
            .shape(sample)
            .and_then(|s| s.get(2).zip(s.get(3)))
            .and_then(|(h, w)| h.mul(w));
        let mut chosen = Vec::new();
        for b in &found.blocks {
            match level(b, latent_tokens.as_ref()) {
                Ok(ds) if ds <= o.max_downsample => chosen.push((b, ds)),
                Ok(ds) => report.skipped.push(Skipped {
                    site: b.path.clone(),
                    reason: format!(
                        "downsampled {ds}x, above --tome-max-downsample {}",
                        o.max_downsample
                    ),
                }),
                Err(why) => report.skipped.push(Skipped {
                    site: b.path.clone(),
                    reason: why,
                }),
            }
        }
        if chosen.is_empty() {
            report.notes.push(format!(
                "no transformer block at downsample <= {}: nothing to do",
                o.max_downsample
            ));
            return Ok(report);
        }
        if model.opset("").unwrap_or(0) < MIN_OPSET {
            match crate::attention::upgrade_default_opset(model, MIN_OPSET) {
                Ok(notes) => report.notes.extend(notes),
                Err(why) => {
                    return Err(Error::Graph(format!(
                        "token merging needs opset {MIN_OPSET} (scatters with reduction): {why}"
                    )));
                }
            }
        }
        for (b, ds) in chosen {
            let mut patch = Patch::new(model);
            let done = match o.mode {
                Mode::Merge { ratio } => {
                    merge::merge_block(&mut patch, model, b, ds, sample, ratio, o)
                }
                Mode::Downsample { factor, pool } => {
                    todo::downsample_block(&mut patch, model, b, ds, sample, factor, pool, o)
                }
            };
            match done {
                Ok(what) => {
                    patch.into_parts().apply(model)?;
                    forget_shapes_inside(model, &b.path);
                    report.rewritten.push(format!(
                        "{} (downsample {ds}, tokens {}): {what}",
                        b.path,
                        b.tokens
                            .as_ref()
                            .map(|t| t.to_string())
                            .unwrap_or("?".into())
                    ));
                }
                Err(why) => report.skipped.push(Skipped {
                    site: b.path.clone(),
                    reason: why,
                }),
            }
        }
        let removed = cleanup::dce(model);
        if removed.nodes > 0 {
            report
                .notes
                .push(format!("dce: removed {} nodes", removed.nodes));
        }
        Ok(report)
    }
}

/// Token counts change inside a rewritten block: declared shapes there (dynamo's
/// value_info) would mislead runtimes, so they go.
fn forget_shapes_inside(model: &mut Model, block: &str) {
    let g = &mut model.graph;
    let prefix = format!("{block}.");
    let inside: Vec<ValueId> = g
        .node_ids()
        .filter(|n| g.node(*n).module == block || g.node(*n).module.starts_with(&prefix))
        .flat_map(|n| {
            g.node(n)
                .outputs
                .iter()
                .flatten()
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    for v in inside {
        g.forget_value_info(v);
    }
}

/// The image latent input: `sample`, else the first 4-D graph input.
fn latent_input(model: &Model) -> Option<ValueId> {
    let g = &model.graph;
    let rank4 = |v: ValueId| {
        g.value_type(v)
            .and_then(onnx::tensor_type)
            .and_then(|t| t.shape.as_ref())
            .is_some_and(|s| s.dim.len() == 4)
    };
    let inputs: Vec<ValueId> = g
        .inputs
        .iter()
        .map(|io| io.value)
        .filter(|v| g.initializer(*v).is_none())
        .collect();
    inputs
        .iter()
        .copied()
        .find(|v| g.value(*v).name == "sample" && rank4(*v))
        .or_else(|| inputs.into_iter().find(|v| rank4(*v)))
}

/// How many times the block's token grid is downsampled from the latent (tomesd's
/// ⌈√(latent tokens / tokens)⌉, which must be a whole number here).
fn level(b: &TransformerBlock, latent_tokens: Option<&Dim>) -> std::result::Result<i64, String> {
    let tokens = b
        .tokens
        .as_ref()
        .ok_or("the block's token count is unknown")?;
    let ratio = latent_tokens
        .ok_or("the latent input's shape is unknown")?
        .div(tokens);
    let Some(ratio) = ratio.as_ref().and_then(Dim::known) else {
        return Err(format!(
            "cannot relate the block's {tokens} tokens to the latent size"
        ));
    };
    let ds = (ratio as f64).sqrt().round() as i64;
    if ratio < 1 || ds.checked_mul(ds) != Some(ratio) {
        return Err(format!(
            "the block's tokens are 1/{ratio} of the latent's, not a square downsample"
        ));
    }
    Ok(ds)
}

/// The block's stream and sublayers: (norm outputs by name, [(residual add, sublayer output)]).
struct Anatomy {
    x: ValueId,
    /// Outputs of norm1..3, where each normalises the stream its sublayer reads (a DiT's
    /// cross-attention reads the stream itself, and its norm2 is the feed-forward's).
    norm_out: [Option<ValueId>; 3],
    /// (add node, input slot of the sublayer output, sublayer output) for attn1, attn2, ff.
    residuals: Vec<(NodeId, usize, ValueId)>,
}

fn anatomy(model: &Model, b: &TransformerBlock) -> std::result::Result<Anatomy, String> {
    let g = &model.graph;
    let x = b.input.ok_or("the block's input is unknown")?;
    // Follow the stream from the block's input through the Adds onto it; other Adds of the
    // block (a DiT's adaLN shift, `1 + scale`) are not residuals.
    let mut streams = vec![x];
    let mut pending = b.residual_adds.clone();
    let mut residuals = Vec::new();
    while let Some((pos, slot)) = pending.iter().enumerate().find_map(|(pos, &add)| {
        let stream = *streams.last().expect("starts with x");
        let ins = &g.node(add).inputs;
        match (
            ins.first().copied().flatten(),
            ins.get(1).copied().flatten(),
        ) {
            (Some(first), Some(_)) if first == stream => Some((pos, 1)),
            (Some(_), Some(second)) if second == stream => Some((pos, 0)),
            _ => None,
        }
    }) {
        let add = pending.remove(pos);
        let sub = g.node(add).inputs[slot].expect("matched above");
        residuals.push((add, slot, sub));
        streams.push(g.node(add).outputs[0].ok_or("residual add without output")?);
    }
    if residuals.is_empty() {
        return Err("no residual add onto the block's stream".into());
    }
    // Sublayer i reads the stream before residual i, so its norm normalises that stream.
    let mut norm_out = [None; 3];
    for (name, n) in &b.norms {
        let Some(i) = ["norm1", "norm2", "norm3"].iter().position(|k| k == name) else {
            continue;
        };
        let node = g.node(*n);
        if node.inputs.first().copied().flatten() == streams.get(i).copied() {
            norm_out[i] = node.outputs.first().copied().flatten();
        }
    }
    Ok(Anatomy {
        x,
        norm_out,
        residuals,
    })
}

/// Scalar token-grid height and width of a block `ds` times downsampled.
fn grid(e: &mut Emitter, sample: ValueId, ds: i64, o: &TomeOptions) -> (In, In) {
    if let Some((h, w)) = o.static_hw {
        return (
            e.i64("tome_h", (h + ds - 1) / ds),
            e.i64("tome_w", (w + ds - 1) / ds),
        );
    }
    let shape = e.op("Shape", "sample_shape", vec![In::Value(sample)], vec![]);
    let (two, three) = (e.i64("tome_axis2", 2), e.i64("tome_axis3", 3));
    let (ds_c, ds_m1) = (e.i64("tome_ds", ds), e.i64("tome_ds_m1", ds - 1));
    let side = |e: &mut Emitter, axis: In, tag: &str| {
        let full = e.op(
            "Gather",
            &format!("{tag}_latent"),
            vec![shape.clone(), axis],
            vec![],
        );
        let up = e.op(
            "Add",
            &format!("{tag}_ceil"),
            vec![full, ds_m1.clone()],
            vec![],
        );
        e.op("Div", tag, vec![up, ds_c.clone()], vec![])
    };
    (side(e, two, "grid_h"), side(e, three, "grid_w"))
}

/// int64 constants each block's rewrite shares.
struct Consts {
    /// Scalars 0 and 1.
    zero: In,
    one: In,
    /// Axes [0] and [1].
    ax0: In,
    ax1: In,
    /// Slice bounds [0] and [i64::MAX].
    start: In,
    end: In,
}

impl Consts {
    fn new(e: &mut Emitter) -> Consts {
        Consts {
            zero: e.i64("tome_zero", 0),
            one: e.i64("tome_one", 1),
            ax0: e.i64s("tome_axes0", &[0]),
            ax1: e.i64s("tome_axes1", &[1]),
            start: e.i64s("tome_start", &[0]),
            end: e.i64s("tome_end", &[i64::MAX]),
        }
    }
}
