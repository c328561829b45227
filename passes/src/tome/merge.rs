//! ToMe around one transformer block: match src tokens to dst tokens once, from the block's
//! input, then merge before and unmerge after each chosen sublayer.
use attune_compiler::analysis::attention::TransformerBlock;
use attune_compiler::ir::{Model, ValueId};
use attune_compiler::onnx::{self, AttributeProto, DataType, TensorProto};
use attune_compiler::patch::{In, Patch, attr};

use super::partition::{Partition, partition};
use super::{Anatomy, Consts, MIN_OPSET, TomeOptions, anatomy, grid};
use crate::emit::Emitter;

pub(super) fn merge_block(
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
    let hw = grid(&mut e, sample, ds, o);
    let x = In::Value(a.x);
    // Sizes as 1-D [1] tensors (for Concat/Expand/TopK) from x [B, N, C].
    let shape_x = e.op("Shape", "x_shape", vec![x.clone()], vec![]);
    let dim = |e: &mut Emitter, i: i64, tag: &str| {
        let idx = e.i64s(&format!("tome_{tag}_index"), &[i]);
        e.op("Gather", tag, vec![shape_x.clone(), idx], vec![])
    };
    let sizes = Sizes {
        b: dim(&mut e, 0, "B"),
        n: dim(&mut e, 1, "N"),
    };
    let c = Consts::new(&mut e);
    let part = partition(&mut e, &c, model, ds, o, hw, &sizes.n);
    let r = merge_count(&mut e, &sizes.n, ratio, &part.n_src);
    let m = best_matches(&mut e, &c, model, x, &part, &r);
    let maps = index_maps(&mut e, &c, &sizes, &part, &m, &r);
    let what = merge_around_sublayers(&mut e, &a, &maps, dtype, o)?;
    Ok(format!("merge {} at ratio {ratio}", what.join(", ")))
}

/// Batch size and token count of the block's input, as 1-D [1] tensors.
struct Sizes {
    b: In,
    n: In,
}

/// r = min(⌊N·ratio⌋, #src), tomesd's count of merged tokens.
fn merge_count(e: &mut Emitter, n: &In, ratio: f32, n_src: &In) -> In {
    let nf = e.cast("N_float", n.clone(), DataType::Float);
    let ratio_c = e.f32("tome_ratio", ratio);
    let rf = e.op("Mul", "r_float", vec![nf, ratio_c], vec![]);
    let rf = e.op("Floor", "r_floor", vec![rf], vec![]);
    let r_all = e.cast("r_int", rf, DataType::Int64);
    e.op("Min", "r", vec![r_all, n_src.clone()], vec![])
}

/// Which src tokens merge, and where to.
struct Matching {
    /// Token positions of the src kept ([B, #src − r]) and of the src merged ([B, r]).
    kept: In,
    merged: In,
    /// Where each merged src goes in the merged sequence: its dst's place ([B, r]).
    target: In,
}

/// The similarity of every src to every dst, each src's best dst, and the r src most
/// similar to theirs.
fn best_matches(
    e: &mut Emitter,
    c: &Consts,
    model: &Model,
    x: In,
    part: &Partition,
    r: &In,
) -> Matching {
    // x / ‖x‖ over channels. Not LpNormalization: ONNX Runtime's CUDA EP has no kernel for
    // it, so it would run on the CPU with the activations copied there and back.
    let opset = model.opset("").unwrap_or(MIN_OPSET);
    let norm = e.reduce("ReduceL2", "metric_norm", x.clone(), &[-1], true, opset);
    let metric = e.op("Div", "metric", vec![x, norm], vec![]);
    let ma = e.gather("metric_src", metric.clone(), part.src.clone(), 1);
    let mb = e.gather("metric_dst", metric, part.dst.clone(), 1);
    let mbt = e.op(
        "Transpose",
        "metric_dst_T",
        vec![mb],
        vec![attr::ints("perm", &[0, 2, 1])],
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
    let last = e.i64s("tome_axes_last", &[-1]);
    let node_max = e.squeeze("best_score", best_score, &last);
    let node_idx = e.squeeze("best_index", best_index, &last);
    let ranked = e.ops(
        "TopK",
        "ranked",
        vec![node_max, part.n_src.clone()],
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
        vec![order.clone(), c.start.clone(), r.clone(), c.ax1.clone()],
        vec![],
    );
    let kept_src = e.op(
        "Slice",
        "kept_src",
        vec![order, r.clone(), c.end.clone(), c.ax1.clone()],
        vec![],
    );
    let kept = e.gather("kept_src_pos", part.src.clone(), kept_src, 0);
    let merged = e.gather("merged_src_pos", part.src.clone(), merged_src.clone(), 0);
    let unmerged = e.op(
        "Sub",
        "src_kept_count",
        vec![part.n_src.clone(), r.clone()],
        vec![],
    );
    let chosen = e.op(
        "GatherElements",
        "merged_dst",
        vec![node_idx, merged_src],
        vec![attr::int("axis", 1)],
    );
    let target = e.op("Add", "merge_target", vec![chosen, unmerged], vec![]);
    Matching {
        kept,
        merged,
        target,
    }
}

/// Indices of the merge and unmerge as [B, rows, 1], read by GatherND per batch row
/// (batch_dims 1): no index tensor as large as the activations.
struct Maps {
    /// The tokens merge keeps in place: the kept src, then every dst.
    keep: In,
    /// The merged src.
    merged: In,
    /// Where each token is found after merging (unmerge is one gather with this map).
    unmerge: In,
    /// (batch, place) of each merged src's dst, for the merge's ScatterND.
    target: In,
    /// Tokens averaged into each place, f32 [B, N − r, 1].
    counts: In,
}

fn index_maps(
    e: &mut Emitter,
    c: &Consts,
    s: &Sizes,
    part: &Partition,
    m: &Matching,
    r: &In,
) -> Maps {
    let bd = e.concat("B_Nd", vec![s.b.clone(), part.n_dst.clone()], 0);
    let dst_row = e.unsqueeze("dst_row", part.dst.clone(), &c.ax0);
    let dst_b = e.op("Expand", "dst_pos", vec![dst_row, bd], vec![]);
    let keep = e.concat("keep_pos", vec![m.kept.clone(), dst_b], 1);
    let nr = e.op("Sub", "merged_count", vec![s.n.clone(), r.clone()], vec![]);
    // Unmerge: the kept tokens are found at 0..N−r, each merged src where its dst went.
    let nr_scalar = e.squeeze("merged_count_scalar", nr.clone(), &c.ax0);
    let places = e.op(
        "Range",
        "merged_range",
        vec![c.zero.clone(), nr_scalar, c.one.clone()],
        vec![],
    );
    let places = e.unsqueeze("merged_range_row", places, &c.ax0);
    let bnr = e.concat("B_Nr", vec![s.b.clone(), nr.clone()], 0);
    let places = e.op("Expand", "merged_range_b", vec![places, bnr], vec![]);
    let bn = e.concat("B_N", vec![s.b.clone(), s.n.clone()], 0);
    let pos0 = fill(e, "pos_init", bn, DataType::Int64, 0.0);
    let pos1 = e.op(
        "ScatterElements",
        "pos_kept",
        vec![pos0, keep.clone(), places],
        vec![attr::int("axis", 1)],
    );
    let pos = e.op(
        "ScatterElements",
        "pos",
        vec![pos1, m.merged.clone(), m.target.clone()],
        vec![attr::int("axis", 1)],
    );
    // (Reshaped to [B, rows, 1] with the row count given, so shape inference sees it.)
    let one1 = e.i64s("tome_one1", &[1]);
    let rows_shape = |e: &mut Emitter, rows: In, tag: &str| {
        e.concat(tag, vec![s.b.clone(), rows, one1.clone()], 0)
    };
    let kept_shape = rows_shape(e, nr, "kept_rows");
    let merged_shape = rows_shape(e, r.clone(), "merged_rows");
    let all_shape = rows_shape(e, s.n.clone(), "all_rows");
    let col = |e: &mut Emitter, idx: In, shape: &In, tag: &str| {
        e.op("Reshape", tag, vec![idx, shape.clone()], vec![])
    };
    let keep = col(e, keep, &kept_shape, "keep_index");
    let merged = col(e, m.merged.clone(), &merged_shape, "merged_src_index");
    let unmerge = col(e, pos, &all_shape, "unmerge_index");
    let target = col(e, m.target.clone(), &merged_shape, "merge_target_index");
    // The merge scatter addresses (batch, token) pairs.
    let b = e.squeeze("B_scalar", s.b.clone(), &c.ax0);
    let batches = e.op(
        "Range",
        "batch_range",
        vec![c.zero.clone(), b, c.one.clone()],
        vec![],
    );
    let ax12 = e.i64s("tome_axes12", &[1, 2]);
    let batch_col = e.unsqueeze("batch_col", batches, &ax12);
    let batch_of = e.op(
        "Expand",
        "merge_batch_index",
        vec![batch_col, merged_shape.clone()],
        vec![],
    );
    let target_nd = e.concat("merge_target_nd", vec![batch_of, target.clone()], 2);
    // Sums and counts accumulate in f32: ONNX Runtime's CPU ScatterElements has no f16 `add`,
    // and f16 sums of many tokens lose precision.
    let f32 = DataType::Float;
    let zeros = fill(e, "count_init", kept_shape, f32, 0.0);
    let ones = fill(e, "merged_ones", merged_shape, f32, 1.0);
    let added = e.op(
        "ScatterElements",
        "merged_counts",
        vec![zeros, target, ones],
        vec![attr::int("axis", 1), reduction_add()],
    );
    let one_t = e.f32("tome_one_f", 1.0);
    let counts = e.op("Add", "counts", vec![added, one_t], vec![]);
    Maps {
        keep,
        merged,
        unmerge,
        target: target_nd,
        counts,
    }
}

/// merge(norm output) and unmerge(sublayer output) around each chosen sublayer; their names.
fn merge_around_sublayers(
    e: &mut Emitter,
    a: &Anatomy,
    maps: &Maps,
    dtype: DataType,
    o: &TomeOptions,
) -> std::result::Result<Vec<&'static str>, String> {
    let f32 = DataType::Float;
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
                "the block has no norm{} of the stream {name} reads, or no residual for it (a DiT's cross-attention reads the stream itself)",
                i + 1
            ));
        };
        let gather_rows = |e: &mut Emitter, tag: &str, from: ValueId, rows: &In| {
            e.op(
                "GatherND",
                &format!("{name}_{tag}"),
                vec![In::Value(from), rows.clone()],
                vec![attr::int("batch_dims", 1)],
            )
        };
        let base = gather_rows(e, "merge_keep", y, &maps.keep);
        let msrc = gather_rows(e, "merge_src", y, &maps.merged);
        let base = cast(e, base, dtype, f32, &format!("{name}_merge_keep_f32"));
        let msrc = cast(e, msrc, dtype, f32, &format!("{name}_merge_src_f32"));
        let summed = e.op(
            "ScatterND",
            &format!("{name}_merge_sum"),
            vec![base, maps.target.clone(), msrc],
            vec![reduction_add()],
        );
        let merged = e.op(
            "Div",
            &format!("{name}_merged"),
            vec![summed, maps.counts.clone()],
            vec![],
        );
        let merged = cast(e, merged, f32, dtype, &format!("{name}_merged_cast"));
        let unmerged = gather_rows(e, "unmerge", z, &maps.unmerge);
        e.p.replace(y, merged);
        e.p.replace(z, unmerged);
        what.push(name);
    }
    Ok(what)
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
    e.cast(tag, x, to)
}
