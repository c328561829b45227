//! DeepCache: `compile --step-cache deepcache[:BRANCH]` and `sample --cache-interval`, against
//! DeepCache's own helper (the `deepcache` package) on the tiny SD1.5- and SDXL-like UNets
//! (`models/deepcache/`, made by `models/export/deepcache_ref.py`), and the inputs refused.
use std::path::{Path, PathBuf};

mod common;

use common::{attune, compile_into, fixture, read_f32, stderr, stdout};

fn refs(name: &str) -> PathBuf {
    common::root().join("models/deepcache").join(name)
}

fn rel_l2(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// `attune sample` on the inputs a reference folder holds (10 steps, its scheduler config);
/// returns (final latents, stderr).
fn sample_inputs(
    model: &Path,
    r: &Path,
    guidance: &str,
    out: &Path,
    extra: &[&str],
) -> (ndarray::ArrayD<f32>, String) {
    let mut args: Vec<String> = vec![
        "sample".into(),
        "--unet".into(),
        model.to_str().unwrap().into(),
    ];
    for (flag, files) in [
        ("--cond", ["cond.npy", ""]),
        ("--uncond", ["uncond.npy", ""]),
        ("--latents", ["latents.npy", ""]),
        ("--pooled-cond", ["pooled_cond.npy", "text_embeds_cond.npy"]),
        (
            "--pooled-uncond",
            ["pooled_uncond.npy", "text_embeds_uncond.npy"],
        ),
        ("--scheduler-config", ["scheduler_config.json", ""]),
    ] {
        if let Some(f) = files.iter().find(|f| !f.is_empty() && r.join(f).exists()) {
            args.extend([flag.into(), r.join(f).to_str().unwrap().into()]);
        }
    }
    args.extend(
        [
            "--steps",
            "10",
            "--guidance",
            guidance,
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = attune(&args);
    assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
    (read_f32(&out.join("latents.npy")), stderr(&o))
}

/// `sample_inputs` with a DeepCache reference's (models/deepcache/NAME).
fn sample(model: &Path, name: &str, out: &Path, extra: &[&str]) -> (ndarray::ArrayD<f32>, String) {
    sample_inputs(model, &refs(name), "5", out, extra)
}

fn cases(name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(refs(name).join("cases.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["cases"].as_array().unwrap().clone()
}

/// Every case: branches 0, 1 and 3, intervals 1-3, uniform and the pipelines' non-uniform
/// steps, on the plain split and (SD1.5) with fused attention: within rel L2 1e-4 of the
/// helper's latents, on the same refresh steps, and far from the uncached latents (so caching
/// happened).
#[test]
fn cached_sampling_follows_deepcaches_helper() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["sd15_legacy", "sdxl_legacy"] {
        let unet = fixture(name);
        let uncached = read_f32(&refs(name).join("uncached.npy"));
        for case in cases(name) {
            let branch = case["branch"].as_u64().unwrap().to_string();
            let interval = case["interval"].as_u64().unwrap().to_string();
            let non_uniform = case["mode"] == "non-uniform";
            let step_cache = format!("deepcache:{branch}");
            let mut variants = vec![vec!["--step-cache", step_cache.as_str()]];
            if name == "sd15_legacy" && case["case"] == "uniform_i3_b0" {
                variants.push(vec![
                    "--step-cache",
                    step_cache.as_str(),
                    "--attention",
                    "flash",
                ]);
            }
            for flags in variants {
                let (model, _) = compile_into(dir.path(), &unet, &flags);
                let mut extra = vec!["--cache-interval", interval.as_str()];
                if non_uniform {
                    extra.extend([
                        "--cache-mode",
                        "non-uniform",
                        "--cache-center",
                        "4",
                        "--cache-pow",
                        "1.4",
                    ]);
                }
                let out = dir.path().join(format!("out_{name}"));
                let (got, err) = sample(&model, name, &out, &extra);
                let want =
                    read_f32(&refs(name).join(format!("{}.npy", case["case"].as_str().unwrap())));
                let e = rel_l2(&got, &want);
                assert!(
                    e < 1e-4,
                    "{name} {} {flags:?}: rel L2 {e:.3e} from DeepCache's helper",
                    case["case"]
                );
                let steps: Vec<String> = case["refresh"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                let line = format!(
                    "step cache: deep part computed on {} steps ({})",
                    steps.len(),
                    steps.join(", ")
                );
                assert!(
                    err.contains(&line),
                    "{name} {}: want '{line}' in\n{err}",
                    case["case"]
                );
                if interval != "1" {
                    let from_uncached = rel_l2(&got, &uncached);
                    assert!(
                        from_uncached > 1e-2,
                        "{name} {}: only {from_uncached:.1e} from the uncached latents",
                        case["case"]
                    );
                }
            }
        }
    }
}

/// Interval 1 computes every step: the uncached sampler's result (within ONNX Runtime's
/// optimiser, which fuses the If branch's nodes separately: 2e-6 here); with its
/// optimisations off a split UNet's step is the unsplit one bit for bit.
#[test]
fn interval_one_is_the_uncached_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let unet = fixture("sd15_legacy");
    let (split, _) = compile_into(dir.path(), &unet, &["--step-cache", "deepcache:0"]);
    let (canonical, _) = compile_into(dir.path(), &unet, &["--canonical"]);
    let (plain, _) = sample(&canonical, "sd15_legacy", &dir.path().join("a"), &[]);
    let (every, err) = sample(
        &split,
        "sd15_legacy",
        &dir.path().join("b"),
        &["--cache-interval", "1"],
    );
    assert!(err.contains("reused on 0"), "{err}");
    let e = rel_l2(&every, &plain);
    assert!(
        e < 1e-5,
        "interval 1: rel L2 {e:.3e} from the uncached sampler"
    );
    let inputs = common::root().join("models/sd15_legacy/inputs");
    let flag = dir.path().join("refresh.npy");
    let empty = dir.path().join("empty.npy");
    attune_runtime::npy::write(
        &flag,
        &attune_runtime::HostTensor::Bool(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), true)),
    )
    .unwrap();
    attune_runtime::npy::write(
        &empty,
        &attune_runtime::HostTensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[0, 0, 0, 0]))),
    )
    .unwrap();
    let off = ["--opt-level".to_string(), "disable".to_string()];
    let want = common::run_unet(&canonical, &inputs, &off);
    let mut extra = off.to_vec();
    extra.extend([
        "--input".into(),
        format!("deepcache.refresh={}", flag.display()),
        "--input".into(),
        format!("deepcache.cached_feature={}", empty.display()),
    ]);
    let got = common::run_unet(&split, &inputs, &extra);
    assert_eq!(
        want.to_f64(),
        got.to_f64(),
        "a refresh step of the split UNet, optimiser off"
    );
}

#[test]
fn the_split_is_reported_and_its_weights_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let unet = fixture("sd15_legacy");
    let (split, out) = compile_into(dir.path(), &unet, &["--step-cache", "deepcache:3"]);
    assert!(
        out.contains("DeepCache branch 3: the feature entering up_blocks.1.resnets.1 is cached"),
        "{out}"
    );
    assert!(out.contains("mid_block"), "{out}");
    let data = |p: &Path| {
        std::fs::metadata(p.with_extension("onnx.data"))
            .unwrap()
            .len()
    };
    assert_eq!(data(&split), data(&unet), "one data file, each weight once");
    let o = attune(&["inspect", split.to_str().unwrap()]);
    let text = stdout(&o);
    assert!(text.contains("deepcache.refresh bool[]"), "{text}");
    assert!(
        text.contains("step cache  DeepCache: ") && text.contains("mid_block"),
        "{text}"
    );
}

#[test]
fn bad_requests_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let unet = fixture("sd15_legacy");
    let out = dir.path().join("x.onnx");
    let refused = |model: &Path, flag: &str, want: &str| {
        let o = common::compile_to(model, &out, &["--step-cache", flag]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains(want), "{flag}: want '{want}' in {err}");
        assert!(!out.exists(), "{flag}: nothing written");
    };
    refused(
        &unet,
        "deepcache:9",
        "the UNet has 3 up blocks (branches 0..8)",
    );
    refused(&unet, "deepcache:-1", "the branch must be a whole number");
    refused(&unet, "deepcache:x", "the branch must be a whole number");
    refused(&unet, "deepcache2", "'deepcache2' is not one of deepcache");
    refused(
        &fixture("pixart_legacy"),
        "deepcache",
        "DeepCache needs a UNet",
    );
    // A split UNet run without its cache inputs, and caching asked of an unsplit one.
    let (split, _) = compile_into(dir.path(), &unet, &["--step-cache", "deepcache"]);
    let o = attune(&[
        "run",
        split.to_str().unwrap(),
        "--input",
        common::root()
            .join("models/sd15_legacy/inputs")
            .to_str()
            .unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("deepcache.refresh"), "{}", stderr(&o));
    for (model, flags, want) in [
        (
            &unet,
            vec!["--cache-interval", "3"],
            "compile it with --step-cache deepcache",
        ),
        (&split, vec!["--cache-interval", "0"], "--cache-interval 0"),
        (
            &split,
            vec![
                "--cache-interval",
                "3",
                "--cache-mode",
                "non-uniform",
                "--cache-center",
                "11",
            ],
            "--cache-center 11 is past the 10 steps",
        ),
        (
            &split,
            vec![
                "--cache-interval",
                "2",
                "--cache-mode",
                "non-uniform",
                "--cache-pow",
                "0.5",
            ],
            "--cache-pow 0.5",
        ),
    ] {
        let r = refs("sd15_legacy");
        let mut args = vec![
            "sample".to_string(),
            "--unet".into(),
            model.to_str().unwrap().into(),
            "--steps".into(),
            "10".into(),
            "--cond".into(),
            r.join("cond.npy").to_str().unwrap().into(),
            "--uncond".into(),
            r.join("uncond.npy").to_str().unwrap().into(),
            "--height".into(),
            "16".into(),
            "--width".into(),
            "16".into(),
            "--out".into(),
            dir.path().join("bad").to_str().unwrap().into(),
        ];
        args.extend(flags.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = attune(&args);
        assert_ne!(o.status.code(), Some(0), "{flags:?}");
        assert!(
            stderr(&o).contains(want),
            "{flags:?}: want '{want}' in {}",
            stderr(&o)
        );
        assert!(
            !dir.path().join("bad/latents.npy").exists(),
            "{flags:?}: nothing written"
        );
    }
}

/// `compile DIR --step-cache` splits the pipeline's UNet only, and `generate --cache-interval`
/// runs it: the refresh steps reported, interval 1 the uncached image, interval 3 close to it
/// but not equal.
#[test]
fn generate_runs_a_split_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let folder = common::root().join("models/pipelines/sd15_tiny");
    let split = dir.path().join("split");
    let o = attune(&[
        "compile",
        folder.to_str().unwrap(),
        "-o",
        split.to_str().unwrap(),
        "--step-cache",
        "deepcache:1",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("not applied: --step-cache"), "{text}");
    assert!(text.contains("DeepCache branch 1"), "{text}");
    let image = |model: &Path, png: &str, extra: &[&str]| {
        let out = dir.path().join(png);
        let mut args = vec![
            "generate",
            model.to_str().unwrap(),
            "--prompt",
            "a red cat",
            "--steps",
            "9",
            "--scheduler",
            "ddim",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = attune(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let pixels = attune_runtime::image::read_png(&out).unwrap();
        (
            pixels
                .pixels
                .iter()
                .map(|v| *v as f32)
                .collect::<Vec<f32>>(),
            stderr(&o),
        )
    };
    let (plain, _) = image(&folder, "plain.png", &[]);
    let (every, _) = image(&split, "every.png", &["--cache-interval", "1"]);
    let (cached, err) = image(&split, "cached.png", &["--cache-interval", "3"]);
    assert!(
        err.contains("step cache: deep part computed on 3 steps (0, 3, 6), reused on 6"),
        "{err}"
    );
    let worst = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        worst(&plain, &every) <= 1.0,
        "interval 1: {} levels apart",
        worst(&plain, &every)
    );
    let mean = plain
        .iter()
        .zip(&cached)
        .map(|(x, y)| (x - y).abs())
        .sum::<f32>()
        / plain.len() as f32;
    assert!(
        mean > 0.1 && mean < 10.0,
        "interval 3: mean {mean} levels from the uncached image"
    );
}

/// `attune sample` with a first-block reference case's inputs (models/fbcache/CASE).
fn sample_fbcache(
    model: &Path,
    case: &str,
    out: &Path,
    extra: &[&str],
) -> (ndarray::ArrayD<f32>, String) {
    let r = common::root().join("models/fbcache").join(case);
    sample_inputs(
        model,
        &r,
        if case == "flux" { "1" } else { "5" },
        out,
        extra,
    )
}

/// ParaAttention's first-block cache written in torch over the tiny PixArt, SD3 and Flux
/// transformers (models/export/fbcache_ref.py): at every threshold the same steps compute all
/// blocks and the final latents are within rel L2 1e-4; threshold 0 computes every step and
/// is the uncached result.
/// The tiny PixArt, SD3 and Flux transformers compiled with `flag`, sampled at each threshold
/// of the reference's `manifest` (models/fbcache/CASE): the same steps compute all blocks and
/// the final latents are within rel L2 1e-4 of `<prefix><threshold>.npy`; thresholds that
/// compute every step give the uncached result.
fn threshold_cache_follows_reference(flag: &str, manifest: &str, prefix: &str, part: &str) {
    let dir = tempfile::tempdir().unwrap();
    for (case, model) in [
        ("pixart", "pixart_legacy"),
        ("sd3", "sd3_legacy"),
        ("flux", "flux_dynamo"),
    ] {
        let (split, _) = compile_into(dir.path(), &fixture(model), &["--step-cache", flag]);
        let refs = common::root().join("models/fbcache").join(case);
        let text = std::fs::read_to_string(refs.join(manifest)).unwrap();
        let m: serde_json::Value = serde_json::from_str(&text).unwrap();
        let uncached = read_f32(&refs.join("uncached.npy"));
        let mut mixed = 0;
        for c in m["cases"].as_array().unwrap() {
            let t = c["threshold"].as_f64().unwrap();
            let out = dir.path().join(format!("{case}_{t}"));
            let (got, err) =
                sample_fbcache(&split, case, &out, &["--cache-threshold", &t.to_string()]);
            let want = read_f32(&refs.join(format!("{prefix}{t:?}.npy")));
            let e = rel_l2(&got, &want);
            assert!(
                e < 1e-4,
                "{flag} {case} threshold {t}: rel L2 {e:.3e} from the reference"
            );
            let steps: Vec<String> = c["computed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.to_string())
                .collect();
            let line = format!(
                "{part} computed on {} steps ({}),",
                steps.len(),
                steps.join(", ")
            );
            assert!(
                err.contains(&line),
                "{flag} {case} threshold {t}: want '{line}' in\n{err}"
            );
            if steps.len() < 10 {
                mixed += 1;
                assert!(
                    rel_l2(&got, &uncached) > 3e-4,
                    "{flag} {case} threshold {t}: cached steps changed nothing"
                );
            } else {
                assert!(
                    rel_l2(&got, &uncached) < 1e-4,
                    "{flag} {case} threshold {t}: every step computed"
                );
            }
        }
        assert!(
            mixed >= 2,
            "{flag} {case}: too few thresholds that skip steps"
        );
    }
}

/// ParaAttention's first-block cache written in torch (models/export/fbcache_ref.py).
#[test]
fn first_block_cache_follows_parattentions_algorithm() {
    threshold_cache_follows_reference("first-block", "cases.json", "t", "blocks after the first");
}

/// TeaCache (TeaCache4FLUX's forward, with its polynomial for Flux and plain relative L1 for
/// PixArt and SD3) written in torch (models/export/fbcache_ref.py).
#[test]
fn teacache_follows_its_algorithm() {
    threshold_cache_follows_reference("teacache", "teacache.json", "tea", "transformer blocks");
}

#[test]
fn first_block_cache_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.onnx");
    for (model, flag, want) in [
        (
            "sd15_legacy",
            "first-block",
            "needs a diffusion transformer",
        ),
        (
            "pixart_legacy",
            "first-block:-0.1",
            "the threshold must be a number >= 0",
        ),
        (
            "pixart_legacy",
            "first-block:abc",
            "the threshold must be a number >= 0",
        ),
        (
            "pixart_legacy",
            "teacache:-1",
            "the threshold must be a number >= 0",
        ),
        (
            "sd15_legacy",
            "teacache",
            "TeaCache needs a diffusion transformer",
        ),
    ] {
        let o = common::compile_to(&fixture(model), &out, &["--step-cache", flag]);
        assert_eq!(o.status.code(), Some(2), "{flag}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(want),
            "{flag}: want '{want}' in {}",
            stderr(&o)
        );
        assert!(!out.exists());
    }
    let (split, _) = compile_into(
        dir.path(),
        &fixture("pixart_legacy"),
        &["--step-cache", "first-block"],
    );
    for (flags, want) in [
        (
            vec!["--cache-threshold=-1"],
            "--cache-threshold -1: must be a number >= 0",
        ),
        (
            vec!["--cache-interval", "2"],
            "decides by --cache-threshold",
        ),
    ] {
        let o = dir.path().join("bad");
        let r = common::root().join("models/fbcache/pixart");
        let mut args = vec![
            "sample",
            "--unet",
            split.to_str().unwrap(),
            "--steps",
            "4",
            "--out",
            o.to_str().unwrap(),
        ];
        let (c, u) = (r.join("cond.npy"), r.join("uncond.npy"));
        args.extend([
            "--cond",
            c.to_str().unwrap(),
            "--uncond",
            u.to_str().unwrap(),
        ]);
        args.extend(["--height", "16", "--width", "16"]);
        args.extend(flags.iter().copied());
        let res = attune(&args);
        assert_ne!(res.status.code(), Some(0), "{flags:?}");
        assert!(
            stderr(&res).contains(want),
            "{flags:?}: want '{want}' in {}",
            stderr(&res)
        );
        assert!(!o.join("latents.npy").exists());
    }
    let o = attune(&[
        "run",
        split.to_str().unwrap(),
        "--input",
        common::root()
            .join("models/pixart_legacy/inputs")
            .to_str()
            .unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("fbcache.prev_residual"),
        "{}",
        stderr(&o)
    );
}

/// The split runs after the other passes: fp16 (the cache carried in fp16), token merging
/// (interval 1 is the merged model's own result) and the CUDA lowering (compiles; run on a GPU
/// by benches/step_cache_cuda.sh).
#[test]
fn step_caches_compose_with_precision_tome_and_cuda_lowering() {
    let dir = tempfile::tempdir().unwrap();
    let unet = fixture("sd15_legacy");
    let (fp16, _) = compile_into(
        dir.path(),
        &unet,
        &["--step-cache", "deepcache", "--precision", "fp16"],
    );
    let (got, err) = sample(
        &fp16,
        "sd15_legacy",
        &dir.path().join("a"),
        &["--cache-interval", "3"],
    );
    assert!(
        err.contains("deep part computed on 4 steps (0, 3, 6, 9)"),
        "{err}"
    );
    let want = read_f32(&refs("sd15_legacy").join("uniform_i3_b0.npy"));
    let e = rel_l2(&got, &want);
    assert!(
        e < 5e-3,
        "fp16 DeepCache: rel L2 {e:.3e} from the fp32 reference"
    );
    let (tome, _) = compile_into(dir.path(), &unet, &["--tome", "0.5"]);
    let (tome_split, _) = compile_into(
        dir.path(),
        &unet,
        &["--tome", "0.5", "--step-cache", "deepcache"],
    );
    let (merged, _) = sample(&tome, "sd15_legacy", &dir.path().join("b"), &[]);
    let (every, _) = sample(
        &tome_split,
        "sd15_legacy",
        &dir.path().join("c"),
        &["--cache-interval", "1"],
    );
    let e = rel_l2(&every, &merged);
    assert!(
        e < 1e-5,
        "ToMe + DeepCache at interval 1: rel L2 {e:.3e} from ToMe alone"
    );
    let (tea16, _) = compile_into(
        dir.path(),
        &fixture("pixart_legacy"),
        &["--step-cache", "teacache", "--precision", "fp16"],
    );
    let (_, err) = sample_fbcache(
        &tea16,
        "pixart",
        &dir.path().join("d"),
        &["--cache-threshold", "0.3"],
    );
    assert!(
        err.contains("transformer blocks computed on 6 steps (0, 1, 2, 5, 8, 9)"),
        "{err}"
    );
    // DeepCache on the CUDA-lowered UNet (its NHWC GroupNorms run on a GPU only).
    let flags = [
        "--step-cache",
        "deepcache",
        "--target",
        "cuda",
        "--precision",
        "fp16",
        "--attention",
        "flash",
    ];
    let (out, report) = compile_into(dir.path(), &unet, &flags);
    assert!(report.contains("step-cache: 1 rewritten"), "{report}");
    let o = attune(&["inspect", out.to_str().unwrap()]);
    assert!(
        stdout(&o).contains("step cache  DeepCache"),
        "{}",
        stdout(&o)
    );
    // The transformers lowered for CUDA (SkipLayerNormalization fuses each residual add into
    // the next norm, so hidden states between blocks are sums) run on the CPU too, but for the
    // NHWC convolution: the same steps and latents as the references.
    for (case, model) in [
        ("pixart", "pixart_legacy"),
        ("sd3", "sd3_legacy"),
        ("flux", "flux_dynamo"),
    ] {
        for (cache, manifest, prefix) in [
            ("first-block", "cases.json", "t"),
            ("teacache", "teacache.json", "tea"),
        ] {
            let flags = [
                "--step-cache",
                cache,
                "--target",
                "cuda",
                "--attention",
                "flash",
                "--disable-fusions",
                "nhwc-conv",
            ];
            let (out, _) = compile_into(dir.path(), &fixture(model), &flags);
            let refs = common::root().join("models/fbcache").join(case);
            let m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(refs.join(manifest)).unwrap())
                    .unwrap();
            let c = m["cases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["computed"].as_array().unwrap().len() < 10)
                .unwrap();
            let t = c["threshold"].as_f64().unwrap();
            let (got, err) = sample_fbcache(
                &out,
                case,
                &dir.path().join(format!("cuda_{case}_{cache}")),
                &["--cache-threshold", &t.to_string()],
            );
            let steps: Vec<String> = c["computed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.to_string())
                .collect();
            assert!(
                err.contains(&format!(
                    "computed on {} steps ({}),",
                    steps.len(),
                    steps.join(", ")
                )),
                "{case} {cache} lowered: {err}"
            );
            let e = rel_l2(&got, &read_f32(&refs.join(format!("{prefix}{t:?}.npy"))));
            assert!(
                e < 1e-4,
                "{case} {cache} lowered for CUDA: rel L2 {e:.3e} from the reference"
            );
        }
    }
}

/// `bench` times a split model's computed and cached steps against each other.
#[test]
fn bench_times_the_computed_and_the_cached_step() {
    let dir = tempfile::tempdir().unwrap();
    let short_text = common::DIMS.map(|d| if d == "sequence=77" { "sequence=8" } else { d });
    for (model, cache, part, dims) in [
        ("sd15_legacy", "deepcache", "deep part", common::DIMS),
        (
            "pixart_legacy",
            "teacache",
            "transformer blocks",
            short_text,
        ),
        (
            "sd3_legacy",
            "first-block",
            "blocks after the first",
            short_text,
        ),
    ] {
        let (split, _) = compile_into(dir.path(), &fixture(model), &["--step-cache", cache]);
        let mut args = vec!["bench", split.to_str().unwrap(), "--iters", "2"];
        args.extend(dims);
        let o = attune(&args);
        let text = stdout(&o);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        assert!(
            text.contains(&format!("(step computing the {part})")),
            "{model}: {text}"
        );
        assert!(
            text.contains(&format!("(step reusing the {part})")),
            "{model}: {text}"
        );
        let o = attune(&[
            "bench",
            split.to_str().unwrap(),
            "--vs",
            split.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{model}: {}", stderr(&o));
        assert!(stderr(&o).contains("alone (no --vs"), "{}", stderr(&o));
    }
}

/// Capture hooks on attention sites inside the cached part: their map outputs are cut with it,
/// and a skipped step reuses the last computed step's maps (and says so), so the split still
/// skips the whole part and the latents are the unhooked cache's.
#[test]
fn capture_hooks_in_the_cached_part_reuse_their_maps() {
    let dir = tempfile::tempdir().unwrap();
    let (split, report) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--hooks", "capture", "--step-cache", "deepcache"],
    );
    assert!(report.contains("mid_block"), "{report}");
    let (got, err) = sample(
        &split,
        "sd15_legacy",
        &dir.path().join("a"),
        &["--cache-interval", "3"],
    );
    assert!(
        err.contains("attention-map outputs of the cached part are the last computed step's"),
        "{err}"
    );
    let e = rel_l2(
        &got,
        &read_f32(&refs("sd15_legacy").join("uniform_i3_b0.npy")),
    );
    assert!(
        e < 1e-4,
        "hooked DeepCache: rel L2 {e:.3e} from DeepCache's helper"
    );
    let (plain, _) = compile_into(
        dir.path(),
        &fixture("pixart_legacy"),
        &["--step-cache", "first-block"],
    );
    let (hooked, _) = compile_into(
        dir.path(),
        &fixture("pixart_legacy"),
        &["--hooks", "capture", "--step-cache", "first-block"],
    );
    let o = attune(&["inspect", plain.to_str().unwrap()]);
    let nodes = |text: &str| {
        let line = text.lines().find(|l| l.starts_with("step cache"))?;
        let head = &line[..line.find(" nodes (")?];
        head.rsplit(' ').next()?.parse::<usize>().ok()
    };
    let o2 = attune(&["inspect", hooked.to_str().unwrap()]);
    let (n_plain, n_hooked) = (nodes(&stdout(&o)).unwrap(), nodes(&stdout(&o2)).unwrap());
    assert!(
        n_hooked >= n_plain,
        "hooks kept {} of {n_plain} nodes out of the cached part",
        n_plain.saturating_sub(n_hooked)
    );
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("models/fbcache/pixart/cases.json")).unwrap(),
    )
    .unwrap();
    let c = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["computed"].as_array().unwrap().len() < 10)
        .unwrap();
    let t = c["threshold"].as_f64().unwrap();
    let (got, err) = sample_fbcache(
        &hooked,
        "pixart",
        &dir.path().join("b"),
        &["--cache-threshold", &t.to_string()],
    );
    assert!(err.contains("attention-map outputs"), "{err}");
    let want = read_f32(&common::root().join(format!("models/fbcache/pixart/t{t:?}.npy")));
    let e = rel_l2(&got, &want);
    assert!(
        e < 1e-4,
        "hooked first-block cache: rel L2 {e:.3e} from the reference"
    );
}

/// `--scheduler dpm|euler` without a config runs that scheduler over Stable Diffusion's betas
/// (it ran DDIM before, silently: the step-cache benchmark's DPM rows caught it).
#[test]
fn scheduler_flag_without_a_config_is_not_ddim() {
    let dir = tempfile::tempdir().unwrap();
    let unet = fixture("sd15_legacy");
    let mut latents = Vec::new();
    for (s, name) in [
        ("ddim", "10 DDIM steps"),
        ("dpm", "10 DPM-Solver++ steps"),
        ("euler", "10 Euler steps"),
    ] {
        let r = refs("sd15_legacy");
        let out = dir.path().join(s);
        let (cond, uncond, latents_in) = (
            r.join("cond.npy"),
            r.join("uncond.npy"),
            r.join("latents.npy"),
        );
        let args = [
            "sample",
            "--unet",
            unet.to_str().unwrap(),
            "--steps",
            "10",
            "--scheduler",
            s,
            "--cond",
            cond.to_str().unwrap(),
            "--uncond",
            uncond.to_str().unwrap(),
            "--latents",
            latents_in.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        let o = attune(&args);
        assert!(o.status.success(), "{s}: {}", stderr(&o));
        assert!(stdout(&o).contains(name), "{s}: {}", stdout(&o));
        latents.push(read_f32(&out.join("latents.npy")));
    }
    assert!(rel_l2(&latents[1], &latents[0]) > 1e-3, "dpm ran as ddim");
    assert!(rel_l2(&latents[2], &latents[0]) > 1e-3, "euler ran as ddim");
}

/// LoRAs meet a split graph only in one compile: fused with the split (the split runs last);
/// adapters (their tensors written from the compiled graph) and LoRAs applied to a graph split
/// already are refused, since the cached layers are inside the If.
#[test]
fn loras_on_split_graphs() {
    let dir = tempfile::tempdir().unwrap();
    let unet = fixture("sd15_legacy");
    let lora = common::root().join("models/loras/kohya.safetensors");
    let lora = lora.to_str().unwrap();
    let (fused, report) = compile_into(
        dir.path(),
        &unet,
        &["--lora", lora, "--step-cache", "deepcache"],
    );
    assert!(report.contains("DeepCache branch 0"), "{report}");
    let (plain, _) = compile_into(dir.path(), &unet, &["--lora", lora]);
    let (a, _) = sample(&plain, "sd15_legacy", &dir.path().join("a"), &[]);
    let (b, _) = sample(
        &fused,
        "sd15_legacy",
        &dir.path().join("b"),
        &["--cache-interval", "1"],
    );
    assert!(
        rel_l2(&b, &a) < 1e-5,
        "fused LoRA + DeepCache at interval 1: {:.3e}",
        rel_l2(&b, &a)
    );
    let out = dir.path().join("x.onnx");
    let o = common::compile_to(
        &unet,
        &out,
        &[
            "--lora",
            lora,
            "--lora-mode",
            "adapter",
            "--step-cache",
            "deepcache",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--lora-mode adapter with --step-cache"),
        "{}",
        stderr(&o)
    );
    let o = common::compile_to(&fused, &out, &["--lora", lora]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("split for step caching"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}
