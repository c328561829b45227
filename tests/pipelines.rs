//! Whole pipelines (`models/pipelines/`, made by `models/export/pipelines.py`): what a folder's
//! components are given, compared with the diffusers pipeline's own references.
use std::path::{Path, PathBuf};

mod common;

use attune_runtime::HostTensor;
use attune_runtime::tokenizer::TextTokenizer;

fn pipeline(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/pipelines")
        .join(name)
}

fn manifest(name: &str) -> serde_json::Value {
    let path = pipeline(name).join("reference/manifest.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn clip_token_ids_equal_transformers_on_every_prompt() {
    let dir = pipeline("sd15_tiny");
    let m = manifest("sd15_tiny");
    let prompts = m["cases"]["tokens"]["prompts"].as_object().unwrap();
    let HostTensor::I64(want) =
        attune_runtime::npy::read(&dir.join("reference/tokens/token_ids.npy")).unwrap()
    else {
        panic!("token ids are int64")
    };
    assert_eq!(want.shape(), [prompts.len(), 77]);
    let t = TextTokenizer::from_dir(&dir.join("tokenizer")).unwrap();
    assert_eq!(t.max_len, 77);
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
        let prompt = prompts[case].as_str().unwrap();
        let got = t.encode(prompt).unwrap();
        let want: Vec<i64> = want
            .index_axis(ndarray::Axis(0), row)
            .iter()
            .copied()
            .collect();
        assert_eq!(got.ids, want, "{case}: {prompt}");
        assert_eq!(got.truncated, case == "long", "{case}");
    }
    // Unicode, control characters and a literal marker, against transformers' CLIPTokenizer
    // (ids printed by `CLIPTokenizer.from_pretrained(dir)(p).input_ids`).
    let cases: [(&str, &[i64]); 3] = [
        (
            "東京の夜景",
            &[48338, 21078, 105, 21575, 23170, 250, 48132, 363],
        ),
        (
            "tab\tand\0control\x07chars",
            &[14724, 537, 444, 3366, 451, 540, 864],
        ),
        ("<|startoftext|> literal", &[49406, 24269]),
    ];
    for (prompt, ids) in cases {
        let got = t.encode(prompt).unwrap().ids;
        assert_eq!(&got[1..=ids.len()], ids, "{prompt:?}");
        assert_eq!(got[0], 49406);
        assert!(
            got[ids.len() + 1..].iter().all(|&i| i == 49407),
            "{prompt:?}"
        );
    }
}

#[test]
fn a_folder_without_a_tokenizer_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = TextTokenizer::from_dir(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("vocab.json") && err.contains(&*dir.path().to_string_lossy()),
        "{err}"
    );
    let src = pipeline("sd15_tiny").join("tokenizer");
    for f in [
        "vocab.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\nnot a merge line at all\n",
    )
    .unwrap();
    let err = TextTokenizer::from_dir(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("do not parse"), "{err}");
}

use common::{max_abs, read_f32};

#[test]
fn the_text_encoder_and_the_vae_give_what_the_diffusers_pipeline_gave() {
    use attune_runtime::pipeline::{TextEncoder, VaeDecoder};
    let dir = pipeline("sd15_tiny");
    let cases = manifest("sd15_tiny")["cases"].clone();
    let mut encoder = TextEncoder::open(
        &dir,
        "text_encoder",
        "tokenizer",
        &attune_runtime::pipeline::Sessions::cpu(),
    )
    .unwrap();
    let mut vae = VaeDecoder::open(&dir, &attune_runtime::pipeline::Sessions::cpu()).unwrap();
    assert_eq!(vae.scaling_factor, 0.18215);
    for case in ["txt2img_a", "txt2img_b"] {
        let refs = dir.join("reference").join(case);
        let prompt = cases[case]["prompt"].as_str().unwrap();
        let negative = cases[case]["negative_prompt"].as_str().unwrap();
        let got = encoder.encode(&[prompt, negative]).unwrap();
        let want = [
            read_f32(&refs.join("prompt_embeds.npy")),
            read_f32(&refs.join("negative_prompt_embeds.npy")),
        ];
        for (row, want) in want.iter().enumerate() {
            let got = got
                .hidden
                .index_axis(ndarray::Axis(0), row)
                .insert_axis(ndarray::Axis(0));
            let d = max_abs(&got.to_owned(), want);
            assert!(d < 1e-5, "{case} row {row}: text embeddings {d} off");
        }
        // Decoding diffusers' final latents gives its image, within 2/255 a pixel.
        let images = vae
            .decode(&read_f32(&refs.join("final_latents.npy")))
            .unwrap();
        let want = read_f32(&refs.join("image.npy"));
        let [1, h, w, 3] = want.shape()[..] else {
            panic!("{:?}", want.shape())
        };
        assert_eq!((images[0].height, images[0].width), (h, w));
        let worst = images[0]
            .pixels
            .iter()
            .zip(want.iter())
            .map(|(&got, &want)| (f32::from(got) - want * 255.0).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 2.0, "{case}: a pixel {worst}/255 off");
    }
}

#[test]
fn a_missing_component_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = attune_runtime::pipeline::VaeDecoder::open(
        dir.path(),
        &attune_runtime::pipeline::Sessions::cpu(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no vae_decoder"), "{err}");
}

/// `attune generate` from prompts and the reference's initial noise: diffusers' image within
/// 2/255 a pixel (single prompts, a wide image, a batch of two).
#[test]
fn generate_from_a_prompt_gives_the_diffusers_pipelines_image() {
    let dir = pipeline("sd15_tiny");
    let cases = manifest("sd15_tiny")["cases"].clone();
    let out = tempfile::tempdir().unwrap();
    for case in ["txt2img_a", "txt2img_wide", "txt2img_batch"] {
        let refs = dir.join("reference").join(case);
        let prompts: Vec<String> = match &cases[case]["prompt"] {
            serde_json::Value::Array(a) => a.iter().map(|p| p.as_str().unwrap().into()).collect(),
            p => vec![p.as_str().unwrap().into()],
        };
        let png = out.path().join(format!("{case}.png"));
        let latents = refs.join("latents.npy");
        let mut args = vec![
            "generate",
            dir.to_str().unwrap(),
            "--steps",
            "4",
            "--guidance",
            "7.5",
            "--latents",
            latents.to_str().unwrap(),
            "-o",
            png.to_str().unwrap(),
        ];
        args.extend(common::reference_scheduler(&dir));
        for p in &prompts {
            args.extend(["--prompt", p.as_str()]);
        }
        let o = common::attune(&args);
        assert!(
            o.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let want = read_f32(&refs.join("image.npy"));
        for (k, want) in want.outer_iter().enumerate() {
            let path = if prompts.len() == 1 {
                png.clone()
            } else {
                out.path().join(format!("{case}-{k}.png"))
            };
            let worst = common::worst_pixel(&path, want.view());
            assert!(worst <= 2.0, "{case} image {k}: a pixel {worst}/255 off");
        }
    }
}

#[test]
fn generate_refuses_what_it_cannot_run_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("x.png");
    let run = |folder: &Path| {
        let o = common::attune(&[
            "generate",
            folder.to_str().unwrap(),
            "--prompt",
            "a cat",
            "-o",
            png.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = run(dir.path());
    assert!(err.contains("not a pipeline folder"), "{err}");
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "KandinskyPipeline"}"#,
    )
    .unwrap();
    let err = run(dir.path());
    assert!(err.contains("KandinskyPipeline"), "{err}");
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline"}"#,
    )
    .unwrap();
    let err = run(dir.path());
    assert!(err.contains("no unet"), "{err}");
    assert!(!png.exists(), "nothing written");
}

/// The session cache: the first run saves ONNX Runtime's optimised graph of each component,
/// the second loads it (and says so), and the images are the same bytes; --no-session-cache
/// neither reads nor writes it. A damaged entry is made again.
#[test]
fn generate_keeps_onnx_runtimes_optimised_graphs_between_runs() {
    // A copy of the folder: its own cache keys, whatever other tests cached.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sd15_tiny");
    let src = pipeline("sd15_tiny");
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        if rel.starts_with("reference") {
            continue;
        }
        let to = dir.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    let latents = src.join("reference/txt2img_a/latents.npy");
    // Its own cache folder (the ORT library named directly, so nothing is fetched), to find
    // and damage the entries.
    let cache = tmp.path().join("cache");
    let lib = attune_runtime::provision::locate(attune_runtime::provision::Flavor::Cpu)
        .unwrap()
        .path;
    let run = |png: &str, extra: &[&str]| {
        let out = tmp.path().join(png);
        let mut args = vec![
            "generate",
            dir.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--latents",
            latents.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = common::run_measured(
            std::process::Command::new(env!("CARGO_BIN_EXE_attune"))
                .args(&args)
                .env("ATTUNE_CACHE", &cache)
                .env("ORT_DYLIB_PATH", &lib),
        );
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        (std::fs::read(out).unwrap(), err)
    };
    let (first, err) = run("a.png", &[]);
    assert!(err.contains("saved in attune's session cache"), "{err}");
    let (second, err) = run("b.png", &[]);
    assert!(err.contains("from attune's session cache"), "{err}");
    assert_eq!(first, second);
    let (third, err) = run("c.png", &["--no-session-cache"]);
    assert!(!err.contains("session cache"), "{err}");
    assert_eq!(first, third);
    // Three components (text encoder, UNet, VAE decoder; the VAE encoder only for img2img): each
    // entry a model and its data; truncated, they are made again.
    let entries: Vec<PathBuf> = walk(&cache.join("sessions"))
        .into_iter()
        .filter(|p| p.ends_with("model.onnx"))
        .collect();
    assert_eq!(entries.len(), 3, "{entries:?}");
    for e in &entries {
        std::fs::write(e, b"damaged").unwrap();
    }
    let (fourth, err) = run("d.png", &[]);
    assert!(err.contains("saved in attune's session cache"), "{err}");
    assert_eq!(first, fourth);
    let (_, err) = run("e.png", &[]);
    assert!(err.contains("from attune's session cache"), "{err}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}
