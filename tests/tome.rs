//! Token merging against tomesd 0.1.3 and ToDo's key/value downsampling (references in
//! models/tome, made by models/export/tome.py).
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use attune_compiler::{diff, import};
use attune_runtime::compare::compare;
use attune_runtime::{HostTensor, npy};
use common::*;

fn tome_ref(case: &str) -> HostTensor {
    npy::read(&root().join("models/tome").join(format!("{case}.npy"))).unwrap()
}

fn compile(dir: &Path, model: &Path, flags: &[&str]) -> (PathBuf, String) {
    compile_into(dir, model, flags)
}

fn run(model: &Path, inputs: &Path) -> HostTensor {
    run_unet(model, inputs, &[])
}

fn fixture_inputs() -> PathBuf {
    root().join("models/sd15_legacy/inputs")
}

fn assert_close(got: &HostTensor, want: &HostTensor, what: &str) {
    let c = compare("out_sample", want, got).unwrap();
    assert!(c.rel_l2 <= 1e-4, "{what}: {c:?}");
}

#[test]
fn merging_matches_tomesd_and_todo_matches_its_definition() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str], usize)] = &[
        ("tome_r05", "sd15_legacy", &["--tome", "0.5"], 3),
        ("tome_r05", "sd15_dynamo", &["--tome", "0.5"], 3),
        // The same UNet at opset 14: its LayerNorms written out, fused back first.
        ("tome_r05", "sd15_op14_legacy", &["--tome", "0.5"], 3),
        ("todo_avg", "sd15_op14_legacy", &["--tome-mode", "todo"], 3),
        // ... and with a dim symbol per input (Olive's names) and an int64 timestep.
        ("tome_r05", "sd15_olive_legacy", &["--tome", "0.5"], 3),
        (
            "tome_r03_all",
            "sd15_legacy",
            &["--tome", "0.3", "--tome-crossattn", "--tome-mlp"],
            3,
        ),
        (
            "tome_r05_ds2",
            "sd15_legacy",
            &["--tome", "0.5", "--tome-max-downsample", "2"],
            6,
        ),
        (
            "tome_r05_sx3",
            "sd15_legacy",
            &["--tome", "0.5", "--tome-sx", "3", "--tome-sy", "3"],
            3,
        ),
        ("todo_avg", "sd15_legacy", &["--tome-mode", "todo"], 3),
        (
            "todo_nearest",
            "sd15_dynamo",
            &["--tome-mode", "todo", "--todo-pool", "nearest"],
            3,
        ),
        // A diffusion transformer: PixArt's attn1 reads norm1's output modulated by adaLN,
        // and its patch grid is the latent halved.
        (
            "pixart_todo_avg",
            "pixart_legacy",
            &["--tome-mode", "todo", "--tome-max-downsample", "2"],
            2,
        ),
        (
            "pixart_todo_nearest",
            "pixart_legacy",
            &[
                "--tome-mode",
                "todo",
                "--todo-pool",
                "nearest",
                "--tome-max-downsample",
                "2",
            ],
            2,
        ),
    ];
    for (case, model, flags, blocks) in cases {
        let (out, report) = compile(dir.path(), &fixture(model), flags);
        assert!(
            report.contains(&format!("tome: {blocks} rewritten")),
            "{case}: {report}"
        );
        // Each export's own inputs (the same values; Olive's timestep as int64).
        let inputs = root().join("models").join(model).join("inputs");
        assert_close(
            &run(&out, &inputs),
            &tome_ref(case),
            &format!("{case} on {model}"),
        );
    }
}

#[test]
fn one_dynamic_graph_serves_every_resolution_and_static_sizes_match() {
    let dir = tempfile::tempdir().unwrap();
    let other = root().join("models/tome/inputs_24x16");
    for (flags, case) in [
        (&["--tome", "0.5"][..], "tome_r05"),
        (&["--tome-mode", "todo"][..], "todo_avg"),
    ] {
        let (out, _) = compile(dir.path(), &fixture("sd15_legacy"), flags);
        assert_close(&run(&out, &fixture_inputs()), &tome_ref(case), case);
        let want = npy::read(&other.join(format!("ref_{case}.npy"))).unwrap();
        assert_close(&run(&out, &other), &want, &format!("{case} at 24x16"));
    }
    let (out, _) = compile(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--tome", "0.5", "--tome-static", "16x16"],
    );
    assert_close(
        &run(&out, &fixture_inputs()),
        &tome_ref("tome_r05"),
        "static 16x16",
    );
}

#[test]
fn combines_with_the_attention_pass_in_either_order() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["sd15_legacy", "sd15_dynamo"] {
        // One compile: attention substitution, then merging around the fused ops.
        let (out, report) = compile(
            dir.path(),
            &fixture(model),
            &["--tome", "0.5", "--attention", "flash"],
        );
        assert!(
            report.contains("attention: 14 rewritten") && report.contains("tome: 3 rewritten"),
            "{report}"
        );
        assert_close(
            &run(&out, &fixture_inputs()),
            &tome_ref("tome_r05"),
            &format!("{model}: flash + tome"),
        );
        // Two compiles: merged blocks are still recognised as attention afterwards.
        let (merged, _) = compile(dir.path(), &fixture(model), &["--tome", "0.5"]);
        let (out, report) = compile(dir.path(), &merged, &["--attention", "onnx"]);
        assert!(
            report.contains("attention: 14 rewritten, 0 skipped"),
            "{report}"
        );
        assert_close(
            &run(&out, &fixture_inputs()),
            &tome_ref("tome_r05"),
            &format!("{model}: tome, then onnx attention"),
        );
    }
}

#[test]
fn ratio_zero_is_the_canonical_graph() {
    let dir = tempfile::tempdir().unwrap();
    let (out, report) = compile(dir.path(), &fixture("sd15_legacy"), &["--tome", "0"]);
    assert!(report.contains("nothing to merge"), "{report}");
    let (canonical, _) = compile(dir.path(), &fixture("sd15_legacy"), &["--canonical"]);
    let (a, b) = (
        import::read(&canonical).unwrap(),
        import::read(&out).unwrap(),
    );
    assert!(diff::diff(&a, &b).is_empty());
    assert_same_function(
        &run(&fixture("sd15_legacy"), &fixture_inputs()),
        &run(&out, &fixture_inputs()),
    );
}

#[test]
fn other_architectures_compile_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let unets = ["sd2_legacy", "sdxl_legacy", "sd15_classic_legacy"];
    // PixArt-α: its patch grid is the latent's downsampled 2x, its residuals gated by adaLN;
    // only self-attention has a norm of its own there (no tomesd reference for DiTs).
    let with_mlp = ["--tome", "0.5", "--tome-max-downsample", "2", "--tome-mlp"];
    for (model, flags) in unets
        .map(|m| (m, &with_mlp[..]))
        .into_iter()
        .chain([("pixart_legacy", &with_mlp[..4])])
    {
        let (out, report) = compile(dir.path(), &fixture(model), flags);
        assert!(!report.contains("tome: 0 rewritten"), "{model}: {report}");
        let got = run(&out, &root().join("models").join(model).join("inputs"));
        let base =
            npy::read(&root().join("models").join(model).join("ref/out_sample.npy")).unwrap();
        let c = compare("out_sample", &base, &got).unwrap();
        assert!(
            c.rel_l2.is_finite() && c.rel_l2 > 1e-4 && c.rel_l2 < 0.5,
            "{model}: merging should change the output a little: {c:?}"
        );
    }
}

#[test]
fn structural_diff_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    // What merging adds to the canonical form.
    let (out, _) = compile(dir.path(), &fixture("sd15_legacy"), &["--tome", "0.5"]);
    let (canonical, _) = compile(dir.path(), &fixture("sd15_legacy"), &["--canonical"]);
    let got = diff::diff(
        &import::read(&canonical).unwrap(),
        &import::read(&out).unwrap(),
    )
    .render();
    let path = root().join("tests/snapshots/tome_r05_sd15_legacy.txt");
    if fs::read_to_string(&path).unwrap_or_default() != got {
        fs::write(path.with_extension("txt.new"), &got).unwrap();
        panic!(
            "tome diff differs from the snapshot; see {}.new",
            path.display()
        );
    }
}

#[test]
fn bad_settings_are_errors_and_missing_blocks_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("sd15_legacy");
    for (flags, expected) in [
        (&["--tome", "1.0"][..], "the ratio must be in [0, 1)"),
        (&["--tome=-0.1"][..], "the ratio must be in [0, 1)"),
        (
            &["--tome", "0.5", "--tome-sx", "0"][..],
            "strides must be 1 to 64",
        ),
        // A stride wider than any latent compiles to a graph that fails at run time.
        (
            &["--tome", "0.5", "--tome-sy", "9223372036854775807"][..],
            "--tome-sx 2 --tome-sy 9223372036854775807: strides must be 1 to 64",
        ),
        (
            &["--tome-mode", "todo", "--todo-factor", "0"][..],
            "--todo-factor 0: must be 1 to 64",
        ),
        (
            &["--tome", "0.5", "--tome-static", "99999999999x64"][..],
            "--tome-static 99999999999x64: sizes must be 1 to 65536 latent pixels",
        ),
        (
            &["--tome", "0.5", "--tome-static", "64"][..],
            "expected HxW",
        ),
    ] {
        let out = dir.path().join("bad.onnx");
        let o = compile_to(&model, &out, flags);
        assert_eq!(o.status.code(), Some(2), "{flags:?}");
        assert!(stderr(&o).contains(expected), "{flags:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
    let (_, report) = compile(dir.path(), &fixture("noattn_legacy"), &["--tome", "0.5"]);
    assert!(
        report.contains("no transformer block at downsample <= 1: nothing to do"),
        "{report}"
    );
}

#[test]
fn random_slots_come_from_an_input_and_default_to_top_left() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = compile(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--tome", "0.5", "--tome-rand"],
    );
    // tomesd with use_rand=True, its random slots replaced by the ones saved next to the reference.
    let slots = root().join("models/tome/tome_slots_ds1.npy");
    let o = tempfile::tempdir().unwrap();
    let mut args = vec![
        "run".to_string(),
        out.display().to_string(),
        "--out".into(),
        o.path().display().to_string(),
    ];
    for n in ["sample", "timestep", "encoder_hidden_states"] {
        args.push(format!(
            "--input={n}={}",
            fixture_inputs().join(format!("{n}.npy")).display()
        ));
    }
    args.push(format!("--input=tome_slots_ds1={}", slots.display()));
    let r = attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success(), "{}", stderr(&r));
    assert_close(
        &npy::read(&o.path().join("out_sample.npy")).unwrap(),
        &tome_ref("tome_r05_rand"),
        "random slots",
    );
    // Without the input: the deterministic top-left slots.
    assert_close(
        &run(&out, &fixture_inputs()),
        &tome_ref("tome_r05"),
        "default slots",
    );
}
