//! `--merge-controlnet`: a ControlNet joined into the denoiser it feeds, one graph (one
//! session, one run per step). The ControlNet reads the denoiser's `sample`, `timestep` and
//! `encoder_hidden_states` (cast, or broadcast to the batch, where it declares them
//! otherwise) and a new input `controlnet_cond`; its residual outputs, scaled by the new input
//! `controlnet_scale` (f32 [], default 1: its own `conditioning_scale` input where it has one),
//! replace the denoiser's residual inputs, which are gone. The ControlNet's names get a
//! `controlnet/` prefix and its module paths a `controlnet.` one; its weights are the
//! denoiser's neighbours in the one data file the export writes.
use std::collections::HashMap;
use std::path::PathBuf;

use attune_compiler::analysis::shapes::declared_dims;
use attune_compiler::controlnet_io::{
    IMAGE_INPUT, MERGED_SCALE, SCALE_INPUT, declared_fit, is_residual,
};
use attune_compiler::ir::{Graph, Io, Model, ValueId};
use attune_compiler::onnx::{self, DataType, tensor_shape_proto};
use attune_compiler::pass::{Pass, PassCx, PassReport};
use attune_compiler::weights::Tensor;
use attune_compiler::{Error, Result};

pub struct MergeControlNet {
    pub path: PathBuf,
}

/// The inputs a ControlNet shares with the denoiser.
const SHARED: [&str; 3] = ["sample", "timestep", "encoder_hidden_states"];
const PREFIX: &str = "controlnet/";

impl Pass for MergeControlNet {
    fn name(&self) -> &'static str {
        "merge-controlnet"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let file = if self.path.is_dir() {
            self.path.join("model.onnx")
        } else {
            self.path.clone()
        };
        let cn = attune_compiler::import::read(&file)?;
        let bad =
            |msg: String| Error::Graph(format!("--merge-controlnet {}: {msg}", file.display()));
        let g = &model.graph;
        let residuals: Vec<(String, ValueId)> = g
            .inputs
            .iter()
            .map(|io| (io.info.name.clone(), io.value))
            .filter(|(n, _)| is_residual(n))
            .collect();
        if residuals.is_empty() {
            return Err(bad(
                "the denoiser has no residual inputs (down_block_N_additional_residual, mid_block_additional_residual) to feed".into(),
            ));
        }
        let (theirs, ours) = (cn.opset(""), model.opset(""));
        if theirs != ours {
            return Err(bad(format!(
                "opset {theirs:?}, the denoiser's {ours:?}: export both at one opset (operators changed between them)"
            )));
        }
        let cg = &cn.graph;
        let input_names: Vec<&str> = cg.inputs.iter().map(|io| io.info.name.as_str()).collect();
        for want in SHARED.iter().chain([&IMAGE_INPUT]) {
            if !input_names.contains(want) {
                return Err(bad(format!(
                    "no input '{want}' (a ControlNet reads sample, timestep, encoder_hidden_states, controlnet_cond)"
                )));
            }
            if SHARED.contains(want)
                && g.value_id(want)
                    .is_none_or(|v| !g.inputs.iter().any(|io| io.value == v))
            {
                return Err(bad(format!("the denoiser has no input '{want}' to share")));
            }
        }
        // Other inputs the denoiser has too (SDXL's text_embeds and time_ids) are shared.
        let ours = |n: &str| g.inputs.iter().any(|io| io.info.name == n);
        if let Some(other) = input_names.iter().find(|n| {
            !SHARED.contains(n)
                && !ours(n)
                && **n != IMAGE_INPUT
                && **n != SCALE_INPUT
                && cg.initializer(cg.value_id(n).expect("input")).is_none()
        }) {
            return Err(bad(format!(
                "input '{other}' is not one the merged graph can feed"
            )));
        }
        let outputs: Vec<&str> = cg.outputs.iter().map(|io| io.info.name.as_str()).collect();
        for (name, _) in &residuals {
            if !outputs.contains(&name.as_str()) {
                return Err(bad(format!(
                    "no output '{name}' for the denoiser's residual input"
                )));
            }
        }
        check_declared_fit(model, &cn).map_err(bad)?;
        let scale_inside = input_names.contains(&SCALE_INPUT);
        let batch_dim = g
            .inputs
            .iter()
            .find(|io| io.info.name == "sample")
            .and_then(|io| io.info.r#type.as_ref())
            .and_then(|t| match &t.value {
                Some(onnx::type_proto::Value::TensorType(t)) => {
                    t.shape.as_ref()?.dim.first().cloned()
                }
                _ => None,
            });
        let mut nodes = 0;
        {
            let g = &mut model.graph;
            let mut map: HashMap<ValueId, ValueId> = HashMap::new();
            // The new inputs.
            let scale = g.value_named(&fresh(g, MERGED_SCALE));
            g.inputs.push(Io {
                value: scale,
                info: onnx::tensor_info(
                    &g.value(scale).name.clone(),
                    DataType::Float,
                    Some(vec![]),
                ),
            });
            g.set_initializer(Tensor::new(
                g.value(scale).name.clone(),
                DataType::Float,
                vec![],
                1f32.to_le_bytes().to_vec().into(),
            ));
            for io in &cg.inputs {
                let name = io.info.name.as_str();
                let ours = g.inputs.iter().any(|i| i.info.name == name);
                let mine = match name {
                    n if SHARED.contains(&n) || (ours && n != IMAGE_INPUT) => shared(g, io, n)?,
                    IMAGE_INPUT => {
                        let value = g.value_named(&fresh(g, IMAGE_INPUT));
                        let mut info = io.info.clone();
                        info.name = g.value(value).name.clone();
                        rename_dims(&mut info, batch_dim.clone());
                        g.inputs.push(Io { value, info });
                        value
                    }
                    SCALE_INPUT => cast_to(g, scale, io_type(&io.info), "conditioning_scale_cast")?,
                    _ => continue,
                };
                map.insert(io.value, mine);
            }
            for (v, t) in cg.initializers() {
                if map.contains_key(&v) {
                    continue;
                }
                let mut t = t.clone();
                t.proto.name = fresh(g, &format!("{PREFIX}{}", t.proto.name));
                map.insert(v, g.set_initializer(t));
            }
            let value =
                |g: &mut Graph, map: &mut HashMap<ValueId, ValueId>, v: ValueId| -> ValueId {
                    *map.entry(v).or_insert_with(|| {
                        let name = fresh(g, &format!("{PREFIX}{}", cg.value(v).name));
                        g.value_named(&name)
                    })
                };
            for n in cg.topo_order()? {
                let node = cg.node(n);
                if !node.implicit_inputs.is_empty() {
                    return Err(bad(format!(
                        "{}: subgraphs are not merged",
                        node.describe()
                    )));
                }
                let inputs = node
                    .inputs
                    .iter()
                    .map(|i| i.map(|v| value(g, &mut map, v)))
                    .collect();
                let outs = node
                    .outputs
                    .iter()
                    .map(|o| o.map(|v| value(g, &mut map, v)))
                    .collect();
                let mut proto = node.proto.clone();
                proto.name = format!("{PREFIX}{}", proto.name);
                let module = if node.module.is_empty() {
                    "controlnet".to_string()
                } else {
                    format!("controlnet.{}", node.module)
                };
                g.add_node(proto, inputs, outs, module, None)?;
                nodes += 1;
            }
            for (name, input) in &residuals {
                let out = cg
                    .outputs
                    .iter()
                    .find(|io| io.info.name == *name)
                    .expect("checked");
                let mut fed = value(g, &mut map, out.value);
                if !scale_inside {
                    let typed = cast_to(g, scale, io_type(&out.info), &format!("{name}_scale"))?;
                    let scaled = g.value_named(&fresh(g, &format!("{PREFIX}{name}_scaled")));
                    g.add_node(
                        node_proto("Mul", &format!("{PREFIX}{name}_scale")),
                        vec![Some(fed), Some(typed)],
                        vec![Some(scaled)],
                        "controlnet".into(),
                        None,
                    )?;
                    fed = scaled;
                }
                g.replace_all_uses(*input, fed);
                g.inputs.retain(|io| io.value != *input);
            }
        }
        for op in cn
            .proto
            .opset_import
            .iter()
            .filter(|o| !onnx::is_default_domain(&o.domain))
        {
            model.require_opset(&op.domain, op.version);
        }
        // Its weights stay mapped from its data file.
        model.data_files.extend(cn.data_files.iter().cloned());
        Ok(PassReport {
            rewritten: vec![format!(
                "{} merged: {nodes} nodes; {} residual inputs fed by it, scaled by '{MERGED_SCALE}'{}",
                file.display(),
                residuals.len(),
                if scale_inside {
                    " (its conditioning_scale)"
                } else {
                    ""
                }
            )],
            ..Default::default()
        })
    }
}

/// A value name not in `g` yet, `base` if free.
fn fresh(g: &Graph, base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 0;
    while g.value_id(&name).is_some() {
        k += 1;
        name = format!("{base}_{k}");
    }
    name
}

fn node_proto(op: &str, name: &str) -> onnx::NodeProto {
    onnx::NodeProto {
        op_type: op.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn io_type(info: &onnx::ValueInfoProto) -> Option<i32> {
    match info.r#type.as_ref()?.value.as_ref()? {
        onnx::type_proto::Value::TensorType(t) => Some(t.elem_type),
        _ => None,
    }
}

/// `v` cast to `to` (itself when it has that type or `to` is unknown).
fn cast_to(g: &mut Graph, v: ValueId, to: Option<i32>, tag: &str) -> Result<ValueId> {
    let Some(to) = to.filter(|t| Some(*t) != g.value_elem_type(v)) else {
        return Ok(v);
    };
    let out = g.value_named(&fresh(g, &format!("{PREFIX}{tag}")));
    let mut proto = node_proto("Cast", &format!("{PREFIX}{tag}"));
    proto
        .attribute
        .push(attune_compiler::patch::attr::int("to", i64::from(to)));
    g.add_node(
        proto,
        vec![Some(v)],
        vec![Some(out)],
        "controlnet".into(),
        None,
    )?;
    Ok(out)
}

/// The denoiser's input `name` as the ControlNet declares it: cast to its element type, and a
/// scalar timestep broadcast to the batch where the ControlNet takes one per row.
fn shared(g: &mut Graph, io: &Io, name: &str) -> Result<ValueId> {
    let ours = g.value_id(name).expect("checked");
    let mut v = cast_to(g, ours, io_type(&io.info), &format!("{name}_cast"))?;
    let their_rank = declared_dims(&io.info).map(|d| d.len());
    let our_info = &g
        .inputs
        .iter()
        .find(|i| i.value == ours)
        .expect("an input")
        .info;
    let our_rank = declared_dims(our_info).map(|d| d.len());
    if name == "timestep" && our_rank == Some(0) && their_rank == Some(1) {
        let sample = g.value_id("sample").expect("checked");
        let batch = g.value_named(&fresh(g, "controlnet/batch"));
        let mut shape = node_proto("Shape", "controlnet/batch");
        shape
            .attribute
            .push(attune_compiler::patch::attr::int("end", 1));
        g.add_node(
            shape,
            vec![Some(sample)],
            vec![Some(batch)],
            "controlnet".into(),
            None,
        )?;
        let rows = g.value_named(&fresh(g, "controlnet/timestep_rows"));
        let expand = node_proto("Expand", "controlnet/timestep_rows");
        g.add_node(
            expand,
            vec![Some(v), Some(batch)],
            vec![Some(rows)],
            "controlnet".into(),
            None,
        )?;
        v = rows;
    } else if their_rank.is_some() && our_rank.is_some() && their_rank != our_rank {
        return Err(Error::Graph(format!(
            "--merge-controlnet: the ControlNet declares '{name}' of rank {}, the denoiser {}",
            their_rank.unwrap_or(0),
            our_rank.unwrap_or(0)
        )));
    }
    Ok(v)
}

/// The control image's declared dims: the denoiser's batch dim first, the others' symbols
/// prefixed (they are the ControlNet's, not the denoiser's).
fn rename_dims(info: &mut onnx::ValueInfoProto, batch: Option<tensor_shape_proto::Dimension>) {
    use tensor_shape_proto::dimension::Value;
    let Some(onnx::type_proto::Value::TensorType(t)) =
        info.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        return;
    };
    let Some(shape) = t.shape.as_mut() else {
        return;
    };
    for (i, d) in shape.dim.iter_mut().enumerate() {
        if i == 0 {
            if let Some(b) = &batch {
                *d = b.clone();
            }
        } else if let Some(Value::DimParam(p)) = &mut d.value {
            *p = format!("controlnet_{p}");
        }
    }
}

/// Each residual the ControlNet outputs fits the denoiser's input where both declare a fixed
/// size (channels, and sizes of fixed-shape exports).
fn check_declared_fit(unet: &Model, cn: &Model) -> std::result::Result<(), String> {
    for io in &unet.graph.inputs {
        if !is_residual(&io.info.name) {
            continue;
        }
        let Some(out) = cn
            .graph
            .outputs
            .iter()
            .find(|o| o.info.name == io.info.name)
        else {
            continue;
        };
        let (ours, theirs) = (declared_dims(&io.info), declared_dims(&out.info));
        if let (Some(a), Some(b)) = (ours, theirs)
            && !declared_fit(&a, &b)
        {
            return Err(format!(
                "residual '{}' is declared {b:?} by the ControlNet, {a:?} by the denoiser: they do not fit",
                io.info.name
            ));
        }
    }
    Ok(())
}
