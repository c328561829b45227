//! Run-time switchable LoRA: low-rank branches `x·A·B·lora_scale` added at the adapted
//! layers, with A and B graph inputs whose defaults have rank 0 (so without an adapter the
//! graph computes the base model), and adapter files holding A and B for a given LoRA.
//! Ranks are symbolic: one compiled graph serves any LoRA (or several, concatenated) of
//! LoRA/LoCon factors.
use std::collections::BTreeMap;
use std::path::Path;

use attune_compiler::ir::Model;
use attune_compiler::onnx::{self, DataType, ValueInfoProto, tensor_shape_proto};
use attune_compiler::pass::{Pass, PassCx, PassReport, Skipped};
use attune_compiler::patch::{In, Patch, attr};
use attune_compiler::weights::Tensor;
use attune_compiler::{Error, Result};

use super::file::{self, Layer, Part};
use super::{Layout, LoraSource, Target, detect_component, find_target, layers_per_block, targets};
use crate::glob::Globs;

/// The global strength input every branch is multiplied by (default 1).
pub const SCALE_INPUT: &str = "lora_scale";

/// Graph input names of a layer's branch.
pub fn input_names(module: &str) -> (String, String) {
    (format!("lora.{module}.down"), format!("lora.{module}.up"))
}

pub struct AdapterPass {
    /// Layers adapted by these files get branches.
    pub sources: Vec<LoraSource>,
    /// ...and so do the layers whose module path matches.
    pub layers: Option<Globs>,
}

impl Pass for AdapterPass {
    fn name(&self) -> &'static str {
        "lora-adapter"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        crate::cache::refuse_split(model, "LoRA adapter branches")?;
        let lpb = layers_per_block(model);
        let all = targets(model);
        let mut report = PassReport::default();
        let mut chosen: BTreeMap<String, Target> = BTreeMap::new();
        for s in &self.sources {
            for layer in file::read(&s.path, lpb, detect_component(model))?.layers {
                match find_target(&all, model, &layer.module) {
                    Some(Ok(t)) => {
                        chosen.insert(layer.module.clone(), t.clone());
                    }
                    Some(Err(why)) => report.skipped.push(Skipped {
                        site: layer.name.clone(),
                        reason: why.clone(),
                    }),
                    None => report.skipped.push(Skipped {
                        site: layer.name.clone(),
                        reason: format!("no layer '{}' in this graph", layer.module),
                    }),
                }
            }
        }
        if let Some(globs) = &self.layers {
            for t in all.values().flatten().filter(|t| globs.matches(&t.module)) {
                chosen.insert(t.module.replace('.', "_"), t.clone());
            }
        }
        if chosen.is_empty() {
            report
                .notes
                .push("no layer selected for LoRA branches: nothing to do".into());
            return Ok(report);
        }
        // A malformed weight (negative dims) is an error naming it, not a skipped layer.
        for t in chosen.values() {
            let w = model
                .graph
                .initializer(t.weight)
                .expect("targets are initializers");
            t.torch_shape(w.name(), w.dims())?;
        }
        let mut patch = Patch::new(model);
        let scale = patch.graph_input(
            tensor_info(SCALE_INPUT, DataType::Float, &[], ""),
            Some(scalar(SCALE_INPUT, 1.0)),
        );
        for t in chosen.values() {
            match branch(&mut patch, model, t, &scale) {
                Ok(()) => report.rewritten.push(format!(
                    "{}: branch inputs {} / {}",
                    t.module,
                    input_names(&t.module).0,
                    input_names(&t.module).1
                )),
                Err(why) => report.skipped.push(Skipped {
                    site: t.module.clone(),
                    reason: why,
                }),
            }
        }
        patch.into_parts().apply(model)?;
        Ok(report)
    }
}

fn scalar(name: &str, v: f32) -> Tensor {
    Tensor::new(
        name,
        DataType::Float,
        vec![],
        v.to_le_bytes().to_vec().into(),
    )
}

/// A tensor input declaration; `None` dims are the layer's symbolic rank (`rank` names it:
/// each layer's rank is its own).
fn tensor_info(name: &str, dt: DataType, dims: &[Option<i64>], rank: &str) -> ValueInfoProto {
    use tensor_shape_proto::dimension::Value;
    let dims = dims
        .iter()
        .map(|d| d.map_or_else(|| Value::DimParam(rank.into()), Value::DimValue))
        .collect();
    onnx::tensor_info(name, dt, Some(dims))
}

/// Adds `out + lora_scale · B(A(x))` after the layer's op.
fn branch(
    p: &mut Patch,
    model: &Model,
    t: &Target,
    scale: &str,
) -> std::result::Result<(), String> {
    let g = &model.graph;
    let node = g.node(t.node);
    let w = g.initializer(t.weight).expect("targets are initializers");
    let dt = DataType::try_from(w.data_type()).map_err(|_| "unknown weight type".to_string())?;
    let shape = t
        .torch_shape(w.name(), w.dims())
        .map_err(|e| e.to_string())?;
    let (out, inp) = (shape[0] as i64, shape[1] as i64);
    let x = node
        .inputs
        .first()
        .copied()
        .flatten()
        .ok_or_else(|| format!("{} has no input", node.describe()))?;
    let y = node
        .outputs
        .first()
        .copied()
        .flatten()
        .ok_or_else(|| format!("{} has no output", node.describe()))?;
    let (down_name, up_name) = input_names(&t.module);
    let rank = format!("rank_{}", t.module.replace('.', "_"));
    let empty = |name: &str, dims: Vec<i64>| Tensor::new(name, dt, dims, Vec::new().into());
    let (m, after) = (t.module.as_str(), Some(t.node));
    let op_name = |tag: &str| format!("{m}/attune_lora_{tag}");
    let low = match t.layout {
        Layout::MatMulT | Layout::Gemm { .. } => {
            let down = p.graph_input(
                tensor_info(&down_name, dt, &[Some(inp), None], &rank),
                Some(empty(&down_name, vec![inp, 0])),
            );
            let up = p.graph_input(
                tensor_info(&up_name, dt, &[None, Some(out)], &rank),
                Some(empty(&up_name, vec![0, out])),
            );
            let a = p.op(
                "MatMul",
                &op_name("down"),
                vec![In::Value(x), In::New(down)],
                vec![],
                m,
                after,
            );
            p.op(
                "MatMul",
                &op_name("up"),
                vec![In::New(a), In::New(up)],
                vec![],
                m,
                after,
            )
        }
        Layout::Conv => {
            if node.attr("group").is_some_and(|a| a.i != 1) {
                return Err("grouped convolutions take no LoRA branch".into());
            }
            let k: Vec<i64> = w.dims()[2..].to_vec();
            let down_dims: Vec<Option<i64>> = [None, Some(inp)]
                .into_iter()
                .chain(k.iter().map(|d| Some(*d)))
                .collect();
            let up_dims: Vec<Option<i64>> = [Some(out), None]
                .into_iter()
                .chain(k.iter().map(|_| Some(1)))
                .collect();
            let default_down = [vec![0, inp], k.clone()].concat();
            let default_up = [vec![out, 0], vec![1; k.len()]].concat();
            let down = p.graph_input(
                tensor_info(&down_name, dt, &down_dims, &rank),
                Some(empty(&down_name, default_down)),
            );
            let up = p.graph_input(
                tensor_info(&up_name, dt, &up_dims, &rank),
                Some(empty(&up_name, default_up)),
            );
            // The down conv repeats the layer's geometry; the up conv is 1x1.
            let geometry: Vec<_> = node
                .proto
                .attribute
                .iter()
                .filter(|a| {
                    matches!(
                        a.name.as_str(),
                        "strides" | "pads" | "dilations" | "auto_pad"
                    )
                })
                .cloned()
                .collect();
            let a = p.op(
                "Conv",
                &op_name("down"),
                vec![In::Value(x), In::New(down)],
                geometry,
                m,
                after,
            );
            p.op(
                "Conv",
                &op_name("up"),
                vec![In::New(a), In::New(up)],
                vec![],
                m,
                after,
            )
        }
    };
    let s = if dt == DataType::Float {
        In::New(scale.to_string())
    } else {
        In::New(p.op(
            "Cast",
            &op_name("scale_cast"),
            vec![In::New(scale.to_string())],
            vec![attr::int("to", dt as i64)],
            m,
            after,
        ))
    };
    let scaled = p.op(
        "Mul",
        &op_name("scale"),
        vec![In::New(low), s],
        vec![],
        m,
        after,
    );
    let sum = p.op(
        "Add",
        &op_name("add"),
        vec![In::Value(y), In::New(scaled)],
        vec![],
        m,
        after,
    );
    p.replace(y, In::New(sum));
    Ok(())
}

/// An adapter tensor for a graph input: name, dims, f32 values (written in `dtype`).
#[derive(Debug, Clone)]
pub struct AdapterTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
    pub dtype: DataType,
}

/// The A/B tensors that make `model`'s branches compute these LoRAs (several files
/// concatenate along the rank). Layers the graph has no branch for are reported back.
pub fn adapter_tensors(
    model: &Model,
    sources: &[LoraSource],
) -> Result<(Vec<AdapterTensor>, Vec<Skipped>)> {
    crate::cache::refuse_split(model, "LoRA adapter tensors")?;
    let lpb = layers_per_block(model);
    let all = targets(model);
    let g = &model.graph;
    let mut acc: BTreeMap<String, (AdapterTensor, AdapterTensor)> = BTreeMap::new();
    let mut skipped = Vec::new();
    for s in sources {
        let f = file::read(&s.path, lpb, detect_component(model))?;
        let fname = s
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for layer in &f.layers {
            let Some(Ok(target)) = find_target(&all, model, &layer.module) else {
                skipped.push(Skipped {
                    site: format!("{fname}:{}", layer.name),
                    reason: format!("no layer '{}' in this graph", layer.module),
                });
                continue;
            };
            let (down_name, up_name) = input_names(&target.module);
            let Some(dt) = g
                .value_id(&down_name)
                .and_then(|v| g.value_elem_type(v))
                .and_then(|t| DataType::try_from(t).ok())
            else {
                skipped.push(Skipped {
                    site: format!("{fname}:{}", layer.name),
                    reason: format!(
                        "the graph has no LoRA branch at {} (compile with --lora-mode adapter)",
                        target.module
                    ),
                });
                continue;
            };
            let w = g
                .initializer(target.weight)
                .expect("targets are initializers");
            let shape = target.torch_shape(w.name(), w.dims())?;
            let factors = factors(layer, &shape, s.multiplier).map_err(|why| Error::Model {
                path: s.path.clone(),
                msg: format!(
                    "layer {} (graph layer {}): {why}",
                    layer.name, target.module
                ),
            })?;
            let entry = acc.entry(target.module.clone()).or_insert_with(|| {
                let empty = |name: &str| AdapterTensor {
                    name: name.into(),
                    dims: vec![],
                    data: vec![],
                    dtype: dt,
                };
                (empty(&down_name), empty(&up_name))
            });
            concat_rank(&mut entry.0, &mut entry.1, factors, &shape, &target.layout);
        }
    }
    Ok((
        acc.into_values().flat_map(|(a, b)| [a, b]).collect(),
        skipped,
    ))
}

/// One file's factors of one layer: down [rank, in, k..], up [out, rank].
struct Factors {
    rank: usize,
    down: Vec<f32>,
    up: Vec<f32>,
}

/// A layer's factors with the scale and multiplier folded into up; a Tucker mid is folded
/// into down.
fn factors(
    layer: &Layer,
    shape: &[usize],
    multiplier: f32,
) -> std::result::Result<Factors, String> {
    if !layer.parts.contains_key(&Part::Down) {
        return Err("adapter mode takes LoRA/LoCon factors; LoHa and LoKr layers can only be fused (--lora-mode fuse)".into());
    }
    let delta = super::math::delta(layer, shape)?; // validates every shape
    let (down, up) = (&layer.parts[&Part::Down], &layer.parts[&Part::Up]);
    let rank = down.rows_cols().0;
    let (out, inp) = (shape[0], shape[1]);
    let spatial: usize = shape[2..].iter().product();
    let down_data = match layer.parts.get(&Part::Mid) {
        // down'[i, q, s] = Σ_j mid[i, j, s] · down[j, q]
        Some(mid) => {
            let mut d = vec![0f32; rank * inp * spatial];
            for i in 0..rank {
                for j in 0..rank {
                    for q in 0..inp {
                        let dv = down.data[j * inp + q];
                        for s in 0..spatial {
                            d[(i * inp + q) * spatial + s] +=
                                mid.data[(i * rank + j) * spatial + s] * dv;
                        }
                    }
                }
            }
            d
        }
        None => down.data.clone(),
    };
    let up_data: Vec<f32> = up
        .data
        .iter()
        .map(|v| v * delta.scale * multiplier)
        .collect();
    debug_assert_eq!(up_data.len(), out * rank);
    Ok(Factors {
        rank,
        down: down_data,
        up: up_data,
    })
}

/// Appends a file's factors to a layer's A/B in the graph's layout: for `MatMul` branches
/// A = downᵀ [in, R] and B = upᵀ [R, out]; for `Conv` branches A [R, in, k..] and
/// B [out, R, 1..]. R grows by each file's rank.
fn concat_rank(
    a: &mut AdapterTensor,
    b: &mut AdapterTensor,
    Factors { rank, down, up }: Factors,
    shape: &[usize],
    layout: &Layout,
) {
    let (out, inp) = (shape[0], shape[1]);
    let conv = *layout == Layout::Conv;
    let old = match (a.dims.is_empty(), conv) {
        (true, _) => 0,
        (false, true) => a.dims[0],
        (false, false) => a.dims[1],
    };
    let total = old + rank;
    // B rows/cols: out x R (conv) or R x out (matmul); both keep old entries first.
    let mut nb = vec![0f32; out * total];
    for o in 0..out {
        for r in 0..total {
            let v = if r < old {
                b.data[if conv { o * old + r } else { r * out + o }]
            } else {
                up[o * rank + (r - old)]
            };
            nb[if conv { o * total + r } else { r * out + o }] = v;
        }
    }
    if conv {
        a.data.extend(&down);
        a.dims = [vec![total, inp], shape[2..].to_vec()].concat();
        b.dims = [vec![out, total], vec![1; shape.len() - 2]].concat();
    } else {
        let mut na = vec![0f32; inp * total];
        for i in 0..inp {
            for r in 0..total {
                na[i * total + r] = if r < old {
                    a.data[i * old + r]
                } else {
                    down[(r - old) * inp + i]
                };
            }
        }
        a.data = na;
        a.dims = vec![inp, total];
        b.dims = vec![total, out];
    }
    b.data = nb;
}

/// Writes adapter tensors as `.safetensors` (atomically).
pub fn write(path: &Path, tensors: &[AdapterTensor]) -> Result<()> {
    attune_compiler::export::write_file(path, &serialize(path, tensors)?)
}

/// Adapter tensors as the bytes of a `.safetensors` file (`path`: where it goes, for errors).
pub fn serialize(path: &Path, tensors: &[AdapterTensor]) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|t| {
            let dt = match t.dtype {
                DataType::Float16 => safetensors::Dtype::F16,
                DataType::Bfloat16 => safetensors::Dtype::BF16,
                DataType::Double => safetensors::Dtype::F64,
                _ => safetensors::Dtype::F32,
            };
            let data = super::encode(&t.data, t.dtype);
            (t.name.clone(), data, dt, t.dims.clone())
        })
        .collect();
    let output_error = |msg: String| Error::Output {
        path: path.into(),
        msg,
    };
    let views = bytes
        .iter()
        .map(|(n, b, dt, dims)| {
            safetensors::tensor::TensorView::new(*dt, dims.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| output_error(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None).map_err(|e| output_error(e.to_string()))
}
