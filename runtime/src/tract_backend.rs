//! tract, the pure-Rust reference backend: standard ONNX ops only, planned for the concrete
//! input shapes of each run (loaded from the file so external data resolves).
use std::path::{Path, PathBuf};

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::HostTensor;

pub struct TractSession {
    path: PathBuf,
    /// The plan for the last input shapes, reused while they stay the same.
    plan: Option<(Vec<Vec<usize>>, std::sync::Arc<TypedSimplePlan>)>,
    input_names: Vec<String>,
    output_names: Vec<String>,
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Tract(format!("{e:#}"))
}

impl TractSession {
    pub fn open(path: &Path) -> Result<Self> {
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| Error::Tract(format!("{}: {e:#}", path.display())))?;
        let names = |outlets: &[OutletId]| -> Vec<String> {
            outlets
                .iter()
                .map(|o| model.node(o.node).name.clone())
                .collect()
        };
        let input_names = names(model.input_outlets().map_err(err)?);
        let output_names = model
            .output_outlets()
            .map_err(err)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        Ok(TractSession {
            path: path.to_path_buf(),
            plan: None,
            input_names,
            output_names,
        })
    }

    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    fn plan_for(
        &mut self,
        inputs: &[(String, HostTensor)],
    ) -> Result<std::sync::Arc<TypedSimplePlan>> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
        if self.plan.as_ref().is_none_or(|(s, _)| *s != shapes) {
            // Inputs get concrete shapes; the export's symbolic value_info would only conflict.
            let onnx = tract_onnx::onnx()
                .with_ignore_value_info(true)
                .with_ignore_output_shapes(true);
            let mut model = onnx.model_for_path(&self.path).map_err(err)?;
            for (i, (_, t)) in inputs.iter().enumerate() {
                let dt = match t {
                    HostTensor::F32(_) => f32::datum_type(),
                    HostTensor::F16(_) => f16::datum_type(),
                    HostTensor::I64(_) => i64::datum_type(),
                    HostTensor::I32(_) => i32::datum_type(),
                    HostTensor::Bool(_) => bool::datum_type(),
                };
                model
                    .set_input_fact(i, InferenceFact::dt_shape(dt, t.shape()))
                    .map_err(err)?;
            }
            let plan = model
                .into_optimized()
                .map_err(err)?
                .into_runnable()
                .map_err(err)?;
            self.plan = Some((shapes, plan));
        }
        Ok(self.plan.as_ref().expect("planned above").1.clone())
    }

    /// Runs with inputs in the model's input order.
    pub fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        let ordered: Vec<(String, HostTensor)> = self
            .input_names
            .iter()
            .map(|n| {
                inputs
                    .iter()
                    .find(|(m, _)| m == n)
                    .cloned()
                    .ok_or_else(|| Error::Inputs(format!("missing input '{n}'")))
            })
            .collect::<Result<_>>()?;
        let values: TVec<TValue> = ordered
            .iter()
            .map(|(_, t)| {
                let tensor: Tensor = match t {
                    HostTensor::F32(a) => a.clone().into(),
                    HostTensor::F16(a) => a.clone().into(),
                    HostTensor::I64(a) => a.clone().into(),
                    HostTensor::I32(a) => a.clone().into(),
                    HostTensor::Bool(a) => a.clone().into(),
                };
                tensor.into_tvalue()
            })
            .collect();
        let names = self.output_names.clone();
        let plan = self.plan_for(&ordered)?;
        let outputs = plan.run(values).map_err(err)?;
        names
            .into_iter()
            .zip(outputs)
            .map(|(name, v)| {
                let t = v.into_tensor();
                let host = match t.datum_type() {
                    DatumType::F32 => HostTensor::F32(t.into_plain_array::<f32>().map_err(err)?),
                    DatumType::F16 => HostTensor::F16(t.into_plain_array::<f16>().map_err(err)?),
                    DatumType::I64 => HostTensor::I64(t.into_plain_array::<i64>().map_err(err)?),
                    DatumType::I32 => HostTensor::I32(t.into_plain_array::<i32>().map_err(err)?),
                    DatumType::Bool => HostTensor::Bool(t.into_plain_array::<bool>().map_err(err)?),
                    other => {
                        return Err(Error::Tract(format!(
                            "output '{name}': element type {other:?} is not supported"
                        )));
                    }
                };
                Ok((name, host))
            })
            .collect()
    }
}
