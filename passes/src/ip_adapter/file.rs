//! An IP-Adapter file in the published layout (`ip-adapter_sd15.safetensors`): the image
//! projection `image_proj.*` and, per cross-attention processor, `ip_adapter.N.to_k_ip.weight`
//! and `.to_v_ip.weight` ([hidden, cross-attention width]), N = 1, 3, 5, ... in the order of
//! diffusers' attention processors (every attention counts, only cross-attention ones have
//! keys).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use attune_compiler::Error;
use safetensors::SafeTensors;

/// A weight as f32, row-major.
#[derive(Clone, Debug)]
pub struct Weight {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A Linear (weight [out, in], bias or none) or a LayerNorm (weight, bias).
#[derive(Clone, Debug)]
pub struct Affine {
    pub weight: Weight,
    pub bias: Option<Weight>,
}

/// One Resampler block (IP-Adapter Plus): PerceiverAttention and its feed-forward.
#[derive(Debug)]
pub struct ResamplerBlock {
    pub norm1: Affine,
    pub norm2: Affine,
    pub to_q: Weight,
    pub to_kv: Weight,
    pub to_out: Weight,
    pub ff_norm: Affine,
    pub ff_in: Weight,
    pub ff_out: Weight,
}

/// The image projection the file holds.
#[derive(Debug)]
pub enum Projection {
    /// The plain IP-Adapter's `ImageProjection`: Linear(image embedding, tokens·width),
    /// reshaped to [tokens, width], LayerNorm.
    Plain {
        proj: Weight,
        proj_bias: Weight,
        norm: Weight,
        norm_bias: Weight,
        tokens: usize,
    },
    /// IP-Adapter Full Face's `MLPProjModel`: Linear, GELU, Linear, LayerNorm over the image
    /// encoder's penultimate hidden states (every token).
    Mlp {
        first: Affine,
        second: Affine,
        norm: Affine,
    },
    /// IP-Adapter Plus's `Resampler`: learned latent queries attending to the image encoder's
    /// penultimate hidden states through PerceiverAttention blocks (heads of 64).
    Resampler {
        latents: Weight,
        proj_in: Affine,
        blocks: Vec<ResamplerBlock>,
        proj_out: Affine,
        norm_out: Affine,
    },
}

#[derive(Debug)]
pub struct IpAdapterFile {
    pub path: PathBuf,
    pub projection: Projection,
    /// N -> (to_k_ip, to_v_ip)
    pub layers: BTreeMap<usize, (Weight, Weight)>,
    /// The cross-attention width the keys and values read (the text's width).
    pub width: usize,
}

fn bad(path: &Path, msg: String) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        msg,
    }
}

impl IpAdapterFile {
    pub fn read(path: &Path) -> Result<IpAdapterFile, Error> {
        let torch = path
            .extension()
            .is_some_and(|e| e == "bin" || e == "pt" || e == "pth");
        let tensors: BTreeMap<String, Weight> = if torch {
            // The published .bin: torch.save({"image_proj": {...}, "ip_adapter": {...}}).
            super::torch_file::read(path)
                .map_err(|e| bad(path, e))?
                .into_iter()
                .collect()
        } else {
            let bytes = attune_compiler::files::read_regular(path)?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| bad(path, format!("not a valid .safetensors file: {e}")))?;
            let mut tensors = BTreeMap::new();
            for (key, view) in st.tensors() {
                let data =
                    crate::lora::file::to_f32(view.dtype(), view.data()).ok_or_else(|| {
                        bad(
                            path,
                            format!(
                                "key '{key}': element type {:?} is not supported",
                                view.dtype()
                            ),
                        )
                    })?;
                tensors.insert(
                    key.clone(),
                    Weight {
                        shape: view.shape().to_vec(),
                        data,
                    },
                );
            }
            tensors
        };
        for (key, w) in &tensors {
            if let Some(i) = w.data.iter().position(|v| !v.is_finite()) {
                return Err(bad(
                    path,
                    format!("key '{key}' holds a non-finite value at element {i}"),
                ));
            }
        }
        let take = |key: &str, rank: usize| -> Result<Weight, Error> {
            let w = tensors
                .get(key)
                .ok_or_else(|| bad(path, format!("no key '{key}'")))?;
            if w.shape.len() != rank {
                return Err(bad(
                    path,
                    format!("key '{key}' is {:?}, expected rank {rank}", w.shape),
                ));
            }
            Ok(w.clone())
        };
        let projection = if tensors.contains_key("image_proj.proj.weight") {
            let (proj, norm) = (
                take("image_proj.proj.weight", 2)?,
                take("image_proj.norm.weight", 1)?,
            );
            let width = norm.shape[0];
            if width == 0 || proj.shape[0] % width != 0 {
                return Err(bad(
                    path,
                    format!(
                        "image_proj.proj.weight {:?} is not tokens x image_proj.norm.weight's {width}",
                        proj.shape
                    ),
                ));
            }
            Projection::Plain {
                tokens: proj.shape[0] / width,
                proj_bias: take("image_proj.proj.bias", 1)?,
                norm_bias: take("image_proj.norm.bias", 1)?,
                proj,
                norm,
            }
        } else if tensors.contains_key("image_proj.proj.3.weight") {
            let affine = |w: &str, b: &str| -> Result<Affine, Error> {
                Ok(Affine {
                    weight: take(w, if w.ends_with(".3.weight") { 1 } else { 2 })?,
                    bias: Some(take(b, 1)?),
                })
            };
            Projection::Mlp {
                first: affine("image_proj.proj.0.weight", "image_proj.proj.0.bias")?,
                second: affine("image_proj.proj.2.weight", "image_proj.proj.2.bias")?,
                norm: affine("image_proj.proj.3.weight", "image_proj.proj.3.bias")?,
            }
        } else if tensors.contains_key("image_proj.latents") {
            let linear = |w: &str, b: &str| -> Result<Affine, Error> {
                Ok(Affine {
                    weight: take(w, 2)?,
                    bias: Some(take(b, 1)?),
                })
            };
            let norm = |prefix: &str| -> Result<Affine, Error> {
                Ok(Affine {
                    weight: take(&format!("{prefix}.weight"), 1)?,
                    bias: Some(take(&format!("{prefix}.bias"), 1)?),
                })
            };
            let mut blocks = Vec::new();
            while tensors.contains_key(&format!("image_proj.layers.{}.0.to_q.weight", blocks.len()))
            {
                let l = format!("image_proj.layers.{}", blocks.len());
                blocks.push(ResamplerBlock {
                    norm1: norm(&format!("{l}.0.norm1"))?,
                    norm2: norm(&format!("{l}.0.norm2"))?,
                    to_q: take(&format!("{l}.0.to_q.weight"), 2)?,
                    to_kv: take(&format!("{l}.0.to_kv.weight"), 2)?,
                    to_out: take(&format!("{l}.0.to_out.weight"), 2)?,
                    ff_norm: norm(&format!("{l}.1.0"))?,
                    ff_in: take(&format!("{l}.1.1.weight"), 2)?,
                    ff_out: take(&format!("{l}.1.3.weight"), 2)?,
                });
            }
            let latents = take("image_proj.latents", 3)?;
            let inner = blocks.first().map_or(0, |b| b.to_q.shape[0]);
            if blocks.is_empty() || inner % 64 != 0 {
                return Err(bad(
                    path,
                    format!(
                        "image_proj.layers: {} blocks of {inner} channels; a Resampler has blocks of heads of 64",
                        blocks.len()
                    ),
                ));
            }
            Projection::Resampler {
                latents,
                proj_in: linear("image_proj.proj_in.weight", "image_proj.proj_in.bias")?,
                blocks,
                proj_out: linear("image_proj.proj_out.weight", "image_proj.proj_out.bias")?,
                norm_out: norm("image_proj.norm_out")?,
            }
        } else if tensors.keys().any(|k| k.starts_with("image_proj.")) {
            return Err(bad(
                path,
                "an image projection of another kind (Face ID?): attune builds the plain, Plus (Resampler) and Full Face (MLP) ones".into(),
            ));
        } else {
            return Err(bad(
                path,
                "no image_proj.* keys: not an IP-Adapter file in the published layout".into(),
            ));
        };
        let width = projection.width();
        let mut layers = BTreeMap::new();
        for key in tensors.keys() {
            let Some(rest) = key.strip_prefix("ip_adapter.") else {
                if !key.starts_with("image_proj.") {
                    return Err(bad(
                        path,
                        format!(
                            "key '{key}' is not an IP-Adapter key (image_proj.*, ip_adapter.N.to_k_ip/to_v_ip)"
                        ),
                    ));
                }
                continue;
            };
            let (n, leaf) = rest
                .split_once('.')
                .and_then(|(n, leaf)| Some((n.parse::<usize>().ok()?, leaf)))
                .filter(|(_, leaf)| *leaf == "to_k_ip.weight" || *leaf == "to_v_ip.weight")
                .ok_or_else(|| {
                    bad(
                        path,
                        format!(
                            "key '{key}' is not ip_adapter.N.to_k_ip.weight or .to_v_ip.weight"
                        ),
                    )
                })?;
            if leaf == "to_k_ip.weight" {
                let k = take(key, 2)?;
                let v = take(&format!("ip_adapter.{n}.to_v_ip.weight"), 2)?;
                for (w, name) in [(&k, "to_k_ip"), (&v, "to_v_ip")] {
                    if w.shape[1] != width {
                        return Err(bad(
                            path,
                            format!(
                                "key 'ip_adapter.{n}.{name}.weight' reads width {}, the image projection makes {width}",
                                w.shape[1]
                            ),
                        ));
                    }
                }
                layers.insert(n, (k, v));
            }
        }
        if layers.is_empty() {
            return Err(bad(path, "no ip_adapter.N.to_k_ip.weight keys".into()));
        }
        Ok(IpAdapterFile {
            path: path.to_path_buf(),
            projection,
            layers,
            width,
        })
    }
}
