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
    let mut args = vec!["--controller", controller.to_str().unwrap()];
    args.extend(extra);
    sample_with(unet, steps, &args)
}

/// `attune sample` of `unet` with the controller fixture's prompts and latents, no controller.
fn sample_with(unet: &Path, steps: &str, extra: &[&str]) -> std::process::Output {
    let s = ctl("sample");
    let file = |f: &str| s.join(f).display().to_string();
    let (cond, uncond, latents) = (file("cond.npy"), file("uncond.npy"), file("latents.npy"));
    let mut args = vec!["sample", "--unet", unet.to_str().unwrap(), "--steps", steps];
    args.extend(["--cond", &cond, "--uncond", &uncond, "--latents", &latents]);
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
    // Fed nothing, the hooked graph computes what the original does.
    let original = run(&fixture("sd15_legacy"), None);
    let defaults = run(&hooked, None);
    assert_same_function(
        output(&original, "out_sample"),
        output(&defaults, "out_sample"),
    );
    // Captured maps: head-averaged cross-attention probabilities of every layer.
    assert_captured(&defaults, &ctl("capture.safetensors"), 7);
}

/// Every map of the reference file `want` (`count` of them) is among `outs`, within 1e-5.
fn assert_captured(outs: &[(String, HostTensor)], want: &Path, count: usize) {
    let want = safetensors_io::read(want).unwrap();
    assert_eq!(want.len(), count);
    for (name, t) in &want {
        let c = compare(name, t, output(outs, name)).unwrap();
        assert!(c.rel_l2 <= 1e-5, "{name}: {c:?}");
    }
}

#[test]
fn controls_work_on_an_opset_14_export_with_its_layer_norms_written_out() {
    // The same UNet exported at opset 14: no LayerNormalization op, so the self-attention
    // modules (found by their norm1) appear only once compile fuses the LayerNorms back.
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("sd15_op14_legacy");
    let (hooked, report) = every_hook_fused(dir.path(), &model);
    assert!(
        report.contains("21 exported LayerNorms -> LayerNormalization")
            && report.contains("hooks: 14 rewritten"),
        "{report}"
    );
    assert_controls_match(&model, &hooked);
}

#[test]
fn controls_work_on_an_export_that_names_each_inputs_batch_differently() {
    // Olive's dim names: the sample's batch, the text states' batch and the timestep's are
    // three symbols, so the cross-attention shapes only line up if they are taken as equal.
    let dir = tempfile::tempdir().unwrap();
    let (hooked, report) = every_hook_fused(dir.path(), &fixture("sd15_olive_legacy"));
    assert!(
        report.contains("attention: 7 rewritten, 7 skipped")
            && report.contains("hooks: 14 rewritten"),
        "{report}"
    );
    // The controller fixture's inputs have a float timestep; this export takes int64.
    let inputs = dir.path().join("inputs");
    fs::create_dir(&inputs).unwrap();
    for f in fs::read_dir(ctl("inputs")).unwrap() {
        let f = f.unwrap().path();
        let t = npy::read(&f).unwrap();
        let t = match (f.file_stem().unwrap().to_str(), t) {
            (Some("timestep"), HostTensor::F32(a)) => HostTensor::I64(a.mapv(|v| v as i64)),
            (_, t) => t,
        };
        npy::write(&inputs.join(f.file_name().unwrap()), &t).unwrap();
    }
    for case in CASES {
        let hooks = format!("--input={}", ctl(&format!("{case}.safetensors")).display());
        let outs = run_outputs(&hooked, &inputs, &[hooks]);
        let want = npy::read(&ctl(&format!("{case}.npy"))).unwrap();
        let c = compare("out_sample", &want, output(&outs, "out_sample")).unwrap();
        assert!(c.rel_l2 <= 1e-4, "{case}: {c:?}");
    }
}

/// `--hooks capture,p2p,masactrl --attention flash`: the compiled model and the report.
fn every_hook_fused(dir: &Path, model: &Path) -> (PathBuf, String) {
    compile_into(
        dir,
        model,
        &["--hooks", "capture,p2p,masactrl", "--attention", "flash"],
    )
}

/// Every control of a `--hooks capture,p2p,masactrl` compile of `model` against the PyTorch
/// references; fed nothing, the hooked graph computes what the original does.
fn assert_controls_match(model: &Path, hooked: &Path) {
    for case in CASES {
        let outs = run(hooked, Some(&ctl(&format!("{case}.safetensors"))));
        let want = npy::read(&ctl(&format!("{case}.npy"))).unwrap();
        let c = compare("out_sample", &want, output(&outs, "out_sample")).unwrap();
        assert!(c.rel_l2 <= 1e-4, "{case}: {c:?}");
    }
    let (original, defaults) = (run(model, None), run(hooked, None));
    let c = compare(
        "out_sample",
        output(&original, "out_sample"),
        output(&defaults, "out_sample"),
    )
    .unwrap();
    assert!(c.rel_l2 <= 1e-5, "defaults: {c:?}");
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
    // Non-finite values, empty word lists and map resolutions the UNet lacks.
    let nan_mapper = dir.path().join("nan_mapper.npy");
    let nan_alphas = dir.path().join("nan_alphas.npy");
    let nan = |shape: &[usize]| {
        HostTensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(shape), f32::NAN))
    };
    npy::write(&nan_mapper, &nan(&[1, 77, 77])).unwrap();
    npy::write(&nan_alphas, &nan(&[1, 77])).unwrap();
    let cases = [
        (
            "[p2p]\nequalizer = { 5 = nan }\n".to_string(),
            "equalizer token 5: weight NaN is not a finite f32",
        ),
        (
            "[p2p]\nequalizer = { 5 = inf }\n".to_string(),
            "equalizer token 5: weight inf is not a finite f32",
        ),
        (
            "[p2p]\nequalizer = { 5 = 1e39 }\n".to_string(),
            "equalizer token 5: weight 1e39 is not a finite f32",
        ),
        (
            format!("[p2p]\nmapper = \"{}\"\n", nan_mapper.display()),
            "nan_mapper.npy has a non-finite value (NaN)",
        ),
        (
            format!("[p2p]\nrefine_alphas = \"{}\"\n", nan_alphas.display()),
            "nan_alphas.npy has a non-finite value (NaN)",
        ),
        (
            "[local_blend]\nwords = [[], []]\n".to_string(),
            "[local_blend] words: the list of prompt 0 is empty",
        ),
        (
            "[local_blend]\nwords = [[3], []]\n".to_string(),
            "[local_blend] words: the list of prompt 1 is empty",
        ),
        (
            "[local_blend]\nwords = [[3], [4]]\nresolution = 0\n".to_string(),
            "[local_blend] resolution 0: must be at least 1",
        ),
        (
            "[local_blend]\nwords = [[3], [4]]\nresolution = 5\n".to_string(),
            "[local_blend] resolution = 5: ",
        ),
        (
            "[local_blend]\nwords = [[3], [4]]\nresolution = 4294967296\n".to_string(),
            "its maps have resolutions 4, 8, 16",
        ),
    ];
    for (toml, expected) in cases {
        let c = controller(dir.path(), &toml);
        let out = dir.path().join("never");
        let o = sample(&hooked, "4", &c, &["--out", out.to_str().unwrap()]);
        assert_clean_error(&o, &[expected, "c.toml"]);
        assert!(!out.exists(), "{toml}");
    }
    for g in ["nan", "inf", "-inf"] {
        let out = dir.path().join("never");
        let o = sample_with(
            &hooked,
            "2",
            &[&format!("--guidance={g}"), "--out", out.to_str().unwrap()],
        );
        assert_clean_error(&o, &["--guidance", "must be a finite number"]);
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

#[test]
fn fp16_unets_sample_like_fp32_ones() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("sd15_legacy");
    let (fp16, _) = compile_into(dir.path(), &base, &["--precision", "fp16"]);
    let (fp16_hooked, _) = compile_into(
        dir.path(),
        &base,
        &["--precision", "fp16", "--hooks", "capture,p2p,masactrl"],
    );
    // Every input is fp16, hook inputs included: the sampler must convert what it feeds.
    let o = attune(&["inspect", fp16_hooked.to_str().unwrap()]);
    let text = stdout(&o);
    assert!(
        text.contains("sample f16[") && text.contains("encoder_hidden_states f16["),
        "{text}"
    );
    let latents = |o: &std::process::Output, out: &Path| {
        assert!(o.status.success(), "{}{}", stdout(o), stderr(o));
        npy::read(&out.join("latents.npy")).unwrap()
    };
    let (o32, o16) = (dir.path().join("s32"), dir.path().join("s16"));
    let want = latents(
        &sample_with(&base, "4", &["--out", o32.to_str().unwrap()]),
        &o32,
    );
    let got = latents(
        &sample_with(&fp16, "4", &["--out", o16.to_str().unwrap()]),
        &o16,
    );
    assert_eq!(got.dtype(), attune_runtime::DType::F32);
    // Observed: rel L2 2.0e-3 (fp16 UNet on ORT CPU, 4 steps).
    let c = compare("latents", &want, &got).unwrap();
    assert!(c.rel_l2 <= 1e-2, "{c:?}");
    // With a controller (P2P, LocalBlend on fp16 maps, MasaCtrl) against the PyTorch loop.
    let s = ctl("sample");
    let oh = dir.path().join("s16h");
    let o = sample(
        &fp16_hooked,
        "4",
        &s.join("controller.toml"),
        &["--out", oh.to_str().unwrap(), "--save-maps", "3"],
    );
    let got = latents(&o, &oh);
    let c = compare(
        "latents",
        &npy::read(&s.join("final_latents.npy")).unwrap(),
        &got,
    )
    .unwrap();
    // Observed: rel L2 2.0e-3.
    assert!(c.rel_l2 <= 1e-2, "{c:?}");
    assert_eq!(fs::read_dir(oh.join("maps")).unwrap().count(), 2);
}

/// Writes a model of Identity nodes from one f32 input `x` to each of `outputs`.
fn identity_model(path: &Path, outputs: &[&str]) {
    use attune_compiler::onnx;
    use prost::Message;
    let graph = onnx::GraphProto {
        name: "g".into(),
        input: vec![onnx::tensor_info("x", onnx::DataType::Float, None)],
        output: outputs
            .iter()
            .map(|o| onnx::tensor_info(o, onnx::DataType::Float, None))
            .collect(),
        node: outputs
            .iter()
            .enumerate()
            .map(|(i, o)| onnx::NodeProto {
                input: vec!["x".into()],
                output: vec![o.to_string()],
                name: format!("/id{i}/Identity"),
                op_type: "Identity".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    fs::write(path, model_of(graph).encode_to_vec()).unwrap();
}

#[test]
fn outputs_never_replace_inputs_and_are_checked_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // sample: --latents inside --out.
    let sx = d.join("sx");
    fs::create_dir(&sx).unwrap();
    let latents = sx.join("latents.npy");
    fs::copy(ctl("sample").join("latents.npy"), &latents).unwrap();
    let before = fs::read(&latents).unwrap();
    let s = ctl("sample");
    let file = |f: &str| s.join(f).display().to_string();
    let (cond, uncond) = (file("cond.npy"), file("uncond.npy"));
    let base = fixture("sd15_legacy");
    let o = attune(&[
        "sample",
        "--unet",
        base.to_str().unwrap(),
        "--steps",
        "2",
        "--cond",
        &cond,
        "--uncond",
        &uncond,
        "--latents",
        latents.to_str().unwrap(),
        "--out",
        sx.to_str().unwrap(),
    ]);
    assert_clean_error(&o, &["is the same file as --latents", "latents.npy"]);
    assert_eq!(fs::read(&latents).unwrap(), before);
    // run: an input file where an output goes (a hard link is the same file too).
    let rr = d.join("rr");
    fs::create_dir(&rr).unwrap();
    let inputs = root().join("models/sd15_legacy/inputs");
    fs::copy(inputs.join("sample.npy"), rr.join("out_sample.npy")).unwrap();
    fs::hard_link(rr.join("out_sample.npy"), d.join("linked.npy")).unwrap();
    let before = fs::read(rr.join("out_sample.npy")).unwrap();
    for given in [rr.join("out_sample.npy"), d.join("linked.npy")] {
        let mut args = vec![
            "run".to_string(),
            base.display().to_string(),
            "--out".into(),
            rr.display().to_string(),
            format!("--input=sample={}", given.display()),
        ];
        for n in ["timestep", "encoder_hidden_states"] {
            args.push(format!(
                "--input={n}={}",
                inputs.join(format!("{n}.npy")).display()
            ));
        }
        let o = attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_clean_error(
            &o,
            &[
                "output 'out_sample'",
                "out_sample.npy",
                &given.display().to_string(),
            ],
        );
        assert_eq!(fs::read(rr.join("out_sample.npy")).unwrap(), before);
    }
    // run: two outputs that map to one file name.
    let collide = d.join("collide.onnx");
    identity_model(&collide, &["a/b", "a_b"]);
    let out = d.join("col");
    let o = attune(&[
        "run",
        collide.to_str().unwrap(),
        "--dim",
        "x=2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_error(&o, &["outputs 'a/b' and 'a_b'", "a_b.npy"]);
    assert!(!out.exists());
    // sample: --save-maps problems are found before sampling, so nothing is written.
    let (hooked, _) = compile_into(d, &base, &["--hooks", "capture"]);
    let sm = d.join("sm");
    let o = sample_with(
        &hooked,
        "2",
        &["--save-maps", "77", "--out", sm.to_str().unwrap()],
    );
    assert_clean_error(&o, &["--save-maps 77", "beyond the 77 text tokens"]);
    assert!(!sm.exists());
    let o = sample_with(
        &base,
        "2",
        &["--save-maps", "3", "--out", sm.to_str().unwrap()],
    );
    assert_clean_error(&o, &["--save-maps", "compile it with --hooks capture"]);
    assert!(!sm.exists());
    fs::create_dir(&sm).unwrap();
    fs::write(sm.join("maps"), b"a file").unwrap();
    let o = sample_with(
        &hooked,
        "2",
        &["--save-maps", "3", "--out", sm.to_str().unwrap()],
    );
    assert_clean_error(&o, &["maps", "exists and is not a folder"]);
    assert!(!sm.join("latents.npy").exists());
}

/// P2P's word inputs are `--hooks-words` long, so the text input is fixed to that length: a
/// prompt of another length is an error naming the input, not a broadcast error in a hook.
#[test]
fn p2p_fixes_the_text_length_to_hooks_words() {
    let dir = tempfile::tempdir().unwrap();
    let (hooked, report) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--hooks", "capture,p2p", "--hooks-words", "8"],
    );
    assert!(
        report.contains("text length fixed to --hooks-words 8 (sequence)"),
        "{report}"
    );
    let shown = common::stdout(&attune(&["inspect", hooked.to_str().unwrap()]));
    assert!(
        shown.contains("encoder_hidden_states f32[batch,8,32]"),
        "{shown}"
    );
    let run_with_tokens = |tokens: usize| {
        let text = dir.path().join(format!("text{tokens}.npy"));
        let zeros = ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, tokens, 32]));
        npy::write(&text, &HostTensor::F32(zeros)).unwrap();
        let out = dir.path().join(format!("out{tokens}"));
        let mut args = vec!["run".to_string(), hooked.display().to_string()];
        args.push(format!("--input=encoder_hidden_states={}", text.display()));
        args.extend(["--out".into(), out.display().to_string()]);
        args.extend(["--dim", "height=16", "--dim", "width=16"].map(String::from));
        attune(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let ok = run_with_tokens(8);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_clean_error(
        &run_with_tokens(7),
        &["input 'encoder_hidden_states': dim 1 is 7, the model declares 8"],
    );
    // Capture alone has no word inputs and keeps the text length free.
    let (capture, report) =
        compile_into(dir.path(), &fixture("sd15_legacy"), &["--hooks", "capture"]);
    assert!(!report.contains("text length fixed"), "{report}");
    let shown = common::stdout(&attune(&["inspect", capture.to_str().unwrap()]));
    assert!(
        shown.contains("encoder_hidden_states f32[batch,sequence,32]"),
        "{shown}"
    );
}

#[test]
fn seeded_latents_follow_each_exports_own_dim_symbols() {
    // One UNet, four exports: our dim names, diffusers' conversion script's (a `channels`
    // symbol), Olive's (a symbol per input, int64 timestep) and dynamo's (`8*height`).
    // Sampled from seeded noise at 16x16, all start from the same latents and end alike.
    let dir = tempfile::tempdir().unwrap();
    let mut finals = Vec::new();
    for name in [
        "sd15_legacy",
        "sd15_op14_legacy",
        "sd15_olive_legacy",
        "sd15_dynamo",
    ] {
        let latents = two_steps(
            &fixture(name),
            &dir.path().join(name),
            &["--height", "16", "--width", "16"],
        );
        assert_eq!(latents.shape()[1..], [4, 16, 16], "{name}");
        finals.push((name, latents));
    }
    for (name, latents) in &finals[1..] {
        let c = compare("latents", &finals[0].1, latents).unwrap();
        assert!(c.rel_l2 <= 1e-5, "{name}: {c:?}");
    }
}

/// sd15_olive_legacy with its timestep declared `[]` (a scalar, unsqueezed inside) or `[1]`,
/// as some exports take it; the data file next to it.
fn with_timestep_declared(dir: &Path, dims: &[i64]) -> PathBuf {
    use attune_compiler::onnx::{self, DataType, ModelProto, NodeProto};
    use prost::Message;
    let src = fixture("sd15_olive_legacy");
    let mut m = ModelProto::decode(fs::read(&src).unwrap().as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    let input = g.input.iter_mut().find(|i| i.name == "timestep").unwrap();
    let shape = dims
        .iter()
        .map(|&d| onnx::tensor_shape_proto::dimension::Value::DimValue(d))
        .collect();
    *input = onnx::tensor_info("timestep", DataType::Int64, Some(shape));
    if dims.is_empty() {
        for n in &mut g.node {
            for i in n.input.iter_mut().filter(|i| *i == "timestep") {
                *i = "timestep_row".into();
            }
        }
        g.initializer.push(onnx::TensorProto {
            name: "timestep_axes".into(),
            data_type: DataType::Int64 as i32,
            dims: vec![1],
            int64_data: vec![0],
            ..Default::default()
        });
        g.node.insert(
            0,
            NodeProto {
                op_type: "Unsqueeze".into(),
                name: "/unsqueeze_timestep".into(),
                input: vec!["timestep".into(), "timestep_axes".into()],
                output: vec!["timestep_row".into()],
                ..Default::default()
            },
        );
    }
    let out = dir.join(format!("t{}", dims.len())).join("unet.onnx");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    fs::copy(
        src.with_file_name("unet.onnx.data"),
        out.with_file_name("unet.onnx.data"),
    )
    .unwrap();
    fs::write(&out, m.encode_to_vec()).unwrap();
    out
}

#[test]
fn the_sampler_feeds_the_timestep_in_the_form_the_unet_declares() {
    let dir = tempfile::tempdir().unwrap();
    let latents = ctl("sample").join("latents.npy").display().to_string();
    let sample =
        |unet: &Path, out: &str| two_steps(unet, &dir.path().join(out), &["--latents", &latents]);
    let per_row = sample(&fixture("sd15_olive_legacy"), "per_row");
    for dims in [&[][..], &[1]] {
        let got = sample(&with_timestep_declared(dir.path(), dims), "other");
        let c = compare("latents", &per_row, &got).unwrap();
        assert!(c.rel_l2 <= 1e-6, "timestep {dims:?}: {c:?}");
    }
}

/// `attune sample` of `unet`, 2 steps, with the controller fixture's prompts (and `extra`):
/// the final latents.
fn two_steps(unet: &Path, out: &Path, extra: &[&str]) -> HostTensor {
    let s = ctl("sample");
    let file = |f: &str| s.join(f).display().to_string();
    let (cond, uncond) = (file("cond.npy"), file("uncond.npy"));
    let mut args = vec!["sample", "--unet", unet.to_str().unwrap(), "--steps", "2"];
    args.extend([
        "--cond",
        &cond,
        "--uncond",
        &uncond,
        "--out",
        out.to_str().unwrap(),
    ]);
    args.extend(extra);
    let o = attune(&args);
    assert!(o.status.success(), "{}: {}", unet.display(), stderr(&o));
    npy::read(&out.join("latents.npy")).unwrap()
}

/// `attune sample` of `unet` on a models/sample case, 4 steps at the guidance
/// models/export/sampling.py ran it with.
fn sample_case(unet: &Path, case: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let guidance = if ["flux", "flux_dev"].contains(&case) {
        "1"
    } else {
        "5"
    };
    common::sample_case(unet, case, out, 4, guidance, extra)
}

#[test]
fn schedulers_from_diffusers_configs_sample_like_diffusers() {
    // diffusers' scheduler objects built from the same scheduler_config.json files, stepping
    // the torch models (models/export/sampling.py): DDIM with v-prediction, trailing spacing
    // and zero terminal SNR, and DPM-Solver++ 2M with v-prediction and Heun's correction (SD2);
    // SDXL's Euler config read as DDIM and as the Euler scheduler it names, with its pooled text
    // and default time ids; PixArt-α's DPMSolver config read as DDIM (linear betas, linspace
    // spacing, DDIM's clip_sample default) and as DPM-Solver++ 2M, its predicted variance
    // dropped; SD3's flow-matching Euler with shift 3 and pooled text (and shifted by its patch
    // tokens, read off its patch-embedding convolution); Flux-dev's token-count shift as
    // FluxPipeline drives it (packed latents), without guidance (its default), with true CFG,
    // and Flux-dev's embedded guidance (3.5 by default, as FluxPipeline's).
    let dir = tempfile::tempdir().unwrap();
    // (case, model, scheduler: else the one the config names)
    for (case, model, scheduler) in [
        ("sd2_vpred", "sd2_legacy", None),
        ("sdxl", "sdxl_legacy", Some("ddim")),
        ("sdxl_euler", "sdxl_legacy", None),
        ("sd2_dpm", "sd2_legacy", None),
        ("pixart", "pixart_legacy", Some("ddim")),
        ("pixart_dpm", "pixart_legacy", None),
        ("sd3", "sd3_legacy", None),
        ("sd3_dynamic", "sd3_legacy", None),
        ("flux", "flux_dynamo", None),
        ("flux_cfg", "flux_dynamo", None),
        ("flux_dev", "flux_dev_dynamo", None),
    ] {
        let config = root()
            .join("models/sample")
            .join(case)
            .join("scheduler_config.json");
        let want = npy::read(
            &root()
                .join("models/sample")
                .join(case)
                .join("final_latents.npy"),
        )
        .unwrap();
        let out = dir.path().join(case);
        let mut args = vec!["--scheduler-config", config.to_str().unwrap()];
        args.extend(scheduler.iter().flat_map(|s| ["--scheduler", s]));
        let o = sample_case(&fixture(model), case, &out, &args);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let c = compare(
            "latents",
            &want,
            &npy::read(&out.join("latents.npy")).unwrap(),
        )
        .unwrap();
        assert!(c.rel_l2 <= 2e-5, "{case}: {c:?}");
        // Stable Diffusion's built-in DDIM schedule lands elsewhere: the config matters.
        // SDXL's config is that schedule (as DDIM).
        let default = dir.path().join(format!("{case}-default"));
        let o = sample_case(&fixture(model), case, &default, &[]);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let c = compare(
            "latents",
            &want,
            &npy::read(&default.join("latents.npy")).unwrap(),
        )
        .unwrap();
        match case {
            "sdxl" => assert!(c.rel_l2 <= 2e-5, "{case} without its config: {c:?}"),
            // DDIM and Euler on one schedule differ little, yet 100x the tolerance.
            "sdxl_euler" => assert!(c.rel_l2 > 2e-3, "{case} as DDIM: {c:?}"),
            _ => assert!(c.rel_l2 > 0.05, "{case} without its config: {c:?}"),
        }
    }
    // Capture on Flux's joint site while sampling without guidance: the maps are the prompts'
    // own rows, and the latents stay the reference's.
    let (hooked, _) = compile_into(dir.path(), &fixture("flux_dynamo"), &["--hooks", "capture"]);
    let config = root().join("models/sample/flux/scheduler_config.json");
    let out = dir.path().join("captured");
    let args = [
        "--scheduler-config",
        config.to_str().unwrap(),
        "--save-maps",
        "0,3",
    ];
    let o = sample_case(&hooked, "flux", &out, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = npy::read(&root().join("models/sample/flux/final_latents.npy")).unwrap();
    let c = compare(
        "latents",
        &want,
        &npy::read(&out.join("latents.npy")).unwrap(),
    )
    .unwrap();
    assert!(c.rel_l2 <= 2e-5, "{c:?}");
    assert_eq!(fs::read_dir(out.join("maps")).unwrap().count(), 4);
}

#[test]
fn stable_diffusions_pndm_config_read_as_ddim_is_the_built_in_schedule() {
    // SD1.5's pipeline folder ships a PNDMScheduler config, which runs as PLMS (tests/samplers.rs);
    // `--scheduler ddim` reads its betas, offset and final alpha, which are the built-in
    // schedule's, and names the keys DDIM does not use.
    let dir = tempfile::tempdir().unwrap();
    let config = root().join("models/sample/sd15_pndm/scheduler_config.json");
    let size = ["--height", "16", "--width", "16"];
    let built_in = two_steps(&fixture("sd15_legacy"), &dir.path().join("a"), &size);
    let args = [
        "--scheduler-config",
        config.to_str().unwrap(),
        "--scheduler",
        "ddim",
        "--height",
        "16",
        "--width",
        "16",
    ];
    let from_config = two_steps(&fixture("sd15_legacy"), &dir.path().join("b"), &args);
    assert_eq!(built_in, from_config);
    let out = dir.path().join("c");
    let args = [&args[..], &["--out", out.to_str().unwrap()]].concat();
    let o = sample_with(&fixture("sd15_legacy"), "1", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not used by attune's scheduler: skip_prk_steps"),
        "{}",
        stderr(&o)
    );
    // As PLMS it lands elsewhere.
    let plms_args = [&args[..2], &size[..]].concat();
    let plms = two_steps(&fixture("sd15_legacy"), &dir.path().join("d"), &plms_args);
    assert_ne!(built_in, plms);
}

#[test]
fn bad_scheduler_configs_and_conditioning_are_errors_naming_the_key_or_input() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let flow = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}"#;
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (
            write("a.json", r#"{"beta_schedule": "exponential"}"#),
            vec![],
            "key 'beta_schedule' = \"exponential\": attune's schedulers take linear, scaled_linear, squaredcos_cap_v2",
        ),
        (
            write("b.json", r#"{"thresholding": true}"#),
            vec![],
            "key 'thresholding' = true: dynamic thresholding is not implemented",
        ),
        (
            write("c.json", r#"{"trained_betas": [0.1, 0.2]}"#),
            vec![],
            "key 'trained_betas'",
        ),
        (
            write(
                "c0.json",
                &format!(r#"{{"trained_betas": [{}]}}"#, ["0.0"; 1000].join(", ")),
            ),
            vec![],
            "a zero beta leaves a step without noise",
        ),
        (
            write("d.json", r#"{"beta_start": 0.5, "beta_end": 0.1}"#),
            vec![],
            "must satisfy 0 < start <= end < 1",
        ),
        (
            write("e.json", "{beta_start: 1"),
            vec![],
            "not a JSON scheduler config",
        ),
        (
            write(
                "f.json",
                r#"{"rescale_betas_zero_snr": true, "timestep_spacing": "trailing", "clip_sample": false}"#,
            ),
            vec![],
            "such schedules need prediction_type v_prediction",
        ),
        (
            write("g.json", flow),
            vec!["--scheduler".into(), "ddim".into()],
            "is a flow-matching schedule",
        ),
        (
            write("h.json", r#"{"_class_name": "DDIMScheduler"}"#),
            vec!["--scheduler".into(), "flow-euler".into()],
            "is not a flow-matching schedule",
        ),
        (
            write(
                "i.json",
                r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": true}"#,
            ),
            vec![],
            "use_dynamic_shifting shifts by the image's token count, which this model's input does not tell",
        ),
        (
            write(
                "k.json",
                r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": true, "time_shift_type": "cubic"}"#,
            ),
            vec![],
            "key 'time_shift_type' = \"cubic\"",
        ),
        (
            write(
                "j.json",
                r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": -1}"#,
            ),
            vec![],
            "key 'shift' = -1",
        ),
        (
            write(
                "n.json",
                r#"{"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}"#,
            ),
            vec![],
            "key 'interpolation_type' = \"log_linear\"",
        ),
        (
            write(
                "o.json",
                r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true, "use_exponential_sigmas": true}"#,
            ),
            vec![],
            "key 'use_exponential_sigmas' = true: only one of the sigma spacings can be on (use_karras_sigmas is)",
        ),
        (
            write(
                "p.json",
                r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}"#,
            ),
            vec![],
            "key 'solver_order' = 4: orders 1, 2 and 3 are implemented",
        ),
        (
            write(
                "q.json",
                r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}"#,
            ),
            vec![],
            "key 'algorithm_type' = \"dpmsolver\"",
        ),
        (
            write("l.json", r#"{"num_train_timesteps": 1000000000000}"#),
            vec![],
            "key 'num_train_timesteps' = 1000000000000: must be within 2..=100000",
        ),
        (
            write(
                "m.json",
                r#"{"steps_offset": 18446744073709551615, "clip_sample": false}"#,
            ),
            vec![],
            "reaches timestep 18446744073709552000, beyond the 1000 training steps",
        ),
    ];
    let s = ctl("sample").display().to_string();
    let unet = fixture("sd15_legacy").display().to_string();
    let out = dir.path().join("out");
    for (config, extra, expected) in &cases {
        let mut args = vec![
            "sample",
            "--unet",
            &unet,
            "--steps",
            "2",
            "--cond",
            &format!("{s}/cond.npy"),
            "--uncond",
            &format!("{s}/uncond.npy"),
            "--out",
            out.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(["--scheduler-config".to_string(), config.clone()]);
        args.extend(extra.iter().cloned());
        let o = attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_clean_error(&o, &[expected]);
        assert!(
            stderr(&o).contains(config.as_str()),
            "the error names the file: {}",
            stderr(&o)
        );
        assert!(!out.exists());
    }
    // Conditioning: SD3 needs its pooled text; other models have none; shapes must fit;
    // an integer timestep cannot take flow matching's fractional ones.
    let sd3 = root().join("models/sample/sd3").display().to_string();
    let pooled = [
        format!("--pooled-cond={sd3}/pooled_cond.npy"),
        format!("--pooled-uncond={sd3}/pooled_uncond.npy"),
    ];
    let rank3 = [
        format!("--pooled-cond={sd3}/uncond.npy"),
        format!("--pooled-uncond={sd3}/pooled_uncond.npy"),
    ];
    let one_row = [
        format!("--pooled-cond={sd3}/pooled_uncond.npy"),
        format!("--pooled-uncond={sd3}/pooled_uncond.npy"),
    ];
    let flow_config = format!("--scheduler-config={}", write("flow.json", flow));
    let conditioning: Vec<(&str, &str, Vec<String>, &str)> = vec![
        (
            "sd3_legacy",
            "sd3",
            vec![],
            "takes pooled text embeddings ('pooled_projections'): give --pooled-cond and --pooled-uncond",
        ),
        (
            "sd3_legacy",
            "sd3",
            vec![pooled[0].clone()],
            "--pooled-cond and --pooled-uncond go together",
        ),
        (
            "sd3_legacy",
            "sd3",
            rank3.to_vec(),
            "uncond.npy: expected a 2-D f32 array, got f32 [1, 8, 16]",
        ),
        (
            "sd3_legacy",
            "sd3",
            one_row.to_vec(),
            "do not fit 2 prompts (expected [2, dim] and [1 or 2, dim])",
        ),
        (
            "sd15_legacy",
            "",
            pooled.to_vec(),
            "has no pooled text input (SD3's 'pooled_projections', SDXL's 'text_embeds')",
        ),
        ("flux_dynamo", "sd3", vec![], "takes pooled text embeddings"),
        (
            "sd15_legacy",
            "",
            vec!["--embedded-guidance=2".into()],
            "has no 'guidance' input (Flux-dev's embedded guidance)",
        ),
        (
            "sd15_legacy",
            "",
            vec![
                "--guidance=1".into(),
                format!("--controller={}", ctl("sample/controller.toml").display()),
            ],
            "act on the classifier-free-guidance batch's halves",
        ),
        (
            "sd15_olive_legacy",
            "",
            vec![flow_config],
            "declares it i64, and flow-matching Euler feeds fractional timesteps",
        ),
    ];
    for (model, case, extra, expected) in conditioning {
        let prompts = if case.is_empty() {
            s.clone()
        } else {
            sd3.clone()
        };
        let mut args = vec![
            "sample".to_string(),
            format!("--unet={}", fixture(model).display()),
            "--steps=2".into(),
            format!("--cond={prompts}/cond.npy"),
            format!("--uncond={prompts}/uncond.npy"),
            format!("--out={}", out.display()),
            "--height=16".into(),
            "--width=16".into(),
        ];
        args.extend(extra);
        let o = attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_clean_error(&o, &[expected]);
        assert!(!out.exists(), "{model}");
    }
    // Guidance needs the unconditional embeddings; without guidance they are not read.
    let o = attune(&[
        "sample",
        "--unet",
        fixture("sd15_legacy").to_str().unwrap(),
        "--steps=2",
        &format!("--cond={s}/cond.npy"),
        "--guidance=3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_error(&o, &["--guidance 3 needs --uncond"]);
    assert!(!out.exists());
}

#[test]
fn every_control_matches_the_pytorch_processors_on_a_diffusion_transformer() {
    // PixArt-α: adaLN-single blocks of patch tokens, self-attention (attn1) and
    // cross-attention (attn2), against the same processors (models/controller/pixart).
    // With `--attention flash` too: the self sites fuse under their controls.
    for fused in [false, true] {
        hooked_pixart_matches(fused);
    }
}

fn hooked_pixart_matches(fused: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = vec!["--hooks", "capture,p2p,masactrl"];
    if fused {
        flags.extend(["--attention", "flash"]);
    }
    let (hooked, report) = compile_into(dir.path(), &fixture("pixart_legacy"), &flags);
    assert!(report.contains("hooks: 4 rewritten"), "{report}");
    if fused {
        assert!(
            report.contains("attention: 2 rewritten, 2 skipped"),
            "{report}"
        );
    }
    let pixart = |f: &str| ctl(&format!("pixart/{f}"));
    let run = |model: &Path, hooks: Option<&str>| {
        let extra: Vec<String> = hooks
            .map(|h| format!("--input={}", pixart(h).display()))
            .into_iter()
            .collect();
        run_outputs(model, &pixart("inputs"), &extra)
    };
    // Random weights keep PixArt's self-attention maps close to uniform, so self-replace
    // moves the output by 4e-5 only: the tolerance sits well below every control's effect.
    const TOL: f64 = 2e-6;
    let base = npy::read(&pixart("default.npy")).unwrap();
    for case in CASES {
        let outs = run(&hooked, Some(&format!("{case}.safetensors")));
        let want = npy::read(&pixart(&format!("{case}.npy"))).unwrap();
        let c = compare("out_sample", &want, output(&outs, "out_sample")).unwrap();
        assert!(c.rel_l2 <= TOL, "{case}: {c:?}");
        let effect = compare("out_sample", &base, &want).unwrap().rel_l2;
        println!(
            "fused {fused} {case}: rel L2 {:.1e} (the control moves the output {effect:.1e})",
            c.rel_l2
        );
        assert!(
            effect > 10.0 * TOL,
            "{case}: the reference moves by {effect:.1e} only"
        );
    }
    // Fed nothing: the original's output.
    let defaults = run(&hooked, None);
    let original = run(&fixture("pixart_legacy"), None);
    let (got, want) = (
        output(&defaults, "out_sample"),
        output(&original, "out_sample"),
    );
    let c = compare("out_sample", want, got).unwrap();
    assert!(c.rel_l2 <= SAME_FUNCTION, "{c:?}");
    assert_captured(&defaults, &pixart("capture.safetensors"), 2);
}

#[test]
fn joint_attention_capture_matches_the_pytorch_maps() {
    // MM-DiT: one softmax over both streams. Capture takes the image queries' probabilities
    // over the text keys (SD3 joins image first, Flux text first), fused elsewhere or not;
    // P2P and MasaCtrl say why they leave the site alone.
    for (name, sites) in [("sd3_legacy", 2), ("flux_dynamo", 1)] {
        let want = ctl(&format!("joint/{name}.safetensors"));
        for flash in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut flags = vec!["--hooks", "capture"];
            if flash {
                flags.extend(["--attention", "flash"]);
            }
            let (hooked, report) = compile_into(dir.path(), &fixture(name), &flags);
            assert!(
                report.contains(&format!("hooks: {sites} rewritten")),
                "{report}"
            );
            let outs = run_outputs(
                &hooked,
                &root().join("models").join(name).join("inputs"),
                &[],
            );
            assert_captured(&outs, &want, sites);
            let reference = npy::read(&root().join("models").join(name).join("ref/out_sample.npy"));
            let c = compare(
                "out_sample",
                &reference.unwrap(),
                output(&outs, "out_sample"),
            )
            .unwrap();
            assert!(c.rel_l2 <= 1e-5, "{name} flash {flash}: {c:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let (_, report) = compile_into(dir.path(), &fixture(name), &["--hooks", "p2p,masactrl"]);
        assert!(
            report.contains("p2p and masactrl control UNet-style self- and cross-attention"),
            "{report}"
        );
    }
}

#[test]
fn a_scheduler_class_attune_does_not_run_is_refused_unless_one_is_named() {
    // A UniPC config ran as DDIM, 26% off diffusers', and exited 0: now an error naming it.
    let dir = tempfile::tempdir().unwrap();
    let pndm =
        fs::read_to_string(root().join("models/sample/sd15_pndm/scheduler_config.json")).unwrap();
    let config = dir.path().join("scheduler_config.json");
    fs::write(
        &config,
        pndm.replace("PNDMScheduler", "LMSDiscreteScheduler"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let args = [
        "--scheduler-config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let o = sample_with(&fixture("sd15_legacy"), "2", &args);
    assert_clean_error(&o, &["LMSDiscreteScheduler", "--scheduler"]);
    assert!(!out.exists());
    let named = [&args[..], &["--scheduler", "ddim"]].concat();
    let o = sample_with(&fixture("sd15_legacy"), "2", &named);
    assert!(o.status.success(), "{}", stderr(&o));
}
