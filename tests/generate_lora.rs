//! `attune generate --lora` and `--adapter`: a LoRA fused for the run is the folder compiled
//! with it (the same PNG bytes); on a UNet compiled with adapter branches, the LoRA computed
//! at run time is its adapter file.
use std::path::{Path, PathBuf};

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Generates from `dir` with the reference's noise; the PNG's bytes and stderr.
fn generate(dir: &Path, out: &Path, extra: &[&str]) -> (Vec<u8>, String) {
    let latents = root().join("models/pipelines/sd15_tiny/reference/txt2img_a/latents.npy");
    let mut args = vec![
        "generate",
        dir.to_str().unwrap(),
        "--prompt",
        "a photo of a cat",
        "--steps",
        "3",
        "--latents",
        latents.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = common::attune(&args);
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    (std::fs::read(out).unwrap(), err)
}

fn compile(dir: &Path, out: &Path, flags: &[&str]) -> String {
    let mut args = vec![
        "compile",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(flags);
    let o = common::attune(&args);
    let text = common::stdout(&o);
    assert!(o.status.success(), "{text}{}", common::stderr(&o));
    text
}

#[test]
fn a_lora_fused_for_the_run_is_the_folder_compiled_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = root().join("models/pipelines/sd15_tiny");
    let lora = root().join("models/loras/text_encoder/peft_mixed.safetensors");
    let spec = format!("{}:0.5", lora.display());
    let (plain, _) = generate(&dir, &tmp.path().join("plain.png"), &[]);
    let (fused, err) = generate(&dir, &tmp.path().join("fused.png"), &["--lora", &spec]);
    // Both the UNet's and the text encoder's layers (peft_mixed has 32 and 12).
    assert!(err.contains("LoRA fused for this run"), "{err}");
    assert!(
        err.contains("text_encoder 12") && err.contains("unet 32"),
        "{err}"
    );
    assert_ne!(plain, fused, "the LoRA changes the image");
    let compiled = tmp.path().join("compiled");
    compile(&dir, &compiled, &["--lora", &spec]);
    let (want, _) = generate(&compiled, &tmp.path().join("want.png"), &[]);
    assert_eq!(fused, want);
    // The input folder is untouched and no temporary folder is left in it.
    assert!(!dir.join("pipeline").exists());
}

#[test]
fn a_lora_on_adapter_branches_is_its_adapter_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = root().join("models/pipelines/sd15_tiny");
    let lora = root().join("models/loras/text_encoder/peft_mixed.safetensors");
    let branched = tmp.path().join("branched");
    compile(
        &dir,
        &branched,
        &["--lora-mode", "adapter", "--lora", lora.to_str().unwrap()],
    );
    let adapter = std::fs::read_dir(branched.join("unet"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".adapter.safetensors"))
        .expect("the UNet's adapter file");
    let (base, _) = generate(&branched, &tmp.path().join("base.png"), &[]);
    let (run_time, err) = generate(
        &branched,
        &tmp.path().join("lora.png"),
        &["--lora", lora.to_str().unwrap()],
    );
    assert!(err.contains("LoRA at run time: 32 layers"), "{err}");
    let (file, _) = generate(
        &branched,
        &tmp.path().join("file.png"),
        &["--adapter", adapter.to_str().unwrap()],
    );
    assert_eq!(run_time, file);
    assert_ne!(base, run_time, "the adapter changes the image");

    // An adapter for another graph names the input it lacks; nothing is written.
    let wrong = common::write_f32_safetensors(
        tmp.path(),
        "wrong",
        &[(
            "lora.mid_block.nothing.down".into(),
            vec![4, 1],
            vec![0.0; 4],
        )],
    );
    let png = tmp.path().join("never.png");
    let latents = root().join("models/pipelines/sd15_tiny/reference/txt2img_a/latents.npy");
    let o = common::attune(&[
        "generate",
        branched.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--latents",
        latents.to_str().unwrap(),
        "--adapter",
        wrong.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no input 'lora.mid_block.nothing.down'"),
        "{err}"
    );
    assert!(!png.exists());
}
