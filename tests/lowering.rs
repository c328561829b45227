//! Deployment lowering: the target check, fp16/bf16 precision, recipes.
mod common;

use std::fs;
use std::path::Path;

use attune_compiler::analysis::ElemTypes;
use attune_compiler::import;
use attune_compiler::onnx::{self, DataType};
use attune_runtime::compare::compare;
use attune_runtime::ort_backend::OrtOptions;
use attune_runtime::{Backend, Ep, HostTensor, inputs, npy};
use common::*;

const LORA: &str = "models/loras/kohya.safetensors";

/// Pass combinations users run (`--target cpu` is the default); the LoRA ones where the
/// LoRA file fits the fixture (made for the SD1.5 fixture's layers).
use common::CUDA_FP16_FLASH;

fn combinations(name: &str) -> Vec<Vec<String>> {
    let lora = root().join(LORA).display().to_string();
    let combos: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--attention", "flash"],
        vec!["--attention", "onnx"],
        vec!["--attention", "linear", "--attention-layers", "*.attn1"],
        vec!["--tome", "0.5"],
        vec!["--tome-mode", "todo"],
        vec!["--tome", "0.5", "--tome-rand", "--attention", "flash"],
        vec!["--hooks", "capture,p2p,masactrl", "--attention", "flash"],
        vec!["--lora", &lora, "--attention", "onnx"],
        vec!["--lora-mode", "adapter", "--lora-layers", "*attn*"],
        vec!["--precision", "fp16"],
        vec![
            "--fix-shapes",
            "sample=2x4x16x16",
            "--attention",
            "flash",
            "--tome",
            "0.5",
        ],
        vec![
            "--precision",
            "fp16",
            "--keep-io-types",
            "--attention",
            "flash",
            "--tome",
            "0.5",
        ],
        vec![
            "--precision",
            "fp16",
            "--hooks",
            "capture,p2p",
            "--lora",
            &lora,
        ],
    ];
    let fits = |c: &Vec<&str>| {
        name.starts_with("sd15_") && !name.contains("classic") && !name.contains("fp16")
            || !c.contains(&"--lora")
    };
    // The fixture's inputs, for the run that measures linear attention's change (whatever
    // the export names its dims).
    let mut inputs: Vec<String> = fs::read_dir(root().join("models").join(name).join("inputs"))
        .unwrap()
        .map(|f| {
            let f = f.unwrap().path();
            let stem = f.file_stem().unwrap().to_str().unwrap().to_string();
            format!("--input={stem}={}", f.display())
        })
        .collect();
    inputs.sort();
    combos
        .into_iter()
        .filter(fits)
        .map(|c| {
            c.into_iter()
                .map(str::to_string)
                .chain(inputs.iter().cloned())
                .collect()
        })
        .collect()
}

fn every_combination_runs_on_ort_cpu(fixtures: &[&str]) {
    for name in fixtures {
        let dir = tempfile::tempdir().unwrap();
        for flags in combinations(name) {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let (out, _) = compile_into(dir.path(), &fixture(name), &flags);
            let outputs = run_cpu(name, &out);
            let y = out_sample(outputs).to_f64();
            assert!(
                y.iter().all(|v| v.is_finite()),
                "{name} {flags:?}: non-finite output"
            );
        }
    }
}

#[test]
fn target_cpu_output_runs_for_every_fixture_and_combination_sd15() {
    every_combination_runs_on_ort_cpu(&FIXTURES[..5]);
}

#[test]
fn target_cpu_output_runs_for_every_fixture_and_combination_rest() {
    every_combination_runs_on_ort_cpu(&FIXTURES[5..]);
}

/// Every normalisation computes its statistics in fp32 (reads fp32, or is a LayerNormalization
/// whose stash_type is fp32); the timestep projection computes in fp32.
fn assert_no_low_precision_statistics(model: &Path) {
    let m = import::read(model).unwrap();
    let g = &m.graph;
    let types = ElemTypes::infer(g).unwrap();
    let mut norms = 0;
    for n in g.node_ids() {
        let node = g.node(n);
        let island = matches!(
            node.op(),
            "InstanceNormalization" | "LayerNormalization" | "GroupNormalization"
        ) || node.module.ends_with("time_proj")
            && matches!(node.op(), "Mul" | "Sin" | "Cos");
        if !island {
            continue;
        }
        norms += 1;
        let stash = node.attr("stash_type").map_or(1, |a| a.i);
        if node.op() == "LayerNormalization" && stash == DataType::Float as i64 {
            continue;
        }
        let x = node.inputs[0].unwrap();
        assert_eq!(
            types.get(x),
            Some(DataType::Float as i32),
            "{} computes in {:?}",
            node.describe(),
            types.get(x)
        );
    }
    assert!(norms > 0, "{}: no normalisation found", model.display());
}

#[test]
fn fp16_matches_the_fp32_reference_and_keeps_statistics_in_fp32() {
    const TOL: f64 = 5e-3;
    for name in FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let reference = reference(name);
        for extra in [
            &[][..],
            &["--keep-io-types"][..],
            &["--attention", "flash"][..],
        ] {
            let flags: Vec<&str> = ["--precision", "fp16"]
                .iter()
                .chain(extra)
                .copied()
                .collect();
            let (out, stdout) = compile_into(dir.path(), &fixture(name), &flags);
            assert!(stdout.contains("fp32 islands"), "{stdout}");
            assert_no_low_precision_statistics(&out);
            let m = import::read(&out).unwrap();
            let io_type = m.graph.outputs[0].info.r#type.clone().unwrap();
            let declared = attune_compiler::onnx::tensor_type(&io_type)
                .unwrap()
                .elem_type;
            let expect = if extra.contains(&"--keep-io-types") || name.contains("fp16") {
                reference.dtype()
            } else {
                attune_runtime::DType::F16
            };
            assert_eq!(
                attune_runtime::DType::from_onnx(declared),
                Some(expect),
                "{name} {extra:?}"
            );
            let c = against_reference(name, run_cpu(name, &out));
            assert!(
                c.within(TOL),
                "{name} {extra:?}: fp16 vs fp32 reference rel L2 {:.2e}",
                c.rel_l2
            );
        }
    }
}

#[test]
fn fp16_halves_the_weights_and_bf16_is_refused_on_cpu_naming_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let (f32_out, _) = compile_into(dir.path(), &fixture("sd15_legacy"), &[]);
    let (f16_out, _) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--precision", "fp16"],
    );
    let size = |p: &Path| fs::metadata(p.with_extension("onnx.data")).unwrap().len() as f64;
    let ratio = size(&f16_out) / size(&f32_out);
    assert!((0.45..0.55).contains(&ratio), "data file ratio {ratio}");

    let before = snapshot(&root().join("models/sd15_legacy"));
    let out = dir.path().join("bf16.onnx");
    let o = compile_to(&fixture("sd15_legacy"), &out, &["--precision", "bf16"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("node '")
            && err.contains("has no bf16 kernel")
            && err.contains("CPU execution provider"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written when the check fails");
    assert_eq!(before, snapshot(&root().join("models/sd15_legacy")));

    // The same conversion for CUDA passes the check (bf16 kernels exist there).
    let (cuda, stdout) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--precision", "bf16", "--target", "cuda"],
    );
    assert!(cuda.exists(), "{stdout}");
}

#[test]
fn an_op_the_target_cannot_run_is_refused_with_the_node_named() {
    // A contrib op only the CUDA EP implements, spliced into a fixture.
    use attune_compiler::onnx::{ModelProto, NodeProto, OperatorSetIdProto};
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("sd15_legacy", dir.path());
    let mut proto = ModelProto::decode(fs::read(&model).unwrap().as_slice()).unwrap();
    let g = proto.graph.as_mut().unwrap();
    let out = g.output[0].name.clone();
    let last = g.node.iter_mut().find(|n| n.output.contains(&out)).unwrap();
    last.output = vec!["pre_bias".into()];
    g.node.push(NodeProto {
        name: "my_bias_add".into(),
        op_type: "BiasAdd".into(),
        domain: "com.microsoft".into(),
        input: vec!["pre_bias".into(), "pre_bias".into(), "pre_bias".into()],
        output: vec![out],
        ..Default::default()
    });
    proto.opset_import.push(OperatorSetIdProto {
        domain: "com.microsoft".into(),
        version: 1,
    });
    fs::write(&model, proto.encode_to_vec()).unwrap();
    let o = compile_to(&model, &dir.path().join("o.onnx"), &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("node 'my_bias_add' (BiasAdd")
            && err.contains("CPU execution provider cannot run com.microsoft.BiasAdd"),
        "{err}"
    );
    // CUDA has the op, but its kernel only for [batch, sequence, 320 | 640 | 1280] inputs; this
    // one reads the UNet's NCHW output. (The sd_widths test compiles BiasAdds it accepts.)
    let o = compile_to(&model, &dir.path().join("c.onnx"), &["--target", "cuda"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("node 'my_bias_add' (BiasAdd")
            && err.contains("BiasAdd kernel takes a [batch, sequence, width] input with width 320, 640, 1280; this input is [batch, 4,"),
        "{err}"
    );
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn a_recipe_and_the_equivalent_flags_produce_identical_graphs() {
    let dir = tempfile::tempdir().unwrap();
    let recipes = root().join("models/recipes");
    let lora = |f: &str| root().join("models/loras").join(f).display().to_string();
    let cuda_fp16 = CUDA_FP16_FLASH;
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "cpu_flash_tome.toml",
            owned(&["--attention", "flash", "--tome", "0.5", "--weights", "link"]),
        ),
        (
            "lora_style.toml",
            vec![
                "--attention".into(),
                "flash".into(),
                "--lora".into(),
                format!("{}:0.8", lora("kohya.safetensors")),
                "--lora".into(),
                format!("{}:0.5", lora("loha.safetensors")),
            ],
        ),
        (
            "p2p_capture.toml",
            owned(&["--attention", "flash", "--hooks", "capture,p2p,masactrl"]),
        ),
        ("cuda_fp16.toml", owned(&cuda_fp16)),
        (
            "cuda_graph_512.toml",
            owned(
                &[
                    &cuda_fp16[..],
                    &["--fix-shapes", "sample=2x4x64x64,sequence=77"],
                ]
                .concat(),
            ),
        ),
    ];
    for (recipe, flags) in cases {
        let path = recipes.join(recipe);
        let (a, _) = compile_into(
            dir.path(),
            &fixture("sd15_legacy"),
            &["--recipe", path.to_str().unwrap()],
        );
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (b, _) = compile_into(dir.path(), &fixture("sd15_legacy"), &flags);
        assert!(
            normalized(&a) == normalized(&b),
            "{recipe}: recipe and flags differ"
        );
    }
    // Flags given on the command line override the recipe.
    let path = recipes.join("cpu_flash_tome.toml");
    let (a, _) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &[
            "--recipe",
            path.to_str().unwrap(),
            "--attention",
            "keep",
            "--tome",
            "0.25",
        ],
    );
    let (b, _) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--tome", "0.25", "--weights", "link"],
    );
    assert!(
        normalized(&a) == normalized(&b),
        "command-line flags must win over the recipe"
    );
}

#[test]
fn cuda_fusions_switch_by_flag_and_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("sd15_legacy");
    let counts = |flags: &[&str]| {
        let (out, _) = compile_into(dir.path(), &model, flags);
        op_counts(&import::read(&out).unwrap())
    };
    let n =
        |c: &std::collections::HashMap<String, usize>, op: &str| c.get(op).copied().unwrap_or(0);
    let cuda = ["--target", "cuda", "--attention", "flash"];
    let default = counts(&cuda);
    assert!(n(&default, "com.microsoft.SkipGroupNorm") > 0);
    fn with<'a>(cuda: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [cuda, extra].concat()
    }
    let off = counts(&with(
        &cuda,
        &["--disable-fusions", "skip-group-norm,nhwc-conv"],
    ));
    assert_eq!(
        n(&off, "com.microsoft.SkipGroupNorm") + n(&off, "com.microsoft.NhwcConv"),
        0
    );
    assert_eq!(
        n(&off, "com.microsoft.GroupNorm"),
        n(&default, "com.microsoft.GroupNorm") + n(&default, "com.microsoft.SkipGroupNorm")
    );
    // Packed QKV/KV is opt-in: one packed MatMul per self-attention (3 -> 1) and cross-attention
    // (2 -> 1).
    let packed = counts(&with(&cuda, &["--enable-fusions", "packed-qkv"]));
    let sites = n(&default, "com.microsoft.MultiHeadAttention");
    assert_eq!(n(&default, "MatMul") - n(&packed, "MatMul"), 3 * sites / 2);
    // The same switches in a recipe.
    let recipe = dir.path().join("fusions.toml");
    fs::write(
        &recipe,
        "target = \"cuda\"\ndisable_fusions = [\"skip-group-norm\", \"bias-add\"]\nenable_fusions = [\"packed-qkv\"]\n[attention]\nmode = \"flash\"\n",
    )
    .unwrap();
    let (a, _) = compile_into(dir.path(), &model, &["--recipe", recipe.to_str().unwrap()]);
    let flags = with(
        &cuda,
        &[
            "--disable-fusions",
            "skip-group-norm,bias-add",
            "--enable-fusions",
            "packed-qkv",
        ],
    );
    let (b, _) = compile_into(dir.path(), &model, &flags);
    assert!(normalized(&a) == normalized(&b), "recipe and flags differ");
    // Misuse is an error.
    let out = dir.path().join("bad.onnx");
    let o = compile_to(&model, &out, &["--disable-fusions", "bias-add"]);
    assert!(
        !o.status.success() && stderr(&o).contains("apply to --target cuda"),
        "{}",
        stderr(&o)
    );
    let o = compile_to(
        &model,
        &out,
        &with(
            &cuda,
            &[
                "--disable-fusions",
                "packed-qkv",
                "--enable-fusions",
                "packed-qkv",
            ],
        ),
    );
    assert!(
        !o.status.success() && stderr(&o).contains("both enabled and disabled"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "no output on error");
}

#[test]
fn recipe_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[attention]\nmode = \"flash\"\nlayer = \"*\"\n",
            "unknown field `layer`",
        ),
        (
            "target = \"tpu\"\n",
            "target = \"tpu\"\n  |          ^^^^^\n'tpu' is not one of cpu, cuda",
        ),
        (
            "precision = \"fp8\"\n",
            "'fp8' is not one of fp32, fp16, bf16",
        ),
        ("[tome]\nratio = \"half\"\n", "invalid type"),
        ("[[lora]]\nscale = 0.5\n", "missing field `file`"),
    ];
    for (text, want) in cases {
        let recipe = dir.path().join("r.toml");
        fs::write(&recipe, text).unwrap();
        let o = compile_to(
            &fixture("sd15_legacy"),
            &dir.path().join("o.onnx"),
            &["--recipe", recipe.to_str().unwrap()],
        );
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(
            err.contains(want) && err.contains("r.toml"),
            "{text:?}: {err}"
        );
        assert!(!dir.path().join("o.onnx").exists());
    }
}

/// The float values of an initializer (f32 or f16).
fn floats(t: &attune_compiler::weights::Tensor) -> Vec<f32> {
    let bytes = t.bytes().unwrap();
    match DataType::try_from(t.data_type()).unwrap() {
        DataType::Float => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        DataType::Float16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("{}: {other:?}", t.name()),
    }
}

#[test]
fn cuda_target_fuses_every_group_norm_and_conv_channels_last() {
    for name in FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let original = import::read(&fixture(name)).unwrap();
        let before = op_counts(&original);
        let n_norms = before["InstanceNormalization"];
        let n_convs = before["Conv"];
        for precision in ["fp32", "fp16"] {
            let (out, stdout) = compile_into(
                dir.path(),
                &fixture(name),
                &["--target", "cuda", "--precision", precision],
            );
            let m = import::read(&out).unwrap();
            let after = op_counts(&m);
            let count = |op: &str| after.get(op).copied().unwrap_or(0);
            assert_eq!(
                count("com.microsoft.GroupNorm") + count("com.microsoft.SkipGroupNorm"),
                n_norms,
                "{name} {precision}: {stdout}"
            );
            assert!(
                count("com.microsoft.SkipGroupNorm") > 0,
                "{name}: the resnets' time-embedding adds fold into their GroupNorms"
            );
            assert_eq!(
                count("com.microsoft.NhwcConv"),
                n_convs,
                "{name} {precision}"
            );
            assert_eq!(
                count("InstanceNormalization") + count("Conv"),
                0,
                "{name} {precision}"
            );
            // The whole UNet runs channels-last: the only NHWC→NCHW Transpose is the output's
            // (attention keeps its own permutes).
            let to_nchw = m
                .graph
                .node_ids()
                .filter(|&n| {
                    let perm = m.graph.node(n).attr("perm").map(|a| a.ints.clone());
                    perm.as_deref() == Some(&[0, 3, 1, 2])
                })
                .count();
            assert_eq!(to_nchw, 1, "{name} {precision}: {stdout}");
            let g = &m.graph;
            assert_eq!(
                g.value(g.outputs[0].value).name,
                "out_sample",
                "{name}: the output keeps its name"
            );
            let types = ElemTypes::infer(g).unwrap();
            // fp32 keeps the export's own type (the fp16 fixture stays fp16).
            let native = original
                .graph
                .value_elem_type(original.graph.inputs[0].value)
                .unwrap();
            let low = if precision == "fp16" {
                DataType::Float16 as i32
            } else {
                native
            };
            for n in g.node_ids() {
                let node = g.node(n);
                if matches!(node.op(), "GroupNorm" | "SkipGroupNorm") {
                    // ONNX Runtime's kernel: fp32 γ/β, statistics in fp32 whatever X is.
                    assert_eq!(
                        types.get(node.inputs[1].unwrap()),
                        Some(DataType::Float as i32),
                        "{name}: γ of {}",
                        node.describe()
                    );
                    assert_eq!(
                        types.get(node.inputs[2].unwrap()),
                        Some(DataType::Float as i32),
                        "{name}: β"
                    );
                    assert_eq!(node.attr("channels_last").map(|a| a.i), Some(1));
                }
                if node.op() == "NhwcConv" {
                    assert_eq!(
                        types.get(node.inputs[0].unwrap()),
                        Some(low),
                        "{name} {precision}: {}",
                        node.describe()
                    );
                }
            }
        }
    }
}

#[test]
fn other_exports_of_the_same_unet_lower_to_the_same_ops() {
    // sd15_op14_legacy is sd15_legacy's UNet at opset 14, its 21 LayerNorms written out
    // (ReduceMean, Sub, Pow, Sqrt, Div...): fused back first, they fuse on as the op does.
    // sd15_olive_legacy names each input's batch differently: shapes still line up.
    let dir = tempfile::tempdir().unwrap();
    let flag_sets: [&[&str]; 3] = [
        &CUDA_FP16_FLASH,
        &["--target", "cuda"],
        &["--precision", "fp16"],
    ];
    for flags in flag_sets {
        let mut counts = Vec::new();
        for name in ["sd15_legacy", "sd15_op14_legacy", "sd15_olive_legacy"] {
            let (out, stdout) = compile_into(dir.path(), &fixture(name), flags);
            counts.push((op_counts(&import::read(&out).unwrap()), stdout));
        }
        let (twin, op14, olive) = (&counts[0], &counts[1], &counts[2]);
        // The Olive export's int64 timestep keeps its Cast to float; the float one's Cast to
        // float was a no-op, gone in the canonical form.
        let without_cast = |c: &std::collections::HashMap<String, usize>| {
            let mut c = c.clone();
            c.remove("Cast");
            c
        };
        assert_eq!(
            without_cast(&olive.0),
            without_cast(&twin.0),
            "{flags:?}: {}",
            olive.1
        );
        // (In fp16 the float timestep gets a Cast to fp16 in its place: one each.)
        let casts =
            |c: &std::collections::HashMap<String, usize>| c.get("Cast").copied().unwrap_or(0);
        assert!(
            (casts(&twin.0)..=casts(&twin.0) + 1).contains(&casts(&olive.0)),
            "{flags:?}: {}",
            olive.1
        );
        assert!(
            op14.1.contains("layer-norm: 1 rewritten, 0 skipped")
                && op14
                    .1
                    .contains("21 exported LayerNorms -> LayerNormalization"),
            "{flags:?}: {}",
            op14.1
        );
        assert_eq!(op14.0, twin.0, "{flags:?}: {}", op14.1);
    }
    // Without a pass that needs them, the export keeps its form (and its opset).
    let (out, stdout) = compile_into(
        dir.path(),
        &fixture("sd15_op14_legacy"),
        &["--attention", "flash"],
    );
    assert!(!stdout.contains("layer-norm"), "{stdout}");
    let m = import::read(&out).unwrap();
    assert_eq!(m.opset(""), Some(14));
    assert_eq!(op_counts(&m).get("LayerNormalization"), None);
}

#[test]
fn nhwc_conv_weights_are_the_original_weights_channels_last() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = compile_into(dir.path(), &fixture("sd15_legacy"), &["--target", "cuda"]);
    let original = import::read(&fixture("sd15_legacy")).unwrap();
    let m = import::read(&out).unwrap();
    let g = &m.graph;
    let mut checked = 0;
    for n in g.node_ids().filter(|n| g.node(*n).op() == "NhwcConv") {
        let w = g.initializer(g.node(n).inputs[1].unwrap()).unwrap();
        let src_name = w
            .name()
            .strip_suffix("_nhwc")
            .expect("named after the original weight");
        let src = original
            .graph
            .initializer(original.graph.value_id(src_name).unwrap())
            .unwrap();
        let [o, c, kh, kw] = <[i64; 4]>::try_from(src.dims())
            .unwrap()
            .map(|d| d as usize);
        assert_eq!(w.dims(), &[o as i64, kh as i64, kw as i64, c as i64]);
        let (a, b) = (floats(src), floats(w));
        for (i, j, y, x) in [
            (0, 0, 0, 0),
            (o - 1, c - 1, kh - 1, kw - 1),
            (o / 2, c / 3, kh / 2, kw - 1),
        ] {
            assert_eq!(
                a[((i * c + j) * kh + y) * kw + x],
                b[((i * kh + y) * kw + x) * c + j],
                "{src_name}[{i},{j},{y},{x}]"
            );
        }
        checked += 1;
    }
    assert!(checked > 10);
}

/// Weights beyond fp16's range are clamped to ±65504 as the export converts them (the passes
/// only decide the conversion), and the compile says how many; the NhwcConv weight is
/// converted, then permuted.
#[test]
fn fp16_clamps_are_counted_as_the_weights_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = import::read(&fixture("sd15_legacy")).unwrap();
    let name = "unet.conv_in.weight";
    let id = m.graph.value_id(name).unwrap();
    let w = m.graph.initializer(id).unwrap();
    let channels = w.dims()[1] as usize;
    let mut values = floats(w);
    values[0] = 1e5;
    values[1] = -7e4;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let w = w.with_data(bytes.into());
    m.graph.set_initializer(w);
    let model = dir.path().join("large_weights.onnx");
    attune_compiler::export::write(&m, &model, &Default::default()).unwrap();
    // In the compiled weights: element [0,0,0,1] is at 1 (OIHW) or at `channels` (OHWI).
    for (flags, stored, second) in [
        (&["--precision", "fp16"][..], name.to_string(), 1),
        (&CUDA_FP16_FLASH[..], format!("{name}_nhwc"), channels),
    ] {
        let (out, stdout) = compile_into(dir.path(), &model, flags);
        assert!(
            stdout.contains("2 weight values beyond the fp16 range were clamped to ±65504"),
            "{flags:?}: {stdout}"
        );
        let c = import::read(&out).unwrap();
        let t = c
            .graph
            .initializer(c.graph.value_id(&stored).unwrap())
            .unwrap();
        assert_eq!(t.data_type(), DataType::Float16 as i32);
        let got = floats(t);
        assert_eq!((got[0], got[second]), (65504.0, -65504.0), "{flags:?}");
    }
}

/// The fused graph's outputs on ONNX Runtime's CUDA EP against the fixture references. Needs
/// an NVIDIA GPU and `attune setup --cuda`: `cargo test --test lowering -- --ignored`.
#[test]
#[ignore = "needs an NVIDIA GPU (cargo test --test lowering -- --ignored)"]
fn cuda_target_output_matches_the_reference_on_ort_cuda() {
    for name in [
        "sd15_legacy",
        "sd15_dynamo",
        "sdxl_legacy",
        "sd15_fp16_legacy",
    ] {
        let dir = tempfile::tempdir().unwrap();
        for (precision, tol) in [("fp32", 5e-3), ("fp16", 5e-3)] {
            let out = compile_for_cuda(dir.path(), name, precision, &[]);
            let c = against_reference(name, run_on(Ep::Cuda, name, &out));
            assert!(c.rel_l2 <= tol, "{name} {precision}: rel L2 {}", c.rel_l2);
        }
    }
}

#[test]
fn cuda_target_graphs_compute_the_reference_with_their_cuda_ops_in_standard_form() {
    for name in FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        for precision in ["fp32", "fp16"] {
            // fp32 keeps the fp16 fixture in fp16.
            let tol = if precision == "fp32" && !name.contains("fp16") {
                1e-4
            } else {
                5e-3
            };
            let flags = ["--enable-fusions", "packed-qkv"];
            let out = compile_for_cuda(dir.path(), name, precision, &flags);
            let standard = dir.path().join(format!("standard_{precision}.onnx"));
            with_cuda_ops_in_standard_ops(&out, &standard);
            let c = against_reference(name, run_cpu(name, &standard));
            println!("{name} {precision}: rel L2 {:.3e}", c.rel_l2);
            assert!(
                c.rel_l2 <= tol,
                "{name} {precision}: rel L2 {} > {tol}",
                c.rel_l2
            );
        }
    }
}

/// Every output of `outputs` against the fixture's `ref/<output>.npy`: the worst rel L2.
fn worst_against_references(name: &str, outputs: Vec<(String, HostTensor)>) -> f64 {
    outputs
        .into_iter()
        .map(|(n, got)| {
            let file = root()
                .join("models")
                .join(name)
                .join(format!("ref/{n}.npy"));
            let want = npy::read(&file).unwrap();
            let got = got.float_as(want.dtype()).unwrap_or(got);
            compare(&n, &want, &got).unwrap().rel_l2
        })
        .fold(0.0, f64::max)
}

#[test]
fn cuda_target_fuses_residuals_and_geglu_at_sd_widths() {
    // The ORT kernels behind these fusions take only SD's widths (BiasAdd 320/640/1280,
    // BiasSplitGelu 2560/5120/10240), which the UNet fixtures are too narrow for.
    for name in ["sd_widths_legacy", "sd_widths_dynamo"] {
        let dir = tempfile::tempdir().unwrap();
        for precision in ["fp32", "fp16"] {
            let flags = ["--target", "cuda", "--precision", precision];
            let (out, stdout) = compile_into(dir.path(), &fixture(name), &flags);
            let counts = op_counts(&import::read(&out).unwrap());
            let count = |op: &str| counts.get(op).copied().unwrap_or(0);
            // norm1 reads the block input (no sum); the feed-forward's 32-wide GEGLU stays.
            assert_eq!(
                count("com.microsoft.SkipLayerNormalization"),
                1,
                "{name}: {stdout}"
            );
            assert_eq!(count("LayerNormalization"), 1, "{name}");
            assert_eq!(count("com.microsoft.BiasAdd"), 1, "{name}");
            assert_eq!(count("com.microsoft.BiasSplitGelu"), 1, "{name}");
            assert_eq!(count("Erf"), 1, "{name}");
            assert!(
                stdout.contains("width 32"),
                "{name}: the skip is reported: {stdout}"
            );
            let standard = dir.path().join(format!("standard_{precision}.onnx"));
            with_cuda_ops_in_standard_ops(&out, &standard);
            let worst = worst_against_references(name, run_cpu(name, &standard));
            let tol = if precision == "fp32" { 1e-5 } else { 5e-3 };
            assert!(
                worst <= tol,
                "{name} {precision}: rel L2 {worst:.3e} > {tol}"
            );
        }
    }
}

#[test]
fn cuda_target_graphs_keep_dynamic_shapes() {
    // Static Reshape targets and channels-last layouts must hold at any input size, not just
    // the fixture's: another batch, latent and text length, against the original export.
    // A 24x16 latent: the legacy export's `height` is the latent's, the dynamo export's the
    // latent's divided by 8 (its sample is `8*height`).
    for (name, h, w) in [("sd15_legacy", 24, 16), ("sd15_dynamo", 3, 2)] {
        let dims = [
            format!("height={h}"),
            format!("width={w}"),
            "batch=1".into(),
            "sequence=5".into(),
        ];
        let dims = inputs::Dims::parse(&dims).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = compile_for_cuda(
            dir.path(),
            name,
            "fp32",
            &["--enable-fusions", "packed-qkv"],
        );
        let standard = dir.path().join("standard.onnx");
        with_cuda_ops_in_standard_ops(&out, &standard);
        let run = |model: &Path| {
            let m = import::read(model).unwrap();
            let feed = inputs::prepare(&inputs::input_specs(&m), vec![], &dims, 7).unwrap();
            let mut b = Backend::open(model, Ep::Cpu, &OrtOptions::default()).unwrap();
            out_sample(b.run(&feed).unwrap())
        };
        let (want, got) = (run(&fixture(name)), run(&standard));
        assert_eq!(want.shape(), got.shape(), "{name}");
        assert_eq!(&want.shape()[2..], &[24, 16], "{name}");
        let c = compare("out_sample", &want, &got).unwrap();
        assert!(c.rel_l2 <= 1e-4, "{name}: rel L2 {:.3e}", c.rel_l2);
    }
}

#[test]
fn cuda_target_equals_cpu_target_for_every_pass_combination() {
    // The same passes compiled for each target; the CUDA graph (its CUDA ops written back in
    // standard ops) computes what the CPU graph computes, on the CPU EP.
    let name = "sd15_legacy";
    let dir = tempfile::tempdir().unwrap();
    for flags in combinations(name) {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        if flags.contains(&"adapter") || flags.contains(&"bf16") {
            continue; // adapter inputs are fed by `run --adapter`; bf16 is not fused
        }
        let (cpu, _) = compile_into(dir.path(), &fixture(name), &flags);
        let cuda_flags: Vec<&str> = flags.iter().copied().chain(["--target", "cuda"]).collect();
        let (cuda, report) = compile_into(dir.path(), &fixture(name), &cuda_flags);
        // Nothing left for ONNX Runtime to run on the CPU between the CUDA kernels.
        assert!(!report.contains("no CUDA kernel"), "{flags:?}: {report}");
        let standard = dir.path().join("standard.onnx");
        with_cuda_ops_in_standard_ops(&cuda, &standard);
        let want = out_sample(run_cpu(name, &cpu));
        let got = out_sample(run_cpu(name, &standard));
        let c = compare(
            "out_sample",
            &want,
            &got.float_as(want.dtype()).unwrap_or(got),
        )
        .unwrap();
        let tol = if flags.contains(&"fp16") { 5e-3 } else { 1e-4 };
        assert!(c.rel_l2 <= tol, "{flags:?}: rel L2 {:.3e}", c.rel_l2);
    }
}

/// A graph of written-out LayerNorms over x [2, 5, 8], one per output, as exporters and
/// ONNX's own function expansion spell them: (a) torch's Div form with γ and β, (b) the
/// Reciprocal form with `c·c` for the square, ε first and no affine, the axis given as 2,
/// (c) γ only, multiplied from the left, (d) a mean over axis 1, which is not a LayerNorm,
/// (e) torch's fp16 form: the statistics and quotient in f64 between Casts.
fn written_out_layer_norms() -> onnx::ModelProto {
    use onnx::{AttributeProto, NodeProto, TensorProto, attribute_proto::AttributeType};
    let node = |op: &str, ins: &[&str], out: &str, axes: Option<i64>| NodeProto {
        op_type: op.into(),
        name: format!("/n/{out}"),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        attribute: axes
            .map(|a| AttributeProto {
                name: "axes".into(),
                r#type: AttributeType::Ints as i32,
                ints: vec![a],
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let tensor = |name: &str, dims: &[i64], values: Vec<f32>| TensorProto {
        name: name.into(),
        data_type: DataType::Float as i32,
        dims: dims.to_vec(),
        float_data: values,
        ..Default::default()
    };
    let ramp = |scale: f32, offset: f32| (0..8).map(|i| offset + scale * i as f32).collect();
    let mut nodes = Vec::new();
    let mut center = |p: &str, axis: i64| {
        nodes.push(node("ReduceMean", &["x"], &format!("{p}_mean"), Some(axis)));
        nodes.push(node(
            "Sub",
            &["x", &format!("{p}_mean")],
            &format!("{p}_c"),
            None,
        ));
    };
    center("a", -1);
    center("b", 2);
    center("c", -1);
    center("d", 1);
    center("e", -1);
    let cast = |input: &str, out: &str, to: DataType| NodeProto {
        attribute: vec![attune_compiler::patch::attr::int("to", to as i64)],
        ..node("Cast", &[input], out, None)
    };
    // `{p}_n` = c / √(mean(c^two over axis) + eps)
    let normalize = |p: &str, c: &str, (two, eps): (&str, &str), axis: i64| {
        let v = |s: &str| format!("{p}_{s}");
        [
            node("Pow", &[c, two], &v("sq"), None),
            node("ReduceMean", &[&v("sq")], &v("var"), Some(axis)),
            node("Add", &[&v("var"), eps], &v("ve"), None),
            node("Sqrt", &[&v("ve")], &v("std"), None),
            node("Div", &[c, &v("std")], &v("n"), None),
        ]
    };
    for (p, axis) in [("a", -1), ("c", -1), ("d", 1)] {
        nodes.extend(normalize(p, &format!("{p}_c"), ("two", "eps"), axis));
    }
    nodes.push(cast("e_c", "e_c64", DataType::Double));
    nodes.extend(normalize("e", "e_c64", ("two64", "eps64"), -1));
    nodes.push(cast("e_n", "e_n32", DataType::Float));
    nodes.push(node("Mul", &["e_n32", "gamma"], "e_s", None));
    nodes.push(node("Add", &["e_s", "beta"], "e", None));
    nodes.push(node("Mul", &["b_c", "b_c"], "b_sq", None));
    nodes.push(node("ReduceMean", &["b_sq"], "b_var", Some(2)));
    nodes.push(node("Add", &["eps", "b_var"], "b_ve", None));
    nodes.push(node("Sqrt", &["b_ve"], "b_std", None));
    nodes.push(node("Reciprocal", &["b_std"], "b_inv", None));
    nodes.push(node("Mul", &["b_c", "b_inv"], "b", None));
    nodes.push(node("Mul", &["a_n", "gamma"], "a_s", None));
    nodes.push(node("Add", &["a_s", "beta"], "a", None));
    nodes.push(node("Mul", &["gamma", "c_n"], "c", None));
    nodes.push(node("Mul", &["d_n", "gamma"], "d", None));
    let io = |name: &str| {
        onnx::tensor_info(
            name,
            DataType::Float,
            Some(
                [2, 5, 8]
                    .map(onnx::tensor_shape_proto::dimension::Value::DimValue)
                    .to_vec(),
            ),
        )
    };
    let mut m = model_of(onnx::GraphProto {
        name: "g".into(),
        node: nodes,
        input: vec![io("x")],
        output: ["a", "b", "c", "d", "e"].map(io).to_vec(),
        initializer: vec![
            tensor("two", &[], vec![2.0]),
            tensor("eps", &[], vec![1e-5]),
            TensorProto {
                name: "two64".into(),
                data_type: DataType::Double as i32,
                double_data: vec![2.0],
                ..Default::default()
            },
            TensorProto {
                name: "eps64".into(),
                data_type: DataType::Double as i32,
                double_data: vec![1e-5],
                ..Default::default()
            },
            tensor("gamma", &[8], ramp(0.25, 0.5)),
            tensor("beta", &[8], ramp(-0.1, 0.3)),
        ],
        ..Default::default()
    });
    m.opset_import[0].version = 14;
    m
}

#[test]
fn written_out_layer_norms_of_every_form_become_the_op_and_compute_the_same() {
    use attune_compiler::pass::{PassCx, PassManager};
    use attune_passes::layer_norm::LayerNormPass;
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("ln.onnx");
    fs::write(&original, written_out_layer_norms().encode_to_vec()).unwrap();
    let mut m = import::read(&original).unwrap();
    let mut pm = PassManager::new();
    pm.add(LayerNormPass);
    let report = pm
        .run(&mut m, &mut PassCx { verify: true })
        .unwrap()
        .remove(0);
    assert_eq!(
        report.rewritten,
        ["4 exported LayerNorms -> LayerNormalization"],
        "{report:?}"
    );
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert!(
        report.skipped[0]
            .reason
            .contains("does not average the last axis alone"),
        "{report:?}"
    );
    assert_eq!(m.opset(""), Some(17));
    let counts = op_counts(&m);
    assert_eq!(counts["LayerNormalization"], 4);
    let fused = dir.path().join("fused.onnx");
    attune_compiler::export::write(&m, &fused, &Default::default()).unwrap();
    let x = HostTensor::F32(ndarray::ArrayD::from_shape_fn(
        ndarray::IxDyn(&[2, 5, 8]),
        |i| ((i[0] * 40 + i[1] * 8 + i[2]) as f32 * 0.37).sin() * 30.0,
    ));
    let feed = [("x".to_string(), x)];
    let run = |p: &Path| {
        Backend::open(p, Ep::Cpu, &OrtOptions::default())
            .unwrap()
            .run(&feed)
            .unwrap()
    };
    for ((name, want), (_, got)) in run(&original).iter().zip(run(&fused)) {
        let c = compare(name, want, &got).unwrap();
        assert!(c.rel_l2 <= 1e-6, "{name}: {c:?}");
    }
}

#[test]
fn diffusion_transformers_lower_for_cuda_and_fp16() {
    // PixArt-α, SD3/SD3.5 (joint attention, qk-norm; both exporters) and Flux (rotary
    // embeddings on Q and K, a single-stream block): every attention
    // fuses for CUDA, the CUDA ops in standard form compute the reference, and fp16 keeps
    // its statistics (qk-norm's RMS included) in fp32.
    for name in DITS {
        let dir = tempfile::tempdir().unwrap();
        let sites = {
            let m = import::read(&fixture(name)).unwrap();
            attune_compiler::analysis::attention::analyze(
                &m,
                &attune_compiler::analysis::Shapes::infer(&m),
            )
            .sites
            .len()
        };
        for (precision, tol) in [("fp32", 1e-4), ("fp16", 5e-3)] {
            let out = compile_for_cuda(dir.path(), name, precision, &[]);
            let m = import::read(&out).unwrap();
            let counts = op_counts(&m);
            assert_eq!(
                counts.get("com.microsoft.MultiHeadAttention"),
                Some(&sites),
                "{name} {precision}"
            );
            assert!(!counts.contains_key("Softmax"), "{name} {precision}");
            // The residual LayerNorms (the dynamo exporter's without β too) fuse; the first
            // block's sum with the broadcast position table does not.
            let skip_norms = match name {
                "pixart_legacy" => 4,
                "flux_dynamo" => 2,
                _ => 6,
            };
            assert_eq!(
                counts.get("com.microsoft.SkipLayerNormalization"),
                Some(&skip_norms),
                "{name} {precision}"
            );
            let standard = dir.path().join(format!("standard_{precision}.onnx"));
            with_cuda_ops_in_standard_ops(&out, &standard);
            let c = against_reference(name, run_cpu(name, &standard));
            assert!(c.rel_l2 <= tol, "{name} {precision}: rel L2 {}", c.rel_l2);
        }
        let (out, _) = compile_into(
            dir.path(),
            &fixture(name),
            &["--precision", "fp16", "--attention", "flash"],
        );
        assert_no_low_precision_statistics(&out);
        let c = against_reference(name, run_cpu(name, &out));
        assert!(c.rel_l2 <= 5e-3, "{name} cpu fp16: rel L2 {}", c.rel_l2);
    }
}

#[test]
fn precision_refuses_a_branch_that_computes() {
    // PixArt's `if out.shape[0] == 1: squeeze` passes a value through, so fp16 types its If
    // (the test above runs it); a branch that computes on the value is refused, naming the If.
    use attune_compiler::onnx::{ModelProto, NodeProto};
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("pixart_legacy");
    let mut m = ModelProto::decode(fs::read(&src).unwrap().as_slice()).unwrap();
    let node = m
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.op_type == "If")
        .unwrap();
    let then = node
        .attribute
        .iter_mut()
        .find(|a| a.name == "then_branch")
        .unwrap();
    let then = then.g.as_mut().unwrap();
    then.node.push(NodeProto {
        op_type: "Neg".into(),
        name: "/negate".into(),
        input: vec![then.output[0].name.clone()],
        output: vec!["negated".into()],
        ..Default::default()
    });
    then.output[0].name = "negated".into();
    let model = dir.path().join("unet.onnx");
    fs::write(&model, m.encode_to_vec()).unwrap();
    fs::copy(
        src.with_file_name("unet.onnx.data"),
        model.with_file_name("unet.onnx.data"),
    )
    .unwrap();
    let out = dir.path().join("out/unet.onnx");
    let o = compile_to(&model, &out, &["--precision", "fp16"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("'/model/If'") && err.contains("a branch computes (Neg)"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn angles_of_sines_and_cosines_stay_fp32() {
    // A rotary embedding computed in f32 (positions × frequencies, then cos/sin): at position
    // 64 fp16's spacing is 1/16, so the angle and its sine stay an fp32 island; a product that
    // only uses the cosine converts as usual.
    use attune_compiler::onnx::tensor_shape_proto::dimension::Value as D;
    use attune_compiler::pass::{PassCx, PassManager};
    use attune_passes::lower::{Precision, PrecisionPass};
    let node = |op: &str, ins: &[&str], out: &str| onnx::NodeProto {
        op_type: op.into(),
        name: format!("/rope/{out}"),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        ..Default::default()
    };
    let graph = onnx::GraphProto {
        name: "g".into(),
        input: vec![onnx::tensor_info(
            "pos",
            DataType::Float,
            Some(vec![D::DimValue(8)]),
        )],
        output: vec![onnx::tensor_info("y", DataType::Float, None)],
        initializer: vec![onnx::TensorProto {
            name: "freq".into(),
            data_type: DataType::Float as i32,
            dims: vec![8],
            raw_data: (0..8)
                .flat_map(|i| (1.0f32 / (i + 1) as f32).to_le_bytes())
                .collect(),
            ..Default::default()
        }],
        node: vec![
            node("Mul", &["pos", "freq"], "angle"),
            node("Cos", &["angle"], "cos"),
            node("Sin", &["angle"], "sin"),
            node("Mul", &["cos", "pos"], "scaled"),
            node("Add", &["scaled", "sin"], "y"),
        ],
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut m = import::from_proto(
        model_of(graph),
        &mut attune_compiler::weights::ExternalData::new(dir.path()),
    )
    .unwrap();
    let mut pm = PassManager::new();
    pm.add(PrecisionPass {
        precision: Precision::F16,
        keep_io_types: false,
    });
    pm.run(&mut m, &mut PassCx { verify: true }).unwrap();
    let g = &m.graph;
    let types = ElemTypes::infer(g).unwrap();
    let computes = |name: &str| {
        let n = g.node_ids().find(|n| g.node(*n).name() == name).unwrap();
        types.get(g.node(n).outputs[0].unwrap())
    };
    for island in ["/rope/angle", "/rope/cos", "/rope/sin"] {
        assert_eq!(computes(island), Some(DataType::Float as i32), "{island}");
    }
    assert_eq!(computes("/rope/scaled"), Some(DataType::Float16 as i32));
}
