//! ToDo (token downsampling): self-attention's keys and values read the tokens they
//! project (norm1's output; in an adaLN block such as PixArt's, that output modulated)
//! pooled over factor×factor windows of the token grid; queries, and so the output, keep
//! every token.
use attune_compiler::analysis::attention::TransformerBlock;
use attune_compiler::ir::{Model, ValueId};
use attune_compiler::patch::{In, Patch, attr};

use super::{Pool, TomeOptions, anatomy, grid};
use crate::emit::Emitter;

#[allow(clippy::too_many_arguments)]
pub(super) fn downsample_block(
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
    anatomy(model, b)?;
    // The tokens the self-attention's key and value projections read (one value for both).
    let projection = |leaf: &str| {
        let module = format!("{}.attn1.{leaf}", b.path);
        g.node_ids()
            .find(|n| g.node(*n).module == module && g.node(*n).is("MatMul"))
            .ok_or(format!("attn1 has no {leaf} MatMul"))
    };
    let kv = [projection("to_k")?, projection("to_v")?].map(|n| (n, 0));
    let [y, y_v] = kv.map(|(n, slot)| g.node(n).inputs[slot]);
    let y = y
        .filter(|y| Some(*y) == y_v)
        .ok_or("attn1's to_k and to_v read different tokens: no one set of tokens to pool")?;
    let after = g.value(y).producer.map(|(n, _)| n);
    let mut e = Emitter::new(p, &b.path, after);
    let (h, w) = grid(&mut e, sample, ds, o);
    let shape_y = e.op("Shape", "y_shape", vec![In::Value(y)], vec![]);
    let dim = |e: &mut Emitter, i: i64, tag: &str| {
        let idx = e.i64s(&format!("todo_{tag}_index"), &[i]);
        e.op("Gather", tag, vec![shape_y.clone(), idx], vec![])
    };
    let (b1, c1) = (dim(&mut e, 0, "B"), dim(&mut e, 2, "C"));
    let axes0 = e.i64s("todo_axes0", &[0]);
    let h1 = e.unsqueeze("grid_h_1d", h, &axes0);
    let w1 = e.unsqueeze("grid_w_1d", w, &axes0);
    let grid_shape = e.concat("grid_shape", vec![b1.clone(), h1, w1, c1.clone()], 0);
    let grid4 = e.op("Reshape", "grid", vec![In::Value(y), grid_shape], vec![]);
    let nchw = e.op(
        "Transpose",
        "grid_nchw",
        vec![grid4],
        vec![attr::ints("perm", &[0, 3, 1, 2])],
    );
    let small = match pool {
        Pool::Average => e.op(
            "AveragePool",
            "pool",
            vec![nchw],
            vec![
                attr::ints("kernel_shape", &[factor, factor]),
                attr::ints("strides", &[factor, factor]),
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
        vec![attr::ints("perm", &[0, 2, 3, 1])],
    );
    let minus1 = e.i64s("todo_minus1", &[-1]);
    let tokens_shape = e.concat("kv_shape", vec![b1, minus1, c1], 0);
    let kv_in = e.op("Reshape", "kv_tokens", vec![nhwc, tokens_shape], vec![]);
    // Rewire after the patch: the projections read the pooled tokens.
    let In::New(name) = kv_in else {
        unreachable!("ops make new values")
    };
    e.p.rewire_inputs(kv.to_vec(), name);
    let how = match pool {
        Pool::Average => "average",
        Pool::Nearest => "nearest",
    };
    Ok(format!(
        "self-attention keys/values pooled {factor}x{factor} ({how})"
    ))
}
