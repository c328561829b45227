//! The samplers people pick, against diffusers' schedulers stepping the same torch UNets
//! (models/export/samplers.py): PLMS, Euler ancestral, Heun, Karras/exponential/beta sigmas,
//! DPM-Solver++ 2M/3M and SDE, DPM++ SDE, UniPC, LCM, TCD, DDIM with eta; stochastic ones
//! replay the reference's noise.
mod common;

use std::fs;
use std::path::Path;

use common::*;

/// (case, UNet fixture, steps, guidance, flags): every models/sample case samplers.py made.
type Case = (
    &'static str,
    &'static str,
    usize,
    &'static str,
    &'static [&'static str],
);
const CASES: [Case; 23] = [
    ("sd15_pndm", "sd15_legacy", 4, "5", &[]),
    ("pndm_vpred_trailing", "sd2_legacy", 5, "5", &[]),
    ("euler_ancestral", "sd15_legacy", 4, "5", &[]),
    ("euler_ancestral_vpred", "sd2_legacy", 4, "5", &[]),
    ("euler_karras", "sd15_legacy", 4, "5", &[]),
    ("euler_exponential_sigma_min", "sd15_legacy", 4, "5", &[]),
    ("heun", "sd15_legacy", 4, "5", &[]),
    ("heun_beta_vpred", "sd2_legacy", 3, "5", &[]),
    ("dpm_karras", "sd15_legacy", 6, "5", &[]),
    ("dpm3m", "sd15_legacy", 6, "5", &[]),
    ("dpm_sde_karras", "sd15_legacy", 6, "5", &[]),
    ("dpm3m_sde_heun_beta", "sd2_legacy", 6, "5", &[]),
    ("dpm_sde_exponential", "sd15_legacy", 5, "5", &[]),
    ("dpm_sde_single_karras", "sd15_legacy", 4, "5", &[]),
    ("dpm_sde_single_vpred", "sd2_legacy", 3, "5", &[]),
    ("unipc", "sd15_legacy", 5, "5", &[]),
    ("unipc3_bh1_karras", "sd15_legacy", 6, "5", &[]),
    ("unipc_noise_vpred", "sd2_legacy", 5, "5", &[]),
    ("unipc3_exponential", "sd15_legacy", 5, "5", &[]),
    ("lcm_plain", "sd15_legacy", 4, "1", &[]),
    ("lcm", "lcm_legacy", 4, "8", &[]),
    ("ddim_eta", "sd15_legacy", 4, "5", &["--eta", "0.5"]),
    ("tcd", "sd15_legacy", 4, "5", &["--eta", "0.3"]),
];

fn case_file(case: &str, file: &str) -> String {
    root()
        .join("models/sample")
        .join(case)
        .join(file)
        .display()
        .to_string()
}

/// `attune sample` of a case with its config (and its noise, where it has some).
fn run_case(case: &str, unet: &str, steps: usize, guidance: &str, out: &Path, extra: &[&str]) {
    let config = case_file(case, "scheduler_config.json");
    let noise = case_file(case, "noise.npy");
    let mut args = vec!["--scheduler-config", config.as_str()];
    if Path::new(&noise).exists() {
        args.extend(["--noise-file", noise.as_str()]);
    }
    args.extend(extra);
    let o = sample_case(&fixture(unet), case, out, steps, guidance, &args);
    assert!(o.status.success(), "{case}: {}", stderr(&o));
}

#[test]
fn every_sampler_lands_on_diffusers_latents() {
    let dir = tempfile::tempdir().unwrap();
    for (case, unet, steps, guidance, flags) in CASES {
        let out = dir.path().join(case);
        run_case(case, unet, steps, guidance, &out, flags);
        let want = read_f32(Path::new(&case_file(case, "final_latents.npy")));
        assert_rel_l2(want, read_f32(&out.join("latents.npy")), 2e-5, case);
    }
}

#[test]
fn stochastic_samplers_draw_from_the_seed_without_a_noise_file() {
    // Without the reference's noise the result is another sample: seeded, so repeatable.
    let dir = tempfile::tempdir().unwrap();
    let case = "euler_ancestral";
    let config = case_file(case, "scheduler_config.json");
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        let args = ["--scheduler-config", config.as_str(), "--seed", seed];
        let o = sample_case(&fixture("sd15_legacy"), case, &out, 4, "5", &args);
        assert!(o.status.success(), "{}", stderr(&o));
        read_f32(&out.join("latents.npy"))
    };
    let (a, b, c) = (run("a", "1"), run("b", "1"), run("c", "2"));
    assert_eq!(a, b);
    assert!(max_abs(&a, &c) > 1e-2);
    let want = read_f32(Path::new(&case_file(case, "final_latents.npy")));
    assert!(max_abs(&a, &want) > 1e-2);
    // DPM++ SDE's seeded Brownian draws too.
    let case = "dpm_sde_single_karras";
    let config = case_file(case, "scheduler_config.json");
    let args = ["--scheduler-config", config.as_str(), "--seed", "4"];
    let runs: Vec<_> = ["d", "e"]
        .iter()
        .map(|name| {
            let out = dir.path().join(name);
            let o = sample_case(&fixture("sd15_legacy"), case, &out, 4, "5", &args);
            assert!(o.status.success(), "{}", stderr(&o));
            read_f32(&out.join("latents.npy"))
        })
        .collect();
    assert_eq!(runs[0], runs[1]);
    let want = read_f32(Path::new(&case_file(case, "final_latents.npy")));
    assert!(max_abs(&runs[0], &want) > 1e-2);
}

#[test]
fn flags_set_sigma_spacings_and_the_sde_variant() {
    // --sigmas karras on a plain DPM-Solver++ config is the reference's use_karras_sigmas;
    // --scheduler dpm2m-sde its SDE algorithm.
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("scheduler_config.json");
    let karras = fs::read_to_string(case_file("dpm_sde_karras", "scheduler_config.json")).unwrap();
    // Python writes lambda_min_clipped as -Infinity, which JSON has not; null reads the same.
    let mut config: serde_json::Value =
        serde_json::from_str(&karras.replace("-Infinity", "null")).unwrap();
    config["use_karras_sigmas"] = false.into();
    config["algorithm_type"] = "dpmsolver++".into();
    fs::write(&plain, config.to_string()).unwrap();
    let noise = case_file("dpm_sde_karras", "noise.npy");
    let out = dir.path().join("out");
    let args = [
        "--scheduler-config",
        plain.to_str().unwrap(),
        "--sigmas",
        "karras",
        "--scheduler",
        "dpm2m-sde",
        "--noise-file",
        noise.as_str(),
    ];
    let o = sample_case(
        &fixture("sd15_legacy"),
        "dpm_sde_karras",
        &out,
        6,
        "5",
        &args,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want = read_f32(Path::new(&case_file("dpm_sde_karras", "final_latents.npy")));
    assert_rel_l2(want, read_f32(&out.join("latents.npy")), 2e-5, "flags");
    // A spacing the scheduler has no key for is an error naming it and the flag.
    let out = dir.path().join("refused");
    let args = ["--scheduler", "euler-ancestral", "--sigmas", "karras"];
    let o = sample_case(
        &fixture("sd15_legacy"),
        "euler_ancestral",
        &out,
        4,
        "5",
        &args,
    );
    assert_clean_error(&o, &["Euler ancestral", "use_karras_sigmas", "--sigmas"]);
    assert!(!out.exists());
}

#[test]
fn bad_sampler_settings_and_noise_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let text = fs::read_to_string(case_file("unipc", "scheduler_config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut config);
        let path = dir.path().join(name);
        fs::write(&path, config.to_string()).unwrap();
        path
    };
    let refused = |config: &Path, extra: &[&str], expected: &[&str]| {
        let out = dir.path().join("out");
        let mut args = vec!["--scheduler-config", config.to_str().unwrap()];
        args.extend(extra);
        let o = sample_case(&fixture("sd15_legacy"), "unipc", &out, 5, "5", &args);
        assert_clean_error(&o, expected);
        assert!(!out.exists(), "{expected:?}: an output was written");
    };
    let plain = write("plain.json", &|_| {});
    refused(
        &plain,
        &["--eta", "0.3"],
        &["--eta 0.3", "UniPC takes no eta"],
    );
    refused(
        &plain,
        &["--scheduler", "ddim", "--eta", "1.5"],
        &["--eta 1.5", "[0, 1]"],
    );
    let order = write("order.json", &|c| c["solver_order"] = 4.into());
    refused(&order, &[], &["solver_order", "4"]);
    let two = write("two.json", &|c| {
        c["use_karras_sigmas"] = true.into();
        c["use_beta_sigmas"] = true.into();
    });
    refused(&two, &[], &["use_beta_sigmas", "use_karras_sigmas"]);
    let spacing = write("spacing.json", &|c| c["timestep_spacing"] = "cosine".into());
    refused(&spacing, &[], &["timestep_spacing", "cosine"]);
    let prk = write("prk.json", &|c| {
        c["_class_name"] = "PNDMScheduler".into();
        c["skip_prk_steps"] = false.into();
    });
    refused(&prk, &[], &["skip_prk_steps"]);
    let sde = write("sde.json", &|c| {
        c["_class_name"] = "DPMSolverMultistepScheduler".into();
        c["algorithm_type"] = "sde-dpmsolver".into();
    });
    refused(&sde, &[], &["algorithm_type", "sde-dpmsolver"]);
    // Karras sigmas' fractional timesteps on an export that declares an integer timestep.
    let out = dir.path().join("int");
    let karras = case_file("euler_karras", "scheduler_config.json");
    let args = ["--scheduler-config", karras.as_str()];
    let o = sample_case(
        &fixture("sd15_olive_legacy"),
        "euler_karras",
        &out,
        4,
        "5",
        &args,
    );
    assert_clean_error(&o, &["timestep", "fractional timesteps"]);
    assert!(!out.exists());
    // Noise files: too few draws, the wrong shape, not f32.
    let ancestral = dir.path().join("ancestral.json");
    fs::copy(
        case_file("euler_ancestral", "scheduler_config.json"),
        &ancestral,
    )
    .unwrap();
    let noise = read_f32(Path::new(&case_file("euler_ancestral", "noise.npy")));
    let few = dir.path().join("few.npy");
    let short = noise.slice_axis(ndarray::Axis(0), (0..3).into()).to_owned();
    attune_runtime::npy::write(&few, &attune_runtime::HostTensor::F32(short)).unwrap();
    refused(
        &ancestral,
        &["--noise-file", few.to_str().unwrap()],
        &["few.npy", "3 draws", "takes 5"],
    );
    let wide = dir.path().join("wide.npy");
    let shape = ndarray::IxDyn(&[4, 2, 4, 16, 8]);
    attune_runtime::npy::write(
        &wide,
        &attune_runtime::HostTensor::F32(ndarray::ArrayD::zeros(shape)),
    )
    .unwrap();
    refused(
        &ancestral,
        &["--noise-file", wide.to_str().unwrap()],
        &["wide.npy", "[4, 2, 4, 16, 8]"],
    );
    let ints = dir.path().join("ints.npy");
    let i64s = ndarray::ArrayD::<i64>::zeros(ndarray::IxDyn(&[4, 2, 4, 16, 16]));
    attune_runtime::npy::write(&ints, &attune_runtime::HostTensor::I64(i64s)).unwrap();
    refused(
        &ancestral,
        &["--noise-file", ints.to_str().unwrap()],
        &["ints.npy", "f32"],
    );
}

/// `attune generate` on sd15_tiny with its own PNDM config (PLMS), and img2img with Heun (which
/// starts at call 2·t_start) and Euler ancestral (the reference's noise replayed), against
/// diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline.
#[test]
fn generate_samples_like_diffusers_pipelines() {
    let dir = tempfile::tempdir().unwrap();
    let folder = root().join("models/pipelines/sd15_tiny");
    let refs = folder.join("reference/samplers");
    let prompt = "a photo of an astronaut riding a horse on mars";
    for (case, extra) in [
        ("txt2img_pndm", vec![]),
        ("img2img_heun", vec!["--scheduler", "heun"]),
        (
            "img2img_euler_ancestral",
            vec!["--scheduler", "euler-ancestral"],
        ),
    ] {
        let r = refs.join(case);
        let file = |f: &str| r.join(f).display().to_string();
        let (png, saved) = (
            dir.path().join(format!("{case}.png")),
            dir.path().join(case),
        );
        let saved = saved.with_extension("npy");
        let (latents, input, noise) = (file("latents.npy"), file("input.png"), file("noise.npy"));
        let mut args = vec![
            "generate",
            folder.to_str().unwrap(),
            "--prompt",
            prompt,
            "--negative-prompt",
            "",
            "--steps",
            "4",
            "--guidance",
            "7.5",
            "--latents",
            &latents,
            "--save-latents",
            saved.to_str().unwrap(),
            "-o",
            png.to_str().unwrap(),
        ];
        if case.starts_with("img2img") {
            args.extend(["--image", &input, "--strength", "0.75"]);
        }
        if r.join("noise.npy").exists() {
            args.extend(["--noise-file", &noise]);
        }
        args.extend(extra);
        let o = attune(&args);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert_like_reference(&r, read_f32(&saved), &png, 1e-4, case);
    }
}

/// A LatentConsistencyModelPipeline folder (an LCM-distilled UNet taking `timestep_cond`): the
/// pipeline's default guidance 8.5 embedded, no CFG batch, its noise replayed; against diffusers'
/// LatentConsistencyModelPipeline.
#[test]
fn generate_runs_a_latent_consistency_pipeline_like_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let folder = root().join("models/pipelines/lcm_tiny");
    let refs = folder.join("reference/lcm");
    let file = |f: &str| refs.join(f).display().to_string();
    let (png, saved) = (dir.path().join("lcm.png"), dir.path().join("lcm.npy"));
    let (latents, noise) = (file("latents.npy"), file("noise.npy"));
    let o = attune(&[
        "generate",
        folder.to_str().unwrap(),
        "--prompt",
        "a photo of an astronaut riding a horse on mars",
        "--steps",
        "4",
        "--latents",
        &latents,
        "--noise-file",
        &noise,
        "--save-latents",
        saved.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_like_reference(&refs, read_f32(&saved), &png, 1e-4, "lcm_tiny");
}
