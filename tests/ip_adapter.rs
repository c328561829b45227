//! IP-Adapter: `compile --ip-adapter` and `generate --ip-image` against diffusers'
//! `load_ip_adapter` (models/export/ip_adapter.py).
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use attune_runtime::HostTensor;
use attune_runtime::compare::compare;
use common::*;

fn folder() -> PathBuf {
    root().join("models/pipelines/sd15_ip_tiny")
}

fn file(name: &str) -> PathBuf {
    root().join("models/ip_adapter").join(name)
}

fn manifest() -> serde_json::Value {
    let path = folder().join("reference/manifest.json");
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn compile_ip(out: &Path, ip_file: &str, attention: &str) -> String {
    let o = attune(&[
        "compile",
        folder().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--ip-adapter",
        file(ip_file).to_str().unwrap(),
        "--attention",
        attention,
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// `generate` on `dir` with a reference's prompt and noise; the final latents and the PNG.
fn generate(
    dir: &Path,
    latents: &Path,
    out: &Path,
    extra: &[String],
) -> (ndarray::ArrayD<f32>, PathBuf) {
    let mut args = vec!["--negative-prompt=".to_string()];
    args.extend(extra.iter().cloned());
    generate_from(
        dir,
        "a photo of an astronaut riding a horse on mars",
        latents,
        out,
        &args,
    )
}

#[test]
fn clip_preprocessing_matches_transformers() {
    let refs = folder().join("reference/ip_one");
    let image = attune_runtime::image::read_png(&refs.join("ip_image.png")).unwrap();
    let mean = [0.48145466, 0.4578275, 0.40821073];
    let std = [0.268_629_5, 0.261_302_6, 0.275_777_1];
    let got = attune_runtime::image::clip_pixels(
        &image,
        224,
        (224, 224),
        attune_runtime::image::Filter::Bicubic,
        mean,
        std,
    );
    let want = read_f32(&refs.join("pixel_values.npy"));
    assert!(max_abs(&want, &got) < 1e-5, "{}", max_abs(&want, &got));
}

#[test]
fn generate_with_an_image_prompt_gives_diffusers_ip_adapter_images() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest();
    for attention in ["keep", "flash"] {
        // The plain IP-Adapter (scale 0.6; layer-wise scales), Plus (a Resampler) and Full Face
        // (an MLP) projections.
        for (case, c) in m["cases"].as_object().unwrap() {
            let ip_file = c["ip_adapter"].as_str().unwrap();
            let compiled = dir.path().join(format!("{attention}-{ip_file}"));
            if !compiled.exists() {
                let report = compile_ip(&compiled, ip_file, attention);
                // Four cross-attention sites, numbered as diffusers numbers its processors.
                for (n, site) in [
                    (1, "down_blocks.0.attentions.0.transformer_blocks.0.attn2"),
                    (7, "mid_block.attentions.0.transformer_blocks.0.attn2"),
                ] {
                    assert!(
                        report.contains(&format!("{site} (cross): ip_adapter.{n}")),
                        "{report}"
                    );
                }
                for carried in [
                    "image_proj/model.onnx",
                    "image_encoder/model.onnx",
                    "feature_extractor/preprocessor_config.json",
                ] {
                    assert!(compiled.join(carried).is_file(), "{carried} missing");
                }
            }
            let refs = folder().join("reference").join(case);
            let mut flags = vec![format!(
                "--ip-image={}",
                refs.join("ip_image.png").display()
            )];
            for (path, scale) in c["scales"].as_object().unwrap() {
                flags.push(format!("--ip-scale={path}={}", scale.as_f64().unwrap()));
            }
            let out = dir.path().join(format!("{attention}-{case}"));
            let (latents, png) = generate(&compiled, &refs.join("latents.npy"), &out, &flags);
            assert_like_reference(&refs, latents, &png, 1e-4, &format!("{attention} {case}"));
        }
    }
    // Without an image prompt: the UNet without its IP-Adapter (sd15_tiny's own reference).
    let compiled = dir.path().join("keep-ip-adapter_tiny.safetensors");
    let tiny = root().join("models/pipelines/sd15_tiny/reference/txt2img_a");
    let (latents, _) = generate(
        &compiled,
        &tiny.join("latents.npy"),
        &dir.path().join("none"),
        &[],
    );
    let want = read_f32(&tiny.join("final_latents.npy"));
    assert_rel_l2(want, latents, 1e-4, "no image prompt");
}

#[test]
fn ip_adapter_requests_that_cannot_work_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let refuse = assert_refused;
    let out = dir.path().join("out");
    let f = folder();
    // A file for another cross-attention width: the file, the key and both widths named.
    let wide = file("ip-adapter_wide.safetensors");
    refuse(
        &[
            "compile",
            f.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--ip-adapter",
            wide.to_str().unwrap(),
        ],
        &[
            "ip-adapter_wide.safetensors",
            "ip_adapter.1.to_k_ip.weight",
            "24",
            "16",
        ],
    );
    assert!(!out.exists());
    // A .bin that is not a torch.save zip.
    let bin = dir.path().join("ip-adapter_sd15.bin");
    fs::write(&bin, b"PK").unwrap();
    refuse(
        &[
            "compile",
            f.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--ip-adapter",
            bin.to_str().unwrap(),
        ],
        &["ip-adapter_sd15.bin", "not a torch.save zip file"],
    );
    assert!(!out.exists());
    // An image prompt for a UNet without an IP-Adapter.
    let image = f.join("reference/ip_one/ip_image.png");
    let png = dir.path().join("x.png");
    refuse(
        &[
            "generate",
            f.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--ip-image",
            image.to_str().unwrap(),
            "-o",
            png.to_str().unwrap(),
        ],
        &["--ip-image", "compile it with --ip-adapter"],
    );
    // A layer-wise scale whose glob matches no site.
    let compiled = dir.path().join("ip");
    compile_ip(&compiled, "ip-adapter_tiny.safetensors", "keep");
    refuse(
        &[
            "generate",
            compiled.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--ip-image",
            image.to_str().unwrap(),
            "--ip-scale",
            "nowhere.*=0.5",
            "-o",
            png.to_str().unwrap(),
        ],
        &["--ip-scale nowhere.*=0.5", "matches no IP-Adapter site"],
    );
    // An image prompt that cannot be read.
    let broken = dir.path().join("broken.png");
    fs::write(&broken, b"nope").unwrap();
    refuse(
        &[
            "generate",
            compiled.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--ip-image",
            broken.to_str().unwrap(),
            "-o",
            png.to_str().unwrap(),
        ],
        &["broken.png"],
    );
    assert!(!png.exists());
}

#[test]
fn ip_adapter_attention_in_fp16_for_the_cuda_target_runs_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let unet = folder().join("unet/model.onnx");
    let ip = file("ip-adapter_tiny.safetensors");
    let ip = ip.to_str().unwrap();
    let (fp32, _) = compile_into(dir.path(), &unet, &["--ip-adapter", ip]);
    let (lowered, report) = compile_into(
        dir.path(),
        &unet,
        &[
            "--ip-adapter",
            ip,
            "--target",
            "cuda",
            "--precision",
            "fp16",
            "--attention",
            "flash",
            "--keep-io-types",
        ],
    );
    assert!(report.contains("ip-adapter: 4 rewritten"), "{report}");
    let runnable = dir.path().join("runnable.onnx");
    with_cuda_ops_in_standard_ops(&lowered, &runnable);
    let inputs = dir.path().join("inputs");
    fs::create_dir_all(&inputs).unwrap();
    let write = |name: &str, t: HostTensor| {
        attune_runtime::npy::write(&inputs.join(format!("{name}.npy")), &t).unwrap()
    };
    write("sample", wave(&[2, 4, 8, 8], 0.37));
    write(
        "timestep",
        HostTensor::F32(ndarray::arr0(501f32).into_dyn()),
    );
    write("encoder_hidden_states", wave(&[2, 77, 16], 0.11));
    write("ip_tokens", wave(&[2, 4, 16], 0.23));
    let want = run_unet(&fp32, &inputs, &[]);
    let got = run_unet(&runnable, &inputs, &[]);
    let c = compare("out_sample", &want, &got).unwrap();
    assert!(c.rel_l2 <= 5e-3, "fp16 cuda-lowered: {c:?}");
    // The image tokens matter (a branch that did nothing could not pass the comparison).
    let plain = run_unet(&unet, &inputs, &[]);
    let moved = compare("out_sample", &want, &plain).unwrap();
    assert!(moved.rel_l2 > 1e-3, "{moved:?}");
}

#[test]
fn published_bin_files_read_as_their_safetensors() {
    // torch.save of {"image_proj": {...}, "ip_adapter": {...}}, as the hub's .bin files: the
    // Plus reference, through the pickle reader.
    let dir = tempfile::tempdir().unwrap();
    let compiled = dir.path().join("bin");
    compile_ip(&compiled, "ip-adapter-plus_tiny.bin", "keep");
    let refs = folder().join("reference/plus_one");
    let flags = vec![
        format!("--ip-image={}", refs.join("ip_image.png").display()),
        "--ip-scale=0.7".to_string(),
    ];
    let (latents, png) = generate(
        &compiled,
        &refs.join("latents.npy"),
        &dir.path().join("plus"),
        &flags,
    );
    assert_like_reference(&refs, latents, &png, 1e-4, "plus from .bin");
}

#[test]
fn sdxl_ip_adapters_follow_diffusers_processor_numbering() {
    // sdxl_tiny's 8 cross-attention sites (two transformer layers per attention), numbered
    // over its processors as diffusers numbers them.
    let dir = tempfile::tempdir().unwrap();
    let sdxl = root().join("models/pipelines/sdxl_ip_tiny");
    let compiled = dir.path().join("ip");
    let o = attune(&[
        "compile",
        sdxl.to_str().unwrap(),
        "-o",
        compiled.to_str().unwrap(),
        "--ip-adapter",
        file("ip-adapter_sdxl_tiny.safetensors").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("ip-adapter: 8 rewritten"),
        "{}",
        stdout(&o)
    );
    let refs = sdxl.join("reference/ip_one");
    let flags = vec![
        format!("--ip-image={}", refs.join("ip_image.png").display()),
        "--ip-scale=0.6".to_string(),
    ];
    let (latents, png) = generate_from(
        &compiled,
        "a photo of an astronaut riding a horse on mars",
        &refs.join("latents.npy"),
        &dir.path().join("out"),
        &flags,
    );
    assert_like_reference(&refs, latents, &png, 1e-4, "sdxl ip_one");
}
