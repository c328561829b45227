//! What a new user meets in the first hour (issue 17): every missing dim in one error,
//! `--input DIR`, `sample --reference`, the hint of a numeric diff that fails by design, the
//! demo's timing and folded structural diff, and errors that name a path once.
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use attune_runtime::compare::compare;
use attune_runtime::npy;
use common::*;

fn inputs_dir(name: &str) -> PathBuf {
    root().join("models").join(name).join("inputs")
}

fn reference(name: &str) -> attune_runtime::HostTensor {
    npy::read(&root().join("models").join(name).join("ref/out_sample.npy")).unwrap()
}

/// The relative L2 column of the numeric table's row for `output`.
fn rel_l2(text: &str, output: &str) -> f64 {
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(output))
        .unwrap_or_else(|| panic!("no row for {output} in:\n{text}"));
    row.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// `printed` is `want` to the three significant digits the table shows.
fn printed_as(printed: f64, want: f64) {
    assert!(
        (printed - want).abs() <= 1e-3 * want.abs() + 1e-12,
        "printed {printed:e}, computed {want:e}"
    );
}

#[test]
fn every_missing_dim_is_listed_at_once_with_the_inputs_using_it() {
    let dynamo = fixture("sd15_dynamo");
    let dynamo = dynamo.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    // The same error from run, bench and diff --numeric: all four symbols, each with its inputs,
    // and what a dynamo export's `8*height` means.
    for args in [
        vec!["run", dynamo, "--out", out],
        vec!["bench", dynamo, "--iters", "1"],
        vec!["diff", dynamo, dynamo, "--numeric"],
    ] {
        let o = attune(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.matches("error:").count(), 1, "{err}");
        assert!(
            err.contains(
                "give --dim batch=N --dim height=N --dim width=N --dim sequence=N (or those inputs with --input)"
            ),
            "{args:?}: {err}"
        );
        for line in [
            "batch     input 'sample' dim 0, input 'timestep' dim 0, input 'encoder_hidden_states' dim 0",
            "height    input 'sample' dim 2 = 8*height: height is the latent's height divided by 8",
            "width     input 'sample' dim 3 = 8*width: width is the latent's width divided by 8",
            "sequence  input 'encoder_hidden_states' dim 1",
        ] {
            assert!(err.contains(line), "{args:?}: expected '{line}' in:\n{err}");
        }
    }
    // Following the message: the fixture's latents are 16x16, so height = width = 16 / 8.
    let shipped = npy::read(&inputs_dir("sd15_dynamo").join("sample.npy")).unwrap();
    let sequence = npy::read(&inputs_dir("sd15_dynamo").join("encoder_hidden_states.npy"))
        .unwrap()
        .shape()[1];
    let side = shipped.shape()[2] / 8;
    let (side, sequence) = (format!("{side}"), format!("{sequence}"));
    let o = attune(&[
        "run",
        dynamo,
        "--out",
        out,
        "--dim",
        "batch=2",
        "--dim",
        &format!("height={side}"),
        "--dim",
        &format!("width={side}"),
        "--dim",
        &format!("sequence={sequence}"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = npy::read(&Path::new(out).join("out_sample.npy")).unwrap();
    assert_eq!(got.shape(), shipped.shape());
    // A given latent fixes batch, height (its 16 / 8) and width: only `sequence` is missing.
    let sample = format!(
        "sample={}",
        inputs_dir("sd15_dynamo").join("sample.npy").display()
    );
    let o = attune(&["run", dynamo, "--out", out, "--input", &sample]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("give --dim sequence=N (or those inputs with --input)")
            && err.contains("sequence  input 'encoder_hidden_states' dim 1")
            && !err.contains("batch")
            && !err.contains("height"),
        "{err}"
    );
}

#[test]
fn input_folder_gives_every_npy_in_it_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["sd15_legacy", "sd15_dynamo"] {
        let model = fixture(name);
        let folder = inputs_dir(name);
        let out = dir.path().join(name);
        let o = attune(&[
            "run",
            model.to_str().unwrap(),
            "--input",
            folder.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let got = npy::read(&out.join("out_sample.npy")).unwrap();
        // What onnxruntime computed on the shipped inputs (on another CPU: see tests/runtime.rs).
        let c = compare("out_sample", &reference(name), &got).unwrap();
        assert!(c.rel_l2 <= 2e-6, "{name}: {c:?}");
        // The same as naming each file.
        let by_name = run_outputs(&model, &folder, &[]);
        assert_eq!(by_name[0].1, got, "{name}");
    }

    // A file that names no input: an error naming the file, before anything runs.
    let model = fixture("sd15_legacy");
    let model = model.to_str().unwrap();
    let partial = dir.path().join("partial");
    fs::create_dir(&partial).unwrap();
    for f in ["sample.npy", "timestep.npy"] {
        fs::copy(inputs_dir("sd15_legacy").join(f), partial.join(f)).unwrap();
    }
    fs::copy(
        inputs_dir("sd15_legacy").join("sample.npy"),
        partial.join("latents.npy"),
    )
    .unwrap();
    fs::write(partial.join("README.txt"), "not an input").unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let p = partial.to_str().unwrap();
    let o = attune(&["run", model, "--input", p, "--out", out]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "--input {p}: {} names no input of {model} (its inputs: sample, timestep, encoder_hidden_states)",
            partial.join("latents.npy").display()
        )),
        "{err}"
    );
    assert!(!Path::new(out).exists());
    // Inputs the folder lacks are made as before: random, with the dims they need.
    fs::remove_file(partial.join("latents.npy")).unwrap();
    let o = attune(&["run", model, "--input", p, "--out", out]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("give --dim sequence=N")
            && err.contains("input 'encoder_hidden_states' dim 1"),
        "{err}"
    );
    let o = attune(&[
        "run",
        model,
        "--input",
        p,
        "--dim",
        "sequence=5",
        "--out",
        out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shipped = npy::read(&inputs_dir("sd15_legacy").join("sample.npy")).unwrap();
    let got = npy::read(&Path::new(out).join("out_sample.npy")).unwrap();
    assert_eq!(got.shape(), shipped.shape());
    // A folder with no .npy files, and a folder given with a file of the same input.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let o = attune(&["run", model, "--input", empty.to_str().unwrap()]);
    assert!(
        stderr(&o).contains("the folder holds no .npy files"),
        "{}",
        stderr(&o)
    );
    let twice = format!(
        "sample={}",
        inputs_dir("sd15_legacy").join("sample.npy").display()
    );
    let o = attune(&["run", model, "--input", p, "--input", &twice]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("input 'sample' is given twice"),
        "{}",
        stderr(&o)
    );
}

/// `attune sample` on a shipped reference (models/sample/CASE), as models/export/sampling.py
/// made it (4 steps, guidance 5), with `extra` flags.
fn sample_reference(unet: &str, case: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let dir = root().join("models/sample").join(case);
    let file = |f: &str| dir.join(f).display().to_string();
    let mut args: Vec<String> = vec!["sample".into(), "--unet".into()];
    args.push(fixture(unet).display().to_string());
    for (flag, f) in [
        ("--scheduler-config", "scheduler_config.json"),
        ("--cond", "cond.npy"),
        ("--uncond", "uncond.npy"),
        ("--pooled-cond", "pooled_cond.npy"),
        ("--pooled-uncond", "pooled_uncond.npy"),
        ("--reference", "final_latents.npy"),
    ] {
        if dir.join(f).exists() {
            args.extend([flag.to_string(), file(f)]);
        }
    }
    args.extend(["--steps", "4", "--out"].map(String::from));
    args.push(out.display().to_string());
    args.extend(extra.iter().map(|a| a.to_string()));
    attune(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn sample_compares_its_final_latents_with_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    for (case, unet) in [("sd2_vpred", "sd2_legacy"), ("sdxl_euler", "sdxl_legacy")] {
        let want = npy::read(
            &root()
                .join("models/sample")
                .join(case)
                .join("final_latents.npy"),
        )
        .unwrap();
        let latents = root().join("models/sample").join(case).join("latents.npy");
        let latents = latents.to_str().unwrap();
        let out = dir.path().join(case);
        // The settings the reference was made with: within the default 1e-4.
        let o = sample_reference(unet, case, &out, &["--latents", latents, "--guidance", "5"]);
        let text = stdout(&o);
        assert_eq!(o.status.code(), Some(0), "{case}: {text}{}", stderr(&o));
        assert!(text.contains("within 1e-4"), "{text}");
        let got = npy::read(&out.join("latents.npy")).unwrap();
        let c = compare("latents", &want, &got).unwrap();
        assert!(c.rel_l2 <= 1e-4, "{case}: {c:?}");
        printed_as(rel_l2(&text, "latents"), c.rel_l2);
        assert!(
            text.lines()
                .any(|l| l.starts_with("latents") && l.ends_with("yes")),
            "{text}"
        );
        // The obvious command (guidance 7.5 by default) lands elsewhere: exit 1, and why.
        let o = sample_reference(unet, case, &out, &["--latents", latents]);
        let text = stdout(&o);
        assert_eq!(o.status.code(), Some(1), "{case}: {text}{}", stderr(&o));
        let got = npy::read(&out.join("latents.npy")).unwrap();
        let c = compare("latents", &want, &got).unwrap();
        assert!(c.rel_l2 > 1e-2, "{case}: {c:?}");
        printed_as(rel_l2(&text, "latents"), c.rel_l2);
        assert!(
            text.lines()
                .any(|l| l.starts_with("latents") && l.ends_with("NO")),
            "{text}"
        );
        assert!(text.contains("--steps 4 --guidance 5"), "{text}");
        // --tol sets what passes.
        let o = sample_reference(unet, case, &out, &["--latents", latents, "--tol", "1"]);
        assert_eq!(o.status.code(), Some(0), "{case}: {}", stdout(&o));
        assert!(stdout(&o).contains("within 1e0"), "{}", stdout(&o));
    }
    // Seeded latents of another size: refused before sampling, saying what to give.
    let out = dir.path().join("seeded");
    let o = sample_reference("sd2_legacy", "sd2_vpred", &out, &["--guidance", "5"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("but the final latents will be [2, 4, 64, 64]")
            && err.contains("give the --latents the reference started from"),
        "{err}"
    );
    assert!(!out.exists());
    // --tol belongs to --reference.
    let o = attune(&[
        "sample", "--unet", "m.onnx", "--cond", "c.npy", "--tol", "0.1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--reference"), "{}", stderr(&o));
}

#[test]
fn numeric_diff_above_tol_says_that_merging_changes_outputs_by_design() {
    let dir = tempfile::tempdir().unwrap();
    let original = fixture("sd15_legacy");
    let (merged, _) = compile_into(dir.path(), &original, &["--tome", "0.5"]);
    let folder = inputs_dir("sd15_legacy");
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "diff".to_string(),
            original.display().to_string(),
            merged.display().to_string(),
            "--numeric".into(),
            "--input".into(),
            folder.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| attune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // tomesd's own output on the shipped inputs is this far from the original's.
    let tomesd = npy::read(&root().join("models/tome/tome_r05.npy")).unwrap();
    let by_design = compare("out_sample", &reference("sd15_legacy"), &tomesd)
        .unwrap()
        .rel_l2;
    assert!(by_design > 1e-2, "{by_design}");
    let o = run(args(&[]));
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{text}{}", stderr(&o));
    assert!(text.contains("within 1e-4"), "{text}");
    let measured = rel_l2(&text, "out_sample");
    assert!(
        (measured - by_design).abs() <= 0.02 * by_design,
        "measured {measured}, tomesd {by_design}"
    );
    let lines: Vec<&str> = text.lines().collect();
    let row = lines
        .iter()
        .position(|l| l.starts_with("out_sample"))
        .unwrap();
    assert!(lines[row].ends_with("NO"), "{text}");
    let hint = lines[row + 1];
    assert!(
        hint.contains("token merging")
            && hint.contains("--attention linear")
            && hint.contains("changes the outputs by design")
            && hint.contains("--tol"),
        "{text}"
    );
    // Accepting the change: exit 0, no hint.
    let o = run(args(&["--tol", "0.1"]));
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(!text.contains("by design"), "{text}");
}

#[test]
fn a_missing_model_is_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.onnx");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["run", missing],
        vec!["inspect", missing],
        vec!["bench", missing],
    ] {
        let o = attune(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.matches(missing).count(), 1, "{err}");
        assert!(
            err.contains(&format!("cannot read model {missing}: No such file")),
            "{err}"
        );
    }
}

#[test]
fn help_says_what_sample_does() {
    let o = attune(&["--help"]);
    let text = stdout(&o);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("sample "))
        .unwrap();
    for part in [
        "DDIM",
        "Euler",
        "DPM-Solver++",
        "flow-matching",
        "classifier-free guidance",
        "scheduler_config.json",
    ] {
        assert!(line.contains(part), "{line}");
    }
    let o = attune(&["sample", "--help"]);
    assert!(
        stdout(&o).contains("--reference") && stdout(&o).contains("[default: 0.0001]"),
        "{}",
        stdout(&o)
    );
}

/// The demo's timing rows: (median, min, max) of `original` and `compiled`, and the verdict.
fn timing_rows(text: &str) -> ([(f64, f64, f64); 2], String) {
    let table = text.split("spread (min..max) ms").nth(1).unwrap();
    let row = |name: &str| {
        let l = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row in:\n{text}"));
        let cells: Vec<&str> = l.split_whitespace().collect();
        let (min, max) = cells[2].split_once("..").unwrap();
        (
            cells[1].parse().unwrap(),
            min.parse().unwrap(),
            max.parse().unwrap(),
        )
    };
    let verdict = text
        .lines()
        .find(|l| l.starts_with("compiled/original:"))
        .unwrap()
        .to_string();
    ([row("original"), row("compiled")], verdict)
}

#[test]
fn demo_times_a_real_latent_and_folds_its_diff() {
    let model = fixture("sd15_legacy");
    let o = attune(&["demo", "--model", model.to_str().unwrap(), "--iters", "2"]);
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    // No path of a file that is gone when the demo ends.
    assert!(text.contains("compiled in "), "{text}");
    assert!(text.contains("temporary folder"), "{text}");
    assert!(!text.contains("compiled.onnx"), "{text}");
    // Every attention site rewritten, the identical module lines folded: the folded lines'
    // counts add up to the 14 sites of the fixture.
    let sites = text
        .lines()
        .find_map(|l| l.strip_prefix("attention: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    assert_eq!(sites, "14", "{text}");
    let section = text
        .split("by module")
        .nth(1)
        .unwrap()
        .split("\ninitializers")
        .next()
        .unwrap();
    let mut fused = 0;
    for l in section
        .lines()
        .filter(|l| l.contains("com.microsoft.MultiHeadAttention +1"))
    {
        fused += l
            .split_once("(x")
            .map_or(1, |(_, n)| n.split(' ').next().unwrap().parse().unwrap());
    }
    assert_eq!(fused, 14, "{section}");
    assert!(section.lines().count() < 40, "{section}");
    assert!(section.contains("(x14 modules)"), "{section}");
    // One default tolerance for the demo and diff.
    assert!(text.contains("within 1e-4"), "{text}");
    // Timing at a 64x64 latent, with each model's spread, session memory and the verdict
    // the spreads give.
    assert!(
        text.contains(
            "a 64x64 latent (sample [2, 4, 64, 64] seeded, --dim height=64 --dim width=64)"
        ),
        "{text}"
    );
    assert!(text.contains("spread (min..max) ms") && text.contains("session RSS"));
    let ([a, b], verdict) = timing_rows(&text);
    for (median, min, max) in [a, b] {
        assert!(min <= median && median <= max, "{text}");
    }
    let overlap = a.1 <= b.2 && b.1 <= a.2;
    assert_eq!(verdict.contains("within noise"), overlap, "{text}");
    assert_eq!(verdict.contains("beyond the spread"), !overlap, "{text}");

    // The dynamo export (`8*height`) at a 32x32 latent; --out keeps the model and says where.
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("sd15_dynamo");
    let o = attune(&[
        "demo",
        "--model",
        model.to_str().unwrap(),
        "--iters",
        "1",
        "--latent",
        "32",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    let kept = dir.path().join("compiled.onnx");
    assert!(
        text.contains(&format!("wrote {} in", kept.display())),
        "{text}"
    );
    assert!(kept.is_file());
    assert!(
        text.contains(
            "a 32x32 latent (sample [2, 4, 32, 32] seeded, --dim height=4 --dim width=4)"
        ),
        "{text}"
    );
}
