//! Conv → `com.microsoft.NhwcConv` (weights stored [M, kH, kW, C]) between Transposes.
use std::cell::Cell;
use std::collections::HashSet;
use std::rc::Rc;

use attune_compiler::ir::{NodeId, ValueId};
use attune_compiler::onnx::{DataType, TensorProto};
use attune_compiler::patch::{In, Patch};
use attune_compiler::pattern::{Cx, Match, Pat, any, constant, op};
use attune_compiler::rule::Rule;
use attune_compiler::weights::{Tensor, Transform};

use super::super::precision::convert_tensor;
use super::{MS_DOMAIN, Site, channels_last};

/// Conv → Transpose → NhwcConv → Transpose. NhwcConv weights are stored in `low` (the
/// precision pass's type) for the convolutions of the data path (`data`), which that pass will
/// run in `low` anyway, so the export writes half the bytes. The stored weights are derived
/// tensors (converted, then permuted to channels-last, when written; see
/// `Tensor::transformed`): nothing is computed here but for weights a pass made, whose fp16
/// clamps `clamped` counts (the export counts the others).
pub struct NhwcConvRule {
    pub low: Option<DataType>,
    pub data: HashSet<ValueId>,
    pub clamped: Rc<Cell<usize>>,
}

impl Rule for NhwcConvRule {
    fn name(&self) -> &'static str {
        "Conv -> com.microsoft.NhwcConv"
    }

    fn anchor(&self) -> Option<&'static str> {
        Some("Conv")
    }

    fn pattern(&self) -> Pat {
        op("Conv", [any("x"), constant("w")]).bind("conv")
    }

    fn check(&self, cx: &Cx, m: &Match) -> Result<(), String> {
        self.weight(cx, m).map(|_| ())
    }

    fn rewrite(&self, cx: &Cx, m: &Match, p: &mut Patch) -> Vec<&'static str> {
        let (g, conv) = (cx.g, m.node("conv").expect("bound"));
        let (stored, clamped) = self.weight(cx, m).expect("checked");
        self.clamped.set(self.clamped.get() + clamped);
        let node = g.node(conv);
        let module = node.module.clone();
        let w_nhwc = p.tensor(stored);
        let x = p.current(m.value("x").expect("bound"));
        let mut rest = vec![In::New(w_nhwc)];
        rest.extend(g.input(conv, 2).map(In::Value));
        let attrs = node.proto.attribute.clone();
        let at = Site {
            module: &module,
            after: Some(conv),
        };
        let nchw = channels_last(p, &at, "NhwcConv", x, rest, attrs, 1).remove(0);
        p.replace(m.root.expect("matched"), In::New(nchw));
        Vec::new()
    }

    fn unmatched(&self, _cx: &Cx, _anchor: NodeId) -> Option<String> {
        Some("its weight is not a constant".into())
    }

    fn opset(&self) -> Option<(&'static str, i64)> {
        Some((MS_DOMAIN, 1))
    }
}

impl NhwcConvRule {
    /// The channels-last weight of a matched Conv (and the clamps computing it made), or why
    /// the Conv stays.
    fn weight(&self, cx: &Cx, m: &Match) -> Result<(Tensor, usize), String> {
        let g = cx.g;
        let conv = m.node("conv").ok_or("no conv")?;
        let x = m.value("x").ok_or("no input")?;
        // A 4-D weight makes it a 2-D convolution of a 4-D (NCHW) input.
        let weight = g
            .initializer(m.value("w").ok_or("no weight")?)
            .filter(|t| t.dims().len() == 4)
            .ok_or("its weight is not a 4-D initializer")?;
        if g.node(conv).attr("group").is_some_and(|a| a.i != 1) {
            return Err("grouped convolution".into());
        }
        let dims = weight.dims().to_vec();
        let dtype = DataType::try_from(weight.data_type()).map_err(|_| "unknown weight type")?;
        // Converted (when stored low) and permuted as the export writes it, converted first:
        // half the bytes to move.
        let (source, clamped) = match self
            .low
            .filter(|_| dtype == DataType::Float && self.data.contains(&x))
        {
            Some(low) => convert_tensor(weight, low as i32).map_err(|e| e.to_string())?,
            None => (weight.clone(), 0),
        };
        let (permuted, _) = source
            .transformed(Transform::ChannelsLast)
            .map_err(|e| e.to_string())?;
        let stored = Tensor {
            proto: TensorProto {
                name: format!("{}_nhwc", weight.name()),
                data_type: permuted.data_type(),
                dims: vec![dims[0], dims[2], dims[3], dims[1]],
                ..Default::default()
            },
            data: permuted.data,
        };
        Ok((stored, clamped))
    }
}
