//! Weights modes against onnx's own loader (issue 18): every output, and the input it was
//! compiled from, passes `onnx.checker.check_model(path)` and `onnx.load(path)` (onnx >= 1.18
//! refuses external data that is a hard or symbolic link); data files have one link; outputs
//! compute what the original does.
//!
//! The onnx checks run `$ATTUNE_PYTHON` (default `python3`); where it or its `onnx` module is
//! missing they are skipped with a message, and everything else is still checked.
mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use attune_compiler::export::{self, ExportOptions, Placed, WeightsMode};
use attune_compiler::import;
use attune_compiler::onnx::{self, ModelProto, tensor_proto::DataLocation};
use attune_compiler::weights::{Tensor, TensorData};
use attune_runtime::HostTensor;
use attune_runtime::compare::compare;
use prost::Message;

use common::*;

/// A python with onnx (`$ATTUNE_PYTHON`, else `python3`), or `None` after saying why not.
fn python() -> Option<&'static str> {
    static PY: OnceLock<Option<String>> = OnceLock::new();
    PY.get_or_init(|| {
        let py = std::env::var("ATTUNE_PYTHON").unwrap_or_else(|_| "python3".into());
        let why = match Command::new(&py)
            .args(["-c", "import onnx; print(onnx.__version__)"])
            .output()
        {
            Ok(o) if o.status.success() => return Some(py),
            Ok(o) => format!("it has no onnx module ({})", stderr(&o).trim()),
            Err(e) => format!("it cannot be run ({e})"),
        };
        eprintln!(
            "SKIPPING the onnx interoperability checks: {py} {why}; \
             set ATTUNE_PYTHON to a python3 with onnx to run them"
        );
        None
    })
    .as_deref()
}

/// onnx's verdict on a model file (checked by path, so its external data is checked too).
fn onnx_verdict(py: &str, model: &Path) -> Result<(), String> {
    let script = "import sys, onnx\n\
                  onnx.checker.check_model(sys.argv[1])\n\
                  onnx.load(sys.argv[1])\n";
    let o = Command::new(py)
        .args(["-c", script])
        .arg(model)
        .output()
        .expect("run python");
    if o.status.success() {
        Ok(())
    } else {
        Err(stderr(&o))
    }
}

/// Each model passes onnx's checker and loader (skipped without a python with onnx).
fn onnx_accepts(models: &[&Path]) {
    let Some(py) = python() else { return };
    for m in models {
        if let Err(e) = onnx_verdict(py, m) {
            panic!("onnx refuses {}:\n{e}", m.display());
        }
    }
}

fn decode(model: &Path) -> ModelProto {
    ModelProto::decode(fs::read(model).unwrap().as_slice()).unwrap()
}

/// The external data files a model refers to.
fn data_files(model: &Path) -> Vec<PathBuf> {
    let m = decode(model);
    let dir = model.parent().unwrap();
    let locations: BTreeSet<String> = m
        .graph
        .unwrap()
        .initializer
        .iter()
        .filter(|t| t.data_location == DataLocation::External as i32)
        .map(|t| {
            onnx::metadata(&t.external_data, "location")
                .unwrap()
                .to_string()
        })
        .collect();
    locations.into_iter().map(|l| dir.join(l)).collect()
}

fn nlink(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().nlink()
}

fn kohya() -> String {
    root()
        .join("models/loras/kohya.safetensors")
        .display()
        .to_string()
}

/// `attune compile` that must succeed; its stdout.
fn compile_ok(model: &Path, out: &Path, flags: &[&str]) -> String {
    let o = compile_to(model, out, flags);
    assert!(
        o.status.success(),
        "{flags:?}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

fn outputs(model: &Path) -> Vec<(String, HostTensor)> {
    run_cpu("sd15_legacy", model)
}

fn assert_close(got: &[(String, HostTensor)], want: &[(String, HostTensor)], tol: f64) {
    assert_eq!(got.len(), want.len());
    for ((n, a), (m, b)) in want.iter().zip(got) {
        assert_eq!(n, m);
        let c = compare(n, a, b).unwrap();
        assert!(c.rel_l2 <= tol, "{n}: {c:?}");
    }
}

/// The line `compile` prints for a data file placed in link mode.
fn placed_line(text: &str, path: &Path) -> String {
    text.lines()
        .find(|l| l.trim_end().ends_with(&path.display().to_string()) && !l.contains("data  "))
        .unwrap_or_else(|| panic!("no line for {}: {text}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn every_weights_mode_gives_files_onnx_loads_and_the_same_outputs() {
    let src = tempfile::tempdir().unwrap();
    let model = copy_fixture("sd15_legacy", src.path());
    let original_data = src.path().join("unet.onnx.data");
    let links_before = nlink(&original_data);
    let input_files = snapshot(src.path());
    let lora = kohya();

    // Link mode into another folder: the original data is cloned or copied, never linked.
    let elsewhere = tempfile::tempdir().unwrap();
    let linked = elsewhere.path().join("fused.onnx");
    let text = compile_ok(&model, &linked, &["--lora", &lora, "--weights", "link"]);
    let placed = elsewhere.path().join("unet.onnx.data");
    let line = placed_line(&text, &placed);
    assert!(
        line.starts_with("copied") || line.starts_with("reflinked"),
        "{text}"
    );
    assert_eq!(
        data_files(&linked),
        [elsewhere.path().join("fused.onnx.data"), placed.clone()]
    );
    assert_eq!(
        fs::read(&placed).unwrap(),
        fs::read(&original_data).unwrap()
    );

    // Link mode into the model's own folder: the original is referred to where it is.
    let own = tempfile::tempdir().unwrap();
    let own_model = copy_fixture("sd15_legacy", own.path());
    let own_before = snapshot(own.path());
    let in_place = own.path().join("fused.onnx");
    let text = compile_ok(
        &own_model,
        &in_place,
        &["--lora", &lora, "--weights", "link"],
    );
    let own_data = own.path().join("unet.onnx.data");
    assert_eq!(
        placed_line(&text, &own_data),
        format!("referenced   {}", own_data.display())
    );
    assert_eq!(
        data_files(&in_place),
        [own.path().join("fused.onnx.data"), own_data.clone()]
    );
    let names: Vec<String> = snapshot(own.path()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "fused.onnx",
            "fused.onnx.data",
            "unet.onnx",
            "unet.onnx.data"
        ]
    );
    for file in &own_before {
        assert!(snapshot(own.path()).contains(file), "{} changed", file.0);
    }

    // Link mode into a folder above the data's: referred to by its path below the output.
    let above = tempfile::tempdir().unwrap();
    fs::create_dir(above.path().join("model")).unwrap();
    let deep_model = copy_fixture("sd15_legacy", &above.path().join("model"));
    let from_above = above.path().join("fused.onnx");
    let text = compile_ok(
        &deep_model,
        &from_above,
        &["--lora", &lora, "--weights", "link"],
    );
    let deep_data = above.path().join("model/unet.onnx.data");
    assert!(
        placed_line(&text, &deep_data).starts_with("referenced"),
        "{text}"
    );
    assert_eq!(
        data_files(&from_above),
        [above.path().join("fused.onnx.data"), deep_data.clone()]
    );

    // Copy mode and inline.
    let other = tempfile::tempdir().unwrap();
    let copied = other.path().join("copied.onnx");
    compile_ok(&model, &copied, &["--lora", &lora, "--weights", "copy"]);
    assert_eq!(data_files(&copied), [other.path().join("copied.onnx.data")]);
    let inline = other.path().join("inline.onnx");
    compile_ok(&model, &inline, &["--lora", &lora, "--inline"]);
    assert!(data_files(&inline).is_empty());
    // Link mode without a change: only the original's data.
    let plain = other.path().join("plain.onnx");
    compile_ok(&model, &plain, &["--weights", "link"]);
    assert_eq!(data_files(&plain), [other.path().join("unet.onnx.data")]);

    let outs = [&linked, &in_place, &from_above, &copied, &inline, &plain];
    // One link per data file of every output; the inputs' link counts unchanged.
    for out in outs {
        for f in data_files(out) {
            if f != own_data && f != deep_data {
                assert_eq!(nlink(&f), 1, "{} of {}", f.display(), out.display());
            }
        }
    }
    assert_eq!(nlink(&original_data), links_before);
    assert_eq!(nlink(&own_data), 1);
    assert_eq!(nlink(&deep_data), 1);
    assert_eq!(input_files, snapshot(src.path()), "the input changed");

    // onnx loads every output and every input (while the outputs exist).
    onnx_accepts(&[&linked, &in_place, &from_above, &copied, &inline, &plain]);
    onnx_accepts(&[&model, &own_model, &deep_model]);

    // They all compute the same: the LoRA's reference, and the original's outputs unfused.
    let fused = outputs(&copied);
    let reference = npy_ref("kohya");
    assert_close(
        &[("out_sample".to_string(), out_sample(fused.clone()))],
        &[("out_sample".to_string(), reference)],
        1e-4,
    );
    for out in [&linked, &in_place, &from_above, &inline] {
        assert_eq!(outputs(out), fused, "{}", out.display());
    }
    assert_close(&outputs(&plain), &outputs(&model), 1e-6);
}

fn npy_ref(name: &str) -> HostTensor {
    attune_runtime::npy::read(&root().join("models/loras/ref").join(format!("{name}.npy"))).unwrap()
}

/// The onnx check above means something: onnx refuses a hard-linked data file (in the model
/// and in the copy of it), which is what link mode used to write.
#[test]
fn onnx_refuses_hard_linked_data_as_link_mode_once_wrote() {
    let Some(py) = python() else { return };
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let model = copy_fixture("sd15_legacy", a.path());
    onnx_accepts(&[&model]);
    fs::hard_link(
        a.path().join("unet.onnx.data"),
        b.path().join("unet.onnx.data"),
    )
    .unwrap();
    match onnx_verdict(py, &model) {
        Err(e) => assert!(e.contains("hard link") || e.contains("hardlink"), "{e}"),
        Ok(()) => eprintln!("note: this onnx (< 1.18?) does not refuse hard-linked external data"),
    }
}

/// Copy mode writes a slice two initializers share once, both referring to the same bytes
/// (as after a shared initializer is cloned under a second name), and the same for new data
/// two tensors share.
#[test]
fn copy_mode_writes_shared_bytes_once() {
    let path = fixture("sd15_legacy");
    let plain = import::read(&path).unwrap();
    let mut model = import::read(&path).unwrap();
    let g = &mut model.graph;
    // An external weight and one replaced by new (owned) data, each given a twin that one of
    // their readers reads instead.
    let mut twins = Vec::new();
    for (name, owned) in [
        ("unet.conv_in.weight", false),
        ("unet.conv_out.weight", true),
    ] {
        let id = g.value_id(name).unwrap();
        let mut t = g.initializer(id).unwrap().clone();
        if owned {
            t = t.with_data(bytes::Bytes::from(t.bytes().unwrap().into_owned()));
            g.set_initializer(t.clone());
        }
        assert!(t.stored_len() >= 1024, "{name} is inlined anyway");
        match (&t.data, owned) {
            (TensorData::External { .. }, false) | (TensorData::Owned(_), true) => {}
            other => panic!("{name}: {:?}", other.0),
        }
        let reader = g.readers(id)[0];
        let slot = g
            .node(reader)
            .inputs
            .iter()
            .position(|i| *i == Some(id))
            .unwrap();
        let twin_name = format!("{name}.twin");
        let mut twin: Tensor = t.clone();
        twin.proto.name = twin_name.clone();
        let twin_id = g.set_initializer(twin);
        g.set_input(reader, slot, Some(twin_id));
        twins.push((name, twin_name));
    }

    let dir = tempfile::tempdir().unwrap();
    let before = dir.path().join("plain.onnx");
    export::write(&plain, &before, &ExportOptions::default()).unwrap();
    let out = dir.path().join("twins.onnx");
    let report = export::write(&model, &out, &ExportOptions::default()).unwrap();
    assert!(report.linked.is_empty());
    let size = |p: &Path| fs::metadata(p).unwrap().len();
    assert!(
        size(&dir.path().join("twins.onnx.data")) <= size(&dir.path().join("plain.onnx.data")),
        "a shared slice was written twice"
    );
    let proto = decode(&out);
    let entry = |name: &str, key: &str| {
        let t = proto
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no initializer {name}"));
        onnx::metadata(&t.external_data, key).unwrap().to_string()
    };
    for (name, twin) in &twins {
        for key in ["location", "offset", "length"] {
            assert_eq!(entry(name, key), entry(twin, key), "{name}: {key}");
        }
    }
    // Read back, both hold the original bytes; onnx loads it; it computes the same.
    let back = import::read(&out).unwrap();
    for (name, twin) in &twins {
        let bytes = |m: &attune_compiler::Model, n: &str| {
            m.graph
                .initializer(m.graph.value_id(n).unwrap())
                .unwrap()
                .bytes()
                .unwrap()
                .into_owned()
        };
        assert_eq!(bytes(&back, name), bytes(&plain, name));
        assert_eq!(bytes(&back, twin), bytes(&plain, name));
    }
    onnx_accepts(&[&out]);
    assert_eq!(outputs(&out), outputs(&before));
}

/// A data file that cannot be read (gone after import) is an error naming it, in either mode,
/// with nothing left in the output folder and the input untouched.
#[test]
fn unreadable_data_file_is_named_and_nothing_is_written() {
    for weights in [WeightsMode::Link, WeightsMode::Copy] {
        let src = tempfile::tempdir().unwrap();
        let path = copy_fixture("sd15_legacy", src.path());
        let model = import::read(&path).unwrap();
        let data = src.path().join("unet.onnx.data");
        // The model keeps its map of the data; the file itself is gone.
        let moved = src.path().join("moved.data");
        fs::rename(&data, &moved).unwrap();
        let before = snapshot(src.path());
        let out_dir = tempfile::tempdir().unwrap();
        let err = export::write(
            &model,
            &out_dir.path().join("o.onnx"),
            &ExportOptions {
                weights,
                inline: false,
            },
        )
        .expect_err("the data file is gone")
        .to_string();
        assert!(
            err.contains(&data.display().to_string()),
            "{weights:?}: {err}"
        );
        assert_eq!(
            fs::read_dir(out_dir.path()).unwrap().count(),
            0,
            "{weights:?}: files left behind"
        );
        assert_eq!(before, snapshot(src.path()));
    }
}

/// The report says how each original data file got there.
#[test]
fn link_mode_reports_referenced_or_cloned_or_copied() {
    let src = tempfile::tempdir().unwrap();
    let path = copy_fixture("sd15_legacy", src.path());
    let model = import::read(&path).unwrap();
    let link = ExportOptions {
        weights: WeightsMode::Link,
        inline: false,
    };
    let here = export::write(&model, &src.path().join("again.onnx"), &link).unwrap();
    assert_eq!(
        here.linked,
        [(src.path().join("unet.onnx.data"), Placed::InPlace)]
    );
    assert!(here.data_file.is_none(), "nothing changed, nothing written");
    let out_dir = tempfile::tempdir().unwrap();
    let there = export::write(&model, &out_dir.path().join("again.onnx"), &link).unwrap();
    let placed = out_dir.path().join("unet.onnx.data");
    assert_eq!(there.linked.len(), 1);
    assert_eq!(there.linked[0].0, placed);
    assert!(matches!(
        there.linked[0].1,
        Placed::Reflinked | Placed::Copied
    ));
    assert_eq!(nlink(&placed), 1);
    assert_eq!(nlink(&src.path().join("unet.onnx.data")), 1);
    assert_eq!(Placed::InPlace.to_string(), "referenced");
    assert_eq!(Placed::Reflinked.to_string(), "reflinked");
    assert_eq!(Placed::Copied.to_string(), "copied");
}

/// A data file onnx refuses (one with a second hard link, as link mode once left them) is not
/// referred to where it is, even from its own folder: the output gets a file of its own.
#[test]
fn hard_linked_input_data_is_not_referred_to_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let model = copy_fixture("sd15_legacy", dir.path());
    let data = dir.path().join("unet.onnx.data");
    fs::hard_link(&data, elsewhere.path().join("old-link.data")).unwrap();
    let out = dir.path().join("fused.onnx");
    let text = compile_ok(&model, &out, &["--weights", "link"]);
    let placed = dir.path().join("fused.onnx.link1.data");
    let line = placed_line(&text, &placed);
    assert!(
        line.starts_with("copied") || line.starts_with("reflinked"),
        "{text}"
    );
    assert_eq!(data_files(&out), std::slice::from_ref(&placed));
    assert_eq!(nlink(&placed), 1);
    assert_eq!(nlink(&data), 2, "the input is left as it was");
    onnx_accepts(&[&out]);
    assert_close(&outputs(&out), &outputs(&model), 1e-6);
}
