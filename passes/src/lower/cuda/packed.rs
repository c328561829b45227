//! Packed projections for `com.microsoft.MultiHeadAttention`.
//!
//! Self-attention projects one input three times (Q, K, V) and cross-attention the text
//! states twice (K, V): three or two GEMMs reading the same activations. One GEMM with the
//! weights side by side does the same work in one launch, and MultiHeadAttention reads its
//! output as packed QKV ([B, S, N, 3, H]) or packed KV ([B, L, N, 2, H]). Packing is per head
//! (the columns of head n: its q, then its k, then its v), which is what those layouts mean.
use attune_compiler::ir::{Graph, NodeId, ValueId};
use attune_compiler::onnx::DataType;
use attune_compiler::patch::{In, Patch};
use attune_compiler::weights::Tensor;

/// A projection `x · W` (W a 2-D initializer [C, D]) read only by the attention.
struct Projection {
    x: ValueId,
    w: ValueId,
    dims: [i64; 2],
}

fn projection(g: &Graph, v: ValueId, mha: NodeId) -> Option<Projection> {
    let mm = g.producer(v).filter(|n| g.node(*n).is("MatMul"))?;
    if g.sole_reader(v) != Some(mha) {
        return None;
    }
    let w = g.input(mm, 1)?;
    let t = g.initializer(w)?;
    let dims: [i64; 2] = t.dims().try_into().ok()?;
    Some(Projection {
        x: g.input(mm, 0)?,
        w,
        dims,
    })
}

/// Weights [C, N·H] each → [C, N·k·H], head by head.
fn pack(g: &Graph, ws: &[ValueId], heads: i64) -> Result<Tensor, String> {
    let tensors: Vec<&Tensor> = ws
        .iter()
        .map(|w| g.initializer(*w).ok_or("not an initializer"))
        .collect::<Result<_, _>>()?;
    let [c, d] = <[i64; 2]>::try_from(tensors[0].dims()).map_err(|_| "not 2-D")?;
    let dtype = tensors[0].data_type();
    if tensors
        .iter()
        .any(|t| t.dims() != [c, d] || t.data_type() != dtype)
    {
        return Err("the projections' weights differ in shape or type".into());
    }
    if heads <= 0 || c <= 0 || d <= 0 {
        return Err(format!("{heads} heads over a [{c}, {d}] weight"));
    }
    if d % heads != 0 {
        return Err(format!("{d} columns do not split into {heads} heads"));
    }
    let bytes: Vec<_> = tensors
        .iter()
        .map(|t| t.bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let size = bytes[0].len() / (c * d) as usize;
    let head = (d / heads) as usize * size;
    let k = ws.len();
    let mut out = Vec::with_capacity(bytes[0].len() * k);
    for row in 0..c as usize {
        for n in 0..heads as usize {
            for b in &bytes {
                let at = row * d as usize * size + n * head;
                out.extend_from_slice(&b[at..at + head]);
            }
        }
    }
    let dtype = DataType::try_from(dtype).map_err(|_| "unknown weight type")?;
    let name = format!("{}_packed{k}", tensors[0].name());
    Ok(Tensor::new(name, dtype, vec![c, d * k as i64], out.into()))
}

/// Rewrites one MultiHeadAttention to packed QKV (self-attention) or KV (cross-attention);
/// returns which.
pub fn pack_attention(p: &mut Patch, g: &Graph, mha: NodeId) -> Result<&'static str, String> {
    let node = g.node(mha);
    if node.inputs.len() != 3 || node.inputs.iter().any(Option::is_none) {
        return Err("not plain query/key/value inputs".into());
    }
    let heads = node.attr("num_heads").ok_or("no num_heads")?.i;
    let [q, k, v] = [0, 1, 2].map(|i| g.input(mha, i).expect("checked above"));
    let (Some(pk), Some(pv)) = (projection(g, k, mha), projection(g, v, mha)) else {
        return Err("key/value are not bias-free projections of constants".into());
    };
    if pk.x != pv.x || pk.dims != pv.dims {
        return Err("key and value project different inputs".into());
    }
    let pq = projection(g, q, mha).filter(|pq| pq.x == pk.x && pq.dims == pk.dims);
    let (x, ws, kind) = match &pq {
        Some(pq) => (pq.x, vec![pq.w, pk.w, pv.w], "QKV"),
        None => (pk.x, vec![pk.w, pv.w], "KV"),
    };
    let packed = pack(g, &ws, heads)?;
    let module = node.module.clone();
    let after = Some(mha);
    let name = |tag: &str| format!("{module}/attune_packed_{tag}");
    let dtype = DataType::try_from(packed.data_type()).map_err(|_| "unknown weight type")?;
    let dims = packed.dims().to_vec();
    let bytes = packed.bytes().map_err(|e| e.to_string())?.into_owned();
    let w = p.constant(packed.name(), dtype, dims, bytes);
    let mm = p.op(
        "MatMul",
        &name(kind),
        vec![In::Value(x), In::New(w)],
        vec![],
        &module,
        after,
    );
    let head = pk.dims[1] / heads;
    let shape = p.i64s(&name("shape"), &[0, 0, heads, ws.len() as i64, head]);
    let split = p.op(
        "Reshape",
        &name(kind),
        vec![In::New(mm), In::New(shape)],
        vec![],
        &module,
        after,
    );
    let inputs = match kind {
        "QKV" => vec![In::New(split)],
        _ => vec![In::Value(q), In::New(split)],
    };
    let out = p
        .node(
            "MultiHeadAttention",
            super::MS_DOMAIN,
            &format!("{module}/attune_MultiHeadAttention_packed"),
            inputs,
            1,
            node.proto.attribute.clone(),
            &module,
            after,
        )
        .remove(0);
    p.replace(g.output(mha).ok_or("no output")?, In::New(out));
    Ok(kind)
}
