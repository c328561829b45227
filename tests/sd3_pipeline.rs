//! The tiny SD3 pipeline (`models/pipelines/sd3_tiny`, made by `models/export/pipelines.py`,
//! exported by optimum-onnx): its T5 tokenizer (`tokenizer_3/tokenizer.json`, 256 ids), the
//! three text encoders as `StableDiffusion3Pipeline` uses them (both CLIPs' penultimate hidden
//! states concatenated and zero-padded to T5's width, T5's after them; both projections as the
//! pooled embeddings) and `attune generate` with its transformer (`hidden_states` input) and
//! flow-matching scheduler, against diffusers.
use std::path::{Path, PathBuf};

mod common;

use attune_runtime::HostTensor;
use attune_runtime::pipeline::{PromptEncoder, PromptEncoding, SD3_T5_TOKENS, Sessions};
use attune_runtime::tokenizer::TextTokenizer;
use ndarray::Axis;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/pipelines/sd3_tiny")
}

fn cases() -> serde_json::Value {
    let path = dir().join("reference/manifest.json");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    m["cases"].clone()
}

/// The reference's prompt rows, in the order the script wrote them.
const ROWS: [&str; 9] = [
    "plain",
    "unicode",
    "decomposed",
    "punctuation",
    "whitespace",
    "case",
    "long",
    "empty",
    "longer",
];

/// All three tokenizers give transformers' ids: the CLIP ones at 77, T5 (`tokenizer.json`:
/// `</s>` appended, pad 0, no start token) at SD3's 256, the prompt longer than that cut with
/// `</s>` last.
#[test]
fn the_three_tokenizers_give_transformers_ids() {
    let cases = cases();
    let tokens = &cases["tokens"];
    let prompts = tokens["prompts"].as_object().unwrap();
    assert_eq!(prompts.keys().collect::<Vec<_>>().len(), ROWS.len());
    for (folder, file, len) in [
        ("tokenizer", "token_ids", 77),
        ("tokenizer_2", "token_ids_2", 77),
        ("tokenizer_3", "token_ids_3", SD3_T5_TOKENS),
    ] {
        let HostTensor::I64(want) =
            attune_runtime::npy::read(&dir().join(format!("reference/tokens/{file}.npy"))).unwrap()
        else {
            panic!("token ids are int64")
        };
        assert_eq!(want.shape(), [ROWS.len(), len]);
        let mut t = TextTokenizer::from_dir(&dir().join(folder)).unwrap();
        if folder == "tokenizer_3" {
            assert!(dir().join(folder).join("tokenizer.json").is_file());
            // The folder says 512; the pipeline pads and cuts to its max_sequence_length.
            assert_eq!(t.max_len, 512);
            t.max_len = SD3_T5_TOKENS;
        }
        for (row, case) in ROWS.into_iter().enumerate() {
            let got = t.encode(prompts[case].as_str().unwrap()).unwrap();
            let want: Vec<i64> = want.index_axis(Axis(0), row).iter().copied().collect();
            assert_eq!(got.ids, want, "{folder} {case}");
            let cut = if folder == "tokenizer_3" {
                case == "longer"
            } else {
                case == "long" || case == "longer"
            };
            assert_eq!(got.truncated, cut, "{folder} {case}");
        }
    }
    // T5's ids: "</s>" (1) closes each prompt, pads are 0, the longest is cut with "</s>" last.
    let HostTensor::I64(t5) =
        attune_runtime::npy::read(&dir().join("reference/tokens/token_ids_3.npy")).unwrap()
    else {
        panic!("token ids are int64")
    };
    let longer = t5.index_axis(Axis(0), ROWS.len() - 1);
    assert_eq!(longer[SD3_T5_TOKENS - 1], 1);
    assert!(longer.iter().all(|&i| i != 0));
    let empty = t5.index_axis(Axis(0), 7);
    assert_eq!(empty[0], 1);
    assert!(empty.iter().skip(1).all(|&i| i == 0));
}

/// Prompt embeddings [1, 77 + 256, 32] and pooled embeddings [1, 32] as diffusers'
/// `encode_prompt` gave them, for the prompt and the negative "".
#[test]
fn prompt_and_pooled_embeddings_equal_diffusers() {
    let cases = cases();
    assert_eq!(
        PromptEncoding::of_class("StableDiffusion3Pipeline"),
        Some(PromptEncoding::StableDiffusion3)
    );
    let mut encoder =
        PromptEncoder::open(&dir(), "StableDiffusion3Pipeline", &Sessions::cpu()).unwrap();
    for case in ["txt2img_a", "txt2img_b"] {
        let c = &cases[case];
        let refs = dir().join("reference").join(case);
        assert_eq!(c["negative_prompt"], "");
        // SD3 has no force_zeros: no negative prompt is "".
        for negative in [Some(""), None] {
            let got = encoder
                .encode(&[c["prompt"].as_str().unwrap()], negative)
                .unwrap();
            assert!(!got.time_ids);
            assert_eq!(got.cond.shape(), [1, 77 + SD3_T5_TOKENS, 32]);
            let (pooled, negative_pooled) = got.pooled.as_ref().expect("SD3 has pooled embeddings");
            let pairs = [
                ("prompt_embeds", &got.cond),
                ("negative_prompt_embeds", &got.uncond),
                ("pooled_prompt_embeds", pooled),
                ("negative_pooled_prompt_embeds", negative_pooled),
            ];
            for (file, got) in pairs {
                let want = common::read_f32(&refs.join(format!("{file}.npy")));
                let d = common::max_abs(got, &want);
                eprintln!("{case} {negative:?} {file}: max abs diff {d:e}");
                assert!(d < 1e-4, "{case} {file}: {d} off");
                assert!(want.iter().any(|&x| x != 0.0), "{case} {file}");
            }
            // The CLIP rows' padding (features 16..32) is zeros; T5's rows are not.
            let clip_pad = got.cond.slice(ndarray::s![.., ..77, 16..]);
            assert!(clip_pad.iter().all(|&x| x == 0.0));
            assert!(
                got.cond
                    .slice(ndarray::s![.., 77.., 16..])
                    .iter()
                    .any(|&x| x != 0.0)
            );
        }
    }
}

/// A folder without T5 (text_encoder_3), and a T5 tokenizer without (or with a broken)
/// tokenizer.json, are refused naming them.
#[test]
fn a_missing_t5_encoder_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"] {
        std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        for f in std::fs::read_dir(dir().join(sub)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, tmp.path().join(sub).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(
        dir().join("model_index.json"),
        tmp.path().join("model_index.json"),
    )
    .unwrap();
    let err = PromptEncoder::open(tmp.path(), "StableDiffusion3Pipeline", &Sessions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no text_encoder_3"), "{err}");
    // T5's slow tokenizer files alone (spiece.model, no tokenizer.json): refused naming the
    // folder and the file it needs.
    let t5 = tmp.path().join("tokenizer_3");
    std::fs::create_dir_all(&t5).unwrap();
    for f in [
        "spiece.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(dir().join("tokenizer_3").join(f), t5.join(f)).unwrap();
    }
    let err = TextTokenizer::from_dir(&t5).err().unwrap().to_string();
    assert!(
        err.contains("tokenizer_3") && err.contains("tokenizer.json"),
        "{err}"
    );
    std::fs::write(t5.join("tokenizer.json"), "{ not json").unwrap();
    let err = TextTokenizer::from_dir(&t5).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// `attune generate` on the SD3 folder from the reference's initial noise (4 steps of the
/// folder's FlowMatchEulerDiscreteScheduler, shift 3, guidance 7.5, negative ""): diffusers'
/// final latents within 1e-4 and its image within 2/255 a pixel.
#[test]
fn generate_gives_the_sd3_pipelines_image() {
    let cases = cases();
    let out = tempfile::tempdir().unwrap();
    for case in ["txt2img_a", "txt2img_b"] {
        let c = &cases[case];
        let refs = dir().join("reference").join(case);
        let png = out.path().join(format!("{case}.png"));
        let saved = out.path().join(format!("{case}.npy"));
        let latents = refs.join("latents.npy");
        let steps = c["steps"].to_string();
        let guidance = c["guidance"].to_string();
        let o = common::attune(&[
            "generate",
            dir().to_str().unwrap(),
            "--prompt",
            c["prompt"].as_str().unwrap(),
            "--negative-prompt",
            c["negative_prompt"].as_str().unwrap(),
            "--steps",
            &steps,
            "--guidance",
            &guidance,
            "--latents",
            latents.to_str().unwrap(),
            "--save-latents",
            saved.to_str().unwrap(),
            "-o",
            png.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{case}: {}", common::stderr(&o));
        let d = common::max_abs(
            &common::read_f32(&saved),
            &common::read_f32(&refs.join("final_latents.npy")),
        );
        eprintln!("{case}: final latents max abs diff {d:e}");
        assert!(d < 1e-4, "{case}: final latents {d} off");
        let want = common::read_f32(&refs.join("image.npy"));
        let worst = common::worst_pixel(&png, want.view());
        eprintln!("{case}: worst pixel {worst}/255");
        assert!(worst <= 2.0, "{case}: a pixel {worst}/255 off");
    }
}

/// Without --latents or a size, the image is StableDiffusion3Pipeline's default (the
/// transformer's sample_size 8 x the VAE's factor 2 = 16 px), seeded; a side that is not a
/// multiple of factor x patch_size (4 px) or has more patches than pos_embed_max_size (8: 32 px)
/// is refused naming the size and the config, and nothing is written.
#[test]
fn sizes_follow_the_transformers_config() {
    let out = tempfile::tempdir().unwrap();
    let d = dir();
    let png = out.path().join("seeded.png");
    let o = common::attune(&[
        "generate",
        d.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--quiet",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let img = attune_runtime::image::read_png(&png).unwrap();
    assert_eq!((img.height, img.width), (16, 16));
    let png = out.path().join("wide.png");
    let o = common::attune(&[
        "generate",
        d.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "24",
        "--quiet",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let img = attune_runtime::image::read_png(&png).unwrap();
    assert_eq!((img.height, img.width), (16, 24));
    for (h, w, says) in [("18", "16", "height 18 px"), ("16", "40", "width 40 px")] {
        let png = out.path().join(format!("bad_{h}_{w}.png"));
        let o = common::attune(&[
            "generate",
            d.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--height",
            h,
            "--width",
            w,
            "-o",
            png.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        let err = common::stderr(&o);
        assert!(
            err.contains(says) && err.contains("transformer/config.json"),
            "{err}"
        );
        assert!(!png.exists());
    }
}
