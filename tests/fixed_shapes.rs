//! `compile --fix-shapes` (the model specialised to one set of input sizes, its shape
//! arithmetic folded) and runs in fixed buffers (the IoBinding path CUDA graphs use).
mod common;

use std::path::Path;

use attune_compiler::import;
use attune_compiler::ir::Model;
use attune_runtime::compare::compare;
use attune_runtime::ort_backend::OrtOptions;
use attune_runtime::{Backend, Ep, HostTensor, inputs};
use common::*;

/// The fixtures' test inputs (batch 2, 16x16 latents, 77 tokens) as fixed shapes: the input
/// form, which the legacy (`height`) and dynamo (`8*height`) exports both take.
const FIXED: &str = "sample=2x4x16x16,encoder_hidden_states=2x77x32";

/// Inputs ONNX Runtime's CUDA kernels read on the host (shapes, sizes, indices of slices):
/// computed at run time, they put their producers on the CPU, between the CUDA kernels.
fn host_inputs(op: &str) -> &'static [usize] {
    match op {
        "Reshape" | "Expand" | "Tile" | "TopK" | "Unsqueeze" | "Squeeze" | "Split" => &[1],
        "ConstantOfShape" => &[0],
        "Slice" => &[1, 2, 3, 4],
        "Resize" => &[1, 2, 3],
        "Range" => &[0, 1, 2],
        "Pad" => &[1, 2],
        _ => &[],
    }
}

/// Nothing left that depends on the input sizes at run time.
fn assert_static(m: &Model, what: &str) {
    let g = &m.graph;
    for io in g.inputs.iter().chain(&g.outputs) {
        let dims = &io
            .info
            .r#type
            .as_ref()
            .and_then(attune_compiler::onnx::tensor_type);
        let dims = &dims.unwrap().shape.as_ref().unwrap().dim;
        assert!(
            dims.iter().all(|d| matches!(
                d.value,
                Some(attune_compiler::onnx::tensor_shape_proto::dimension::Value::DimValue(_))
            )),
            "{what}: {} keeps a symbolic size",
            io.info.name
        );
    }
    for n in g.node_ids() {
        let node = g.node(n);
        assert!(
            !matches!(
                node.op(),
                "Shape" | "Size" | "NonZero" | "If" | "Loop" | "Scan"
            ),
            "{what}: {} left",
            node.describe()
        );
        for &slot in host_inputs(node.op()) {
            let Some(Some(v)) = node.inputs.get(slot) else {
                continue;
            };
            let constant = g.initializer(*v).is_some()
                || g.value(*v)
                    .producer
                    .is_some_and(|(p, _)| g.node(p).is("Constant"));
            assert!(
                constant,
                "{what}: input {slot} of {} is computed at run time",
                node.describe()
            );
        }
    }
}

/// The model's out_sample on ORT CPU for the fixture's inputs, with `opts`, run `times` times
/// (all runs must agree).
fn run_fixture(name: &str, model: &Path, opts: &OrtOptions, times: usize) -> HostTensor {
    let feed = fixture_feed(name, model);
    let mut b = Backend::open(model, Ep::Cpu, opts).unwrap();
    let first = out_sample(b.run(&feed).unwrap());
    for _ in 1..times {
        let again = out_sample(b.run(&feed).unwrap());
        assert_eq!(compare("again", &first, &again).unwrap().max_abs, 0.0);
    }
    first
}

#[test]
fn fixed_shapes_leave_no_size_computed_at_run_time_and_compute_the_same() {
    let bound = OrtOptions {
        bind_io: true,
        ..Default::default()
    };
    for name in ["sd15_legacy", "sd15_dynamo", "sdxl_legacy"] {
        let dir = tempfile::tempdir().unwrap();
        for extra in [
            &[][..],
            &["--tome", "0.5"],
            &["--enable-fusions", "packed-qkv"],
        ] {
            let what = format!("{name} {extra:?}");
            let dynamic = compile_for_cuda(dir.path(), name, "fp32", extra);
            let flags = [extra, &["--fix-shapes", FIXED]].concat();
            let fixed = compile_for_cuda(dir.path(), name, "fp32", &flags);
            let m = import::read(&fixed).unwrap();
            assert_static(&m, &what);
            assert!(
                m.graph.node_count() < import::read(&dynamic).unwrap().graph.node_count(),
                "{what}: nothing folded"
            );
            // Run the CUDA ops in standard form on the CPU, plainly and in fixed buffers.
            let (std_dynamic, std_fixed) = (dir.path().join("d.onnx"), dir.path().join("f.onnx"));
            with_cuda_ops_in_standard_ops(&dynamic, &std_dynamic);
            with_cuda_ops_in_standard_ops(&fixed, &std_fixed);
            let want = run_fixture(name, &std_dynamic, &OrtOptions::default(), 1);
            let plain = run_fixture(name, &std_fixed, &OrtOptions::default(), 1);
            let in_buffers = run_fixture(name, &std_fixed, &bound, 3);
            for (how, got) in [("plain", plain), ("bound", in_buffers)] {
                let c = compare("out_sample", &want, &got).unwrap();
                assert!(c.rel_l2 <= 1e-5, "{what} {how}: rel L2 {:.3e}", c.rel_l2);
            }
            if extra.is_empty() {
                let c = against_reference(name, run_cpu(name, &std_fixed));
                assert!(c.rel_l2 <= 1e-4, "{what}: rel L2 {:.3e}", c.rel_l2);
            }
        }
    }
}

#[test]
fn diffusion_transformers_fix_to_static_graphs() {
    // PixArt's `squeeze(1)` on the token count is an If the fixed sizes decide (its branch
    // is inlined); SD3 crops its position table and splits the joint output at sizes
    // computed at run time: all constants once fixed.
    for name in DITS {
        let dir = tempfile::tempdir().unwrap();
        for (precision, tol) in [("fp32", 1e-4), ("fp16", 5e-3)] {
            let what = format!("{name} {precision}");
            let sizes = match name {
                "flux_dynamo" => "batch=2,tokens=64,sequence=7", // packed latent tokens
                _ => "sample=2x4x16x16,sequence=7",
            };
            let flags = ["--fix-shapes", sizes];
            let fixed = compile_for_cuda(dir.path(), name, precision, &flags);
            assert_static(&import::read(&fixed).unwrap(), &what);
            let standard = dir.path().join(format!("standard_{precision}.onnx"));
            with_cuda_ops_in_standard_ops(&fixed, &standard);
            let c = against_reference(name, run_cpu(name, &standard));
            assert!(c.rel_l2 <= tol, "{what}: rel L2 {:.3e}", c.rel_l2);
        }
    }
}

#[test]
fn fixed_shapes_of_the_cpu_target_run_on_ort_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--attention", "flash", "--fix-shapes", FIXED];
    let (out, stdout) = compile_into(dir.path(), &fixture("sd15_legacy"), &flags);
    assert!(
        stdout.contains("batch=2, height=16, sequence=77, width=16"),
        "{stdout}"
    );
    assert_static(&import::read(&out).unwrap(), "cpu");
    let c = against_reference("sd15_legacy", run_cpu("sd15_legacy", &out));
    assert!(c.rel_l2 <= 1e-4, "rel L2 {:.3e}", c.rel_l2);
    // A size left out stays dynamic, and the report says so.
    let (_, stdout) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--fix-shapes", "sample=2x4x16x16"],
    );
    assert!(
        stdout.contains("sequence stays dynamic (in encoder_hidden_states)"),
        "{stdout}"
    );
    // A partial spec fixes the outputs' declarations as it does the inputs'.
    let (out, _) = compile_into(
        dir.path(),
        &fixture("sd15_legacy"),
        &["--fix-shapes", "height=16"],
    );
    let shown = common::stdout(&attune(&["inspect", out.to_str().unwrap()]));
    for decl in [
        "sample f32[batch,4,16,width]",
        "out_sample f32[batch,4,16,width]",
    ] {
        assert!(shown.contains(decl), "{decl}: {shown}");
    }
}

#[test]
fn hooks_keep_working_with_fixed_shapes_and_in_fixed_buffers() {
    // The hooks' inputs have defaults a sampler overrides: what depends on their values stays
    // computed, their sizes fold once given (`edits`), and runs in fixed buffers bind them too.
    let ctl = root().join("models/controller");
    let dir = tempfile::tempdir().unwrap();
    let fixed = "sample=4x4x16x16,encoder_hidden_states=4x77x32,edits=1";
    let flags = ["--hooks", "capture,p2p,masactrl", "--fix-shapes", fixed];
    let (out, stdout) = compile_into(dir.path(), &fixture("sd15_legacy"), &flags);
    assert!(!stdout.contains("stays dynamic"), "{stdout}");
    assert_static(&import::read(&out).unwrap(), "hooks");
    let mut feed: Vec<(String, HostTensor)> = ["sample", "timestep", "encoder_hidden_states"]
        .iter()
        .map(|n| {
            let file = ctl.join("inputs").join(format!("{n}.npy"));
            (n.to_string(), attune_runtime::npy::read(&file).unwrap())
        })
        .collect();
    let bound = OrtOptions {
        bind_io: true,
        ..Default::default()
    };
    for case in ["replace", "masactrl"] {
        let mut inputs = feed.clone();
        let controls = ctl.join(format!("{case}.safetensors"));
        inputs.extend(attune_runtime::safetensors_io::read(&controls).unwrap());
        let want = attune_runtime::npy::read(&ctl.join(format!("{case}.npy"))).unwrap();
        for opts in [OrtOptions::default(), bound.clone()] {
            let mut b = Backend::open(&out, Ep::Cpu, &opts).unwrap();
            for run in 0..2 {
                let got = out_sample(b.run(&inputs).unwrap());
                let c = compare("out_sample", &want, &got).unwrap();
                assert!(
                    c.rel_l2 <= 1e-4,
                    "{case} bind_io={} run {run}: {c:?}",
                    opts.bind_io
                );
            }
            // Buffers are made for the first run's inputs: one more is refused by name.
            if opts.bind_io {
                feed.push(("p2p.extra".into(), HostTensor::F32(Default::default())));
                let err = b.run(&feed).unwrap_err().to_string();
                assert!(err.contains("input 'p2p.extra'"), "{err}");
                feed.pop();
            }
        }
    }
}

#[test]
fn symbols_the_model_uses_as_one_size_are_fixed_together() {
    // Olive names each input's batch: fixing the sample's fixes the text states' (they meet in
    // the cross-attention), not the timestep's (expanded to the batch, it may be 1).
    let name = "sd15_olive_legacy";
    let dir = tempfile::tempdir().unwrap();
    let fix = ["--fix-shapes", "sample=2x4x16x16,unet_hidden_sequence=77"];
    for target in [&[][..], &["--target", "cuda", "--attention", "flash"]] {
        let (out, report) = compile_into(dir.path(), &fixture(name), &[target, &fix].concat());
        assert!(
            report.contains("unet_hidden_batch=2 too: one size with unet_sample_batch")
                && report.contains("unet_time_batch stays dynamic"),
            "{target:?}: {report}"
        );
        let m = import::read(&out).unwrap();
        let text = inputs::input_specs(&m)
            .into_iter()
            .find(|s| s.name == "encoder_hidden_states")
            .unwrap();
        assert_eq!(text.dims, [2, 77, 32].map(inputs::Dim::Fixed), "{target:?}");
        let standard = dir.path().join("standard.onnx");
        with_cuda_ops_in_standard_ops(&out, &standard);
        let c = against_reference(name, run_cpu(name, &standard));
        assert!(c.rel_l2 <= 1e-4, "{target:?}: rel L2 {:.3e}", c.rel_l2);
    }
    let o = compile_to(
        &fixture(name),
        &dir.path().join("bad.onnx"),
        &["--fix-shapes", "sample=2x4x16x16,unet_hidden_batch=3"],
    );
    assert!(
        stderr(&o).contains("unet_sample_batch=2 but unet_hidden_batch=3"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("bad.onnx").exists());
}

#[test]
fn bad_fixed_shapes_are_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    let cases = [
        (
            "sd15_legacy",
            "foo=3",
            "'foo' is neither an input nor a dim symbol",
        ),
        ("sd15_legacy", "sample=2x4x16", "input sample has 4 dims"),
        (
            "sd15_legacy",
            "sample=2x3x16x16",
            "input sample dim 1 is 4, not 3",
        ),
        (
            "sd15_legacy",
            "sample=2x4x16x16,batch=3",
            "input sample dim 0 (batch) is 3, not 2",
        ),
        (
            "sd15_legacy",
            "sample=2x4x0x16",
            "'0' is not a positive size",
        ),
        ("sd15_legacy", "sample=", "'' is not a positive size"),
        ("sd15_legacy", "batch", "expected INPUT=AxBx.. or SYMBOL=N"),
        (
            "sd15_dynamo",
            "sample=2x4x20x20",
            "20 is not a multiple of 8",
        ),
        // The skip connection (15x15) and the upsampled path (16x16) cannot meet.
        ("sd15_legacy", "sample=2x4x15x15", "Concat at up_blocks"),
        // The same with only the height given: axes compare where both sizes are known.
        (
            "sd15_legacy",
            "height=3",
            "inputs of sizes [?, 32, 4, ?], [?, 32, 3, ?] do not fit",
        ),
        // 8·height overflows 64 bits: an error, not a height left dynamic.
        (
            "sd15_dynamo",
            "height=1152921504606846976",
            "input sample dim 2 (8*height) is not a 64-bit whole number",
        ),
        (
            "sd15_legacy",
            "sample=1x4x4611686018427387904x4",
            "input sample would hold more than 2^63 elements",
        ),
    ];
    for (name, spec, expected) in cases {
        let o = compile_to(&fixture(name), &out, &["--fix-shapes", spec]);
        assert!(!o.status.success(), "{name} {spec}: compiled");
        assert!(
            stderr(&o).contains(expected),
            "{name} {spec}: {}",
            stderr(&o)
        );
        assert!(!out.exists(), "{name} {spec}: wrote an output");
    }
    // ToMe specialised to another latent size than the fixed one.
    let o = compile_to(
        &fixture("sd15_legacy"),
        &out,
        &[
            "--tome",
            "0.5",
            "--tome-static",
            "32x32",
            "--fix-shapes",
            FIXED,
        ],
    );
    let err = stderr(&o);
    assert!(
        err.contains("attune_src_before") && err.contains("[256], [1024] do not fit"),
        "{err}"
    );
    assert!(!out.exists());
    // A hook input's default ([1, 77, 77] for one edit) fixes its size too.
    let o = compile_to(
        &fixture("sd15_legacy"),
        &out,
        &["--hooks", "p2p", "--fix-shapes", "sample=4x4x16x16,edits=2"],
    );
    let err = stderr(&o);
    assert!(
        err.contains("(edits) would be 2, but its default has 1"),
        "{err}"
    );
    assert!(!out.exists());
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "fix_shapes = \"nope=1\"\n").unwrap();
    let o = compile_to(
        &fixture("sd15_legacy"),
        &out,
        &["--recipe", recipe.to_str().unwrap()],
    );
    assert!(stderr(&o).contains("'nope' is neither"), "{}", stderr(&o));
}

#[test]
fn runs_in_fixed_buffers_refuse_dynamic_outputs_and_other_input_sizes() {
    let bound = OrtOptions {
        bind_io: true,
        ..Default::default()
    };
    let feed_at = |model: &Path, height: &str| {
        let m = import::read(model).unwrap();
        let dims = ["batch=2", height, "width=16", "sequence=77"].map(String::from);
        let dims = inputs::Dims::parse(&dims).unwrap();
        inputs::prepare(&inputs::input_specs(&m), vec![], &dims, 1).unwrap()
    };
    // The original export's output sizes are only known at run time.
    let dynamic = fixture("sd15_legacy");
    let mut b = Backend::open(&dynamic, Ep::Cpu, &bound).unwrap();
    let err = b
        .run(&feed_at(&dynamic, "height=16"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("output 'out_sample' has dynamic sizes"),
        "{err}"
    );
    assert!(err.contains("--fix-shapes"), "{err}");
    // A fixed model: the buffers take the first run's sizes; other sizes are refused by name.
    let dir = tempfile::tempdir().unwrap();
    let (fixed, _) = compile_into(dir.path(), &dynamic, &["--fix-shapes", FIXED]);
    let mut b = Backend::open(&fixed, Ep::Cpu, &bound).unwrap();
    b.run(&feed_at(&fixed, "height=16")).unwrap();
    let err = b
        .run(&feed_at(&dynamic, "height=24"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("input 'sample'"), "{err}");
    // CUDA graphs are for the CUDA provider only, in bench and in the sampling loop.
    let s = root().join("models/controller/sample");
    let file = |f: &str| s.join(f).display().to_string();
    let o = attune(&[
        "sample",
        "--unet",
        fixed.to_str().unwrap(),
        "--steps",
        "1",
        "--cond",
        &file("cond.npy"),
        "--uncond",
        &file("uncond.npy"),
        "--cuda-graph",
    ]);
    assert!(
        stderr(&o).contains("CUDA graphs need the CUDA execution provider"),
        "{}",
        stderr(&o)
    );
    let o = attune(&[
        "bench",
        fixed.to_str().unwrap(),
        "--cuda-graph",
        "--iters",
        "1",
    ]);
    assert!(
        stderr(&o).contains("CUDA graphs need the CUDA execution provider"),
        "{}",
        stderr(&o)
    );
}

/// The fixed fp16 model replayed as a CUDA graph on ONNX Runtime's CUDA EP, against the
/// fixture reference. Needs an NVIDIA GPU: `cargo test --test fixed_shapes -- --ignored`.
#[test]
#[ignore = "needs an NVIDIA GPU (cargo test --test fixed_shapes -- --ignored)"]
fn cuda_graph_replays_compute_the_reference() {
    let graph = OrtOptions {
        cuda_graph: true,
        ..Default::default()
    };
    for name in ["sd15_legacy", "sd15_dynamo", "sdxl_legacy"] {
        let dir = tempfile::tempdir().unwrap();
        for precision in ["fp32", "fp16"] {
            let flags = ["--fix-shapes", FIXED];
            let out = compile_for_cuda(dir.path(), name, precision, &flags);
            let feed = fixture_feed(name, &out);
            let mut b = Backend::open(&out, Ep::Cuda, &graph).unwrap();
            let on_cpu: usize = b
                .placement()
                .iter()
                .filter(|(ep, _)| ep != "CUDAExecutionProvider")
                .map(|(_, n)| n)
                .sum();
            assert_eq!(on_cpu, 0, "{name}: {:?}", b.placement());
            // Run 1 is plain, run 2 captures, runs 3+ replay.
            for run in 1..=4 {
                let c = against_reference(name, b.run(&feed).unwrap());
                assert!(
                    c.rel_l2 <= 5e-3,
                    "{name} {precision} run {run}: rel L2 {}",
                    c.rel_l2
                );
            }
        }
    }
}

#[test]
fn fixed_sizes_decide_pixarts_if_whichever_attention_op() {
    // The If deciding PixArt's `squeeze(1)` reads the token count through the attention's
    // output shape: decided (and inlined) after opset 23's Attention as after MHA.
    let dir = tempfile::tempdir().unwrap();
    for mode in ["flash", "onnx"] {
        let flags = [
            "--attention",
            mode,
            "--fix-shapes",
            "sample=2x4x16x16,sequence=7",
        ];
        let (out, report) = compile_into(dir.path(), &fixture("pixart_legacy"), &flags);
        let m = import::read(&out).unwrap();
        assert!(
            !op_counts(&m).contains_key("If"),
            "{mode}: If left\n{report}"
        );
        let c = against_reference("pixart_legacy", run_cpu("pixart_legacy", &out));
        assert!(c.rel_l2 <= 1e-4, "{mode}: rel L2 {:.3e}", c.rel_l2);
    }
}
