//! Dead-code elimination as a pass (the function lives with the IR: the rule engine runs it).
use attune_compiler::Result;
use attune_compiler::ir::Model;
use attune_compiler::pass::{Pass, PassCx, PassReport};

pub use attune_compiler::dce::{Removed, dce};

/// DCE as a pass of its own.
pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }
    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        let r = dce(model);
        Ok(PassReport {
            notes: vec![format!(
                "removed {} nodes and {} initializers",
                r.nodes, r.initializers
            )],
            ..Default::default()
        })
    }
}
