//! Helpers of the lowering tests: fixture runs, references, and the CUDA ops written back in
//! standard form so the CPU EP can check them.
use std::path::Path;

use attune_compiler::import;
use attune_compiler::onnx::DataType;
use attune_runtime::compare::compare;
use attune_runtime::ort_backend::OrtOptions;
use attune_runtime::{Backend, Ep, HostTensor, inputs, npy};

use super::*;

/// Adds one node (op, inputs, attributes) to a patch; returns its output.
type OpFn<'a> = dyn FnMut(
        &mut attune_compiler::patch::Patch,
        &str,
        Vec<attune_compiler::patch::In>,
        Vec<attune_compiler::onnx::AttributeProto>,
    ) -> attune_compiler::patch::In
    + 'a;

/// Runs a model on ORT CPU with its fixture's inputs (converted to the model's float types;
/// optional inputs at their defaults); every output.
pub fn run_cpu(fixture_name: &str, model: &Path) -> Vec<(String, HostTensor)> {
    run_on(Ep::Cpu, fixture_name, model)
}

/// [`run_cpu`] on `ep`.
pub fn run_on(ep: Ep, fixture_name: &str, model: &Path) -> Vec<(String, HostTensor)> {
    let feed = fixture_feed(fixture_name, model);
    Backend::open(model, ep, &OrtOptions::default())
        .unwrap_or_else(|e| panic!("{}: {ep:?} session: {e}", model.display()))
        .run(&feed)
        .unwrap_or_else(|e| panic!("{}: {ep:?} run: {e}", model.display()))
}

/// The fixture's inputs for `model` (in its float types; optional inputs at their defaults).
pub fn fixture_feed(fixture_name: &str, model: &Path) -> Vec<(String, HostTensor)> {
    let m = import::read(model).unwrap();
    let specs = inputs::input_specs(&m);
    let dir = root().join("models").join(fixture_name).join("inputs");
    let given = specs
        .iter()
        .filter(|s| !s.optional)
        .map(|s| {
            (
                s.name.clone(),
                npy::read(&dir.join(format!("{}.npy", s.name))).unwrap(),
            )
        })
        .collect();
    inputs::prepare(&specs, given, &Default::default(), 0).unwrap()
}

pub fn out_sample(outputs: Vec<(String, HostTensor)>) -> HostTensor {
    outputs
        .into_iter()
        .find(|(n, _)| n == "out_sample")
        .expect("out_sample")
        .1
}

pub fn reference(name: &str) -> HostTensor {
    npy::read(&root().join("models").join(name).join("ref/out_sample.npy")).unwrap()
}

/// `out_sample` of `outputs` against the fixture's reference (in the reference's type).
pub fn against_reference(
    name: &str,
    outputs: Vec<(String, HostTensor)>,
) -> attune_runtime::compare::Comparison {
    let reference = reference(name);
    let got = out_sample(outputs);
    compare(
        "out_sample",
        &reference,
        &got.float_as(reference.dtype()).unwrap_or(got),
    )
    .unwrap()
}

/// Ops of a model by (domain-qualified) name, with how often each occurs.
pub fn op_counts(model: &attune_compiler::ir::Model) -> std::collections::HashMap<String, usize> {
    let g = &model.graph;
    let mut counts = std::collections::HashMap::new();
    for n in g.node_ids() {
        let node = g.node(n);
        let key = if node.domain().is_empty() {
            node.op().to_string()
        } else {
            format!("{}.{}", node.domain(), node.op())
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// `compile --target cuda --attention flash --precision PRECISION EXTRA` of a fixture.
pub fn compile_for_cuda(
    dir: &Path,
    name: &str,
    precision: &str,
    extra: &[&str],
) -> std::path::PathBuf {
    let flags = [
        &[
            "--target",
            "cuda",
            "--attention",
            "flash",
            "--precision",
            precision,
        ],
        extra,
    ]
    .concat();
    compile_into(dir, &fixture(name), &flags).0
}

/// The `--target cuda` graph with its CUDA-only ops written out in standard ops that do the
/// same (NhwcConv: Conv between Transposes, with the weights back to OIHW; GroupNorm: the
/// exporters' InstanceNormalization form), so ONNX Runtime's CPU EP can check every layout
/// change, weight permutation and attribute the fusions wrote.
pub fn with_cuda_ops_in_standard_ops(model: &Path, out: &Path) {
    use attune_compiler::patch::{In, Patch, attr};
    let mut m = import::read(model).unwrap();
    let shapes = attune_compiler::analysis::Shapes::infer(&m);
    let g = &m.graph;
    let mut p = Patch::new(&m);
    for n in g.topo_order().unwrap() {
        let node = g.node(n);
        if node.domain() != "com.microsoft"
            || !matches!(
                node.op(),
                "NhwcConv"
                    | "GroupNorm"
                    | "SkipGroupNorm"
                    | "BiasSplitGelu"
                    | "BiasAdd"
                    | "MultiHeadAttention"
            )
        {
            continue;
        }
        // What each input is now (an earlier rewrite of this patch may have replaced it).
        let inputs: Vec<In> = node
            .inputs
            .iter()
            .map(|v| v.map_or(In::None, |v| p.current(v)))
            .collect();
        let (module, after) = (node.module.clone(), Some(n));
        let name = format!("{}_standard", node.name());
        let mut op = |p: &mut Patch, op: &str, inputs: Vec<In>, attrs| {
            In::New(p.op(op, &name, inputs, attrs, &module, after))
        };
        let input = |i: usize| inputs[i].clone();
        if node.op() == "MultiHeadAttention" {
            // Packed QKV [B, S, N, 3, H] / KV [B, L, N, 2, H] (CPU has no packed kernels): the
            // t-th of each head's slots, as [B, S, N·H].
            let packed = node.inputs.len() - 1;
            let Some(5) = shapes.shape(node.inputs[packed].unwrap()).map(<[_]>::len) else {
                continue;
            };
            let mut qkv: Vec<In> = (0..packed).map(input).collect();
            let slots = if packed == 0 { 3 } else { 2 };
            for t in 0..slots {
                let ints = |p: &mut Patch, v: &[i64]| In::New(p.i64s("mha_unpack", v));
                let (s, e, a) = (
                    ints(&mut p, &[t]),
                    ints(&mut p, &[t + 1]),
                    ints(&mut p, &[3]),
                );
                let one = op(&mut p, "Slice", vec![input(packed), s, e, a], vec![]);
                let flat = ints(&mut p, &[0, 0, -1]);
                qkv.push(op(&mut p, "Reshape", vec![one, flat], vec![]));
            }
            let y = In::New(
                p.node(
                    "MultiHeadAttention",
                    "com.microsoft",
                    &name,
                    qkv,
                    1,
                    node.proto.attribute.clone(),
                    &module,
                    after,
                )
                .remove(0),
            );
            p.replace(node.outputs[0].unwrap(), y);
            continue;
        }
        if node.op() == "BiasAdd" {
            let biased = op(&mut p, "Add", vec![input(0), input(1)], vec![]);
            let y = op(&mut p, "Add", vec![biased, input(2)], vec![]);
            p.replace(node.outputs[0].unwrap(), y);
            continue;
        }
        if node.op() == "BiasSplitGelu" {
            // h * gelu(g) for [h | g] = X + bias, GELU in its erf form.
            let width = g.initializer(node.inputs[1].unwrap()).unwrap().dims()[0];
            let biased = op(&mut p, "Add", vec![input(0), input(1)], vec![]);
            let half = |p: &mut Patch, from: i64, to: i64| {
                let ints = |p: &mut Patch, v: i64| In::New(p.i64s("bsg_bound", &[v]));
                let (s, e, a) = (ints(p, from), ints(p, to), ints(p, -1));
                op(p, "Slice", vec![biased.clone(), s, e, a], vec![])
            };
            let h = half(&mut p, 0, width / 2);
            let gate = half(&mut p, width / 2, width);
            let f = |p: &mut Patch, v: f32| In::New(p.f32_scalar("bsg_c", v));
            let like = |p: &mut Patch, c: In, op: &mut OpFn<'_>| {
                op(p, "CastLike", vec![c, gate.clone()], vec![])
            };
            let (sqrt2, one, half_c) = (
                f(&mut p, std::f32::consts::SQRT_2),
                f(&mut p, 1.0),
                f(&mut p, 0.5),
            );
            let sqrt2 = like(&mut p, sqrt2, &mut op);
            let one = like(&mut p, one, &mut op);
            let half_c = like(&mut p, half_c, &mut op);
            let scaled = op(&mut p, "Div", vec![gate.clone(), sqrt2], vec![]);
            let erf = op(&mut p, "Erf", vec![scaled], vec![]);
            let plus = op(&mut p, "Add", vec![erf, one], vec![]);
            let gelu = op(&mut p, "Mul", vec![gate.clone(), plus], vec![]);
            let gelu = op(&mut p, "Mul", vec![gelu, half_c], vec![]);
            let y = op(&mut p, "Mul", vec![h, gelu], vec![]);
            p.replace(node.outputs[0].unwrap(), y);
            continue;
        }
        let to_nchw = |p: &mut Patch, x, op: &mut OpFn<'_>| {
            op(
                p,
                "Transpose",
                vec![x],
                vec![attr::ints("perm", &[0, 3, 1, 2])],
            )
        };
        // SkipGroupNorm: GroupNorm of x + skip (NHWC; a [N, C] skip per channel), and the sum.
        let mut x_nhwc = input(0);
        if node.op() == "SkipGroupNorm" {
            let skip = node.inputs[3].unwrap();
            let mut s = input(3);
            if shapes.shape(skip).map(<[_]>::len) == Some(2) {
                let nc11 = In::New(p.i64s("sgn_n11c", &[0, 1, 1, -1]));
                s = op(&mut p, "Reshape", vec![s, nc11], vec![]);
            }
            x_nhwc = op(&mut p, "Add", vec![x_nhwc, s], vec![]);
            if let Some(Some(sum)) = node.outputs.get(1) {
                p.replace(*sum, x_nhwc.clone());
            }
        }
        let x = to_nchw(&mut p, x_nhwc, &mut op);
        let y = if node.op() == "NhwcConv" {
            let w = to_nchw(&mut p, input(1), &mut op);
            let mut inputs = vec![x, w];
            inputs.extend(node.inputs.get(2).copied().flatten().map(|_| input(2)));
            op(&mut p, "Conv", inputs, node.proto.attribute.clone())
        } else {
            let int = |k: &str| node.attr(k).unwrap().i;
            let groups = int("groups");
            let ones = p.constant(
                "gn_ones",
                DataType::Float,
                vec![groups],
                1f32.to_le_bytes().repeat(groups as usize),
            );
            let zeros = p.constant(
                "gn_zeros",
                DataType::Float,
                vec![groups],
                vec![0; 4 * groups as usize],
            );
            let grouped_shape = In::New(p.i64s("gn_grouped", &[0, groups, -1]));
            let channel_col = In::New(p.i64s("gn_channel_col", &[-1, 1, 1]));
            let f32_x = op(
                &mut p,
                "Cast",
                vec![x.clone()],
                vec![attr::int("to", DataType::Float as i64)],
            );
            let grouped = op(&mut p, "Reshape", vec![f32_x, grouped_shape], vec![]);
            let eps = attr::float("epsilon", node.attr("epsilon").unwrap().f);
            let normed = op(
                &mut p,
                "InstanceNormalization",
                vec![grouped, In::New(ones), In::New(zeros)],
                vec![eps],
            );
            let shape = op(&mut p, "Shape", vec![x.clone()], vec![]);
            let back = op(&mut p, "Reshape", vec![normed, shape], vec![]);
            let gamma = op(
                &mut p,
                "Reshape",
                vec![input(1), channel_col.clone()],
                vec![],
            );
            let beta = op(&mut p, "Reshape", vec![input(2), channel_col], vec![]);
            let scaled = op(&mut p, "Mul", vec![back, gamma], vec![]);
            let mut y = op(&mut p, "Add", vec![scaled, beta], vec![]);
            if int("activation") == 1 {
                let s = op(&mut p, "Sigmoid", vec![y.clone()], vec![]);
                y = op(&mut p, "Mul", vec![y, s], vec![]);
            }
            op(&mut p, "CastLike", vec![y, x], vec![])
        };
        let y = op(
            &mut p,
            "Transpose",
            vec![y],
            vec![attr::ints("perm", &[0, 2, 3, 1])],
        );
        p.replace(node.outputs[0].unwrap(), y);
    }
    p.into_parts().apply(&mut m).unwrap();
    attune_passes::cleanup::dce(&mut m);
    attune_compiler::export::write(&m, out, &Default::default()).unwrap();
}
