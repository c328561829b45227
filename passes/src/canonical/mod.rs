//! The canonical front end: one normal form for what exporters write differently, so every
//! pattern after it is written once. Runs first in every compile that rewrites anything.
//!
//! - `Constant` nodes are initializers; an Identity of a constant is a constant of its own
//!   (torch deduplicates equal weights behind Identity nodes), other Identities are gone;
//! - everything computed from constants alone is folded (weights transposed or cast at run
//!   time in exports made without constant folding; sizes known from the declared dims);
//! - no-ops are gone: Casts to the same type, Reshapes to the same shape, `x·1`, `x/1`,
//!   `x+0`, `x-0` (so an affine norm with γ = 1, β = 0 looks like one without, and the passes
//!   that fuse norms synthesise the unit affine);
//! - equal nodes on equal inputs compute once (CSE);
//! - an `If` whose condition is a constant is the branch it takes;
//! - opset 20's `Gelu` is written out as exports below opset 20 write it.
//!
//! Repeated to a fixed point (each step exposes work for the others).
use attune_compiler::Result;
use attune_compiler::analysis::Shapes;
use attune_compiler::ir::{Model, ValueId};
use attune_compiler::pass::{Pass, PassCx, PassReport};

mod cse;
mod eval;
mod fold;
mod known;
mod simplify;

pub use fold::{constants_to_initializers, uniform};
pub use known::fold_known_values;

use crate::cleanup::dce;

/// Ops whose results differ run to run: never folded, never merged.
const RANDOM: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
];

/// Rounds before giving up on a fixed point (each round is linear in the graph).
const MAX_ROUNDS: usize = 8;

pub struct Canonicalize;

#[derive(Default)]
struct Counts {
    constants: usize,
    identities: usize,
    folded: usize,
    noops: usize,
    merged: usize,
    gelus: usize,
    inlined: usize,
    removed: usize,
}

impl Counts {
    fn total(&self) -> usize {
        self.constants
            + self.identities
            + self.folded
            + self.noops
            + self.merged
            + self.gelus
            + self.inlined
    }
}

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonical"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let mut report = PassReport::default();
        let mut c = Counts::default();
        let before = model.graph.node_count();
        for _ in 0..MAX_ROUNDS {
            let start = c.total();
            c.constants += constants_to_initializers(model);
            c.gelus += simplify::expand_gelu(model)?;
            let s = simplify::drop_identities(model)?;
            c.identities += s.identities;
            for kept in s.kept {
                if !report.skipped.iter().any(|k| k.site == kept) {
                    report.skipped.push(attune_compiler::pass::Skipped {
                        site: kept,
                        reason: "Identity kept: it passes a graph input, output or initializer to a graph output, both names fixed".into(),
                    });
                }
            }
            c.folded += fold::fold_constant_nodes(model)?;
            let shapes = Shapes::infer(model);
            c.folded += fold_known_values(model, &shapes)?;
            c.inlined += crate::lower::decided_if::inline(model)?;
            c.removed += dce(model).nodes;
            let shapes = Shapes::infer(model);
            c.noops += simplify::drop_noops(model, &shapes)?;
            c.merged += cse::merge(model)?;
            c.removed += dce(model).nodes;
            drop_unused_initializers(model);
            if c.total() == start {
                break;
            }
        }
        let line = |n: usize, what: &str| (n > 0).then(|| format!("{n} {what}"));
        report.rewritten.extend(
            [
                line(c.constants, "Constant nodes -> initializers"),
                line(c.identities, "Identity nodes removed"),
                line(c.folded, "values computed from constants -> constants"),
                line(c.noops, "no-op Casts, Reshapes and unit arithmetic removed"),
                line(c.merged, "equal nodes and small constants merged"),
                line(
                    c.gelus,
                    "Gelu ops -> x·(1 + erf(x/√2))·½ (the form of exports below opset 20)",
                ),
            ]
            .into_iter()
            .flatten(),
        );
        report.notes.push(format!(
            "{before} -> {} nodes ({} dead nodes removed)",
            model.graph.node_count(),
            c.removed
        ));
        Ok(report)
    }
}

/// Initializers nothing reads any more (merged or folded away), unless callers can feed them.
fn drop_unused_initializers(model: &mut Model) {
    let g = &model.graph;
    let unused: Vec<ValueId> = g
        .initializers()
        .map(|(v, _)| v)
        .filter(|&v| {
            g.value(v).consumers.is_empty()
                && g.value(v).producer.is_none()
                && !g.is_graph_output(v)
                && g.is_constant(v)
        })
        .collect();
    for v in unused {
        let _ = model.graph.remove_value(v);
    }
}
