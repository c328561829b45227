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
use attune_compiler::analysis::attention::{self, TransformerBlock};
use attune_compiler::analysis::{Dim, Shapes};
use attune_compiler::ir::{Model, NodeId, ValueId};
use attune_compiler::onnx::{self, AttributeProto, DataType, TensorProto};
use attune_compiler::pass::{Pass, PassCx, PassReport, Skipped};
use attune_compiler::patch::{In, Patch, attr};

use attune_compiler::{Error, Result};

use crate::cleanup;
use crate::emit::Emitter;

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
                Mode::Merge { ratio } => merge_block(&mut patch, model, b, ds, sample, ratio, o),
                Mode::Downsample { factor, pool } => {
                    downsample_block(&mut patch, model, b, ds, sample, factor, pool, o)
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
    norm_out: [Option<ValueId>; 3],
    /// (add node, input slot of the sublayer output, sublayer output) for attn1, attn2, ff.
    residuals: Vec<(NodeId, usize, ValueId)>,
}

fn anatomy(model: &Model, b: &TransformerBlock) -> std::result::Result<Anatomy, String> {
    let g = &model.graph;
    let x = b.input.ok_or("the block's input is unknown")?;
    let mut norm_out = [None; 3];
    for (name, n) in &b.norms {
        if let Some(i) = ["norm1", "norm2", "norm3"].iter().position(|k| k == name) {
            norm_out[i] = g.node(*n).outputs.first().copied().flatten();
        }
    }
    let mut stream = x;
    let mut residuals = Vec::new();
    for &add in &b.residual_adds {
        let ins = &g.node(add).inputs;
        let slot = match (
            ins.first().copied().flatten(),
            ins.get(1).copied().flatten(),
        ) {
            (Some(first), Some(_)) if first == stream => 1,
            (Some(_), Some(second)) if second == stream => 0,
            _ => {
                return Err(format!(
                    "residual {} does not add onto the block's stream",
                    g.node(add).describe()
                ));
            }
        };
        let sub = ins[slot].expect("checked above");
        residuals.push((add, slot, sub));
        stream = g.node(add).outputs[0].ok_or("residual add without output")?;
    }
    Ok(Anatomy {
        x,
        norm_out,
        residuals,
    })
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    attr::ints(name, v)
}

/// `ConstantOfShape` filled with `value` of `dtype`.
fn fill(e: &mut Emitter, tag: &str, shape: In, dtype: DataType, value: f64) -> In {
    let raw: Vec<u8> = match dtype {
        DataType::Int64 => (value as i64).to_le_bytes().to_vec(),
        DataType::Float16 => half::f16::from_f64(value).to_le_bytes().to_vec(),
        DataType::Bfloat16 => half::bf16::from_f64(value).to_le_bytes().to_vec(),
        DataType::Double => value.to_le_bytes().to_vec(),
        _ => (value as f32).to_le_bytes().to_vec(),
    };
    let t = TensorProto {
        data_type: dtype as i32,
        dims: vec![1],
        raw_data: raw.into(),
        ..Default::default()
    };
    let a = AttributeProto {
        name: "value".into(),
        r#type: onnx::attribute_proto::AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    };
    e.op("ConstantOfShape", tag, vec![shape], vec![a])
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

/// dtype of the block's activations (the norm's scale, else f32).
fn activation_type(model: &Model, b: &TransformerBlock) -> DataType {
    let g = &model.graph;
    b.norms
        .iter()
        .find_map(|(_, n)| {
            g.node(*n)
                .inputs
                .get(1)
                .copied()
                .flatten()
                .and_then(|v| g.value_elem_type(v))
        })
        .and_then(|t| DataType::try_from(t).ok())
        .unwrap_or(DataType::Float)
}

#[allow(clippy::too_many_arguments)]
fn merge_block(
    p: &mut Patch,
    model: &Model,
    b: &TransformerBlock,
    ds: i64,
    sample: ValueId,
    ratio: f32,
    o: &TomeOptions,
) -> std::result::Result<String, String> {
    let a = anatomy(model, b)?;
    let dtype = activation_type(model, b);
    let after = b.norms.first().map(|(_, n)| *n);
    let mut e = Emitter::new(p, &b.path, after);
    let (h, w) = grid(&mut e, sample, ds, o);
    let x = In::Value(a.x);
    // Sizes as 1-D [1] tensors (for Concat/Expand/TopK) from x [B, N, C].
    let shape_x = e.op("Shape", "x_shape", vec![x.clone()], vec![]);
    let dim = |e: &mut Emitter, i: i64, tag: &str| {
        let idx = e.i64s(&format!("tome_{tag}_index"), &[i]);
        e.op("Gather", tag, vec![shape_x.clone(), idx], vec![])
    };
    let (b1, n1) = (dim(&mut e, 0, "B"), dim(&mut e, 1, "N"));
    // Partition: dst = one slot of every full sy×sx window (its top-left unless random slots
    // are given), src = the rest.
    let (zero, one) = (e.i64("tome_zero", 0), e.i64("tome_one", 1));
    let (sy, sx) = (e.i64("tome_sy", o.sy), e.i64("tome_sx", o.sx));
    let (ax0, ax1, axm1) = (
        e.i64s("tome_axes0", &[0]),
        e.i64s("tome_axes1", &[1]),
        e.i64s("tome_axes_last", &[-1]),
    );
    let slots = slot_input(&mut e, model, ds, o.random);
    // Per axis: token index, its window, whether the window is whole, its offset in the window.
    let axis = |e: &mut Emitter, len: In, stride: In, tag: &str| {
        let idx = e.op(
            "Range",
            &format!("{tag}_range"),
            vec![zero.clone(), len.clone(), one.clone()],
            vec![],
        );
        let windows = e.op(
            "Div",
            &format!("{tag}_windows"),
            vec![len, stride.clone()],
            vec![],
        );
        let covered = e.op(
            "Mul",
            &format!("{tag}_covered"),
            vec![windows.clone(), stride.clone()],
            vec![],
        );
        let inside = e.op(
            "Less",
            &format!("{tag}_inside"),
            vec![idx.clone(), covered],
            vec![],
        );
        let window = e.op(
            "Div",
            &format!("{tag}_window"),
            vec![idx.clone(), stride.clone()],
            vec![],
        );
        let last = e.op(
            "Sub",
            &format!("{tag}_last_window"),
            vec![windows.clone(), one.clone()],
            vec![],
        );
        let last = e.op(
            "Max",
            &format!("{tag}_last_window_clamped"),
            vec![last, zero.clone()],
            vec![],
        );
        let window = e.op(
            "Min",
            &format!("{tag}_window_clamped"),
            vec![window, last],
            vec![],
        );
        let offset = e.op("Mod", &format!("{tag}_offset"), vec![idx, stride], vec![]);
        (windows, inside, window, offset)
    };
    let (hw_rows, rows_inside, row_window, row_offset) = axis(&mut e, h, sy, "rows");
    let (hw_cols, cols_inside, col_window, col_offset) = axis(&mut e, w, sx.clone(), "cols");
    // One dst per whole window: the counts follow from the shapes alone.
    let n_dst = e.op(
        "Mul",
        "dst_count",
        vec![hw_rows.clone(), hw_cols.clone()],
        vec![],
    );
    let rows_col = e.op(
        "Unsqueeze",
        "rows_inside_col",
        vec![rows_inside, ax1.clone()],
        vec![],
    );
    let cols_row = e.op(
        "Unsqueeze",
        "cols_inside_row",
        vec![cols_inside, ax0.clone()],
        vec![],
    );
    let inside = e.op("And", "inside_windows", vec![rows_col, cols_row], vec![]);
    let row1 = e.op(
        "Unsqueeze",
        "window_rows_1d",
        vec![hw_rows, ax0.clone()],
        vec![],
    );
    let col1 = e.op(
        "Unsqueeze",
        "window_cols_1d",
        vec![hw_cols, ax0.clone()],
        vec![],
    );
    let windows_shape = e.op(
        "Concat",
        "windows_shape",
        vec![row1, col1],
        vec![attr::int("axis", 0)],
    );
    let slot_grid = e.op("Expand", "slots", vec![slots, windows_shape], vec![]);
    let slot_rows = e.op(
        "Gather",
        "slots_rows",
        vec![slot_grid, row_window],
        vec![attr::int("axis", 0)],
    );
    let slot_of_token = e.op(
        "Gather",
        "slots_tokens",
        vec![slot_rows, col_window],
        vec![attr::int("axis", 1)],
    );
    let row_part = e.op("Mul", "offset_rows", vec![row_offset, sx], vec![]);
    let row_part = e.op(
        "Unsqueeze",
        "offset_rows_col",
        vec![row_part, ax1.clone()],
        vec![],
    );
    let col_part = e.op(
        "Unsqueeze",
        "offset_cols_row",
        vec![col_offset, ax0.clone()],
        vec![],
    );
    let local = e.op("Add", "offset_in_window", vec![row_part, col_part], vec![]);
    let chosen_slot = e.op("Equal", "is_slot", vec![slot_of_token, local], vec![]);
    let grid_mask = e.op("And", "dst_grid", vec![inside, chosen_slot], vec![]);
    let flat = e.i64s("tome_flat", &[-1]);
    let mask = e.op("Reshape", "dst_mask", vec![grid_mask, flat.clone()], vec![]);
    // The dst tokens, then the src tokens, each ascending: a stable partition by the mask,
    // each token's place counted with CumSum and the tokens scattered there. Neither NonZero
    // (its data-dependent size makes a CUDA run wait for the GPU) nor a sort (ONNX Runtime's
    // CUDA TopK runs each row in one thread block).
    let nd1 = e.op("Reshape", "dst_count_1d", vec![n_dst, flat.clone()], vec![]);
    let ns1 = e.op("Sub", "src_count", vec![n1.clone(), nd1.clone()], vec![]);
    let n = e.op("Squeeze", "N_scalar", vec![n1.clone()], vec![]);
    let token = e.op(
        "Range",
        "token_range",
        vec![zero.clone(), n, one.clone()],
        vec![],
    );
    let mask_int = e.op(
        "Cast",
        "dst_mask_int",
        vec![mask.clone()],
        vec![attr::int("to", DataType::Int64 as i64)],
    );
    let dst_upto = e.op("CumSum", "dst_upto", vec![mask_int, zero.clone()], vec![]);
    let dst_rank = e.op(
        "Sub",
        "dst_rank",
        vec![dst_upto.clone(), one.clone()],
        vec![],
    );
    let src_before = e.op("Sub", "src_before", vec![token.clone(), dst_upto], vec![]);
    let src_rank = e.op("Add", "src_rank", vec![src_before, nd1.clone()], vec![]);
    let rank = e.op(
        "Where",
        "partition_rank",
        vec![mask, dst_rank, src_rank],
        vec![],
    );
    let order = e.op(
        "ScatterElements",
        "partition",
        vec![token.clone(), rank, token],
        vec![attr::int("axis", 0)],
    );
    let (start, end) = (e.i64s("tome_start", &[0]), e.i64s("tome_end", &[i64::MAX]));
    let dst = e.op(
        "Slice",
        "dst_index",
        vec![order.clone(), start.clone(), nd1.clone()],
        vec![],
    );
    let src = e.op(
        "Slice",
        "src_index",
        vec![order, nd1.clone(), end.clone()],
        vec![],
    );
    // r = min(⌊N·ratio⌋, #src)
    let nf = e.op(
        "Cast",
        "N_float",
        vec![n1.clone()],
        vec![attr::int("to", DataType::Float as i64)],
    );
    let ratio_c = e.f32("tome_ratio", ratio);
    let rf = e.op("Mul", "r_float", vec![nf, ratio_c], vec![]);
    let rf = e.op("Floor", "r_floor", vec![rf], vec![]);
    let r_all = e.op(
        "Cast",
        "r_int",
        vec![rf],
        vec![attr::int("to", DataType::Int64 as i64)],
    );
    let r1 = e.op("Min", "r", vec![r_all, ns1.clone()], vec![]);
    // Similarity of every src to every dst; each src's best dst; src ranked by it.
    // x / ‖x‖ over channels. Not LpNormalization: ONNX Runtime's CUDA EP has no kernel for
    // it, so it would run on the CPU with the activations copied there and back.
    let opset = model.opset("").unwrap_or(MIN_OPSET);
    let norm = e.reduce("ReduceL2", "metric_norm", x.clone(), &[-1], true, opset);
    let metric = e.op("Div", "metric", vec![x.clone(), norm], vec![]);
    let ma = e.op(
        "Gather",
        "metric_src",
        vec![metric.clone(), src.clone()],
        vec![attr::int("axis", 1)],
    );
    let mb = e.op(
        "Gather",
        "metric_dst",
        vec![metric, dst.clone()],
        vec![attr::int("axis", 1)],
    );
    let mbt = e.op(
        "Transpose",
        "metric_dst_T",
        vec![mb],
        vec![ints("perm", &[0, 2, 1])],
    );
    let scores = e.op("MatMul", "scores", vec![ma, mbt], vec![]);
    // Each src's best dst: ArgMax (the first of equal maxima, as TopK with k 1 gives), its
    // score read back. Not TopK: ONNX Runtime's CUDA TopK sorts each row in a block.
    let best_index = e.op(
        "ArgMax",
        "best_dst",
        vec![scores.clone()],
        vec![attr::int("axis", -1), attr::int("keepdims", 1)],
    );
    let best_score = e.op(
        "GatherElements",
        "best_dst_score",
        vec![scores, best_index.clone()],
        vec![attr::int("axis", -1)],
    );
    let node_max = e.op(
        "Squeeze",
        "best_score",
        vec![best_score, axm1.clone()],
        vec![],
    );
    let node_idx = e.op(
        "Squeeze",
        "best_index",
        vec![best_index, axm1.clone()],
        vec![],
    );
    let ranked = e.ops(
        "TopK",
        "ranked",
        vec![node_max, ns1.clone()],
        2,
        vec![
            attr::int("axis", -1),
            attr::int("largest", 1),
            attr::int("sorted", 1),
        ],
    );
    let order = ranked[1].clone();
    let merged_src = e.op(
        "Slice",
        "merged_src",
        vec![order.clone(), start, r1.clone(), ax1.clone()],
        vec![],
    );
    let kept_src = e.op(
        "Slice",
        "kept_src",
        vec![order, r1.clone(), end, ax1.clone()],
        vec![],
    );
    let kept_pos = e.op(
        "Gather",
        "kept_src_pos",
        vec![src.clone(), kept_src],
        vec![attr::int("axis", 0)],
    );
    let merged_pos = e.op(
        "Gather",
        "merged_src_pos",
        vec![src, merged_src.clone()],
        vec![attr::int("axis", 0)],
    );
    let unmerged = e.op("Sub", "src_kept_count", vec![ns1, r1.clone()], vec![]);
    let chosen = e.op(
        "GatherElements",
        "merged_dst",
        vec![node_idx, merged_src],
        vec![attr::int("axis", 1)],
    );
    let target = e.op("Add", "merge_target", vec![chosen, unmerged], vec![]);
    let bd = e.op(
        "Concat",
        "B_Nd",
        vec![b1.clone(), nd1],
        vec![attr::int("axis", 0)],
    );
    let dst_row = e.op("Unsqueeze", "dst_row", vec![dst, ax0.clone()], vec![]);
    let dst_b = e.op("Expand", "dst_pos", vec![dst_row, bd], vec![]);
    let keep = e.op(
        "Concat",
        "keep_pos",
        vec![kept_pos, dst_b],
        vec![attr::int("axis", 1)],
    );
    let nr1 = e.op("Sub", "merged_count", vec![n1.clone(), r1.clone()], vec![]);
    // Where each token is found after merging (unmerge is one gather with this map).
    let nr = e.op(
        "Squeeze",
        "merged_count_scalar",
        vec![nr1.clone(), ax0.clone()],
        vec![],
    );
    let rng = e.op(
        "Range",
        "merged_range",
        vec![zero.clone(), nr, one.clone()],
        vec![],
    );
    let rng = e.op(
        "Unsqueeze",
        "merged_range_row",
        vec![rng, ax0.clone()],
        vec![],
    );
    let bnr = e.op(
        "Concat",
        "B_Nr",
        vec![b1.clone(), nr1.clone()],
        vec![attr::int("axis", 0)],
    );
    let rng = e.op("Expand", "merged_range_b", vec![rng, bnr.clone()], vec![]);
    let bn = e.op(
        "Concat",
        "B_N",
        vec![b1.clone(), n1.clone()],
        vec![attr::int("axis", 0)],
    );
    let pos0 = fill(&mut e, "pos_init", bn, DataType::Int64, 0.0);
    let pos1 = e.op(
        "ScatterElements",
        "pos_kept",
        vec![pos0, keep.clone(), rng],
        vec![attr::int("axis", 1)],
    );
    let pos = e.op(
        "ScatterElements",
        "pos",
        vec![pos1, merged_pos.clone(), target.clone()],
        vec![attr::int("axis", 1)],
    );
    // Token indices as [B, rows, 1], read by GatherND per batch row (batch_dims 1): no index
    // tensor as large as the activations. The merge scatter addresses (batch, token) pairs.
    // (Reshaped to [B, rows, 1] with the row count given, so shape inference sees it.)
    let one1 = e.i64s("tome_one1", &[1]);
    let rows_shape = |e: &mut Emitter, rows: In, tag: &str| {
        e.op(
            "Concat",
            tag,
            vec![b1.clone(), rows, one1.clone()],
            vec![attr::int("axis", 0)],
        )
    };
    let (kept_shape, merged_shape, all_shape) = (
        rows_shape(&mut e, nr1, "kept_rows"),
        rows_shape(&mut e, r1, "merged_rows"),
        rows_shape(&mut e, n1, "all_rows"),
    );
    let col = |e: &mut Emitter, idx: In, shape: &In, tag: &str| {
        e.op("Reshape", tag, vec![idx, shape.clone()], vec![])
    };
    let keep_c = col(&mut e, keep, &kept_shape, "keep_index");
    let msrc_c = col(&mut e, merged_pos, &merged_shape, "merged_src_index");
    let pos_c = col(&mut e, pos, &all_shape, "unmerge_index");
    let target_c = col(&mut e, target.clone(), &merged_shape, "merge_target_index");
    let b = e.op("Squeeze", "B_scalar", vec![b1, ax0.clone()], vec![]);
    let batches = e.op(
        "Range",
        "batch_range",
        vec![zero.clone(), b, one.clone()],
        vec![],
    );
    let ax12 = e.i64s("tome_axes12", &[1, 2]);
    let batch_col = e.op("Unsqueeze", "batch_col", vec![batches, ax12], vec![]);
    let batch_of = e.op(
        "Expand",
        "merge_batch_index",
        vec![batch_col, merged_shape.clone()],
        vec![],
    );
    let target_nd = e.op(
        "Concat",
        "merge_target_nd",
        vec![batch_of, target_c.clone()],
        vec![attr::int("axis", 2)],
    );
    // Sums and counts accumulate in f32: ONNX Runtime's CPU ScatterElements has no f16 `add`,
    // and f16 sums of many tokens lose precision.
    let f32 = DataType::Float;
    let zeros = fill(&mut e, "count_init", kept_shape, f32, 0.0);
    let ones = fill(&mut e, "merged_ones", merged_shape, f32, 1.0);
    let added = e.op(
        "ScatterElements",
        "merged_counts",
        vec![zeros, target_c, ones],
        vec![attr::int("axis", 1), reduction_add()],
    );
    let one_t = e.f32("tome_one_f", 1.0);
    let counts = e.op("Add", "counts", vec![added, one_t], vec![]);
    // Apply around each chosen sublayer.
    let mut what = Vec::new();
    for (i, (on, name)) in [
        (o.merge_attn, "attn1"),
        (o.merge_crossattn, "attn2"),
        (o.merge_mlp, "mlp"),
    ]
    .into_iter()
    .enumerate()
    {
        if !on {
            continue;
        }
        let (Some(y), Some(&(_, _, z))) = (a.norm_out[i], a.residuals.get(i)) else {
            return Err(format!(
                "the block has no norm{} / residual for {name}",
                i + 1
            ));
        };
        let base = e.op(
            "GatherND",
            &format!("{name}_merge_keep"),
            vec![In::Value(y), keep_c.clone()],
            vec![attr::int("batch_dims", 1)],
        );
        let msrc = e.op(
            "GatherND",
            &format!("{name}_merge_src"),
            vec![In::Value(y), msrc_c.clone()],
            vec![attr::int("batch_dims", 1)],
        );
        let base = cast(&mut e, base, dtype, f32, &format!("{name}_merge_keep_f32"));
        let msrc = cast(&mut e, msrc, dtype, f32, &format!("{name}_merge_src_f32"));
        let summed = e.op(
            "ScatterND",
            &format!("{name}_merge_sum"),
            vec![base, target_nd.clone(), msrc],
            vec![reduction_add()],
        );
        let merged = e.op(
            "Div",
            &format!("{name}_merged"),
            vec![summed, counts.clone()],
            vec![],
        );
        let merged = cast(&mut e, merged, f32, dtype, &format!("{name}_merged_cast"));
        let unmerged = e.op(
            "GatherND",
            &format!("{name}_unmerge"),
            vec![In::Value(z), pos_c.clone()],
            vec![attr::int("batch_dims", 1)],
        );
        e.p.replace(y, merged);
        e.p.replace(z, unmerged);
        what.push(name);
    }
    Ok(format!("merge {} at ratio {ratio}", what.join(", ")))
}

/// Name of the random-slot input of a level.
pub fn slot_input_name(ds: i64) -> String {
    format!("tome_slots_ds{ds}")
}

/// The dst slot of every window: a constant 0 (top-left), or the level's graph input
/// (shared by the level's blocks; default zeros, so it may be left out).
fn slot_input(e: &mut Emitter, model: &Model, ds: i64, random: bool) -> In {
    if !random {
        return e.i64s("tome_slot_top_left", &[0]);
    }
    let name = slot_input_name(ds);
    if let Some(v) = model
        .graph
        .value_id(&name)
        .filter(|v| model.graph.inputs.iter().any(|io| io.value == *v))
    {
        return In::Value(v);
    }
    use attune_compiler::onnx::tensor_shape_proto::dimension::Value;
    let dims = ["rows", "cols"].map(|d| Value::DimParam(format!("{name}_{d}")));
    let info = onnx::tensor_info(&name, DataType::Int64, Some(dims.into()));
    let default = attune_compiler::weights::Tensor::new(
        name.clone(),
        DataType::Int64,
        vec![1, 1],
        0i64.to_le_bytes().to_vec().into(),
    );
    In::New(e.p.graph_input(info, Some(default)))
}

fn reduction_add() -> AttributeProto {
    AttributeProto {
        name: "reduction".into(),
        r#type: onnx::attribute_proto::AttributeType::String as i32,
        s: b"add".to_vec(),
        ..Default::default()
    }
}

/// `x` of type `from` as `to`; a no-op when they agree.
fn cast(e: &mut Emitter, x: In, from: DataType, to: DataType, tag: &str) -> In {
    if from == to {
        return x;
    }
    e.op("Cast", tag, vec![x], vec![attr::int("to", to as i64)])
}

#[allow(clippy::too_many_arguments)]
fn downsample_block(
    p: &mut Patch,
    model: &Model,
    b: &TransformerBlock,
    ds: i64,
    sample: ValueId,
    factor: i64,
    pool: Pool,
    o: &TomeOptions,
) -> std::result::Result<String, String> {
    let g = &model.graph;
    let a = anatomy(model, b)?;
    let y = a.norm_out[0].ok_or("the block has no norm1")?;
    // The self-attention's key and value projections reading norm1's output.
    let kv: Vec<(NodeId, usize)> = g
        .value(y)
        .consumers
        .iter()
        .filter_map(|u| match u {
            attune_compiler::ir::Use::Input(n, slot) => Some((*n, *slot)),
            _ => None,
        })
        .filter(|(n, _)| {
            let m = &g.node(*n).module;
            m == &format!("{}.attn1.to_k", b.path) || m == &format!("{}.attn1.to_v", b.path)
        })
        .collect();
    if kv.len() != 2 {
        return Err(format!(
            "expected attn1's to_k and to_v to read norm1's output, found {} readers there",
            kv.len()
        ));
    }
    let after = b.norms.first().map(|(_, n)| *n);
    let mut e = Emitter::new(p, &b.path, after);
    let (h, w) = grid(&mut e, sample, ds, o);
    let shape_y = e.op("Shape", "y_shape", vec![In::Value(y)], vec![]);
    let dim = |e: &mut Emitter, i: i64, tag: &str| {
        let idx = e.i64s(&format!("todo_{tag}_index"), &[i]);
        e.op("Gather", tag, vec![shape_y.clone(), idx], vec![])
    };
    let (b1, c1) = (dim(&mut e, 0, "B"), dim(&mut e, 2, "C"));
    let axes0 = e.i64s("todo_axes0", &[0]);
    let h1 = e.op("Unsqueeze", "grid_h_1d", vec![h, axes0.clone()], vec![]);
    let w1 = e.op("Unsqueeze", "grid_w_1d", vec![w, axes0], vec![]);
    let grid_shape = e.op(
        "Concat",
        "grid_shape",
        vec![b1.clone(), h1, w1, c1.clone()],
        vec![attr::int("axis", 0)],
    );
    let grid4 = e.op("Reshape", "grid", vec![In::Value(y), grid_shape], vec![]);
    let nchw = e.op(
        "Transpose",
        "grid_nchw",
        vec![grid4],
        vec![ints("perm", &[0, 3, 1, 2])],
    );
    let small = match pool {
        Pool::Average => e.op(
            "AveragePool",
            "pool",
            vec![nchw],
            vec![
                ints("kernel_shape", &[factor, factor]),
                ints("strides", &[factor, factor]),
            ],
        ),
        Pool::Nearest => {
            let (s, en, ax, st) = (
                e.i64s("todo_starts", &[0, 0]),
                e.i64s("todo_ends", &[i64::MAX, i64::MAX]),
                e.i64s("todo_axes", &[2, 3]),
                e.i64s("todo_steps", &[factor, factor]),
            );
            e.op("Slice", "pool", vec![nchw, s, en, ax, st], vec![])
        }
    };
    let nhwc = e.op(
        "Transpose",
        "pool_nhwc",
        vec![small],
        vec![ints("perm", &[0, 2, 3, 1])],
    );
    let minus1 = e.i64s("todo_minus1", &[-1]);
    let tokens_shape = e.op(
        "Concat",
        "kv_shape",
        vec![b1, minus1, c1],
        vec![attr::int("axis", 0)],
    );
    let kv_in = e.op("Reshape", "kv_tokens", vec![nhwc, tokens_shape], vec![]);
    // Rewire after the patch: the projections read the pooled tokens.
    let In::New(name) = kv_in else {
        unreachable!("ops make new values")
    };
    e.p.rewire_inputs(kv, name);
    let how = match pool {
        Pool::Average => "average",
        Pool::Nearest => "nearest",
    };
    Ok(format!(
        "self-attention keys/values pooled {factor}x{factor} ({how})"
    ))
}
