//! Emitting the nodes of one rewrite site: same module path, same place in the exported
//! order, names under one prefix; constants made on the way.
use attune_compiler::ir::NodeId;
use attune_compiler::onnx::{AttributeProto, DataType};
use attune_compiler::patch::{In, Patch, attr};

pub struct Emitter<'a, 'g> {
    pub p: &'a mut Patch<'g>,
    pub module: &'a str,
    pub after: Option<NodeId>,
}

impl<'a, 'g> Emitter<'a, 'g> {
    pub fn new(p: &'a mut Patch<'g>, module: &'a str, after: Option<NodeId>) -> Self {
        Emitter { p, module, after }
    }

    /// A single-output node named `<module>/attune_<tag>`.
    pub fn op(&mut self, op: &str, tag: &str, inputs: Vec<In>, attrs: Vec<AttributeProto>) -> In {
        let name = format!("{}/attune_{tag}", self.module);
        In::New(self.p.op(op, &name, inputs, attrs, self.module, self.after))
    }

    /// Every output of a node.
    pub fn ops(
        &mut self,
        op: &str,
        tag: &str,
        inputs: Vec<In>,
        outputs: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<In> {
        let name = format!("{}/attune_{tag}", self.module);
        self.p
            .node(
                op,
                "",
                &name,
                inputs,
                outputs,
                attrs,
                self.module,
                self.after,
            )
            .into_iter()
            .map(In::New)
            .collect()
    }

    /// Concat along `axis`.
    pub fn concat(&mut self, tag: &str, inputs: Vec<In>, axis: i64) -> In {
        self.op("Concat", tag, inputs, vec![attr::int("axis", axis)])
    }

    /// Gather along `axis`.
    pub fn gather(&mut self, tag: &str, data: In, indices: In, axis: i64) -> In {
        self.op(
            "Gather",
            tag,
            vec![data, indices],
            vec![attr::int("axis", axis)],
        )
    }

    /// Unsqueeze (opset 13+: the axes are an input).
    pub fn unsqueeze(&mut self, tag: &str, x: In, axes: &In) -> In {
        self.op("Unsqueeze", tag, vec![x, axes.clone()], vec![])
    }

    /// Squeeze (opset 13+: the axes are an input).
    pub fn squeeze(&mut self, tag: &str, x: In, axes: &In) -> In {
        self.op("Squeeze", tag, vec![x, axes.clone()], vec![])
    }

    pub fn cast(&mut self, tag: &str, x: In, to: DataType) -> In {
        self.op("Cast", tag, vec![x], vec![attr::int("to", to as i64)])
    }

    pub fn i64s(&mut self, tag: &str, values: &[i64]) -> In {
        In::New(self.p.i64s(tag, values))
    }

    /// A scalar (rank 0) int64 constant.
    pub fn i64(&mut self, tag: &str, value: i64) -> In {
        In::New(
            self.p
                .constant(tag, DataType::Int64, vec![], value.to_le_bytes().to_vec()),
        )
    }

    pub fn f32(&mut self, tag: &str, value: f32) -> In {
        In::New(self.p.f32_scalar(tag, value))
    }

    /// A reduction over `axes`, which opset 18 moved from an attribute to an input.
    pub fn reduce(
        &mut self,
        op: &str,
        tag: &str,
        x: In,
        axes: &[i64],
        keepdims: bool,
        opset: i64,
    ) -> In {
        let keep = attr::int("keepdims", keepdims as i64);
        if opset >= 18 {
            let axes = self.i64s(&format!("{tag}_axes"), axes);
            self.op(op, tag, vec![x, axes], vec![keep])
        } else {
            self.op(op, tag, vec![x], vec![attr::ints("axes", axes), keep])
        }
    }
}
