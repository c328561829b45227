//! The canonical front end: exact on every fixture, and the graphs it must leave alone.
mod common;

use std::fs;

use attune_compiler::import;
use attune_compiler::onnx::{self, DataType, GraphProto, NodeProto, TensorProto};
use common::*;
use prost::Message;

#[test]
fn canonical_form_computes_exactly_what_the_export_does() {
    // With ONNX Runtime's optimizer at the basic level (constant folding only, no fusions),
    // the canonical graph's output is the export's, bit for bit.
    let dir = tempfile::tempdir().unwrap();
    let basic = ["--opt-level".to_string(), "basic".to_string()];
    for name in FIXTURES.iter().chain(&DITS) {
        let (out, report) = compile_into(dir.path(), &fixture(name), &["--canonical"]);
        assert!(report.contains("canonical: "), "{report}");
        let inputs = root().join("models").join(name).join("inputs");
        let want = run_outputs(&fixture(name), &inputs, &basic);
        let got = run_outputs(&out, &inputs, &basic);
        assert_eq!(want.len(), got.len(), "{name}");
        for ((n, w), (m, g)) in want.iter().zip(&got) {
            assert_eq!(n, m, "{name}");
            assert_eq!(w, g, "{name}: {n}");
        }
        let m = import::read(&out).unwrap();
        let counts = op_counts(&m);
        for op in ["Constant", "Identity"] {
            assert!(!counts.contains_key(op), "{name}: {op} left: {counts:?}");
        }
    }
}

fn value(name: &str, dims: &[i64]) -> onnx::ValueInfoProto {
    use onnx::tensor_shape_proto::dimension::Value;
    onnx::tensor_info(
        name,
        DataType::Float,
        Some(dims.iter().map(|&d| Value::DimValue(d)).collect()),
    )
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::Float as i32,
        dims: dims.to_vec(),
        raw_data: v
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        ..Default::default()
    }
}

#[test]
fn partly_foldable_graphs_keep_what_depends_on_inputs_and_fixed_names() {
    // y = x · Transpose(W) · 1 (W constant: folded), passed through Identity to output `y`;
    // `x_copy` = Identity(x) is a graph output passing the input through, `w_copy` one passing
    // an initializer: both names fixed, they stay (reported).
    let w: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let mut transpose = node("Transpose", "t", &["W"], &["Wt"]);
    transpose
        .attribute
        .push(attune_compiler::patch::attr::ints("perm", &[1, 0]));
    let graph = GraphProto {
        name: "g".into(),
        node: vec![
            transpose,
            node("MatMul", "mm", &["x", "Wt"], &["p"]),
            node("Mul", "unit", &["p", "one"], &["q"]),
            node("Identity", "id", &["q"], &["y"]),
            node("Identity", "pass", &["x"], &["x_copy"]),
            node("Identity", "weight", &["W"], &["w_copy"]),
        ],
        initializer: vec![f32_tensor("W", &[3, 2], &w), f32_tensor("one", &[], &[1.0])],
        input: vec![value("x", &[4, 2])],
        output: vec![
            value("y", &[4, 3]),
            value("x_copy", &[4, 2]),
            value("w_copy", &[3, 2]),
        ],
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("small.onnx");
    fs::write(&model, model_of(graph).encode_to_vec()).unwrap();
    let out = dir.path().join("canonical.onnx");
    let o = compile_to(&model, &out, &["--canonical"]);
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    assert!(text.contains("Identity kept"), "{text}");
    let m = import::read(&out).unwrap();
    let counts = op_counts(&m);
    assert_eq!(counts.get("Transpose"), None, "{counts:?}");
    assert_eq!(counts.get("Mul"), None, "{counts:?}");
    assert_eq!(counts.get("Identity"), Some(&2), "{counts:?}");
    let names: Vec<&str> = m
        .graph
        .outputs
        .iter()
        .map(|io| io.info.name.as_str())
        .collect();
    assert_eq!(names, ["y", "x_copy", "w_copy"]);
    // Same outputs on ORT CPU (the folded transpose moved the right elements).
    let x = attune_runtime::HostTensor::F32(
        ndarray::ArrayD::from_shape_vec(vec![4, 2], (0..8).map(|i| i as f32).collect()).unwrap(),
    );
    let inputs = dir.path().join("inputs");
    fs::create_dir(&inputs).unwrap();
    attune_runtime::npy::write(&inputs.join("x.npy"), &x).unwrap();
    let want = run_outputs(&model, &inputs, &[]);
    let got = run_outputs(&out, &inputs, &[]);
    assert_eq!(want, got);
}
