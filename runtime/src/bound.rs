//! Runs through an IoBinding, with the inputs and outputs in buffers on the session's device
//! that stay the same from run to run. CUDA graphs need this: ONNX Runtime captures the kernel
//! launches of one run with the addresses they read and write, and later runs replay them.
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, DynTensorValueType, ValueType};

use crate::error::{Error, Result};
use crate::ort_backend::{from_value, to_value};
use crate::tensor::HostTensor;

pub struct Bound {
    binding: IoBinding,
    /// The device buffers each run's inputs are copied into, by name.
    inputs: Vec<(String, DynTensor)>,
    outputs: Vec<String>,
}

fn given<'a>(inputs: &'a [(String, HostTensor)], name: &str) -> Result<&'a HostTensor> {
    inputs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| Error::Ort(format!("input '{name}' is not given")))
}

impl Bound {
    /// Buffers shaped like `inputs` and like the model's (fixed) output shapes, on the CUDA
    /// device or in host memory.
    pub fn new(session: &Session, cuda: bool, inputs: &[(String, HostTensor)]) -> Result<Bound> {
        let allocator = if cuda {
            let memory = MemoryInfo::new(
                AllocationDevice::CUDA,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?;
            Allocator::new(session, memory)?
        } else {
            Allocator::default()
        };
        let mut binding = session.create_binding()?;
        for input in session.inputs() {
            given(inputs, input.name())?;
        }
        // Every given input, the optional ones (defaults a caller overrides) included.
        let mut bound_inputs = Vec::new();
        for (name, host) in inputs {
            let host = to_value(host)?;
            let ValueType::Tensor { ty, shape, .. } = host.dtype() else {
                return Err(Error::Ort(format!("input '{name}' is not a tensor")));
            };
            let buffer = DynTensor::new(&allocator, *ty, shape.clone())?;
            binding.bind_input(name, &buffer)?;
            bound_inputs.push((name.clone(), buffer));
        }
        let mut outputs = Vec::new();
        for output in session.outputs() {
            let name = output.name();
            let ValueType::Tensor { ty, shape, .. } = output.dtype() else {
                return Err(Error::Ort(format!("output '{name}' is not a tensor")));
            };
            if shape.iter().any(|d| *d < 0) {
                return Err(Error::Ort(format!(
                    "output '{name}' has dynamic sizes {shape}: runs in fixed buffers (CUDA graphs) need a model with fixed sizes (compile --fix-shapes)"
                )));
            }
            binding.bind_output(name, DynTensor::new(&allocator, *ty, shape.clone())?)?;
            outputs.push(name.to_string());
        }
        Ok(Bound {
            binding,
            inputs: bound_inputs,
            outputs,
        })
    }

    /// Copies the inputs into the buffers, runs, and copies the outputs back to the host.
    pub fn run(
        &mut self,
        session: &mut Session,
        inputs: &[(String, HostTensor)],
    ) -> Result<Vec<(String, HostTensor)>> {
        if let Some((name, _)) = inputs
            .iter()
            .find(|(n, _)| !self.inputs.iter().any(|(b, _)| b == n))
        {
            return Err(Error::Ort(format!(
                "input '{name}' was not given to this session's first run, so it has no buffer (runs in fixed buffers take the same inputs every run)"
            )));
        }
        for (name, buffer) in &mut self.inputs {
            let host = to_value(given(inputs, name)?)?.downcast::<DynTensorValueType>()?;
            if host.dtype() != buffer.dtype() {
                return Err(Error::Ort(format!(
                    "input '{name}': {} given, but this session runs in buffers of {} (fixed by its first run)",
                    host.dtype(),
                    buffer.dtype()
                )));
            }
            host.copy_into(&mut *buffer)?;
        }
        let outputs = session.run_binding(&self.binding)?;
        self.outputs
            .iter()
            .map(|name| {
                let value = outputs
                    .get(name)
                    .ok_or_else(|| Error::Ort(format!("no output '{name}'")))?;
                let on_host = value
                    .view()
                    .downcast::<DynTensorValueType>()?
                    .to(AllocationDevice::CPU, 0)?;
                let t = from_value(&on_host.into_dyn())
                    .map_err(|e| Error::Ort(format!("output '{name}': {e}")))?;
                Ok((name.clone(), t))
            })
            .collect()
    }
}
