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
        if path.extension().is_some_and(|e| e == "bin") {
            return Err(bad(
                path,
                "a torch pickle (.bin): attune reads IP-Adapter .safetensors files (the hub ships both; convert with safetensors' save_file)".into(),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(path, format!("not a valid .safetensors file: {e}")))?;
        let mut tensors: BTreeMap<String, Weight> = BTreeMap::new();
        for (key, view) in st.tensors() {
            let data = crate::lora::file::to_f32(view.dtype(), view.data()).ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "key '{key}': element type {:?} is not supported",
                        view.dtype()
                    ),
                )
            })?;
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(bad(
                    path,
                    format!("key '{key}' holds a non-finite value at element {i}"),
                ));
            }
            tensors.insert(
                key.clone(),
                Weight {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
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
        } else if tensors.keys().any(|k| k.starts_with("image_proj.")) {
            let kind = if tensors.contains_key("image_proj.proj.3.weight") {
                "IP-Adapter Full Face (MLPProjModel)"
            } else if tensors.contains_key("image_proj.latents") {
                "IP-Adapter Plus (Resampler)"
            } else {
                "an image projection of another kind (Face ID?)"
            };
            return Err(bad(
                path,
                format!(
                    "{kind}: attune builds the plain IP-Adapter's image projection (image_proj.proj, image_proj.norm) so far"
                ),
            ));
        } else {
            return Err(bad(
                path,
                "no image_proj.* keys: not an IP-Adapter file in the published layout".into(),
            ));
        };
        let Projection::Plain { norm, .. } = &projection;
        let width = norm.shape[0];
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
