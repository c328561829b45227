//! Prompt-to-Prompt from prompts: controller words and `edit = "replace" | "refine"` resolved
//! with the pipeline's tokenizer, against P2P's own `get_word_inds` / `seq_aligner` run by
//! `models/export/p2p_aligner.py` (`models/pipelines/sd15_tiny/reference/p2p/`), and
//! `attune generate` with them against the same run given token indices and mapper files.
use std::path::{Path, PathBuf};

mod common;

use attune_runtime::HostTensor;
use attune_runtime::controller::aligner;
use attune_runtime::controller::{Controller, PromptTokens, Word};
use attune_runtime::npy;
use attune_runtime::tokenizer::TextTokenizer;
use common::{attune, stderr, stdout};
use ndarray::{ArrayD, IxDyn};

fn pipeline() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/pipelines/sd15_tiny")
}

fn reference(file: &str) -> HostTensor {
    npy::read(&pipeline().join("reference/p2p").join(file)).unwrap()
}

fn manifest() -> serde_json::Value {
    let path = pipeline().join("reference/p2p/manifest.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn word_positions_mappers_and_alphas_equal_prompt_to_prompts() {
    let t = TextTokenizer::from_dir(&pipeline().join("tokenizer")).unwrap();
    let m = manifest();
    let len = m["max_len"].as_u64().unwrap() as usize;
    let (mut replace, mut refine, mut words, mut alpha_words) = (0, 0, 0, 0);
    for case in m["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        match case["kind"].as_str().unwrap() {
            "replace" => {
                let prompts = strings(&case["prompts"]);
                let p: Vec<PromptTokens> = prompts
                    .iter()
                    .map(|s| PromptTokens::encode(&t, s).unwrap())
                    .collect();
                let HostTensor::F32(want) = reference(case["mapper"].as_str().unwrap()) else {
                    panic!("{name}: f32 mapper")
                };
                assert_eq!(want.shape(), [p.len() - 1, len, len], "{name}");
                for e in 1..p.len() {
                    let got = aligner::replacement_mapper(&p[0], &p[e], len).unwrap();
                    let want: Vec<f32> = want
                        .index_axis(ndarray::Axis(0), e - 1)
                        .iter()
                        .copied()
                        .collect();
                    assert_eq!(got.len(), want.len(), "{name}");
                    if let Some(k) = (0..got.len()).find(|&k| got[k] != want[k]) {
                        panic!(
                            "{name}: edit {e} ({:?}): mapper[{}, {}] is {}, P2P's {}",
                            prompts[e],
                            k / len,
                            k % len,
                            got[k],
                            want[k]
                        );
                    }
                }
                replace += 1;
            }
            "refine" => {
                let prompts = strings(&case["prompts"]);
                let p: Vec<PromptTokens> = prompts
                    .iter()
                    .map(|s| PromptTokens::encode(&t, s).unwrap())
                    .collect();
                let HostTensor::I64(want_m) = reference(case["mapper"].as_str().unwrap()) else {
                    panic!("{name}: i64 mapper")
                };
                let HostTensor::F32(want_a) = reference(case["alphas"].as_str().unwrap()) else {
                    panic!("{name}: f32 alphas")
                };
                assert_eq!(want_m.shape(), [p.len() - 1, len], "{name}");
                for e in 1..p.len() {
                    let (mapper, alphas) = aligner::refinement_mapper(&p[0], &p[e], len).unwrap();
                    let want_mapper: Vec<i64> = want_m
                        .index_axis(ndarray::Axis(0), e - 1)
                        .iter()
                        .copied()
                        .collect();
                    let want_alphas: Vec<f32> = want_a
                        .index_axis(ndarray::Axis(0), e - 1)
                        .iter()
                        .copied()
                        .collect();
                    assert_eq!(mapper, want_mapper, "{name}: mapper of edit {e}");
                    assert_eq!(alphas, want_alphas, "{name}: alphas of edit {e}");
                    // Some tokens are inserted, so the case tests the alignment.
                    assert!(alphas.contains(&0.0), "{name}: edit {e} inserts nothing");
                }
                refine += 1;
            }
            "words" => {
                let prompt = case["prompt"].as_str().unwrap();
                let p = PromptTokens::encode(&t, prompt).unwrap();
                let word = match &case["word"] {
                    serde_json::Value::String(s) => Word::Text(s),
                    v => Word::Position(v.as_u64().unwrap() as usize),
                };
                let HostTensor::I64(want) = reference(case["indices"].as_str().unwrap()) else {
                    panic!("{name}: i64 indices")
                };
                let want: Vec<usize> = want.iter().map(|&i| i as usize).collect();
                assert_eq!(p.word_indices(word), want, "{name}: {prompt:?} {word:?}");
                words += 1;
            }
            "alpha_words" => {
                let prompts = strings(&case["prompts"]);
                let steps = case["steps"].as_u64().unwrap() as usize;
                let ranges = case["cross_replace_steps"].as_object().unwrap();
                let words: Vec<String> = ranges
                    .iter()
                    .filter(|(k, _)| *k != "default_")
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect();
                let toml = format!(
                    "[p2p]\ncross_replace_steps = {}\ncross_replace_words = {{ {} }}\n",
                    ranges["default_"],
                    words.join(", ")
                );
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("c.toml");
                std::fs::write(&path, &toml).unwrap();
                let tokens = prompts
                    .iter()
                    .map(|s| PromptTokens::encode(&t, s).unwrap())
                    .collect();
                let plan = Controller::read(&path)
                    .unwrap()
                    .with_prompts(tokens)
                    .plan(steps, prompts.len(), len, 0)
                    .unwrap();
                let HostTensor::F32(want) = reference(case["alpha"].as_str().unwrap()) else {
                    panic!("{name}: f32 alpha")
                };
                assert_eq!(want.shape(), [steps + 1, prompts.len() - 1, len], "{name}");
                for step in 0..=steps {
                    let HostTensor::F32(got) = plan.alpha(step) else {
                        panic!("f32 alpha")
                    };
                    let want = want.index_axis(ndarray::Axis(0), step);
                    assert_eq!(got.view(), want, "{name}: {toml} step {step}");
                }
                alpha_words += 1;
            }
            other => panic!("{name}: unknown kind {other}"),
        }
    }
    assert_eq!(
        (replace, refine, words, alpha_words),
        (3, 3, 13, 1),
        "the manifest's cases"
    );
}

/// sd15_tiny with its UNet compiled with P2P and capture hooks, in `dir`.
fn hooked_pipeline(dir: &Path) -> PathBuf {
    let p = dir.join("sd15_tiny");
    copy_dir(&pipeline(), &p);
    let unet = p.join("unet/model.onnx");
    let o = attune(&[
        "compile",
        pipeline().join("unet/model.onnx").to_str().unwrap(),
        "--hooks",
        "p2p,capture",
        "-o",
        unet.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    p
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() == "reference" {
            continue;
        }
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// `attune generate` of `prompts` with a controller; the PNG bytes and final latents.
fn generate(
    dir: &Path,
    prompts: &[&str],
    controller: Option<&str>,
    tag: &str,
) -> (Vec<Vec<u8>>, HostTensor) {
    let out = dir.join(tag);
    std::fs::create_dir_all(&out).unwrap();
    let png = out.join("img.png");
    let latents = out.join("latents.npy");
    let mut args: Vec<String> = vec![
        "generate".into(),
        dir.join("sd15_tiny").to_str().unwrap().into(),
        "--steps".into(),
        "4".into(),
        "--guidance".into(),
        "5".into(),
        "--width".into(),
        "16".into(),
        "--height".into(),
        "16".into(),
        "--save-latents".into(),
        latents.to_str().unwrap().into(),
        "-o".into(),
        png.to_str().unwrap().into(),
    ];
    for p in prompts {
        args.extend(["--prompt".into(), p.to_string()]);
    }
    if let Some(c) = controller {
        let f = out.join("controller.toml");
        std::fs::write(&f, c).unwrap();
        args.extend(["--controller".into(), f.to_str().unwrap().into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = attune(&args);
    assert!(o.status.success(), "{tag}: {}{}", stdout(&o), stderr(&o));
    let pngs = (0..prompts.len())
        .map(|k| std::fs::read(out.join(format!("img-{k}.png"))).unwrap())
        .collect();
    (pngs, npy::read(&latents).unwrap())
}

/// Bit-identical tensors (the max difference reported otherwise).
fn assert_same(a: &HostTensor, b: &HostTensor, what: &str) {
    let (HostTensor::F32(a), HostTensor::F32(b)) = (a, b) else {
        panic!("{what}: f32 latents")
    };
    assert_eq!(a.shape(), b.shape(), "{what}");
    let diff = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(a == b, "{what}: differ by up to {diff:e}");
}

fn write_f32(path: &Path, shape: &[usize], data: Vec<f32>) {
    npy::write(
        path,
        &HostTensor::F32(ArrayD::from_shape_vec(IxDyn(shape), data).unwrap()),
    )
    .unwrap();
}

#[test]
fn p2p_from_prompts_equals_the_token_index_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    hooked_pipeline(dir);
    let files = pipeline().join("reference/p2p");
    let schedule = "cross_replace_steps = 0.8\nself_replace_steps = 0.4\n";

    // Replace, 3 prompts: a 1 -> 2 token word and a 2-token word (P2P's mapper from the
    // reference), reweighted, blended locally.
    let prompts = [
        "a squirrel eating a burger",
        "a lemur eating a cheeseburger",
        "a lionfish eating a burger",
    ];
    let words = format!(
        "[p2p]\nedit = \"replace\"\n{schedule}equalizer = {{ cheeseburger = 2.0 }}\n\
         [local_blend]\nwords = [\"burger\", \"cheeseburger\", [\"lionfish\", \"burger\"]]\nresolution = 8\n"
    );
    // The same by token index (transformers' CLIPTokenizer: "a lemur eating a cheeseburger"
    // is a, le, mur, eating, a, cheeseburger; "a lionfish eating a burger" a, lion, fish, ...).
    let indices = format!(
        "[p2p]\nmapper = \"{}\"\n{schedule}equalizer = {{ 6 = 2.0 }}\n\
         [local_blend]\nwords = [[5], [6], [2, 3, 6]]\nresolution = 8\n",
        files.join("replace_multi_mapper.npy").display()
    );
    let by_words = generate(dir, &prompts, Some(&words), "replace_words");
    let by_indices = generate(dir, &prompts, Some(&indices), "replace_indices");
    assert_same(&by_words.1, &by_indices.1, "replace: final latents");
    assert_eq!(by_words.0, by_indices.0, "replace: PNG bytes");
    let plain = generate(dir, &prompts, None, "replace_plain");
    assert_ne!(plain.1, by_words.1, "the controller changes nothing");

    // Refine: inserted words, the mapper one-hot and the alphas from the reference.
    let prompts = [
        "a cat sitting on a sofa",
        "a fluffy cat sitting on a red sofa",
    ];
    let HostTensor::I64(m) = reference("refine_insert_mapper.npy") else {
        panic!("i64 mapper")
    };
    let mut hot = vec![0f32; 77 * 77];
    for (n, &s) in m.iter().enumerate() {
        // P2P indexes with -1 (inserted tokens, alpha 0): the last token.
        let s = if s < 0 { 77 + s } else { s } as usize;
        hot[s * 77 + n] = 1.0;
    }
    write_f32(&dir.join("refine_mapper.npy"), &[1, 77, 77], hot);
    let words = format!(
        "[p2p]\nedit = \"refine\"\n{schedule}\n[local_blend]\nwords = [\"cat\", [\"fluffy\", \"cat\"]]\nresolution = 8\n"
    );
    let indices = format!(
        "[p2p]\nmapper = \"{}\"\nrefine_alphas = \"{}\"\n{schedule}\n[local_blend]\nwords = [[2], [2, 3]]\nresolution = 8\n",
        dir.join("refine_mapper.npy").display(),
        files.join("refine_insert_alphas.npy").display()
    );
    let by_words = generate(dir, &prompts, Some(&words), "refine_words");
    let by_indices = generate(dir, &prompts, Some(&indices), "refine_indices");
    assert_same(&by_words.1, &by_indices.1, "refine: final latents");
    assert_eq!(by_words.0, by_indices.0, "refine: PNG bytes");
    let plain = generate(dir, &prompts, None, "refine_plain");
    assert_ne!(plain.1, by_words.1, "the controller changes nothing");
}

#[test]
fn save_maps_takes_words_and_writes_next_to_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = hooked_pipeline(dir);
    let png = dir.join("out/img.png");
    let o = attune(&[
        "generate",
        p.to_str().unwrap(),
        "--prompt",
        "a lionfish eating a burger",
        "--prompt",
        "a cat eating a burger",
        "--steps",
        "2",
        "--width",
        "16",
        "--height",
        "16",
        "--save-maps",
        "lionfish,cat,5",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut maps: Vec<String> = std::fs::read_dir(dir.join("out/maps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    maps.sort();
    // lionfish: tokens 2 and 3 (lion, fish) of prompt 0, cat token 2 of prompt 1; 5 given as
    // an index for both.
    assert_eq!(
        maps,
        [
            "prompt0_word2.png",
            "prompt0_word3.png",
            "prompt0_word5.png",
            "prompt1_word2.png",
            "prompt1_word5.png"
        ]
    );
    // The heatmaps are of the captured maps: a word's map is not another's.
    let read = |f: &str| std::fs::read(dir.join("out/maps").join(f)).unwrap();
    assert_ne!(read("prompt0_word2.png"), read("prompt0_word5.png"));
    for (maps, expected) in [
        ("dog", ["--save-maps dog", "a lionfish eating a burger"]),
        ("2,80", ["--save-maps 80", "77 tokens"]),
    ] {
        let o = attune(&[
            "generate",
            p.to_str().unwrap(),
            "--prompt",
            "a lionfish eating a burger",
            "--steps",
            "2",
            "--save-maps",
            maps,
            "-o",
            dir.join("none/img.png").to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        let e = stderr(&o);
        for want in expected {
            assert!(e.contains(want), "{maps}: {e}");
        }
        assert!(!dir.join("none").exists(), "{maps}: nothing written");
    }
}

#[test]
fn words_without_prompts_or_not_in_them_are_errors_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = hooked_pipeline(dir);
    let ctl = |name: &str, text: &str| -> PathBuf {
        let f = dir.join(name);
        std::fs::write(&f, text).unwrap();
        f
    };
    let run_gen = |controller: &Path, prompts: &[&str]| {
        let mut args = vec![
            "generate",
            p.to_str().unwrap(),
            "--steps",
            "2",
            "--guidance",
            "5",
            "--width",
            "16",
            "--height",
            "16",
            "--controller",
            controller.to_str().unwrap(),
            "-o",
        ];
        let out = dir.join("never/img.png");
        let out = out.to_str().unwrap().to_string();
        let mut all: Vec<String> = args.drain(..).map(str::to_string).collect();
        all.push(out);
        for q in prompts {
            all.extend(["--prompt".to_string(), q.to_string()]);
        }
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        attune(&all)
    };
    let two = ["a cat sitting on a sofa", "a dog sitting on a sofa"];
    let cases: [(&str, &str, &[&str], &[&str]); 6] = [
        (
            "steps_word.toml",
            "[p2p]\ncross_replace_words = { cat = 0.2 }\n",
            &two,
            &[
                "word 'cat'",
                "none of the edited prompts",
                "\"a dog sitting on a sofa\"",
            ],
        ),
        (
            "absent.toml",
            "[local_blend]\nwords = [\"cat\", \"cat\"]\nresolution = 8\n",
            &two,
            &["word 'cat'", "\"a dog sitting on a sofa\""],
        ),
        (
            "equalizer.toml",
            "[p2p]\nequalizer = { horse = 2.0 }\n",
            &two,
            &["equalizer", "word 'horse'", "\"a dog sitting on a sofa\""],
        ),
        (
            "lengths.toml",
            "[p2p]\nedit = \"replace\"\n",
            &["a cat sitting on a sofa", "a fluffy cat sitting on a sofa"],
            &[
                "same number of words",
                "\"a fluffy cat sitting on a sofa\" has 7",
            ],
        ),
        (
            "both.toml",
            "[p2p]\nedit = \"refine\"\nmapper = \"m.npy\"\n",
            &two,
            &["edit = \"refine\"", "not both"],
        ),
        (
            "unknown_edit.toml",
            "[p2p]\nedit = \"swap\"\n",
            &two,
            &["swap", "replace", "refine"],
        ),
    ];
    for (name, text, prompts, expected) in cases {
        let o = run_gen(&ctl(name, text), prompts);
        let e = stderr(&o);
        assert!(!o.status.success(), "{name}: ran");
        for want in expected {
            assert!(e.contains(want), "{name}: {e}");
        }
        assert!(!e.contains("panicked"), "{name}: {e}");
        assert!(!dir.join("never").exists(), "{name}: wrote an output");
    }

    // attune sample has no prompts: words and edits say to use generate or indices.
    let cond = dir.join("cond.npy");
    let uncond = dir.join("uncond.npy");
    write_f32(&cond, &[2, 77, 16], vec![0.1; 2 * 77 * 16]);
    write_f32(&uncond, &[1, 77, 16], vec![0.0; 77 * 16]);
    for (name, text) in [
        ("sample_edit.toml", "[p2p]\nedit = \"replace\"\n"),
        (
            "sample_words.toml",
            "[local_blend]\nwords = [\"cat\", [2]]\nresolution = 8\n",
        ),
    ] {
        let o = attune(&[
            "sample",
            "--unet",
            p.join("unet/model.onnx").to_str().unwrap(),
            "--cond",
            cond.to_str().unwrap(),
            "--uncond",
            uncond.to_str().unwrap(),
            "--steps",
            "2",
            "--guidance",
            "5",
            "--height",
            "8",
            "--width",
            "8",
            "--controller",
            ctl(name, text).to_str().unwrap(),
            "--out",
            dir.join("sample_out").to_str().unwrap(),
        ]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{name}: ran");
        assert!(
            e.contains("attune generate") && e.contains("token indices"),
            "{name}: {e}"
        );
        assert!(!dir.join("sample_out").exists(), "{name}: wrote an output");
    }
}
