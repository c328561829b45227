//! img2img and inpainting in `attune generate`, against diffusers' StableDiffusionImg2ImgPipeline
//! and StableDiffusionInpaintPipeline on the tiny pipelines (`models/pipelines/*/reference/
//! {img2img,inpaint}`, made by `models/export/pipelines.py`), and the inputs it refuses.
use std::path::{Path, PathBuf};

mod common;

use attune_runtime::HostTensor;
use ndarray::ArrayD;

fn pipeline(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/pipelines")
        .join(name)
}

fn case(name: &str, case: &str) -> serde_json::Value {
    let path = pipeline(name).join("reference/manifest.json");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    m["cases"][case].clone()
}

use common::{max_abs, read_f32};

/// The VAE encoder's mean of the input image, of the image with the repainted part black, and
/// the mask at the latents' size: what diffusers computed.
#[test]
fn the_vae_encoder_and_the_mask_give_the_references_latents() {
    use attune_runtime::image::{read_png, resize_nearest, to_mask, to_tensor};
    use attune_runtime::pipeline::VaeEncoder;
    for name in ["sd15_tiny", "sd15_inpaint_tiny"] {
        let dir = pipeline(name);
        let refs = dir.join("reference/inpaint");
        let mut vae = VaeEncoder::open(&dir, &attune_runtime::pipeline::Sessions::cpu()).unwrap();
        assert_eq!(vae.scaling_factor, 0.18215);
        let HostTensor::F32(pixels) = to_tensor(&read_png(&refs.join("input.png")).unwrap()) else {
            panic!()
        };
        let got = vae.encode(&pixels).unwrap();
        let d = max_abs(&got, &read_f32(&refs.join("image_latents.npy")));
        assert!(d < 1e-5, "{name}: image latents {d} off");
        let HostTensor::F32(mask) = to_mask(&read_png(&refs.join("mask.png")).unwrap()) else {
            panic!()
        };
        let small = resize_nearest(&mask, got.shape()[2], got.shape()[3]);
        assert_eq!(small, read_f32(&refs.join("mask.npy")), "{name}: mask");
        let masked = &pixels * &mask.mapv(|m| 1.0 - m);
        let got = vae.encode(&masked).unwrap();
        let d = max_abs(&got, &read_f32(&refs.join("masked_image_latents.npy")));
        assert!(d < 1e-5, "{name}: masked image latents {d} off");
    }
}

/// The timesteps of the progress lines (`step k/n [...] t=T ...`) on stderr, checked to count
/// 1..=n.
fn progress_timesteps(stderr: &str) -> Vec<i64> {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("step ")).collect();
    let n = lines.len();
    lines
        .iter()
        .enumerate()
        .map(|(k, l)| {
            assert!(l.starts_with(&format!("step {}/{n} ", k + 1)), "{l}");
            assert!(l.ends_with(" s/step"), "{l}");
            let t = l.split(" t=").nth(1).unwrap().split(' ').next().unwrap();
            t.parse().unwrap()
        })
        .collect()
}

/// img2img (strength 0.75: 3 of 4 steps), inpainting with a plain UNet (latents blended after
/// every step) and with a 9-channel inpainting UNet, from the references' noise: diffusers'
/// images within 2/255 a pixel, its final latents, and its timesteps.
#[test]
fn img2img_and_inpainting_give_the_diffusers_pipelines_images() {
    let out = tempfile::tempdir().unwrap();
    for (name, which) in [
        ("sd15_tiny", "img2img"),
        ("sd15_tiny", "inpaint"),
        ("sd15_inpaint_tiny", "inpaint"),
    ] {
        let dir = pipeline(name);
        let c = case(name, which);
        let refs = dir.join("reference").join(which);
        let path = |f: &str| refs.join(f).to_str().unwrap().to_string();
        let png = out.path().join(format!("{name}_{which}.png"));
        let npy = out.path().join(format!("{name}_{which}.npy"));
        let steps = c["steps"].as_u64().unwrap().to_string();
        let guidance = c["guidance"].as_f64().unwrap().to_string();
        let strength = c["strength"].as_f64().unwrap().to_string();
        let mut args = vec![
            "generate".to_string(),
            dir.to_str().unwrap().into(),
            "--prompt".into(),
            c["prompt"].as_str().unwrap().into(),
            "--negative-prompt".into(),
            c["negative_prompt"].as_str().unwrap().into(),
            "--steps".into(),
            steps,
            "--guidance".into(),
            guidance,
            "--image".into(),
            path("input.png"),
            "--strength".into(),
            strength,
            "--latents".into(),
            path("latents.npy"),
            "--save-latents".into(),
            npy.to_str().unwrap().into(),
            "-o".into(),
            png.to_str().unwrap().into(),
        ];
        if which == "inpaint" {
            args.extend(["--mask".into(), path("mask.png")]);
        }
        args.extend(
            common::reference_scheduler(&dir)
                .into_iter()
                .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = common::attune(&args);
        let err = common::stderr(&o);
        assert!(o.status.success(), "{name} {which}: {err}");
        let HostTensor::I64(want) = attune_runtime::npy::read(&refs.join("timesteps.npy")).unwrap()
        else {
            panic!("timesteps are int64")
        };
        let want: Vec<i64> = want.iter().copied().collect();
        assert_eq!(progress_timesteps(&err), want, "{name} {which}: {err}");
        if let Some(run) = c["steps_run"].as_u64() {
            assert_eq!(want.len() as u64, run);
        }
        let d = max_abs(&read_f32(&npy), &read_f32(&refs.join("final_latents.npy")));
        assert!(d < 1e-4, "{name} {which}: final latents {d} off");
        let want = read_f32(&refs.join("image.npy"));
        let worst = common::worst_pixel(&png, want.view());
        println!("{name} {which}: final latents {d:e} off, worst pixel {worst}/255");
        assert!(worst <= 2.0, "{name} {which}: a pixel {worst}/255 off");
    }
}

/// Bad inputs: each refused naming the file or flag, nothing written.
#[test]
fn img2img_refuses_bad_inputs_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let sd = pipeline("sd15_tiny");
    let refs = sd.join("reference/inpaint");
    let png = t.join("out.png");
    let npy = t.join("out.npy");
    let write = |name: &str, w: usize, h: usize| {
        let path = t.join(name);
        let image = attune_runtime::image::Rgb {
            width: w,
            height: h,
            pixels: vec![200; w * h * 3],
        };
        attune_runtime::image::write_png(&path, &image).unwrap();
        path.to_str().unwrap().to_string()
    };
    let odd = write("odd.png", 15, 15);
    let small_mask = write("small_mask.png", 8, 8);
    let input = refs.join("input.png").to_str().unwrap().to_string();
    // The reference's mask is a grayscale (L) PNG: a mask, not an image.
    let mask = refs.join("mask.png").to_str().unwrap().to_string();
    // A folder like sd15_tiny without its VAE encoder (the other components linked).
    let no_encoder = t.join("no_vae_encoder");
    std::fs::create_dir(&no_encoder).unwrap();
    for entry in std::fs::read_dir(&sd).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "vae_encoder" {
            std::os::unix::fs::symlink(entry.path(), no_encoder.join(entry.file_name())).unwrap();
        }
    }
    let run = |dir: &Path, extra: &[&str], wants: &[&str]| {
        let mut args = vec![
            "generate",
            dir.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "4",
            "-o",
            png.to_str().unwrap(),
        ];
        if !extra.contains(&"--save-latents") {
            args.extend(["--save-latents", npy.to_str().unwrap()]);
        }
        args.extend(extra);
        let o = common::attune(&args);
        let err = common::stderr(&o);
        assert!(!o.status.success(), "{extra:?} ran");
        for w in wants {
            assert!(err.contains(w), "{extra:?}: {err}");
        }
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        assert!(!png.exists() && !npy.exists(), "{extra:?} wrote");
    };
    run(&sd, &["--image", &odd], &["--image", "odd.png", "15x15"]);
    run(&sd, &["--image", &mask], &["--image", "mask.png", "mode L"]);
    run(
        &sd,
        &["--image", &input, "--mask", &small_mask],
        &["--mask", "small_mask.png", "input.png", "same size"],
    );
    run(&sd, &["--mask", &mask], &["--image"]);
    run(&sd, &["--strength", "0.5"], &["--image"]);
    for s in ["1.5", "-0.1", "NaN"] {
        run(
            &sd,
            &["--image", &input, &format!("--strength={s}")],
            &["--strength", "[0, 1]"],
        );
    }
    run(
        &sd,
        &["--image", &input, "--strength", "0.2"],
        &["--strength 0.2", "0 of the 4 steps"],
    );
    run(&no_encoder, &["--image", &input], &["no vae_encoder"]);
    // The inpainting pipeline needs its mask.
    run(
        &pipeline("sd15_inpaint_tiny"),
        &["--image", &input],
        &["model_index.json", "--mask"],
    );
    // An output over an input.
    run(
        &sd,
        &["--image", &input, "--save-latents", &input],
        &["input.png"],
    );
    assert!(refs.join("input.png").is_file());
}

/// A `vae_encoder/model.onnx` in `dir` passing its `sample` input through to `output`.
fn passthrough_encoder(dir: &Path, output: &str) {
    use attune_compiler::onnx;
    use prost::Message;
    let graph = onnx::GraphProto {
        name: "g".into(),
        input: vec![onnx::tensor_info("sample", onnx::DataType::Float, None)],
        output: vec![onnx::tensor_info(output, onnx::DataType::Float, None)],
        node: vec![onnx::NodeProto {
            input: vec!["sample".into()],
            output: vec![output.into()],
            name: "/id/Identity".into(),
            op_type: "Identity".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    std::fs::create_dir_all(dir.join("vae_encoder")).unwrap();
    std::fs::write(
        dir.join("vae_encoder/model.onnx"),
        common::model_of(graph).encode_to_vec(),
    )
    .unwrap();
}

/// Optimum's `latent_parameters` give their first half of channels (the mean); older exports'
/// `latent_sample` is taken as it is (flagged as a draw); both scaled and shifted as the config
/// says; other outputs are refused naming the file.
#[test]
fn the_vae_encoder_takes_the_mean_or_the_sample_the_export_has() {
    use attune_runtime::pipeline::VaeEncoder;
    let x = ArrayD::from_shape_vec(
        ndarray::IxDyn(&[1, 4, 1, 2]),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
    )
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    passthrough_encoder(t.path(), "latent_parameters");
    let mut vae = VaeEncoder::open(t.path(), &attune_runtime::pipeline::Sessions::cpu()).unwrap();
    assert!(!vae.draws);
    let got = vae.encode(&x).unwrap();
    assert_eq!(got.shape(), [1, 2, 1, 2]);
    let want: Vec<f32> = [1.0, 2.0, 3.0, 4.0].iter().map(|v| v * 0.18215).collect();
    assert_eq!(got.iter().copied().collect::<Vec<_>>(), want);

    let t = tempfile::tempdir().unwrap();
    passthrough_encoder(t.path(), "latent_sample");
    std::fs::write(
        t.path().join("vae_encoder/config.json"),
        r#"{"scaling_factor": 2.0, "shift_factor": 0.5}"#,
    )
    .unwrap();
    let mut vae = VaeEncoder::open(t.path(), &attune_runtime::pipeline::Sessions::cpu()).unwrap();
    assert!(vae.draws);
    let got = vae.encode(&x).unwrap();
    let want: Vec<f32> = x.iter().map(|v| (v - 0.5) * 2.0).collect();
    assert_eq!(got.iter().copied().collect::<Vec<_>>(), want);

    let t = tempfile::tempdir().unwrap();
    passthrough_encoder(t.path(), "posterior");
    let mut vae = VaeEncoder::open(t.path(), &attune_runtime::pipeline::Sessions::cpu()).unwrap();
    let err = vae.encode(&x).unwrap_err().to_string();
    assert!(
        err.contains("vae_encoder/model.onnx") && err.contains("posterior"),
        "{err}"
    );
}

/// Two copies of the reference's prompt from its one noise (broadcast): each image is the
/// reference's (the batch rows of the image latents, the mask and the masked image line up
/// with the guidance batch's).
#[test]
fn a_batch_of_prompts_inpaints_each_as_the_single_one() {
    let out = tempfile::tempdir().unwrap();
    for name in ["sd15_tiny", "sd15_inpaint_tiny"] {
        let dir = pipeline(name);
        let c = case(name, "inpaint");
        let refs = dir.join("reference/inpaint");
        let path = |f: &str| refs.join(f).to_str().unwrap().to_string();
        let png = out.path().join(format!("{name}.png"));
        let prompt = c["prompt"].as_str().unwrap();
        let (input, mask, latents) = (path("input.png"), path("mask.png"), path("latents.npy"));
        let o = common::attune(&[
            "generate",
            dir.to_str().unwrap(),
            "--prompt",
            prompt,
            "--prompt",
            prompt,
            "--steps",
            "4",
            "--image",
            &input,
            "--mask",
            &mask,
            "--latents",
            &latents,
            "--scheduler",
            "ddim",
            "-o",
            png.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{name}: {}", common::stderr(&o));
        let want = read_f32(&refs.join("image.npy"));
        for k in 0..2 {
            let got = attune_runtime::image::read_png(&out.path().join(format!("{name}-{k}.png")))
                .unwrap();
            let worst = got
                .pixels
                .iter()
                .zip(want.iter())
                .map(|(&g, &w)| (f32::from(g) - w * 255.0).abs())
                .fold(0.0, f32::max);
            assert!(worst <= 2.0, "{name} image {k}: a pixel {worst}/255 off");
        }
    }
}
