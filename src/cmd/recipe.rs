//! Recipes: a whole conversion in one reviewable TOML file (`compile --recipe FILE`), read as
//! the same `attune_passes::pipeline::Options` the flags fill (its field names are the keys).
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
//! canonical = true                # the canonical form only (with no other pass)
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
use std::path::Path;

use anyhow::anyhow;
use clap::parser::ValueSource;

use attune_passes::pipeline::Options;

/// The recipe's options with every flag given on the command line put over them. An option's
/// clap id is its path in the recipe (`attention.mode`), so this needs no per-option code.
pub fn merge(
    recipe: Options,
    cli: &Options,
    matches: &clap::ArgMatches,
) -> anyhow::Result<Options> {
    let mut merged = serde_json::to_value(recipe)?;
    let given = serde_json::to_value(cli)?;
    let command = <Options as clap::Args>::augment_args(clap::Command::new("attune"));
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if !given_on_command_line(matches, id) {
            continue;
        }
        let pointer = format!("/{}", id.replace('.', "/"));
        let value = given
            .pointer(&pointer)
            .ok_or_else(|| anyhow!("option {id} has no recipe key"))?;
        *merged
            .pointer_mut(&pointer)
            .ok_or_else(|| anyhow!("option {id} has no recipe key"))? = value.clone();
    }
    Ok(serde_json::from_value::<Options>(merged)?)
}

/// A recipe key holding a non-finite number (`ratio = nan`), refused naming the key and file:
/// merging goes through JSON, where NaN would silently become "not set".
pub fn check_finite(recipe: &Options, path: &Path) -> anyhow::Result<()> {
    fn walk(v: &toml::Value, key: &str) -> Option<(String, f64)> {
        match v {
            toml::Value::Float(f) if !f.is_finite() => Some((key.to_string(), *f)),
            toml::Value::Table(t) => t.iter().find_map(|(k, v)| {
                let key = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                walk(v, &key)
            }),
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, &format!("{key}[{i}]"))),
            _ => None,
        }
    }
    let value = toml::Value::try_from(recipe)?;
    match walk(&value, "") {
        Some((key, f)) => Err(anyhow!(
            "recipe {}: key '{key}' is {f}, must be a finite number",
            path.display()
        )),
        None => Ok(()),
    }
}

/// An option error that starts with a flag (`--tome NaN: ...`) whose value came from the
/// recipe, said with the recipe's key and file instead (`recipe r.toml: key 'tome.ratio': ...`);
/// `None` where the flag was given on the command line or the message names no flag.
pub fn name_key(msg: &str, recipe: &Path, matches: &clap::ArgMatches) -> Option<String> {
    let flag = msg.strip_prefix("--")?.split([' ', ':', '=']).next()?;
    let command = <Options as clap::Args>::augment_args(clap::Command::new("attune"));
    let arg = command
        .get_arguments()
        .find(|a| a.get_long() == Some(flag))?;
    let id = arg.get_id().as_str();
    if given_on_command_line(matches, id) {
        return None;
    }
    let rest = msg.split_once(": ").map_or(msg, |(_, r)| r);
    Some(format!("recipe {}: key '{id}': {rest}", recipe.display()))
}

/// Was the argument `id` given on the command line (not defaulted)?
fn given_on_command_line(matches: &clap::ArgMatches, id: &str) -> bool {
    matches!(
        matches
            .try_get_raw(id)
            .ok()
            .flatten()
            .and(matches.value_source(id)),
        Some(ValueSource::CommandLine)
    )
}
