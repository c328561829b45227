//! ToMe's bipartite partition of a block's tokens: dst = one slot of every full sy×sx window
//! of the token grid (its top-left unless random slots are given), src = the rest.
use attune_compiler::ir::Model;
use attune_compiler::onnx::{self, DataType};
use attune_compiler::patch::{In, attr};

use super::{Consts, TomeOptions};
use crate::emit::Emitter;

/// Token indices of one block's partition, and its sizes as 1-D [1] tensors.
pub(super) struct Partition {
    /// dst tokens, then src tokens, each ascending ([#dst], [#src]).
    pub dst: In,
    pub src: In,
    pub n_dst: In,
    pub n_src: In,
}

/// The partition of `n` tokens (1-D [1]) on an `h`×`w` grid (scalars) of level `ds`.
pub(super) fn partition(
    e: &mut Emitter,
    c: &Consts,
    model: &Model,
    ds: i64,
    o: &TomeOptions,
    (h, w): (In, In),
    n: &In,
) -> Partition {
    let (sy, sx) = (e.i64("tome_sy", o.sy), e.i64("tome_sx", o.sx));
    let slots = slot_input(e, model, ds, o.random);
    let rows = axis(e, c, h, sy, "rows");
    let cols = axis(e, c, w, sx.clone(), "cols");
    // One dst per whole window: the counts follow from the shapes alone.
    let n_dst = e.op(
        "Mul",
        "dst_count",
        vec![rows.windows.clone(), cols.windows.clone()],
        vec![],
    );
    let rows_col = e.unsqueeze("rows_inside_col", rows.inside, &c.ax1);
    let cols_row = e.unsqueeze("cols_inside_row", cols.inside, &c.ax0);
    let inside = e.op("And", "inside_windows", vec![rows_col, cols_row], vec![]);
    let row1 = e.unsqueeze("window_rows_1d", rows.windows, &c.ax0);
    let col1 = e.unsqueeze("window_cols_1d", cols.windows, &c.ax0);
    let windows_shape = e.concat("windows_shape", vec![row1, col1], 0);
    let slot_grid = e.op("Expand", "slots", vec![slots, windows_shape], vec![]);
    let slot_rows = e.gather("slots_rows", slot_grid, rows.window, 0);
    let slot_of_token = e.gather("slots_tokens", slot_rows, cols.window, 1);
    let row_part = e.op("Mul", "offset_rows", vec![rows.offset, sx], vec![]);
    let row_part = e.unsqueeze("offset_rows_col", row_part, &c.ax1);
    let col_part = e.unsqueeze("offset_cols_row", cols.offset, &c.ax0);
    let local = e.op("Add", "offset_in_window", vec![row_part, col_part], vec![]);
    let chosen_slot = e.op("Equal", "is_slot", vec![slot_of_token, local], vec![]);
    let grid_mask = e.op("And", "dst_grid", vec![inside, chosen_slot], vec![]);
    let flat = e.i64s("tome_flat", &[-1]);
    let mask = e.op("Reshape", "dst_mask", vec![grid_mask, flat.clone()], vec![]);
    // The dst tokens, then the src tokens, each ascending: a stable partition by the mask,
    // each token's place counted with CumSum and the tokens scattered there. Neither NonZero
    // (its data-dependent size makes a CUDA run wait for the GPU) nor a sort (ONNX Runtime's
    // CUDA TopK runs each row in one thread block).
    let n_dst = e.op("Reshape", "dst_count_1d", vec![n_dst, flat], vec![]);
    let n_src = e.op("Sub", "src_count", vec![n.clone(), n_dst.clone()], vec![]);
    let n_scalar = e.op("Squeeze", "N_scalar", vec![n.clone()], vec![]);
    let token = e.op(
        "Range",
        "token_range",
        vec![c.zero.clone(), n_scalar, c.one.clone()],
        vec![],
    );
    let mask_int = e.cast("dst_mask_int", mask.clone(), DataType::Int64);
    let dst_upto = e.op("CumSum", "dst_upto", vec![mask_int, c.zero.clone()], vec![]);
    let dst_rank = e.op(
        "Sub",
        "dst_rank",
        vec![dst_upto.clone(), c.one.clone()],
        vec![],
    );
    let src_before = e.op("Sub", "src_before", vec![token.clone(), dst_upto], vec![]);
    let src_rank = e.op("Add", "src_rank", vec![src_before, n_dst.clone()], vec![]);
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
    let dst = e.op(
        "Slice",
        "dst_index",
        vec![order.clone(), c.start.clone(), n_dst.clone()],
        vec![],
    );
    let src = e.op(
        "Slice",
        "src_index",
        vec![order, n_dst.clone(), c.end.clone()],
        vec![],
    );
    Partition {
        dst,
        src,
        n_dst,
        n_src,
    }
}

/// One axis of the grid: per token its window (clamped to the last whole one), whether that
/// window is whole, and the token's offset in it; and the number of whole windows.
struct Axis {
    windows: In,
    inside: In,
    window: In,
    offset: In,
}

fn axis(e: &mut Emitter, c: &Consts, len: In, stride: In, tag: &str) -> Axis {
    let t = |what: &str| format!("{tag}_{what}");
    let idx = e.op(
        "Range",
        &t("range"),
        vec![c.zero.clone(), len.clone(), c.one.clone()],
        vec![],
    );
    let windows = e.op("Div", &t("windows"), vec![len, stride.clone()], vec![]);
    let covered = e.op(
        "Mul",
        &t("covered"),
        vec![windows.clone(), stride.clone()],
        vec![],
    );
    let inside = e.op("Less", &t("inside"), vec![idx.clone(), covered], vec![]);
    let window = e.op(
        "Div",
        &t("window"),
        vec![idx.clone(), stride.clone()],
        vec![],
    );
    let last = e.op(
        "Sub",
        &t("last_window"),
        vec![windows.clone(), c.one.clone()],
        vec![],
    );
    let last = e.op(
        "Max",
        &t("last_window_clamped"),
        vec![last, c.zero.clone()],
        vec![],
    );
    let window = e.op("Min", &t("window_clamped"), vec![window, last], vec![]);
    let offset = e.op("Mod", &t("offset"), vec![idx, stride], vec![]);
    Axis {
        windows,
        inside,
        window,
        offset,
    }
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
