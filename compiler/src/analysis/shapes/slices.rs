//! Slices whose bounds are computed at run time but whose length is still known: a crop
//! `x[top : top + h]`, and a joint attention's output split back into its streams.
use std::collections::HashMap;

use super::{Facts, Num, Shapes, attr_i, axis, known_ints};
use crate::analysis::dim::Dim;
use crate::ir::{Graph, NodeId, ValueId};

impl Shapes {
    pub(super) fn remember_sum(&mut self, g: &Graph, concat: NodeId, out: Option<&Facts>) {
        let node = g.node(concat);
        let Some(shape) = out.and_then(|f| f.shape.as_ref()) else {
            return;
        };
        let Some(a) = attr_i(&node.proto.attribute, "axis").and_then(|a| axis(a, shape.len()))
        else {
            return;
        };
        let Some(total) = shape[a].as_symbol().filter(|s| s.starts_with('?')) else {
            return;
        };
        let parts: Option<Vec<Dim>> = node
            .inputs
            .iter()
            .map(|v| Some(self.facts.get(&(*v)?)?.shape.as_ref()?.get(a)?.clone()))
            .collect();
        if let Some([p, q]) = parts.as_deref() {
            self.sums.insert(total.to_string(), [p.clone(), q.clone()]);
        }
    }
}

/// `x[:, :a]` or `x[:, a:]` of an axis that is a remembered sum `a + b` (joint attention's
/// output split back into its streams), or `x[:, :s]` to a symbolic size.
pub(super) fn part_of_sum(
    g: &Graph,
    facts: &HashMap<ValueId, Facts>,
    sums: &HashMap<String, [Dim; 2]>,
    slice: NodeId,
) -> Option<Facts> {
    let node = g.node(slice);
    let input = |i: usize| facts.get(&node.inputs.get(i).copied().flatten()?);
    let x = input(0)?;
    let mut shape = x.shape.clone()?;
    let steps_one = input(4).is_none_or(|f| known_ints(f).is_some_and(|v| v == [1]));
    let axes = input(3).and_then(known_ints);
    let (Some([Num::I(start)]), Some([Num::I(end)]), Some([a])) = (
        input(1)?.value.as_deref(),
        input(2)?.value.as_deref(),
        axes.as_deref(),
    ) else {
        return None;
    };
    let a = axis(*a, shape.len())?;
    let to_end = end.known().is_some_and(|e| e >= i64::MAX / 2);
    let sum = shape[a].as_symbol().and_then(|s| sums.get(s));
    shape[a] = match sum {
        _ if !steps_one => return None,
        Some([first, _]) if *start == Dim::Known(0) && end == first => first.clone(),
        Some([first, second]) if start == first && to_end => second.clone(),
        _ if *start == Dim::Known(0) && end.known().is_none() => end.clone(),
        _ => return None,
    };
    Some(Facts {
        shape: Some(shape),
        value: None,
        float: x.float,
    })
}

/// A crop `x[top : top + h]` whose start is computed at run time (SD3 crops its position table
/// around the latent's size): the slice is `h` long. Torch's trace dropped the range check
/// that made it fit, so a valid run is assumed, as for broadcasting.
pub(super) fn crop(g: &Graph, facts: &HashMap<ValueId, Facts>, slice: NodeId) -> Option<Facts> {
    let node = g.node(slice);
    let input = |i: usize| node.inputs.get(i).copied().flatten();
    let x = facts.get(&input(0)?)?;
    let mut shape = x.shape.clone()?;
    let ones = |f: Option<&Facts>| {
        f.and_then(known_ints)
            .is_some_and(|v| v.iter().all(|s| *s == 1))
    };
    if input(4).is_some() && !ones(input(4).and_then(|v| facts.get(&v))) {
        return None;
    }
    let [a] = known_ints(facts.get(&input(3)?)?)?[..] else {
        return None;
    };
    // Below the Unsqueezes and no-op Casts around the scalar start and end.
    let scalar = |mut v: ValueId| {
        while let Some((n, 0)) = g.value(v).producer
            && matches!(g.node(n).op(), "Unsqueeze" | "Cast" | "Reshape")
        {
            v = g.node(n).inputs.first().copied().flatten()?;
        }
        Some(v)
    };
    let start = scalar(input(1)?)?;
    let (end, _) = g.value(scalar(input(2)?)?).producer?;
    let end = g.node(end);
    if !end.is("Add") {
        return None;
    }
    let terms: Vec<ValueId> = end
        .inputs
        .iter()
        .flatten()
        .filter_map(|v| scalar(*v))
        .collect();
    let [p, q] = terms[..] else { return None };
    let length = if p == start {
        q
    } else if q == start {
        p
    } else {
        return None;
    };
    let [Num::I(length)] = &facts.get(&length)?.value.as_ref()?[..] else {
        return None;
    };
    let a = axis(a, shape.len())?;
    shape[a] = length.clone();
    Some(Facts {
        shape: Some(shape),
        value: None,
        float: x.float,
    })
}

/// `(s - 1) // k + 1`, torch's ceil division of a size by a stride (the dynamo exporter writes
/// it for the sizes after strided downsampling), taken as `s / k`: exact for the sizes a
/// well-formed model runs at, as the strided convolutions' own output sizes assume.
pub(super) fn ceil_div(g: &Graph, facts: &HashMap<ValueId, Facts>, add: NodeId) -> Option<Facts> {
    let value = |v: ValueId| facts.get(&v)?.value.as_deref();
    let is_int = |v: ValueId, want: i64| {
        value(v).is_some_and(|x| !x.is_empty() && x.iter().all(|n| *n == Num::I(Dim::Known(want))))
    };
    let producer = |v: ValueId, op: &str| g.producer(v).filter(|n| g.node(*n).is(op));
    let (a, b) = (g.input(add, 0)?, g.input(add, 1)?);
    let quotient = if is_int(a, 1) {
        b
    } else if is_int(b, 1) {
        a
    } else {
        return None;
    };
    let div = producer(quotient, "Div")?;
    let (k, stride) = (g.input(div, 0)?, g.input(div, 1)?);
    let [Num::I(Dim::Known(stride))] = value(stride)? else {
        return None;
    };
    let (stride, less) = (*stride, g.producer(k)?);
    let (l0, l1) = (g.input(less, 0)?, g.input(less, 1)?);
    let op = |name: &str| g.node(less).is(name);
    let size = match () {
        _ if op("Sub") && is_int(l1, 1) => l0,
        _ if op("Add") && is_int(l1, -1) => l0,
        _ if op("Add") && is_int(l0, -1) => l1,
        _ => return None,
    };
    if stride <= 0 || facts.get(&size)?.float {
        return None;
    }
    let sizes = value(size)?
        .iter()
        .map(|n| match n {
            Num::I(d) => d.div(&Dim::Known(stride)).map(Num::I),
            Num::F(_) => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Facts {
        shape: facts.get(&size)?.shape.clone(),
        value: Some(sizes),
        float: false,
    })
}
