//! Recipes: a whole conversion in one reviewable TOML file (`compile --recipe FILE`).
//! Flags given on the command line override the recipe; paths are relative to the recipe.
//!
//! ```toml
//! target = "cpu"                  # cpu | cuda
//! precision = "fp16"              # fp32 | fp16 | bf16
//! keep_io_types = true
//! disable_fusions = ["bias-add"]  # cuda: group-norm | skip-group-norm | nhwc-conv |
//!                                 #   skip-layer-norm | bias-add | bias-split-gelu
//! enable_fusions = ["packed-qkv"] # cuda, off by default: packed-qkv
//! weights = "link"                # copy | link
//! fix_shapes = "sample=2x4x64x64,encoder_hidden_states=2x77x768,timestep=2"
//! [attention]
//! mode = "flash"                  # keep | flash | onnx | linear
//! layers = "up_blocks.*"
//! feature_map = "elu1"            # linear attention: relu | elu1
//! [[lora]]
//! file = "style.safetensors"
//! scale = 0.8
//! [lora_options]
//! mode = "fuse"                   # fuse | adapter
//! strict = true
//! layers = "*attn*"               # adapter branches for these layers too
//! [tome]
//! ratio = 0.5
//! mode = "merge"                  # merge | todo
//! max_downsample = 1
//! sx = 2
//! sy = 2
//! attn = true
//! crossattn = false
//! mlp = false
//! static = "64x64"
//! rand = false
//! todo_factor = 2
//! todo_pool = "avg"               # avg | nearest
//! [hooks]
//! kinds = ["capture", "p2p"]      # capture | p2p | masactrl
//! layers = "*.attn2"
//! words = 77
//! ```
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::ValueEnum;
use clap::parser::ValueSource;
use serde::Deserialize;

use attune_passes::lower::CudaFusion;

use super::compile::CompileOptions;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    target: Option<String>,
    precision: Option<String>,
    keep_io_types: Option<bool>,
    disable_fusions: Option<Vec<String>>,
    enable_fusions: Option<Vec<String>>,
    pub weights: Option<String>,
    fix_shapes: Option<String>,
    attention: Option<Attention>,
    #[serde(default)]
    lora: Vec<Lora>,
    lora_options: Option<LoraOptions>,
    tome: Option<Tome>,
    hooks: Option<Hooks>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attention {
    mode: Option<String>,
    layers: Option<String>,
    feature_map: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Lora {
    file: PathBuf,
    #[serde(default = "one")]
    scale: f32,
}

fn one() -> f32 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoraOptions {
    mode: Option<String>,
    strict: Option<bool>,
    layers: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tome {
    ratio: Option<f32>,
    mode: Option<String>,
    max_downsample: Option<i64>,
    sx: Option<i64>,
    sy: Option<i64>,
    attn: Option<bool>,
    crossattn: Option<bool>,
    mlp: Option<bool>,
    #[serde(rename = "static")]
    static_hw: Option<String>,
    rand: Option<bool>,
    todo_factor: Option<i64>,
    todo_pool: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hooks {
    kinds: Option<Vec<String>>,
    layers: Option<String>,
    words: Option<i64>,
}

impl Recipe {
    pub fn read(path: &Path) -> anyhow::Result<(Recipe, PathBuf)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        let recipe: Recipe =
            toml::from_str(&text).map_err(|e| anyhow!("recipe {}: {e}", path.display()))?;
        Ok((
            recipe,
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        ))
    }

    /// Sets every option the recipe names and the command line did not (`given(id)`).
    pub fn apply(
        &self,
        dir: &Path,
        o: &mut CompileOptions,
        given: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        fn set<T>(given: &dyn Fn(&str) -> bool, id: &str, slot: &mut T, value: Option<T>) {
            if let Some(v) = value
                && !given(id)
            {
                *slot = v;
            }
        }
        fn choice<T: ValueEnum>(key: &str, v: &Option<String>) -> anyhow::Result<Option<T>> {
            v.as_deref()
                .map(|s| {
                    T::from_str(s, true).map_err(|_| {
                        let allowed: Vec<String> = T::value_variants()
                            .iter()
                            .filter_map(|v| v.to_possible_value())
                            .map(|p| p.get_name().to_string())
                            .collect();
                        anyhow!(
                            "recipe key `{key}`: '{s}' is not one of {}",
                            allowed.join(", ")
                        )
                    })
                })
                .transpose()
        }
        set(
            given,
            "target",
            &mut o.target,
            choice("target", &self.target)?,
        );
        set(
            given,
            "precision",
            &mut o.precision,
            choice("precision", &self.precision)?,
        );
        set(
            given,
            "keep_io_types",
            &mut o.keep_io_types,
            self.keep_io_types,
        );
        set(
            given,
            "fix_shapes",
            &mut o.fix_shapes,
            self.fix_shapes.clone().map(Some),
        );
        if let Some(a) = &self.attention {
            set(
                given,
                "attention",
                &mut o.attention,
                choice("attention.mode", &a.mode)?,
            );
            set(
                given,
                "attention_layers",
                &mut o.attention_layers,
                a.layers.clone().map(Some),
            );
            set(
                given,
                "linear_feature_map",
                &mut o.linear_feature_map,
                choice("attention.feature_map", &a.feature_map)?,
            );
        }
        if !self.lora.is_empty() {
            let files = self
                .lora
                .iter()
                .map(|l| format!("{}:{}", dir.join(&l.file).display(), l.scale))
                .collect();
            set(given, "loras", &mut o.loras, Some(files));
        }
        if let Some(l) = &self.lora_options {
            set(
                given,
                "lora_mode",
                &mut o.lora_mode,
                choice("lora_options.mode", &l.mode)?,
            );
            set(given, "lora_strict", &mut o.lora_strict, l.strict);
            set(
                given,
                "lora_layers",
                &mut o.lora_layers,
                l.layers.clone().map(Some),
            );
        }
        if let Some(t) = &self.tome {
            let m = &mut o.tome;
            set(given, "tome", &mut m.tome, t.ratio.map(Some));
            set(
                given,
                "tome_mode",
                &mut m.tome_mode,
                choice("tome.mode", &t.mode)?,
            );
            set(
                given,
                "tome_max_downsample",
                &mut m.tome_max_downsample,
                t.max_downsample,
            );
            set(given, "tome_sx", &mut m.tome_sx, t.sx);
            set(given, "tome_sy", &mut m.tome_sy, t.sy);
            set(given, "tome_attn", &mut m.tome_attn, t.attn);
            set(given, "tome_crossattn", &mut m.tome_crossattn, t.crossattn);
            set(given, "tome_mlp", &mut m.tome_mlp, t.mlp);
            set(
                given,
                "tome_static",
                &mut m.tome_static,
                t.static_hw.clone().map(Some),
            );
            set(given, "tome_rand", &mut m.tome_rand, t.rand);
            set(given, "todo_factor", &mut m.todo_factor, t.todo_factor);
            set(
                given,
                "todo_pool",
                &mut m.todo_pool,
                choice("tome.todo_pool", &t.todo_pool)?,
            );
        }
        fn choices<T: ValueEnum>(
            key: &str,
            v: &Option<Vec<String>>,
        ) -> anyhow::Result<Option<Vec<T>>> {
            v.as_ref()
                .map(|items| {
                    items
                        .iter()
                        .map(|k| choice(key, &Some(k.clone())).map(|v| v.expect("some")))
                        .collect()
                })
                .transpose()
        }
        let fusions = |key: &str, names: &Option<Vec<String>>| -> anyhow::Result<_> {
            names
                .as_ref()
                .map(|ns| {
                    ns.iter()
                        .map(|n| {
                            CudaFusion::parse(n).map_err(|e| anyhow!("recipe key `{key}`: {e}"))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .transpose()
        };
        set(
            given,
            "disable_fusions",
            &mut o.disable_fusions,
            fusions("disable_fusions", &self.disable_fusions)?,
        );
        set(
            given,
            "enable_fusions",
            &mut o.enable_fusions,
            fusions("enable_fusions", &self.enable_fusions)?,
        );
        if let Some(h) = &self.hooks {
            set(
                given,
                "hooks",
                &mut o.hooks,
                choices("hooks.kinds", &h.kinds)?,
            );
            set(
                given,
                "hooks_layers",
                &mut o.hooks_layers,
                h.layers.clone().map(Some),
            );
            set(given, "hooks_words", &mut o.hooks_words, h.words);
        }
        Ok(())
    }
}

/// Was the argument `id` given on the command line (not defaulted)?
pub fn given_on_command_line(matches: &clap::ArgMatches) -> impl Fn(&str) -> bool + '_ {
    move |id| {
        matches!(
            matches
                .try_get_raw(id)
                .ok()
                .flatten()
                .and(matches.value_source(id)),
            Some(ValueSource::CommandLine)
        )
    }
}
