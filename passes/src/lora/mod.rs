//! LoRA fusion: one or several LoRA files (kohya, diffusers/PEFT, LyCORIS) baked into the
//! graph's weights, in f32 whatever the stored dtype, rounded once. Layers are matched
//! through module paths in underscore space; linear layers exported as `MatMul` store Wᵀ,
//! `Gemm` may (transB), `Conv` stores [out, in, kh, kw]. Changed weights become new data;
//! the others stay memory-mapped.
//!
//! A LoRA file may adapt several models of a pipeline (the UNet and the text encoders); a
//! pass fuses the layers of the component its graph is ([`Component`], said or detected) and
//! notes the others as theirs. Text encoders' keys name modules under the encoder's wrapper
//! (`text_model_encoder_layers_0_self_attn_q_proj`), which the import strips from module paths
//! (`encoder.layers.0.self_attn.q_proj`, prefix `text_model`): both spellings match.
pub mod adapter;
pub mod file;
pub mod math;

use std::collections::BTreeMap;
use std::path::PathBuf;

use attune_compiler::ir::{Model, NodeId, ValueId};
use attune_compiler::onnx::{self, DataType};
use attune_compiler::pass::{Pass, PassCx, PassReport, Skipped};
use attune_compiler::{Error, Result};

pub use file::Component;
use file::{Layer, LoraFile};

/// A LoRA file and its multiplier (`--lora FILE:0.8`).
#[derive(Clone, Debug)]
pub struct LoraSource {
    pub path: PathBuf,
    pub multiplier: f32,
}

impl LoraSource {
    /// `FILE` or `FILE:MULTIPLIER`.
    pub fn parse(text: &str) -> std::result::Result<LoraSource, String> {
        let Some((path, m)) = text.rsplit_once(':') else {
            return Ok(LoraSource {
                path: text.into(),
                multiplier: 1.0,
            });
        };
        // A colon followed by no number belongs to the path.
        let lower = m.to_ascii_lowercase();
        let looks_numeric = lower
            .trim_start_matches(['-', '+'])
            .starts_with(|c: char| c.is_ascii_digit() || c == '.')
            || lower.contains("inf")
            || lower.contains("nan");
        if !looks_numeric {
            // `FILE:abc` where FILE exists and `FILE:abc` does not: a multiplier mistyped.
            if !std::path::Path::new(text).exists() && std::path::Path::new(path).exists() {
                return Err(format!(
                    "--lora {text}: multiplier '{m}' is not a number (FILE:M, e.g. {path}:0.8)"
                ));
            }
            return Ok(LoraSource {
                path: text.into(),
                multiplier: 1.0,
            });
        }
        match m.parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(LoraSource {
                path: path.into(),
                multiplier: v,
            }),
            _ => Err(format!(
                "--lora {text}: multiplier '{m}' is not a finite number"
            )),
        }
    }
}

pub struct LoraPass {
    pub sources: Vec<LoraSource>,
    /// Unmatched layers (of this graph's component) are errors instead of report entries.
    pub strict: bool,
    /// Which model of a pipeline the graph is; `None`: [`detect_component`].
    pub component: Option<Component>,
}

impl LoraPass {
    /// The pass fusing `sources`' layers for `component` (a folder compile makes one per
    /// component; the files' other components are noted, not errors).
    pub fn for_component(sources: Vec<LoraSource>, component: Component, strict: bool) -> Self {
        LoraPass {
            sources,
            strict,
            component: Some(component),
        }
    }
}

/// The component a graph is when nobody says: one with an `input_ids` input is a text encoder
/// (`text_encoder`; SDXL's second says so), anything else the denoiser.
pub fn detect_component(model: &Model) -> Component {
    let g = &model.graph;
    if g.inputs
        .iter()
        .any(|io| g.value(io.value).name == "input_ids")
    {
        Component::TextEncoder
    } else {
        Component::Denoiser
    }
}

/// A file layer's graph target: its module as is, or without the graph's stripped wrapper
/// (`text_model_`), as LoRA files of text encoders spell it.
pub fn find_target<'a>(
    targets: &'a BTreeMap<String, std::result::Result<Target, String>>,
    model: &Model,
    module: &str,
) -> Option<&'a std::result::Result<Target, String>> {
    targets.get(module).or_else(|| {
        let prefix = model.module_prefix.replace('.', "_");
        let rest = module.strip_prefix(prefix.as_str())?.strip_prefix('_')?;
        (!prefix.is_empty()).then(|| targets.get(rest)).flatten()
    })
}

/// Report notes for a file's layers of other components, and for a file with none for this one.
fn component_notes(f: &LoraFile, fname: &str) -> Vec<String> {
    let mut notes: Vec<String> = f
        .elsewhere
        .iter()
        .map(|(c, names)| {
            let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
            format!(
                "{fname}: {} layer{} for {c} (fused when {c} is compiled, --lora-component {c}): {}{}",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                shown.join(", "),
                if names.len() > shown.len() { ", ..." } else { "" }
            )
        })
        .collect();
    if f.layers.is_empty() {
        notes.push(format!(
            "{fname} has no layer for {}, the component this graph is",
            f.component
        ));
    }
    notes
}

/// How a graph stores a layer's weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `MatMul(x, Wᵀ)`: stored [in, out].
    MatMulT,
    /// `Gemm(x, W, transB)`: stored [out, in] when transB.
    Gemm { trans_b: bool },
    /// `Conv(x, W)`: stored [out, in, kh, kw].
    Conv,
}

/// A weight LoRA can adapt.
#[derive(Clone, Debug)]
pub struct Target {
    pub node: NodeId,
    pub weight: ValueId,
    pub layout: Layout,
    pub module: String,
}

impl Target {
    /// The weight's shape in torch's layout ([out, in, k..]); `weight` is the initializer's
    /// name (for the error about a negative or missing dim).
    pub fn torch_shape(&self, weight: &str, stored: &[i64]) -> Result<Vec<usize>> {
        let s: Vec<usize> = stored
            .iter()
            .map(|d| usize::try_from(*d))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                Error::tensor(
                    weight,
                    format!(
                        "weight of layer {} has a negative dim ({stored:?})",
                        self.module
                    ),
                )
            })?;
        match (self.layout, &s[..]) {
            (Layout::MatMulT | Layout::Gemm { trans_b: false }, [a, b]) => Ok(vec![*b, *a]),
            (Layout::Gemm { trans_b: true }, [_, _]) | (Layout::Conv, [_, _, _, ..]) => Ok(s),
            _ => Err(Error::tensor(
                weight,
                format!(
                    "weight of layer {} has shape {stored:?}, not one a {:?} layer stores",
                    self.module, self.layout
                ),
            )),
        }
    }
}

/// Adaptable weights by module path in underscore form; `Err` for modules with several.
pub fn targets(model: &Model) -> BTreeMap<String, std::result::Result<Target, String>> {
    let g = &model.graph;
    let mut out: BTreeMap<String, std::result::Result<Target, String>> = BTreeMap::new();
    for n in g.node_ids() {
        let node = g.node(n);
        let Some(Some(w)) = node.inputs.get(1).copied() else {
            continue;
        };
        // Overridable initializers (graph inputs, e.g. LoRA branches) are not fixed weights.
        let Some(t) = g
            .initializer(w)
            .filter(|_| !g.inputs.iter().any(|io| io.value == w))
        else {
            continue;
        };
        let layout = match (node.op(), t.dims().len()) {
            ("MatMul", 2) if node.is("MatMul") => Layout::MatMulT,
            ("Gemm", 2) if node.is("Gemm") => Layout::Gemm {
                trans_b: node.attr("transB").is_some_and(|a| a.i == 1),
            },
            ("Conv", 3..) if node.is("Conv") => Layout::Conv,
            _ => continue,
        };
        if !onnx::is_float(t.data_type()) || node.module.is_empty() {
            continue;
        }
        let key = node.module.replace('.', "_");
        let target = Target {
            node: n,
            weight: w,
            layout,
            module: node.module.clone(),
        };
        out.entry(key)
            .and_modify(|e| {
                *e = Err(format!(
                    "module {} holds several weights ({} and more)",
                    target.module,
                    node.describe()
                ))
            })
            .or_insert(Ok(target));
    }
    out
}

/// The UNet's layers per block (for SGM/LDM names): resnets of the first down block.
pub(crate) fn layers_per_block(model: &Model) -> usize {
    let g = &model.graph;
    g.node_ids()
        .filter_map(|n| {
            g.node(n)
                .module
                .strip_prefix("down_blocks.0.resnets.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map(|m| m + 1)
        .unwrap_or(2)
}

impl Pass for LoraPass {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn run(&self, model: &mut Model, _cx: &mut PassCx) -> Result<PassReport> {
        crate::cache::refuse_split(model, "LoRA fusion")?;
        let lpb = layers_per_block(model);
        let component = self.component.unwrap_or_else(|| detect_component(model));
        let files: Vec<(LoraFile, f32)> = self
            .sources
            .iter()
            .map(|s| Ok((file::read(&s.path, lpb, component)?, s.multiplier)))
            .collect::<Result<_>>()?;
        let targets = targets(model);
        let mut report = PassReport::default();
        // Which file layers adapt each weight; fused one weight at a time so only one ΔW is
        // alive (memory stays near the size of the changed tensors).
        let mut plan: BTreeMap<String, (Target, Vec<(usize, usize)>)> = BTreeMap::new();
        let mut unmatched = Vec::new();
        for (fi, (f, _)) in files.iter().enumerate() {
            let fname = file_name(&f.path);
            report.notes.extend(component_notes(f, &fname));
            for (li, layer) in f.layers.iter().enumerate() {
                match find_target(&targets, model, &layer.module) {
                    Some(Ok(t)) => plan
                        .entry(layer.module.clone())
                        .or_insert_with(|| (t.clone(), Vec::new()))
                        .1
                        .push((fi, li)),
                    Some(Err(why)) => report.skipped.push(Skipped {
                        site: format!("{fname}:{}", layer.name),
                        reason: why.clone(),
                    }),
                    None => {
                        unmatched.push(format!("{fname}:{}", layer.name));
                        report.skipped.push(Skipped {
                            site: format!("{fname}:{}", layer.name),
                            reason: format!(
                                "no layer '{}' in this graph ({component})",
                                layer.module
                            ),
                        });
                    }
                }
            }
        }
        if self.strict && !unmatched.is_empty() {
            return Err(Error::Graph(format!(
                "--lora-strict: {} LoRA layers match no layer of this graph: {}",
                unmatched.len(),
                unmatched.join(", ")
            )));
        }
        for (target, uses) in plan.into_values() {
            let w = model
                .graph
                .initializer(target.weight)
                .expect("targets are initializers");
            let shape = target.torch_shape(w.name(), w.dims())?;
            let mut sum: Vec<f32> = Vec::new();
            for (fi, li) in uses {
                let (f, multiplier) = &files[fi];
                let layer = &f.layers[li];
                let d = math::delta(layer, &shape)
                    .map_err(|why| layer_error(f, layer, &target, why))?;
                report.rewritten.push(format!(
                    "{} <- {}:{} ({}, rank {}, scale {:.4}, x{multiplier})",
                    target.module,
                    file_name(&f.path),
                    layer.name,
                    d.kind,
                    d.rank,
                    d.scale
                ));
                if sum.is_empty() {
                    sum = vec![0f32; d.data.len()];
                }
                sum.iter_mut()
                    .zip(&d.data)
                    .for_each(|(acc, v)| *acc += multiplier * v);
            }
            fuse(model, &target, &shape, &sum)?;
        }
        Ok(report)
    }
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn layer_error(f: &LoraFile, layer: &Layer, target: &Target, why: String) -> Error {
    Error::Model {
        path: f.path.clone(),
        msg: format!(
            "layer {} (graph layer {}): {why}",
            layer.name, target.module
        ),
    }
}

/// W ← round(W_f32 + ΔW) in the weight's own dtype and layout (f64 weights: W_f64 + ΔW, no
/// rounding through f32).
fn fuse(model: &mut Model, target: &Target, shape: &[usize], delta: &[f32]) -> Result<()> {
    let g = &mut model.graph;
    let t = g
        .initializer(target.weight)
        .expect("targets are initializers");
    let dtype = DataType::try_from(t.data_type())
        .map_err(|_| Error::tensor(t.name(), "unknown data type"))?;
    let not_finite = |bad: String| {
        Error::Graph(format!(
            "fusing LoRA into layer {} ({}) gives {bad}, which is not finite in {}",
            target.module,
            t.name(),
            onnx::type_name(t.data_type())
        ))
    };
    let data = if dtype == DataType::Double {
        let mut w: Vec<f64> = t
            .bytes()?
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        t.release();
        add_delta(&mut w, target, shape, delta, |w, d| *w += f64::from(d))?;
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(not_finite(bad.to_string()));
        }
        w.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else {
        let mut w = decode(&t.bytes()?, dtype).ok_or_else(|| {
            Error::tensor(
                t.name(),
                format!(
                    "cannot fuse into {} weights",
                    onnx::type_name(t.data_type())
                ),
            )
        })?;
        t.release();
        add_delta(&mut w, target, shape, delta, |w, d| *w += d)?;
        let max = match dtype {
            DataType::Float16 => 65504.0,
            DataType::Bfloat16 => 3.389_531_4e38,
            _ => f32::MAX,
        };
        if let Some(bad) = w.iter().find(|v| !v.is_finite() || v.abs() > max) {
            return Err(not_finite(bad.to_string()));
        }
        encode(&w, dtype)
    };
    let fused = t.with_data(data.into());
    g.set_initializer(fused);
    Ok(())
}

/// Adds ΔW (torch layout [out, rest]) to the stored weight `w` (its own layout).
fn add_delta<T>(
    w: &mut [T],
    target: &Target,
    shape: &[usize],
    delta: &[f32],
    add: impl Fn(&mut T, f32),
) -> Result<()> {
    let (out, rest) = (shape[0], shape[1..].iter().product::<usize>());
    if w.len() != out * rest || delta.len() != out * rest {
        return Err(Error::Graph(format!(
            "layer {}: its weight holds {} values and the LoRA gives {}, its dims {shape:?} call for {}",
            target.module,
            w.len(),
            delta.len(),
            out * rest
        )));
    }
    let transposed = matches!(
        target.layout,
        Layout::MatMulT | Layout::Gemm { trans_b: false }
    );
    for o in 0..out {
        for i in 0..rest {
            let at = if transposed {
                i * out + o
            } else {
                o * rest + i
            };
            add(&mut w[at], delta[o * rest + i]);
        }
    }
    Ok(())
}

/// Floats of a weight's dtype, widened to f32.
pub(crate) fn decode(bytes: &[u8], dtype: DataType) -> Option<Vec<f32>> {
    let chunks = |n: usize| bytes.chunks_exact(n);
    Some(match dtype {
        DataType::Float => chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DataType::Double => chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DataType::Float16 => chunks(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        DataType::Bfloat16 => chunks(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        _ => return None,
    })
}

/// f32 values rounded once to `dtype` (f32, f16 or bf16; f64 widened exactly).
pub(crate) fn encode(w: &[f32], dtype: DataType) -> Vec<u8> {
    match dtype {
        DataType::Double => w.iter().flat_map(|v| f64::from(*v).to_le_bytes()).collect(),
        DataType::Float16 => w
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DataType::Bfloat16 => w
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}
