//! The tiny SDXL pipeline (`models/pipelines/sdxl_tiny`, made by `models/export/pipelines.py`):
//! its second tokenizer, both text encoders as SDXL's pipeline uses them (penultimate hidden
//! states concatenated, the projection as pooled embeddings, force_zeros_for_empty_prompt),
//! its time ids and `attune generate`, against diffusers' `StableDiffusionXLPipeline`.
use std::path::{Path, PathBuf};

mod common;

use attune_runtime::HostTensor;
use attune_runtime::pipeline::{PromptEncoder, PromptEncoding, time_ids};
use attune_runtime::tokenizer::TextTokenizer;
use ndarray::Axis;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/pipelines/sdxl_tiny")
}

fn cases() -> serde_json::Value {
    let path = dir().join("reference/manifest.json");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    m["cases"].clone()
}

use common::{max_abs, read_f32};

/// tokenizer_2 pads with "!" (id 0), as SDXL's does; both tokenizers give transformers' ids.
#[test]
fn both_tokenizers_give_transformers_ids() {
    let cases = cases();
    let tokens = &cases["tokens"];
    let prompts = tokens["prompts"].as_object().unwrap();
    assert_eq!(tokens["pad_token_id"]["token_ids_2"], 0);
    for (folder, file) in [("tokenizer", "token_ids"), ("tokenizer_2", "token_ids_2")] {
        let HostTensor::I64(want) =
            attune_runtime::npy::read(&dir().join(format!("reference/tokens/{file}.npy"))).unwrap()
        else {
            panic!("token ids are int64")
        };
        assert_eq!(want.shape(), [prompts.len(), 77]);
        let t = TextTokenizer::from_dir(&dir().join(folder)).unwrap();
        // The reference's rows, in the order the script wrote them.
        let rows = [
            "plain",
            "unicode",
            "decomposed",
            "punctuation",
            "whitespace",
            "case",
            "long",
            "empty",
        ];
        for (row, case) in rows.into_iter().enumerate() {
            let got = t.encode(prompts[case].as_str().unwrap()).unwrap();
            let want: Vec<i64> = want.index_axis(Axis(0), row).iter().copied().collect();
            assert_eq!(got.ids, want, "{folder} {case}");
            assert_eq!(got.truncated, case == "long", "{folder} {case}");
        }
    }
}

/// Prompt embeddings (both encoders' penultimate layers), pooled embeddings and time ids as
/// diffusers' encode_prompt and _get_add_time_ids gave them: a negative prompt not given
/// (zeros) and "" (encoded).
#[test]
fn prompt_embeddings_pooled_and_time_ids_equal_diffusers() {
    let cases = cases();
    assert_eq!(
        PromptEncoding::of_class("StableDiffusionXLPipeline"),
        Some(PromptEncoding::StableDiffusionXl)
    );
    let mut encoder = PromptEncoder::open(
        &dir(),
        "StableDiffusionXLPipeline",
        &attune_runtime::pipeline::Sessions::cpu(),
    )
    .unwrap();
    for case in ["txt2img_a", "txt2img_b"] {
        let c = &cases[case];
        let refs = dir().join("reference").join(case);
        let negative = c["negative_prompt"].as_str();
        assert_eq!(negative.is_none(), case == "txt2img_a");
        let got = encoder
            .encode(&[c["prompt"].as_str().unwrap()], negative)
            .unwrap();
        let (pooled, negative_pooled) = got.pooled.as_ref().expect("SDXL has pooled embeddings");
        let pairs = [
            ("prompt_embeds", &got.cond),
            ("negative_prompt_embeds", &got.uncond),
            ("pooled_prompt_embeds", pooled),
            ("negative_pooled_prompt_embeds", negative_pooled),
        ];
        for (file, got) in pairs {
            let want = read_f32(&refs.join(format!("{file}.npy")));
            let d = max_abs(got, &want);
            assert!(d < 1e-4, "{case} {file}: {d} off");
            // A test that could not fail: zeros where diffusers gave zeros, and only there.
            let zero = want.iter().all(|&x| x == 0.0);
            assert_eq!(
                zero,
                case == "txt2img_a" && file.starts_with("negative"),
                "{case} {file}"
            );
        }
        assert_eq!(got.cond.shape(), [1, 77, 24]);
        assert!(got.time_ids);
        let want = read_f32(&refs.join("add_time_ids.npy"));
        let (h, w) = (
            c["height"].as_u64().unwrap() as usize,
            c["width"].as_u64().unwrap() as usize,
        );
        for row in want.outer_iter() {
            assert_eq!(
                row.iter().copied().collect::<Vec<f32>>(),
                time_ids(h, w),
                "{case}"
            );
        }
    }
}

/// An encoder export without the hidden states SDXL needs, a missing second encoder and a
/// class without a prompt encoding are refused naming them.
#[test]
fn what_sdxl_cannot_encode_with_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let sd15 = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/pipelines/sd15_tiny");
    for (from, to) in [
        (sd15.join("text_encoder"), "text_encoder"),
        (sd15.join("tokenizer"), "tokenizer"),
        (dir().join("text_encoder_2"), "text_encoder_2"),
        (dir().join("tokenizer_2"), "tokenizer_2"),
    ] {
        std::fs::create_dir_all(tmp.path().join(to)).unwrap();
        for f in std::fs::read_dir(&from).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, tmp.path().join(to).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(
        dir().join("model_index.json"),
        tmp.path().join("model_index.json"),
    )
    .unwrap();
    let mut encoder = PromptEncoder::open(
        tmp.path(),
        "StableDiffusionXLPipeline",
        &attune_runtime::pipeline::Sessions::cpu(),
    )
    .unwrap();
    let err = encoder.encode(&["a cat"], None).err().unwrap().to_string();
    assert!(
        err.contains("hidden_states") && err.contains("text_encoder/model.onnx"),
        "{err}"
    );
    std::fs::remove_dir_all(tmp.path().join("text_encoder_2")).unwrap();
    let err = PromptEncoder::open(
        tmp.path(),
        "StableDiffusionXLPipeline",
        &attune_runtime::pipeline::Sessions::cpu(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no text_encoder_2"), "{err}");
    let err = PromptEncoder::open(
        tmp.path(),
        "KandinskyPipeline",
        &attune_runtime::pipeline::Sessions::cpu(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("KandinskyPipeline"), "{err}");
}

/// `attune generate` on the SDXL folder from the reference's initial noise: diffusers' image
/// within 2/255 a pixel, with no negative prompt (zeros) and DDIM, "" and DDIM, and the
/// folder's own Euler scheduler.
#[test]
fn generate_gives_the_sdxl_pipelines_image() {
    let cases = cases();
    let out = tempfile::tempdir().unwrap();
    for case in ["txt2img_a", "txt2img_b", "txt2img_a_euler"] {
        let c = &cases[case];
        let refs = dir().join("reference").join(case);
        let png = out.path().join(format!("{case}.png"));
        let latents = refs.join("latents.npy");
        let mut args: Vec<String> = vec![
            "generate".into(),
            dir().to_str().unwrap().into(),
            "--prompt".into(),
            c["prompt"].as_str().unwrap().into(),
            "--steps".into(),
            c["steps"].to_string(),
            "--guidance".into(),
            c["guidance"].to_string(),
            "--latents".into(),
            latents.to_str().unwrap().into(),
            "-o".into(),
            png.to_str().unwrap().into(),
        ];
        if let Some(n) = c["negative_prompt"].as_str() {
            args.extend(["--negative-prompt".into(), n.into()]);
        }
        let sched = c["scheduler"].as_str().unwrap();
        if sched.starts_with("DDIM") {
            args.extend(["--scheduler".into(), "ddim".into()]);
        } else {
            assert!(sched.starts_with("EulerDiscrete"), "{sched}");
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = common::attune(&args);
        assert!(o.status.success(), "{case}: {}", common::stderr(&o));
        let want = read_f32(&refs.join("image.npy"));
        let worst = common::worst_pixel(&png, want.view());
        eprintln!("{case}: worst pixel {worst}/255");
        assert!(worst <= 2.0, "{case}: a pixel {worst}/255 off");
    }
}
