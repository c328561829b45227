//! A malformed model is an error in attune, never a crash in a backend (#22): one crafted
//! model per class of error, refused by `inspect`, `compile` and `run` on ORT CPU and tract
//! with exit 2, the node (or graph input) named, nothing written, no signal; and refused by
//! `Backend::open` before either backend sees it.
mod common;

use std::path::Path;

use attune_compiler::ir::builder::Builder;
use attune_compiler::onnx::{AttributeProto, DataType, ModelProto, NodeProto, TensorProto};
use attune_compiler::patch::attr::{int as int_attr, ints as ints_attr, tensor as tensor_attr};
use attune_runtime::ort_backend::OrtOptions;
use attune_runtime::{Backend, Ep};
use common::{assert_refused, attune, snapshot, stderr};
use prost::Message;

/// Writes `model` and checks every command refuses it naming each of `expected`.
fn refused_everywhere(model: ModelProto, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    let p = path.to_str().unwrap();
    let out = dir.path().join("out.onnx");
    let out_dir = dir.path().join("outs");
    let before = snapshot(dir.path());
    let commands: [Vec<&str>; 4] = [
        vec!["inspect", p],
        vec!["compile", p, "-o", out.to_str().unwrap()],
        vec!["run", p, "--ep", "cpu", "--out", out_dir.to_str().unwrap()],
        vec![
            "run",
            p,
            "--ep",
            "tract",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    ];
    for args in commands {
        let o = attune(&args);
        let err = stderr(&o);
        // Exit 2 is a clean refusal: a process killed by a signal has no exit code.
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        for e in expected {
            assert!(err.contains(e), "{args:?}: expected '{e}' in: {err}");
        }
        assert_eq!(snapshot(dir.path()), before, "{args:?} wrote a file");
        assert!(!out_dir.exists(), "{args:?} made {}", out_dir.display());
    }
    for ep in [Ep::Cpu, Ep::Tract] {
        let e = Backend::open(&path, ep, &OrtOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{} opened a malformed model", ep.name()))
            .to_string();
        for want in expected {
            assert!(e.contains(want), "{}: expected '{want}' in: {e}", ep.name());
        }
    }
}

/// `x: f32[dims]` through one `op` node (named `/<op>_0`) with these attributes.
fn one_op(
    dims: &[i64],
    op: &str,
    consts: &[(&str, &[i64], &[i64])],
    attrs: Vec<AttributeProto>,
) -> ModelProto {
    let mut b = Builder::new();
    let x = b.input("x", dims);
    let mut inputs = vec![x];
    for (name, d, v) in consts {
        if name.is_empty() {
            inputs.push(String::new());
        } else {
            inputs.push(b.ints(name, d, v));
        }
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let y = b.op_with(op, &refs, attrs);
    b.proto(&[&y])
}

fn conv(attr: AttributeProto) -> ModelProto {
    let mut b = Builder::new();
    let x = b.input("x", &[1, 1, 4, 4]);
    let w = b.constant("w", &[1, 1, 3, 3], &[0.5; 9]);
    let y = b.op_with("Conv", &[&x, &w], vec![attr]);
    b.proto(&[&y])
}

/// A model whose one node is a Constant holding `t` (named `/Constant_0`).
fn constant(t: TensorProto) -> ModelProto {
    let mut b = Builder::new();
    let y = b.op_with("Constant", &[], vec![tensor_attr("value", t)]);
    b.proto(&[&y])
}

fn float_tensor(dims: &[i64], bytes: usize) -> TensorProto {
    TensorProto {
        data_type: DataType::Float as i32,
        dims: dims.to_vec(),
        raw_data: vec![0u8; bytes].into(),
        ..Default::default()
    }
}

#[test]
fn transpose_perm_out_of_range_or_repeated() {
    for perm in [[0, 5], [1, 1]] {
        let m = one_op(&[2, 3], "Transpose", &[], vec![ints_attr("perm", &perm)]);
        refused_everywhere(m, &["/Transpose_0", "perm", "not a permutation"]);
    }
    let m = one_op(
        &[2, 3],
        "Transpose",
        &[],
        vec![ints_attr("perm", &[2, 0, 1])],
    );
    refused_everywhere(m, &["/Transpose_0", "perm", "rank 2"]);
}

#[test]
fn conv_stride_group_dilation_zero_or_huge() {
    refused_everywhere(conv(ints_attr("strides", &[0, 1])), &["/Conv_0", "strides"]);
    refused_everywhere(conv(int_attr("group", 0)), &["/Conv_0", "group"]);
    refused_everywhere(
        conv(ints_attr("dilations", &[1 << 62, 1])),
        &["/Conv_0", "dilations", "4611686018427387904"],
    );
}

#[test]
fn split_sizes_negative() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 3]);
    let s = b.ints("s", &[2], &[-1, 4]);
    b.node(NodeProto {
        op_type: "Split".into(),
        name: "/Split_0".into(),
        input: vec![x, s],
        output: vec!["a".into(), "b".into()],
        attribute: vec![int_attr("axis", 1)],
        ..Default::default()
    });
    refused_everywhere(b.proto(&["a", "b"]), &["/Split_0", "split", "negative"]);
}

#[test]
fn slice_step_zero_and_range_delta_zero() {
    let c: &[(&str, &[i64], &[i64])] = &[
        ("starts", &[1], &[0]),
        ("ends", &[1], &[2]),
        ("axes", &[1], &[0]),
        ("steps", &[1], &[0]),
    ];
    refused_everywhere(
        one_op(&[2, 3], "Slice", c, vec![]),
        &["/Slice_0", "step of 0"],
    );
    let mut b = Builder::new();
    let start = b.ints("start", &[], &[0]);
    let limit = b.ints("limit", &[], &[10]);
    let delta = b.ints("delta", &[], &[0]);
    let y = b.op("Range", &[&start, &limit, &delta]);
    refused_everywhere(b.proto(&[&y]), &["/Range_0", "delta"]);
}

#[test]
fn if_without_a_branch() {
    let mut b = Builder::new();
    let c = b.input_typed("c", DataType::Bool, &[]);
    let y = b.op("If", &[&c]);
    refused_everywhere(b.proto(&[&y]), &["/If_0", "then_branch", "required"]);
}

#[test]
fn duplicate_graph_inputs_and_negative_dims() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 3]);
    b.input("x", &[2, 3]);
    let y = b.op("Relu", &[&x]);
    refused_everywhere(b.proto(&[&y]), &["graph input 'x'", "more than once"]);
    let mut b = Builder::new();
    let x = b.input("x", &[-2, 3]);
    let y = b.op("Relu", &[&x]);
    refused_everywhere(b.proto(&[&y]), &["graph input 'x'", "negative dim"]);
}

#[test]
fn constant_bytes_dims_and_dtype() {
    refused_everywhere(
        constant(float_tensor(&[4], 8)),
        &["/Constant_0", "'value'", "holds 8 bytes"],
    );
    refused_everywhere(
        constant(float_tensor(&[1 << 40], 0)),
        &["/Constant_0", "'value'", "elements"],
    );
    refused_everywhere(
        constant(float_tensor(&[-3], 0)),
        &["/Constant_0", "'value'", "negative"],
    );
    let mut t = float_tensor(&[1], 4);
    t.data_type = 99;
    refused_everywhere(constant(t), &["/Constant_0", "unknown element type"]);
    let m = one_op(&[2], "Cast", &[], vec![int_attr("to", 99)]);
    refused_everywhere(m, &["/Cast_0", "'to'", "unknown element type"]);
}

#[test]
fn cycles_undefined_inputs_and_missing_opset_import() {
    let mut b = Builder::new();
    let x = b.input("x", &[2]);
    b.node(NodeProto {
        op_type: "Add".into(),
        name: "/a".into(),
        input: vec![x, "r".into()],
        output: vec!["s".into()],
        ..Default::default()
    });
    b.node(NodeProto {
        op_type: "Relu".into(),
        name: "/b".into(),
        input: vec!["s".into()],
        output: vec!["r".into()],
        ..Default::default()
    });
    refused_everywhere(b.proto(&["r"]), &["cycle"]);
    let mut b = Builder::new();
    let x = b.input("x", &[2]);
    let y = b.op("Add", &[&x, "ghost"]);
    refused_everywhere(b.proto(&[&y]), &["/Add_0", "'ghost'", "not defined"]);
    let mut m = one_op(&[2], "Relu", &[], vec![]);
    m.opset_import.clear();
    refused_everywhere(m, &["/Relu_0", "no opset import"]);
}

#[test]
fn integer_overflow_constants_and_huge_expand() {
    // ONNX Runtime folds int64 MIN / -1 at session start and dies of SIGFPE.
    let mut b = Builder::new();
    let a = b.ints("a", &[], &[i64::MIN]);
    let d = b.ints("d", &[], &[-1]);
    let y = b.op("Div", &[&a, &d]);
    refused_everywhere(b.proto(&[&y]), &["/Div_0", "overflows"]);
    // tract returned empty tensors for an Expand to 2^40 elements.
    let c: &[(&str, &[i64], &[i64])] = &[("shape", &[2], &[1 << 20, 1 << 20])];
    refused_everywhere(
        one_op(&[1, 1], "Expand", c, vec![]),
        &["/Expand_0", "limit"],
    );
}

#[test]
fn a_checked_model_still_runs_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.onnx");
    let m = one_op(&[2, 3], "Transpose", &[], vec![ints_attr("perm", &[1, 0])]);
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    for ep in ["cpu", "tract"] {
        let out = dir.path().join(ep);
        let o = attune(&[
            "run",
            path.to_str().unwrap(),
            "--ep",
            ep,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{ep}: {}", stderr(&o));
        assert!(Path::new(&out).join("Transpose_0.npy").exists());
    }
}

/// A FIFO at `path` (a reader opening it blocks until a writer comes).
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn fifos_devices_and_folders_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let model = d.join("ok.onnx");
    let m = one_op(&[2, 3], "Relu", &[], vec![]);
    std::fs::write(&model, m.encode_to_vec()).unwrap();
    let (m, f, out) = (
        model.to_str().unwrap(),
        fifo.to_str().unwrap(),
        d.join("out"),
    );
    let o = out.to_str().unwrap();
    let input = format!("x={f}");
    assert_refused(
        &["run", m, "--input", &input, "--out", o],
        &[f, "is a FIFO"],
    );
    assert_refused(
        &["run", m, "--input", "x=/dev/zero", "--out", o],
        &["/dev/zero: is a character device"],
    );
    assert_refused(&["run", m, "--adapter", f, "--out", o], &[f, "is a FIFO"]);
    assert_refused(&["inspect", f], &[f, "is a FIFO"]);
    let unet = common::fixture("sd15_legacy");
    let c_out = d.join("c.onnx");
    assert_refused(
        &[
            "compile",
            unet.to_str().unwrap(),
            "-o",
            c_out.to_str().unwrap(),
            "--lora",
            f,
        ],
        &[f, "is a FIFO"],
    );
    assert!(!out.exists() && !c_out.exists());
    // An external-data location that is a folder.
    let mut m = one_op(&[2], "Add", &[], vec![]);
    let g = m.graph.as_mut().unwrap();
    g.node[0].input.push("w".into());
    g.initializer.push(TensorProto {
        name: "w".into(),
        data_type: DataType::Float as i32,
        dims: vec![2],
        data_location: attune_compiler::onnx::tensor_proto::DataLocation::External as i32,
        external_data: attune_compiler::weights::external_entries("sub", 0, 8),
        ..Default::default()
    });
    std::fs::create_dir(d.join("sub")).unwrap();
    let ext = d.join("ext.onnx");
    std::fs::write(&ext, m.encode_to_vec()).unwrap();
    assert_refused(
        &["inspect", ext.to_str().unwrap()],
        &[
            "tensor 'w'",
            "location 'sub' is a folder, not a regular file",
        ],
    );
}

#[test]
fn adapters_recipes_and_lora_multipliers_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("ok.onnx");
    std::fs::write(&model, one_op(&[2, 3], "Relu", &[], vec![]).encode_to_vec()).unwrap();
    let nan = common::write_f32_safetensors(
        d,
        "nan",
        &[("lora.attn1.down".into(), vec![2], vec![1.0, f32::NAN])],
    );
    let out = d.join("out");
    assert_refused(
        &[
            "run",
            model.to_str().unwrap(),
            "--adapter",
            nan.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[
            "nan.safetensors",
            "tensor 'lora.attn1.down'",
            "non-finite value (NaN) at element 1",
        ],
    );
    let unet = common::fixture("sd15_legacy");
    let (u, c_out) = (unet.to_str().unwrap(), d.join("c.onnx"));
    let lora = format!("{}:abc", nan.display());
    assert_refused(
        &["compile", u, "-o", c_out.to_str().unwrap(), "--lora", &lora],
        &["multiplier 'abc' is not a number"],
    );
    let recipe = d.join("r.toml");
    for (text, says) in [
        (
            "[tome]\nratio = nan\n",
            "r.toml: key 'tome.ratio' is NaN, must be a finite number",
        ),
        (
            "[tome]\nratio = 1.5\n",
            "r.toml: key 'tome.ratio': the ratio must be in [0, 1)",
        ),
    ] {
        std::fs::write(&recipe, text).unwrap();
        let args = [
            "compile",
            u,
            "-o",
            c_out.to_str().unwrap(),
            "--recipe",
            recipe.to_str().unwrap(),
        ];
        assert_refused(&args, &["recipe ", says]);
    }
    assert!(!out.exists() && !c_out.exists());
}
