//! Attention-control hooks and the sampling loop against PyTorch attention processors doing
//! the same (models/export/controller.py).
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use attune_runtime::compare::compare;
use attune_runtime::{HostTensor, npy, safetensors_io};
use common::*;

fn ctl(name: &str) -> PathBuf {
    root().join("models/controller").join(name)
}

/// `attune sample` of `unet` with the controller fixture's prompts and latents.
fn sample(unet: &Path, steps: &str, controller: &Path, extra: &[&str]) -> std::process::Output {
    let s = ctl("sample");
    let file = |f: &str| s.join(f).display().to_string();
    let (cond, uncond, latents) = (file("cond.npy"), file("uncond.npy"), file("latents.npy"));
    let mut args = vec!["sample", "--unet", unet.to_str().unwrap(), "--steps", steps];
    args.extend(["--cond", &cond, "--uncond", &uncond, "--latents", &latents]);
    args.extend(["--controller", controller.to_str().unwrap()]);
    args.extend(extra);
    attune(&args)
}

/// Runs with the controller fixture's inputs (and a hook-value file); every output.
fn run(model: &Path, hooks: Option<&Path>) -> Vec<(String, HostTensor)> {
    let extra: Vec<String> = hooks
        .map(|h| format!("--input={}", h.display()))
        .into_iter()
        .collect();
    run_outputs(model, &ctl("inputs"), &extra)
}

fn output<'a>(outs: &'a [(String, HostTensor)], name: &str) -> &'a HostTensor {
    &outs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .1
}

const CASES: [&str; 5] = ["replace", "refine", "reweight", "self_replace", "masactrl"];

#[test]
fn every_control_matches_the_pytorch_processors_and_defaults_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (hooked, report) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--hooks", "capture,p2p,masactrl"],
    );
    // 7 cross sites (capture, p2p) + 7 self-attention modules (p2p self_gate, masactrl gate).
    assert!(report.contains("hooks: 14 rewritten"), "{report}");
    for case in CASES {
        let outs = run(&hooked, Some(&ctl(&format!("{case}.safetensors"))));
        let want = npy::read(&ctl(&format!("{case}.npy"))).unwrap();
        let c = compare("out_sample", &want, output(&outs, "out_sample")).unwrap();
        assert!(c.rel_l2 <= 1e-4, "{case}: {c:?}");
        // Each control really changes the output (so a no-op could not pass).
        let base = npy::read(&ctl("default.npy")).unwrap();
        assert!(
            compare("out_sample", &base, &want).unwrap().rel_l2 > 1e-3,
            "{case} reference equals the default"
        );
    }
    // Fed nothing, the hooked graph computes exactly what the original does.
    let original = run(&fixture("sd15_legacy"), None);
    let defaults = run(&hooked, None);
    assert_eq!(
        output(&defaults, "out_sample"),
        output(&original, "out_sample")
    );
    // Captured maps: head-averaged cross-attention probabilities of every layer.
    let want = safetensors_io::read(&ctl("capture.safetensors")).unwrap();
    assert_eq!(want.len(), 7);
    for (name, t) in &want {
        let c = compare(name, t, output(&defaults, name)).unwrap();
        assert!(c.rel_l2 <= 1e-5, "{name}: {c:?}");
    }
}

#[test]
fn self_controls_work_on_fused_sites_and_layer_selection_keeps_others_fusable() {
    let dir = tempfile::tempdir().unwrap();
    // P2P's self-replace and MasaCtrl act on the projections: self-attention fuses, the
    // cross-attention sites whose maps P2P and capture read stay unfused and say why.
    let (fused, report) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--hooks", "capture,p2p,masactrl", "--attention", "flash"],
    );
    assert!(
        report.contains("attention: 7 rewritten, 7 skipped")
            && report.contains("hooks: 14 rewritten"),
        "{report}"
    );
    for case in CASES {
        let outs = run(&fused, Some(&ctl(&format!("{case}.safetensors"))));
        let want = npy::read(&ctl(&format!("{case}.npy"))).unwrap();
        let c = compare("out_sample", &want, output(&outs, "out_sample")).unwrap();
        assert!(c.rel_l2 <= 1e-4, "{case}: {c:?}");
    }
    let (masa, report) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--hooks", "masactrl", "--attention", "flash"],
    );
    assert!(
        report.contains("attention: 14 rewritten") && report.contains("hooks: 7 rewritten"),
        "{report}"
    );
    let outs = run(&masa, Some(&ctl("masactrl.safetensors")));
    let c = compare(
        "out_sample",
        &npy::read(&ctl("masactrl.npy")).unwrap(),
        output(&outs, "out_sample"),
    )
    .unwrap();
    assert!(c.rel_l2 <= 1e-4, "{c:?}");
    // Only cross-attention hooked: no self control, cross stays unfused and says why.
    let (out, report) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &[
            "--hooks",
            "p2p",
            "--hooks-layers",
            "*.attn2",
            "--attention",
            "flash",
        ],
    );
    assert!(
        report.contains("attention: 7 rewritten, 7 skipped")
            && report.contains("hooks: 7 rewritten"),
        "{report}"
    );
    assert!(
        report.contains(
            "attn2: hooked by --hooks (capture/p2p read the cross-attention probabilities): kept unfused"
        ),
        "{report}"
    );
    let outs = run(&out, Some(&ctl("replace.safetensors")));
    let c = compare(
        "out_sample",
        &npy::read(&ctl("replace.npy")).unwrap(),
        output(&outs, "out_sample"),
    )
    .unwrap();
    assert!(c.rel_l2 <= 1e-4, "{c:?}");
}

#[test]
fn classic_form_hooks_keep_the_graph_exact_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("sd15_classic_legacy");
    let (hooked, report) = compile_into(dir.path(), &model, &["--hooks", "capture,p2p"]);
    assert!(report.contains("hooks: 8 rewritten"), "{report}");
    let inputs = root().join("models/sd15_classic_legacy/inputs");
    let run_with = |m: &Path| {
        let o = tempfile::tempdir().unwrap();
        let mut args = vec![
            "run".to_string(),
            m.display().to_string(),
            "--out".into(),
            o.path().display().to_string(),
        ];
        for n in ["sample", "timestep", "encoder_hidden_states"] {
            args.push(format!(
                "--input={n}={}",
                inputs.join(format!("{n}.npy")).display()
            ));
        }
        let r = attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(r.status.success(), "{}", stderr(&r));
        npy::read(&o.path().join("out_sample.npy")).unwrap()
    };
    assert_eq!(run_with(&hooked), run_with(&model));
}

#[test]
fn sampling_with_a_controller_matches_the_pytorch_loop() {
    let dir = tempfile::tempdir().unwrap();
    let (hooked, _) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--hooks", "capture,p2p,masactrl"],
    );
    let s = ctl("sample");
    let out = dir.path().join("sampled");
    let o = sample(
        &hooked,
        "4",
        &s.join("controller.toml"),
        &["--out", out.to_str().unwrap(), "--save-maps", "3,4"],
    );
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let got = npy::read(&out.join("latents.npy")).unwrap();
    let c = compare(
        "latents",
        &npy::read(&s.join("final_latents.npy")).unwrap(),
        &got,
    )
    .unwrap();
    assert!(c.rel_l2 <= 1e-4, "{c:?}");
    assert_eq!(fs::read_dir(out.join("maps")).unwrap().count(), 4);
}

/// Writes a controller TOML (and mapper) into `dir`.
fn controller(dir: &Path, toml: &str) -> PathBuf {
    let p = dir.join("c.toml");
    fs::write(&p, toml).unwrap();
    p
}

#[test]
fn bad_controllers_are_errors_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let (hooked, _) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--hooks", "capture,p2p,masactrl"],
    );
    let wrong = dir.path().join("wrong_mapper.npy");
    npy::write(
        &wrong,
        &HostTensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 77, 76]))),
    )
    .unwrap();
    let cases = [
        (
            format!("[p2p]\nmapper = \"{}\"\n", wrong.display()),
            "expected f32 [1, 77, 77]",
        ),
        (
            "[p2p]\nequalizer = { 80 = 2.0 }\n".to_string(),
            "equalizer token 80 is beyond the 77 text tokens",
        ),
        (
            "[local_blend]\nwords = [[3], [77]]\n".to_string(),
            "word index 77 is beyond the 77 text tokens",
        ),
        (
            "[masactrl]\nstart_step = 9\n".to_string(),
            "start_step 9 is outside the 4 steps",
        ),
        (
            "[p2p]\ncross_replace_steps = 1.5\n".to_string(),
            "not a range of fractions within [0, 1]",
        ),
        (
            "[p2p]\nmystery = 1\n".to_string(),
            "unknown field `mystery`",
        ),
    ];
    for (toml, expected) in cases {
        let c = controller(dir.path(), &toml);
        let out = dir.path().join("never");
        let o = sample(&hooked, "4", &c, &["--out", out.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{toml}");
        assert!(stderr(&o).contains(expected), "{toml}: {}", stderr(&o));
        assert!(!out.exists());
    }
    // A controller needing hooks the model lacks.
    let c = controller(dir.path(), "[p2p]\ncross_replace_steps = 0.5\n");
    let o = sample(&fixture("sd15_legacy"), "2", &c, &[]);
    assert!(
        stderr(&o).contains("compile it with --hooks p2p"),
        "{}",
        stderr(&o)
    );
}
