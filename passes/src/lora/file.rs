//! Reading LoRA `.safetensors` files of every common key style into layers:
//! - kohya / LyCORIS: `lora_unet_<module_with_underscores>.{lora_down,lora_up,lora_mid}.weight`,
//!   `.alpha`, `.hada_w{1,2}_{a,b}`, `.hada_t{1,2}`, `.lokr_w{1,2}[_{a,b}]`, `.lokr_t2`;
//!   SGM/LDM block names (`input_blocks_4_1_...`) mapped to diffusers module paths; Flux's
//!   Black Forest Labs names (`double_blocks_0_img_attn_qkv`, `single_blocks_0_linear1`), whose
//!   fused layers' rows are split across diffusers' modules (Q, K, V and the MLP input);
//! - diffusers/PEFT: `unet.<path>.lora_A.weight` / `lora_B.weight` (`transformer.<path>` for
//!   diffusion transformers: SD3, Flux), alphas from the file's
//!   `lora_adapter_metadata` (rsLoRA when flagged) or `<path>.alpha` keys;
//! - diffusers' legacy attention processors: `unet.<attn>.processor.to_q_lora.down.weight`.
//!
//! - text encoders: kohya `lora_te_`/`lora_te1_` (text_encoder), `lora_te2_` (text_encoder_2),
//!   `lora_te3_` (text_encoder_3, SD3's T5) followed by the module in underscore form
//!   (`text_model_encoder_layers_0_self_attn_q_proj`); diffusers/PEFT `text_encoder.<path>`,
//!   `text_encoder_2.<path>` (also diffusers' older `.lora_linear_layer.down/up` and
//!   `self_attn.to_q_lora.down` forms), and a bare PEFT `base_model.model.text_model.<path>`.
//!
//! Every key belongs to one [`Component`] of a pipeline; a read keeps the layers of the
//! component asked for and counts the others (reported as theirs, not as failures).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use attune_compiler::{Error, Result};
use safetensors::{Dtype, SafeTensors};

/// The model of a pipeline a LoRA key adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The UNet or diffusion transformer (`lora_unet_`, `unet.`, `transformer.`).
    Denoiser,
    /// `text_encoder` (`lora_te_`, `lora_te1_`, `text_encoder.`).
    TextEncoder,
    /// `text_encoder_2` (`lora_te2_`, `text_encoder_2.`).
    TextEncoder2,
    /// `text_encoder_3` (`lora_te3_`, `text_encoder_3.`).
    TextEncoder3,
}

impl Component {
    pub const ALL: [Component; 4] = [
        Component::Denoiser,
        Component::TextEncoder,
        Component::TextEncoder2,
        Component::TextEncoder3,
    ];

    /// The name users and pipeline folders give it (`unet` for the denoiser, whose folder may
    /// also be `transformer`).
    pub fn name(self) -> &'static str {
        match self {
            Component::Denoiser => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::TextEncoder3 => "text_encoder_3",
        }
    }

    /// A pipeline folder's component directory (`unet`, `transformer`, `text_encoder_2`); `None`
    /// for those LoRA files never adapt (VAE, tokenizers).
    pub fn from_folder(name: &str) -> Option<Component> {
        Some(match name {
            "unet" | "transformer" | "denoiser" | "prior" | "decoder" => Component::Denoiser,
            "text_encoder" => Component::TextEncoder,
            "text_encoder_2" => Component::TextEncoder2,
            "text_encoder_3" => Component::TextEncoder3,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A factor, upcast to f32 (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Factor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// The key it was read from.
    pub key: String,
}

impl Factor {
    /// Rows × (everything else): the matrix view of a factor.
    pub fn rows_cols(&self) -> (usize, usize) {
        let rows = self.shape.first().copied().unwrap_or(1);
        (rows, self.data.len() / rows.max(1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Down,
    Up,
    Mid,
    Alpha,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    DoraScale,
}

/// One adapted layer of a file: its module (underscore form), the factors by part, the
/// scale rule.
#[derive(Clone, Debug)]
pub struct Layer {
    /// diffusers module path with `_` for `.` (`down_blocks_0_attentions_0_..._to_q`).
    pub module: String,
    /// The layer's name as the file spells it (for reports and errors).
    pub name: String,
    pub parts: BTreeMap<Part, Factor>,
    /// alpha from the file or its metadata (`None`: alpha = rank).
    pub alpha: Option<f32>,
    /// Scale by alpha/sqrt(rank) (rsLoRA) instead of alpha/rank.
    pub rslora: bool,
}

#[derive(Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    /// The component these layers were read for.
    pub component: Component,
    /// Its layers.
    pub layers: Vec<Layer>,
    /// The layers (names as the file spells them) of the file's other components.
    pub elsewhere: BTreeMap<Component, Vec<String>>,
}

/// What a key says: the component, the layer's name, its module, which part.
struct Key {
    component: Component,
    name: String,
    module: String,
    part: Part,
}

/// Which components a LoRA file has layers for, and how many each, from its keys alone (no
/// factor decoded): a folder compile asks which of its components get a LoRA pass.
pub fn components(path: &Path) -> Result<BTreeMap<Component, usize>> {
    let bad = |msg: String| Error::Model {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = attune_compiler::files::read_regular(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a valid .safetensors file: {e}")))?;
    let mut layers: BTreeMap<Component, std::collections::BTreeSet<String>> = BTreeMap::new();
    for key in st.names() {
        let (component, name) = match parse_key(key, 2) {
            Some(k) => (k.component, k.name),
            None => match prefix_component(key) {
                Some(c) if c != Component::Denoiser => (c, layer_name(key)),
                _ => {
                    return Err(bad(format!(
                        "key '{key}' is not a LoRA key attune knows (kohya, LyCORIS, diffusers/PEFT)"
                    )));
                }
            },
        };
        layers.entry(component).or_default().insert(name);
    }
    Ok(layers.into_iter().map(|(c, n)| (c, n.len())).collect())
}

/// The component a key's prefix names, whatever follows it.
fn prefix_component(key: &str) -> Option<Component> {
    KOHYA_PREFIXES
        .iter()
        .chain(DOTTED_PREFIXES)
        .find(|(p, _)| key.starts_with(p))
        .map(|(_, c)| *c)
}

/// A key without its factor suffix, for naming a layer whose key attune cannot read.
fn layer_name(key: &str) -> String {
    for suffix in [".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", ".alpha"] {
        if let Some(i) = key.find(suffix) {
            return key[..i].to_string();
        }
    }
    key.to_string()
}

/// Reads a LoRA file's layers for `component`; the other components' layers are named in
/// `elsewhere`. `layers_per_block` maps SGM/LDM block names.
pub fn read(path: &Path, layers_per_block: usize, component: Component) -> Result<LoraFile> {
    let bad = |msg: String| Error::Model {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = attune_compiler::files::read_regular(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a valid .safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a valid .safetensors file: {e}")))?;
    let peft = PeftMeta::from(meta.metadata().as_ref(), component);
    let mut layers: BTreeMap<String, Layer> = BTreeMap::new();
    let mut elsewhere: BTreeMap<Component, Vec<String>> = BTreeMap::new();
    let mut names: Vec<&str> = st.names();
    names.sort();
    for key in names {
        let parsed = parse_key(key, layers_per_block).or_else(|| {
            // Another component's key in a form attune cannot read is that component's
            // business: named there, not an error here.
            let of =
                prefix_component(key).filter(|c| *c != component && *c != Component::Denoiser)?;
            Some(Key {
                component: of,
                name: layer_name(key),
                module: String::new(),
                part: Part::Alpha,
            })
        });
        let Key {
            component: of,
            name,
            module,
            part,
        } = parsed.ok_or_else(|| {
            bad(format!(
                "key '{key}' is not a LoRA key attune knows (kohya, LyCORIS, diffusers/PEFT)"
            ))
        })?;
        if of != component {
            let names = elsewhere.entry(of).or_default();
            if !names.contains(&name) {
                names.push(name);
            }
            continue;
        }
        let view = st
            .tensor(key)
            .map_err(|e| bad(format!("key '{key}': {e}")))?;
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| {
            bad(format!(
                "key '{key}': element type {:?} is not supported",
                view.dtype()
            ))
        })?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "key '{key}' (layer {module}) holds a non-finite value ({}) at element {i}",
                data[i]
            )));
        }
        let layer = layers.entry(module.clone()).or_insert_with(|| Layer {
            module: module.clone(),
            name: name.clone(),
            parts: BTreeMap::new(),
            alpha: None,
            rslora: peft.rslora,
        });
        if layer.name != name {
            return Err(bad(format!(
                "keys '{}' and '{name}' both adapt layer {module}",
                layer.name
            )));
        }
        if part == Part::Alpha {
            if data.len() != 1 {
                return Err(bad(format!(
                    "key '{key}' (layer {module}): alpha must be a single value, not shape {:?}",
                    view.shape()
                )));
            }
            layer.alpha = data.first().copied();
            continue;
        }
        check_rank(part, view.shape())
            .map_err(|why| bad(format!("key '{key}' (layer {module}): {why}")))?;
        let factor = Factor {
            shape: view.shape().to_vec(),
            data,
            key: key.to_string(),
        };
        if let Some(prev) = layer.parts.insert(part, factor) {
            return Err(bad(format!(
                "keys '{}' and '{key}' are the same factor of layer {module}",
                prev.key
            )));
        }
    }
    let mut layers = split_fused(layers.into_values().collect()).map_err(bad)?;
    for l in &mut layers {
        if l.alpha.is_none() {
            l.alpha = peft.alpha_for(&l.module);
        }
    }
    Ok(LoraFile {
        path: path.to_path_buf(),
        component,
        layers,
        elsewhere,
    })
}

/// kohya's Flux layers in Black Forest Labs' names: the diffusers modules (underscore form)
/// whose weights are their rows, in order.
fn bfl_to_diffusers(name: &str) -> Option<Vec<String>> {
    let t: Vec<&str> = name.split('_').collect();
    let (block, leaves): (String, Vec<&str>) = match t.as_slice() {
        ["double", "blocks", i, stream @ ("img" | "txt"), rest @ ..] => {
            let img = *stream == "img";
            let pick = |a: &'static str, b: &'static str| if img { a } else { b };
            let leaves = match rest {
                ["attn", "qkv"] => vec![
                    pick("attn_to_q", "attn_add_q_proj"),
                    pick("attn_to_k", "attn_add_k_proj"),
                    pick("attn_to_v", "attn_add_v_proj"),
                ],
                ["attn", "proj"] => vec![pick("attn_to_out_0", "attn_to_add_out")],
                ["mlp", "0"] => vec![pick("ff_net_0_proj", "ff_context_net_0_proj")],
                ["mlp", "2"] => vec![pick("ff_net_2", "ff_context_net_2")],
                ["mod", "lin"] => vec![pick("norm1_linear", "norm1_context_linear")],
                _ => return None,
            };
            (
                format!("transformer_blocks_{}", i.parse::<usize>().ok()?),
                leaves,
            )
        }
        ["single", "blocks", i, rest @ ..] => {
            let leaves = match rest {
                ["linear1"] => vec!["attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp"],
                ["linear2"] => vec!["proj_out"],
                ["modulation", "lin"] => vec!["norm_linear"],
                _ => return None,
            };
            (
                format!("single_transformer_blocks_{}", i.parse::<usize>().ok()?),
                leaves,
            )
        }
        _ => return None,
    };
    Some(leaves.iter().map(|l| format!("{block}_{l}")).collect())
}

/// Flux layers under diffusers' names; a fused one (`attn_qkv`: Q, K, V in equal thirds;
/// `linear1`: Q, K, V of the block's width, then the MLP input) becomes one layer per module,
/// each with the down factor and its rows of the up factor (kohya's `alpha/rank` unchanged).
fn split_fused(layers: Vec<Layer>) -> std::result::Result<Vec<Layer>, String> {
    let mut out = Vec::new();
    for layer in layers {
        let Some(modules) = bfl_to_diffusers(&layer.module) else {
            out.push(layer);
            continue;
        };
        if let [module] = &modules[..] {
            out.push(Layer {
                module: module.clone(),
                ..layer
            });
            continue;
        }
        let fused = |why: String| format!("layer {}: {why}", layer.name);
        let (Some(down), Some(up), 2) = (
            layer.parts.get(&Part::Down),
            layer.parts.get(&Part::Up),
            layer.parts.len(),
        ) else {
            return Err(fused(format!(
                "only a plain LoRA (lora_down, lora_up) of a fused layer can be split across \
                 {}",
                modules.join(", ")
            )));
        };
        let (rows, rank) = up.rows_cols();
        let width = down.rows_cols().1;
        let sizes: Vec<usize> = if modules.len() == 3 && rows % 3 == 0 {
            vec![rows / 3; 3]
        } else if modules.len() == 4 && rows > 3 * width {
            vec![width, width, width, rows - 3 * width]
        } else {
            return Err(fused(format!(
                "{rows} output rows do not split into {}",
                modules.join(", ")
            )));
        };
        let mut start = 0;
        for (module, size) in modules.into_iter().zip(sizes) {
            let mut part = up.clone();
            part.shape[0] = size;
            part.data = up.data[start * rank..(start + size) * rank].to_vec();
            let mut parts = layer.parts.clone();
            parts.insert(Part::Up, part);
            out.push(Layer {
                module,
                name: format!("{} rows {start}..{}", layer.name, start + size),
                parts,
                ..layer.clone()
            });
            start += size;
        }
    }
    Ok(out)
}

/// Every factor is a matrix (Tucker cores and conv factors have more dims), with no empty
/// dimension: the math indexes rows and ranks without re-checking.
fn check_rank(part: Part, shape: &[usize]) -> std::result::Result<(), String> {
    let min = match part {
        Part::Alpha => return Ok(()),
        Part::DoraScale => 1,
        _ => 2,
    };
    if shape.len() < min {
        return Err(format!(
            "a {part:?} factor must have at least {min} dimensions, this one has shape {shape:?}"
        ));
    }
    if shape.contains(&0) {
        return Err(format!(
            "a {part:?} factor must not have an empty dimension, this one has shape {shape:?}"
        ));
    }
    Ok(())
}

pub(crate) fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    use attune_compiler::onnx::DataType;
    let dt = match dtype {
        Dtype::F32 => DataType::Float,
        Dtype::F16 => DataType::Float16,
        Dtype::BF16 => DataType::Bfloat16,
        Dtype::F64 => DataType::Double,
        _ => return None,
    };
    super::decode(bytes, dt)
}

/// diffusers' `lora_adapter_metadata` (PEFT config of the saved adapter).
#[derive(Default)]
struct PeftMeta {
    alpha: Option<f32>,
    alpha_pattern: Vec<(String, f32)>,
    rslora: bool,
}

impl PeftMeta {
    /// The config of `component`'s adapter (diffusers packs each under its prefix:
    /// `unet.lora_alpha`, `text_encoder.lora_alpha`).
    fn from(
        meta: Option<&std::collections::HashMap<String, String>>,
        component: Component,
    ) -> Self {
        let Some(text) = meta.and_then(|m| m.get("lora_adapter_metadata")) else {
            return Self::default();
        };
        let Ok(serde_json::Value::Object(v)) = serde_json::from_str::<serde_json::Value>(text)
        else {
            return Self::default();
        };
        let prefixes: &[&str] = match component {
            Component::Denoiser => &["unet", "transformer"],
            c => &[c.name()],
        };
        let get = |k: &str| {
            prefixes
                .iter()
                .find_map(|p| v.get(&format!("{p}.{k}")))
                .or_else(|| v.get(k))
        };
        PeftMeta {
            alpha: get("lora_alpha").and_then(|a| a.as_f64()).map(|a| a as f32),
            alpha_pattern: get("alpha_pattern")
                .and_then(|p| p.as_object())
                .map(|p| {
                    p.iter()
                        .filter_map(|(k, a)| Some((k.replace('.', "_"), a.as_f64()? as f32)))
                        .collect()
                })
                .unwrap_or_default(),
            rslora: get("use_rslora").and_then(|r| r.as_bool()).unwrap_or(false),
        }
    }

    fn alpha_for(&self, module: &str) -> Option<f32> {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| module.ends_with(k.as_str()))
            .map(|(_, a)| *a)
            .or(self.alpha)
    }
}

const KOHYA_PARTS: &[(&str, Part)] = &[
    ("lora_down.weight", Part::Down),
    ("lora_up.weight", Part::Up),
    ("lora_mid.weight", Part::Mid),
    ("alpha", Part::Alpha),
    ("hada_w1_a", Part::HadaW1A),
    ("hada_w1_b", Part::HadaW1B),
    ("hada_w2_a", Part::HadaW2A),
    ("hada_w2_b", Part::HadaW2B),
    ("hada_t1", Part::HadaT1),
    ("hada_t2", Part::HadaT2),
    ("lokr_w1", Part::LokrW1),
    ("lokr_w1_a", Part::LokrW1A),
    ("lokr_w1_b", Part::LokrW1B),
    ("lokr_w2", Part::LokrW2),
    ("lokr_w2_a", Part::LokrW2A),
    ("lokr_w2_b", Part::LokrW2B),
    ("lokr_t2", Part::LokrT2),
    ("dora_scale", Part::DoraScale),
];

/// kohya prefixes: the component and whether SGM/LDM block names may follow.
const KOHYA_PREFIXES: &[(&str, Component)] = &[
    ("lora_unet_", Component::Denoiser),
    ("lora_te_", Component::TextEncoder),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
    ("lora_te3_", Component::TextEncoder3),
    ("te_", Component::TextEncoder),
];

/// diffusers/PEFT prefixes of dotted paths.
const DOTTED_PREFIXES: &[(&str, Component)] = &[
    ("unet.", Component::Denoiser),
    ("transformer.", Component::Denoiser),
    ("text_encoder.", Component::TextEncoder),
    ("text_encoder_2.", Component::TextEncoder2),
    ("text_encoder_3.", Component::TextEncoder3),
    ("base_model.model.", Component::Denoiser),
];

fn parse_key(key: &str, lpb: usize) -> Option<Key> {
    if let Some((prefix, component)) = KOHYA_PREFIXES.iter().find(|(p, _)| key.starts_with(p)) {
        let rest = &key[prefix.len()..];
        let (name, suffix) = rest.split_once('.')?;
        let part = KOHYA_PARTS.iter().find(|(s, _)| *s == suffix)?.1;
        let module = match component {
            Component::Denoiser => sgm_to_diffusers(name, lpb),
            _ => name.to_string(),
        };
        return Some(Key {
            component: *component,
            name: format!("{prefix}{name}"),
            module,
            part,
        });
    }
    // diffusers / PEFT: dotted module paths.
    let (path, mut component) = DOTTED_PREFIXES
        .iter()
        .find_map(|(p, c)| Some((key.strip_prefix(p)?, *c)))
        .unwrap_or((key, Component::Denoiser));
    // A text encoder's own PEFT state dict (no pipeline prefix).
    if component == Component::Denoiser && path.starts_with("text_model.") {
        component = Component::TextEncoder;
    }
    let (module, part) = if let Some(m) = path.strip_suffix(".lora_A.weight") {
        (m.to_string(), Part::Down)
    } else if let Some(m) = path.strip_suffix(".lora_B.weight") {
        (m.to_string(), Part::Up)
    } else if let Some(m) = path.strip_suffix(".alpha") {
        (m.to_string(), Part::Alpha)
    } else if let Some(m) = path
        .strip_suffix(".lora_linear_layer.down.weight")
        .or_else(|| path.strip_suffix(".lora.down.weight"))
    {
        // diffusers' own names (`convert_state_dict_to_diffusers`, as its training scripts
        // save): `lora_linear_layer` in text encoders' attention, `lora` in the UNet's.
        (m.to_string(), Part::Down)
    } else if let Some(m) = path
        .strip_suffix(".lora_linear_layer.up.weight")
        .or_else(|| path.strip_suffix(".lora.up.weight"))
    {
        (m.to_string(), Part::Up)
    } else if let Some((attn, tail)) = path.split_once(".processor.") {
        let (proj, part) = tail.split_once("_lora.")?;
        let part = legacy_part(part)?;
        let proj = if proj == "to_out" { "to_out.0" } else { proj };
        (format!("{attn}.{proj}"), part)
    } else if component != Component::Denoiser && path.contains(".self_attn.to_") {
        // diffusers' oldest text-encoder form: `self_attn.to_q_lora.down.weight`.
        let (attn, tail) = path.split_once(".to_")?;
        let (proj, part) = tail.split_once("_lora.")?;
        let proj = match proj {
            "q" | "k" | "v" => format!("{proj}_proj"),
            "out" => "out_proj".to_string(),
            _ => return None,
        };
        (format!("{attn}.{proj}"), legacy_part(part)?)
    } else {
        return None;
    };
    Some(Key {
        component,
        name: module.clone(),
        module: module.replace('.', "_"),
        part,
    })
}

fn legacy_part(text: &str) -> Option<Part> {
    match text {
        "down.weight" => Some(Part::Down),
        "up.weight" => Some(Part::Up),
        _ => None,
    }
}

/// SGM/LDM block names (kohya's SDXL naming) to diffusers module paths, in underscore form;
/// diffusers names pass through. `lpb` is the UNet's layers per block.
pub fn sgm_to_diffusers(name: &str, lpb: usize) -> String {
    let t: Vec<&str> = name.split('_').collect();
    let num = |i: usize| t.get(i).and_then(|s| s.parse::<usize>().ok());
    let join = |head: String, rest: &[&str]| {
        if rest.is_empty() {
            head
        } else {
            format!("{head}_{}", resnet_inner(&rest.join("_")))
        }
    };
    let top = [
        ("input_blocks_0_0", "conv_in"),
        ("out_2", "conv_out"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
    ];
    if let Some((_, d)) = top.iter().find(|(s, _)| name == *s) {
        return d.to_string();
    }
    match (t.first().copied(), t.get(1).copied()) {
        (Some("input"), Some("blocks")) => {
            let (Some(i), Some(j)) = (num(2), num(3)) else {
                return name.to_string();
            };
            if i == 0 {
                return name.to_string();
            }
            let (level, layer) = ((i - 1) / (lpb + 1), (i - 1) % (lpb + 1));
            let rest = &t[4..];
            if rest.first() == Some(&"op") {
                return join(
                    format!("down_blocks_{level}_downsamplers_0_conv"),
                    &rest[1..],
                );
            }
            let kind = if j == 0 { "resnets" } else { "attentions" };
            join(format!("down_blocks_{level}_{kind}_{layer}"), rest)
        }
        (Some("middle"), Some("block")) => {
            let Some(i) = num(2) else {
                return name.to_string();
            };
            let head = match i {
                0 => "mid_block_resnets_0",
                1 => "mid_block_attentions_0",
                _ => "mid_block_resnets_1",
            };
            join(head.to_string(), &t[3..])
        }
        (Some("output"), Some("blocks")) => {
            let (Some(i), Some(j)) = (num(2), num(3)) else {
                return name.to_string();
            };
            let (level, layer) = (i / (lpb + 1), i % (lpb + 1));
            let rest = &t[4..];
            // An upsampler follows the last resnet (index 1 without attention, 2 with).
            if rest == ["conv"] && j >= 1 {
                return format!("up_blocks_{level}_upsamplers_0_conv");
            }
            let kind = if j == 0 { "resnets" } else { "attentions" };
            join(format!("up_blocks_{level}_{kind}_{layer}"), rest)
        }
        _ => name.to_string(),
    }
}

/// LDM resnet layer names to diffusers'.
fn resnet_inner(rest: &str) -> String {
    match rest {
        "in_layers_2" => "conv1".into(),
        "out_layers_3" => "conv2".into(),
        "emb_layers_1" => "time_emb_proj".into(),
        "skip_connection" => "conv_shortcut".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgm_names() {
        assert_eq!(
            sgm_to_diffusers("input_blocks_4_1_transformer_blocks_0_attn1_to_q", 2),
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        );
        assert_eq!(
            sgm_to_diffusers("input_blocks_1_0_in_layers_2", 2),
            "down_blocks_0_resnets_0_conv1"
        );
        assert_eq!(
            sgm_to_diffusers("input_blocks_3_0_op", 2),
            "down_blocks_0_downsamplers_0_conv"
        );
        assert_eq!(
            sgm_to_diffusers("middle_block_1_proj_in", 2),
            "mid_block_attentions_0_proj_in"
        );
        assert_eq!(
            sgm_to_diffusers("middle_block_2_emb_layers_1", 2),
            "mid_block_resnets_1_time_emb_proj"
        );
        assert_eq!(
            sgm_to_diffusers("output_blocks_5_1_transformer_blocks_0_ff_net_2", 2),
            "up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2"
        );
        assert_eq!(
            sgm_to_diffusers("output_blocks_2_1_conv", 2),
            "up_blocks_0_upsamplers_0_conv"
        );
        assert_eq!(
            sgm_to_diffusers("output_blocks_8_2_conv", 2),
            "up_blocks_2_upsamplers_0_conv"
        );
        assert_eq!(
            sgm_to_diffusers("output_blocks_3_0_skip_connection", 2),
            "up_blocks_1_resnets_0_conv_shortcut"
        );
        assert_eq!(
            sgm_to_diffusers("down_blocks_0_attentions_0_proj_in", 2),
            "down_blocks_0_attentions_0_proj_in"
        );
        assert_eq!(sgm_to_diffusers("out_2", 2), "conv_out");
    }

    #[test]
    fn key_styles() {
        let unet = |k: &str| match parse_key(k, 1) {
            Some(Key {
                component: Component::Denoiser,
                module,
                part,
                ..
            }) => (module, part),
            _ => panic!("{k}"),
        };
        assert_eq!(
            unet("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"),
            ("mid_block_attentions_0_proj_in".into(), Part::Down)
        );
        assert_eq!(
            unet("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight").1,
            Part::Up
        );
        assert_eq!(
            unet(
                "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight"
            ),
            (
                "mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0".into(),
                Part::Up
            )
        );
        let te = |k: &str| {
            let Key {
                component,
                module,
                part,
                ..
            } = parse_key(k, 1).expect(k);
            (component, module, part)
        };
        let fc1 = "text_model_encoder_layers_0_mlp_fc1".to_string();
        let q = "text_model_encoder_layers_1_self_attn_q_proj".to_string();
        let out = "text_model_encoder_layers_1_self_attn_out_proj".to_string();
        use Component::*;
        assert_eq!(
            te("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"),
            (TextEncoder, fc1.clone(), Part::Alpha)
        );
        assert_eq!(
            te("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"),
            (TextEncoder, fc1.clone(), Part::Down)
        );
        assert_eq!(
            te("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"),
            (TextEncoder2, fc1.clone(), Part::Up)
        );
        assert_eq!(
            te("lora_te3_text_model_encoder_layers_0_mlp_fc1.lora_up.weight").0,
            TextEncoder3
        );
        assert_eq!(
            te("text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight"),
            (TextEncoder, q.clone(), Part::Down)
        );
        assert_eq!(
            te("text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight"),
            (TextEncoder2, q.clone(), Part::Up)
        );
        assert_eq!(
            te("base_model.model.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight"),
            (TextEncoder, q.clone(), Part::Up)
        );
        assert_eq!(
            te(
                "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_linear_layer.down.weight"
            ),
            (TextEncoder, q.clone(), Part::Down)
        );
        assert_eq!(
            unet(
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight"
            ),
            (
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0".into(),
                Part::Up
            )
        );
        assert_eq!(
            te("text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora.up.weight"),
            (TextEncoder, out, Part::Up)
        );
        assert_eq!(
            te("text_encoder.text_model.encoder.layers.1.self_attn.to_q_lora.down.weight"),
            (TextEncoder, q, Part::Down)
        );
        assert!(
            parse_key(
                "text_encoder.text_model.encoder.layers.1.self_attn.to_x_lora.down.weight",
                1
            )
            .is_none()
        );
        assert!(parse_key("something_else", 1).is_none());
    }
}
