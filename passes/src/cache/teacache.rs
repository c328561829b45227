//! TeaCache (Liu et al. 2024, ali-vilab/TeaCache), for diffusion transformers: the input the
//! first block's attention sees (the hidden states normalised and modulated by the timestep)
//! predicts how much a step's output will change. Its relative L1 change from the last step,
//! rescaled by a polynomial fitted per model family, accumulates over steps; while the sum stays
//! under the threshold every block is skipped and the residual the blocks added on the last
//! computed step is added to their input instead; past it, the blocks run and the sum restarts.
//! The first and last steps always compute.
//!
//! Inputs `teacache.threshold` (default the compiled one), `teacache.force` (bool: compute
//! regardless, the runtime's first and last steps), `teacache.accumulated` (f32 []),
//! `teacache.prev_modulated` (last step's modulated input; a 0 scalar first) and
//! `teacache.cached_residual[_k]`; outputs `teacache.computed`, `teacache.accumulated_next`
//! (the sum with this step's change, to carry while skipping), `teacache.modulated` and
//! `teacache.residual[_k]`.
use attune_compiler::error::{Error, Result};
use attune_compiler::ir::{Model, ValueId};
use attune_compiler::onnx::{self, DataType};
use attune_compiler::pass::PassReport;
use attune_compiler::patch::{In, Patch};

use super::first_block::{Blocks, ResidualIo, relative_l1, scalar_input, switch_residuals};
use super::region::{self, Types};

pub use attune_compiler::cache_io::teacache::{
    ACCUMULATED, ACCUMULATED_NEXT, CACHED_RESIDUAL, COMPUTED, FORCE, MODULATED, PREV_MODULATED,
    RESIDUAL, THRESHOLD,
};

/// TeaCache4FLUX's rescaling polynomial (highest power first), fitted on FLUX.1-dev.
const FLUX: [f64; 5] = [
    4.98651651e+02,
    -2.83781631e+02,
    5.58554382e+01,
    -3.82021401e+00,
    2.64230861e-01,
];
/// TeaCache4FLUX's threshold for about 1.5x on Flux; without a polynomial the plain relative
/// L1 sums to about the same over a schedule.
pub const DEFAULT_THRESHOLD: f32 = 0.25;

pub fn split(model: &mut Model, threshold: f32) -> Result<PassReport> {
    const WHAT: &str = "TeaCache";
    let types = Types::infer(model)?;
    let g = &model.graph;
    let b = Blocks::find(g, &types, WHAT)?;
    let first = b.first().to_string();
    let hidden_in = b.hidden_in;
    // What the first block's attention reads of the hidden states: the modulated input.
    let attention = [format!("{first}.attn"), format!("{first}.attn1")];
    let within = |m: &str, a: &str| m == a || m.starts_with(&format!("{a}."));
    let modulated: Option<ValueId> = g.topo_order()?.into_iter().find_map(|n| {
        let module = &g.node(n).module;
        let a = attention.iter().find(|a| within(module, a))?;
        g.node(n).inputs.iter().flatten().copied().find(|v| {
            g.producer(*v)
                .is_some_and(|p| !within(&g.node(p).module, a))
                && types.shape(*v).is_some()
                && types.shape(*v) == types.shape(hidden_in)
        })
    });
    let Some(modulated) = modulated else {
        return Err(Error::Graph(format!(
            "TeaCache: found no modulated hidden states entering {first}'s attention ({first}.attn or .attn1)"
        )));
    };
    // Every block is skipped: each end continues a value entering the first block.
    let entering: Vec<ValueId> = vec![hidden_in];
    let pairs: Vec<super::first_block::Hidden> = b
        .groups
        .iter()
        .map(|e| b.pair(g, &types, &entering, e.anchor(), WHAT))
        .collect::<Result<_>>()?;
    let (region, maps) = b.region(model, &[modulated, hidden_in], &b.names, WHAT)?;
    let flux = b
        .names
        .iter()
        .any(|n| n.starts_with("single_transformer_blocks."));
    let total = g.node_count();
    let elem = types.elem(modulated);
    let mut p = Patch::new(model);
    let bases: Vec<String> = pairs
        .iter()
        .map(|h| h.name(&mut p, g, "teacache"))
        .collect();
    let thr = scalar_input(&mut p, THRESHOLD, threshold);
    let force = p.graph_input(onnx::tensor_info(FORCE, DataType::Bool, Some(vec![])), None);
    let acc_in = p.graph_input(
        onnx::tensor_info(ACCUMULATED, DataType::Float, Some(vec![])),
        None,
    );
    let prev = p.graph_input(onnx::tensor_info(PREV_MODULATED, elem, None), None);
    let after = g.producer(modulated);
    let op = |p: &mut Patch, op: &str, inputs: Vec<In>| {
        p.op(op, &format!("teacache/{op}"), inputs, vec![], "", after)
    };
    let mut change = relative_l1(
        &mut p,
        In::New(prev),
        In::Value(modulated),
        elem,
        "teacache",
        after,
    );
    if flux {
        // Horner: ((c0·x + c1)·x + c2)·x ...
        let x = change.clone();
        let mut acc = p.f32_scalar("teacache_c0", FLUX[0] as f32);
        for c in &FLUX[1..] {
            let m = op(&mut p, "Mul", vec![In::New(acc), In::New(x.clone())]);
            let c = p.f32_scalar("teacache_c", *c as f32);
            acc = op(&mut p, "Add", vec![In::New(m), In::New(c)]);
        }
        change = acc;
    }
    let acc = op(&mut p, "Add", vec![In::New(acc_in), In::New(change)]);
    let small = op(&mut p, "Less", vec![In::New(acc.clone()), In::New(thr)]);
    let large = op(&mut p, "Not", vec![In::New(small)]);
    let compute = op(&mut p, "Or", vec![In::New(force), In::New(large)]);
    let io = ResidualIo {
        prefix: "teacache",
        cached: CACHED_RESIDUAL,
        computed: COMPUTED,
        residual: RESIDUAL,
    };
    let shapes = switch_residuals(
        &mut p, g, &types, &b, &region, &maps, &bases, compute, io, after,
    )?;
    p.graph_output(In::New(acc), ACCUMULATED_NEXT, DataType::Float, "", after);
    p.graph_output(In::Value(modulated), MODULATED, elem, "", after);
    let names = (
        g.value(modulated).name.clone(),
        g.value(hidden_in).name.clone(),
    );
    let computed = region::values_of(g, &region);
    let patch = p.into_parts();
    region::apply(model, patch, computed, shapes)?;
    let rescale = if flux {
        "rescaled by TeaCache4FLUX's polynomial".to_string()
    } else {
        "plain relative L1: TeaCache publishes no polynomial for this model family".to_string()
    };
    Ok(PassReport {
        rewritten: vec![format!(
            "TeaCache: {} of {total} nodes ({}) skipped while the accumulated change of '{}' (the modulated input of {first}'s attention; {rescale}) stays under the threshold ({threshold} by default)",
            region.len(),
            b.names.join(", "),
            names.0,
        )],
        notes: vec![format!(
            "cached: the blocks' residual over '{}'; inputs {THRESHOLD}, {FORCE}, {ACCUMULATED}, {PREV_MODULATED}, {CACHED_RESIDUAL}...; outputs {COMPUTED}, {ACCUMULATED_NEXT}, {MODULATED}, {RESIDUAL}...: run it with `attune sample/generate`",
            names.1
        )],
        ..Default::default()
    })
}
