//! ControlNet: `generate --controlnet/--control-image` and `compile --merge-controlnet` against
//! diffusers' StableDiffusionControlNetPipeline (models/export/controlnet.py).
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use attune_compiler::onnx::{self, DataType, tensor_shape_proto::dimension::Value as D};
use attune_runtime::HostTensor;
use attune_runtime::compare::compare;
use common::*;
use prost::Message;

fn folder() -> PathBuf {
    root().join("models/pipelines/sd15_controlnet_tiny")
}

fn manifest() -> serde_json::Value {
    let path = folder().join("reference/manifest.json");
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// `attune generate` of a reference case's prompt and noise on `dir` with `extra` (CFG 7.5,
/// negative ""); the final latents and the PNG's path.
fn generate(
    dir: &Path,
    case: &str,
    out: &Path,
    extra: &[String],
) -> (ndarray::ArrayD<f32>, PathBuf) {
    let latents = folder().join("reference").join(case).join("latents.npy");
    let mut args = vec![
        "--negative-prompt=".to_string(),
        "--guidance=7.5".to_string(),
    ];
    args.extend(extra.iter().cloned());
    generate_from(dir, PROMPT, &latents, &out.join(case), &args)
}

const PROMPT: &str = "a photo of an astronaut riding a horse on mars";

/// The --controlnet and --control-image flags of a reference case.
fn control_flags(case: &str) -> Vec<String> {
    let m = manifest();
    let c = &m["cases"][case];
    let refs = folder().join("reference").join(case);
    let mut flags = Vec::new();
    for (k, net) in c["controlnets"].as_array().unwrap().iter().enumerate() {
        let path = match net.as_str().unwrap() {
            "controlnet/" => folder().join("controlnet"),
            other => root().join(other),
        };
        let num = |key: &str| c[key][k].as_f64().unwrap();
        flags.push(format!(
            "--controlnet={}:{}:{}:{}",
            path.display(),
            num("controlnet_conditioning_scale"),
            num("control_guidance_start"),
            num("control_guidance_end")
        ));
        flags.push(format!(
            "--control-image={}",
            refs.join(c["control_images"][k].as_str().unwrap())
                .display()
        ));
    }
    flags
}

fn assert_matches_reference(case: &str, latents: ndarray::ArrayD<f32>, png: &Path, tol: f64) {
    assert_like_reference(
        &folder().join("reference").join(case),
        latents,
        png,
        tol,
        case,
    );
}

#[test]
fn generate_with_controlnets_gives_diffusers_controlnet_pipelines_images() {
    let out = tempfile::tempdir().unwrap();
    // One ControlNet (legacy export, conditioning_scale input), two (the second a dynamo
    // export without it; each with its own share of the steps), a control image resized.
    for case in ["one", "two", "resized"] {
        let (latents, png) = generate(&folder(), case, out.path(), &control_flags(case));
        assert_matches_reference(case, latents, &png, 1e-4);
    }
}

#[test]
fn residual_inputs_without_a_controlnet_get_zeros() {
    let out = tempfile::tempdir().unwrap();
    // The same UNet weights as sd15_tiny's: its txt2img_a reference.
    let tiny = root().join("models/pipelines/sd15_tiny/reference/txt2img_a");
    let (latents, _) = generate_from(
        &folder(),
        PROMPT,
        &tiny.join("latents.npy"),
        &out.path().join("zeros"),
        &["--negative-prompt=".to_string()],
    );
    assert_rel_l2(
        read_f32(&tiny.join("final_latents.npy")),
        latents,
        1e-4,
        "zeros",
    );
    // `attune sample` feeds them zeros too.
    let file = |f: &str| tiny.join(f).display().to_string();
    let o = attune(&[
        "sample",
        "--unet",
        folder().join("unet/model.onnx").to_str().unwrap(),
        "--steps",
        "4",
        "--scheduler-config",
        folder()
            .join("scheduler/scheduler_config.json")
            .to_str()
            .unwrap(),
        "--scheduler",
        "ddim",
        "--cond",
        &file("prompt_embeds.npy"),
        "--uncond",
        &file("negative_prompt_embeds.npy"),
        "--latents",
        &file("latents.npy"),
        "--reference",
        &file("final_latents.npy"),
        "--out",
        out.path().join("sample").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

#[test]
fn a_merged_controlnet_equals_the_two_sessions() {
    let dir = tempfile::tempdir().unwrap();
    for attention in ["keep", "flash"] {
        let merged = dir.path().join(format!("merged-{attention}"));
        let o = attune(&[
            "compile",
            folder().to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
            "--merge-controlnet",
            folder().join("controlnet").to_str().unwrap(),
            "--attention",
            attention,
        ]);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        let report = stdout(&o);
        assert!(report.contains("merge-controlnet: 1 rewritten"), "{report}");
        // One graph: no residual inputs left, the control image and scale in their place.
        let unet = attune_compiler::import::read(&merged.join("unet/model.onnx")).unwrap();
        let inputs: Vec<&str> = unet
            .graph
            .inputs
            .iter()
            .map(|io| io.info.name.as_str())
            .collect();
        assert!(
            !inputs.iter().any(|n| n.contains("additional_residual")),
            "{inputs:?}"
        );
        assert!(
            inputs.contains(&"controlnet_cond") && inputs.contains(&"controlnet_scale"),
            "{inputs:?}"
        );
        let image = folder().join("reference/one/control_0.png");
        let flags = |scale: &str| {
            vec![
                format!("--controlnet-scale={scale}"),
                format!("--control-image={}", image.display()),
            ]
        };
        let out = dir.path().join(attention);
        fs::create_dir_all(&out).unwrap();
        let (latents, png) = generate(&merged, "one", &out, &flags("0.8"));
        assert_matches_reference("one", latents, &png, 1e-4);
        // With a share of the steps: the two-session run of the same schedule.
        let (merged_run, _) = generate(
            &merged,
            "one",
            &dir.path().join(attention),
            &flags("0.8:0.25:0.75"),
        );
        let two = vec![
            format!(
                "--controlnet={}:0.8:0.25:0.75",
                folder().join("controlnet").display()
            ),
            format!("--control-image={}", image.display()),
        ];
        let sessions = dir.path().join(format!("{attention}-sessions"));
        fs::create_dir_all(&sessions).unwrap();
        let (two_run, _) = generate(&folder(), "one", &sessions, &two);
        assert_rel_l2(
            two_run,
            merged_run,
            1e-5,
            &format!("{attention}: merged vs sessions"),
        );
    }
}

#[test]
fn controlnets_compile_with_attention_fusion_fp16_and_the_cuda_lowering() {
    let dir = tempfile::tempdir().unwrap();
    let fused = dir.path().join("fused");
    let o = attune(&[
        "compile",
        folder().to_str().unwrap(),
        "-o",
        fused.to_str().unwrap(),
        "--attention",
        "flash",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let report = stdout(&o);
    assert!(report.contains("controlnet (ControlNet)"), "{report}");
    let graph = attune_compiler::import::read(&fused.join("controlnet/model.onnx")).unwrap();
    let fused_ops = graph
        .graph
        .node_ids()
        .filter(|n| graph.graph.node(*n).op() == "MultiHeadAttention")
        .count();
    assert!(fused_ops > 0, "{report}");
    let (latents, png) = generate(&fused, "one", dir.path(), &control_flags("one"));
    assert_matches_reference("one", latents, &png, 1e-4);
    // fp16 for the CUDA provider, checked on the CPU with its CUDA-only ops written out.
    let cn = folder().join("controlnet/model.onnx");
    let (lowered, _) = compile_into(
        dir.path(),
        &cn,
        &[
            "--target",
            "cuda",
            "--precision",
            "fp16",
            "--attention",
            "flash",
            "--keep-io-types",
        ],
    );
    let runnable = dir.path().join("runnable.onnx");
    with_cuda_ops_in_standard_ops(&lowered, &runnable);
    let inputs = dir.path().join("inputs");
    fs::create_dir_all(&inputs).unwrap();
    let write = |name: &str, t: HostTensor| {
        attune_runtime::npy::write(&inputs.join(format!("{name}.npy")), &t).unwrap()
    };
    write("sample", wave(&[2, 4, 8, 8], 0.37));
    write(
        "timestep",
        HostTensor::I64(ndarray::arr1(&[501i64, 501]).into_dyn()),
    );
    write("encoder_hidden_states", wave(&[2, 77, 16], 0.11));
    let HostTensor::F32(image) = wave(&[2, 3, 16, 16], 0.05) else {
        unreachable!()
    };
    write(
        "controlnet_cond",
        HostTensor::F32(image.mapv(|v| v * 0.5 + 0.5)),
    );
    write(
        "conditioning_scale",
        HostTensor::F32(ndarray::arr0(0.8f32).into_dyn()),
    );
    let want = run_outputs(&cn, &inputs, &[]);
    let got = run_outputs(&runnable, &inputs, &[]);
    assert_eq!(want.len(), 5);
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        let c = compare(name, w, g).unwrap();
        assert!(c.rel_l2 <= 5e-3, "fp16 cuda-lowered {name}: {c:?}");
    }
}

/// A ControlNet-shaped graph whose residuals have 7 channels (the UNet's have 32).
fn misfit_controlnet(dir: &Path) -> PathBuf {
    let float = |name: &str, dims: Vec<D>| onnx::tensor_info(name, DataType::Float, Some(dims));
    let sym = |s: &str| D::DimParam(s.into());
    let mut inputs = vec![
        float(
            "sample",
            vec![sym("batch"), D::DimValue(4), sym("h"), sym("w")],
        ),
        onnx::tensor_info("timestep", DataType::Int64, Some(vec![sym("batch")])),
        float(
            "encoder_hidden_states",
            vec![sym("batch"), sym("s"), D::DimValue(16)],
        ),
        float(
            "controlnet_cond",
            vec![sym("batch"), D::DimValue(3), sym("H"), sym("W")],
        ),
    ];
    let names: Vec<String> = (0..4)
        .map(|i| format!("down_block_{i}_additional_residual"))
        .chain(["mid_block_additional_residual".to_string()])
        .collect();
    let zeros = onnx::TensorProto {
        name: "zeros".into(),
        data_type: DataType::Float as i32,
        dims: vec![1, 7, 1, 1],
        raw_data: vec![0u8; 28].into(),
        ..Default::default()
    };
    let nodes = names
        .iter()
        .map(|n| onnx::NodeProto {
            op_type: "Identity".into(),
            name: format!("{n}_node"),
            input: vec!["zeros".into()],
            output: vec![n.clone()],
            ..Default::default()
        })
        .collect();
    let outputs = names
        .iter()
        .map(|n| {
            float(
                n,
                vec![
                    D::DimValue(1),
                    D::DimValue(7),
                    D::DimValue(1),
                    D::DimValue(1),
                ],
            )
        })
        .collect();
    inputs.truncate(4);
    let graph = onnx::GraphProto {
        name: "misfit".into(),
        node: nodes,
        input: inputs,
        output: outputs,
        initializer: vec![zeros],
        ..Default::default()
    };
    let path = dir.join("misfit.onnx");
    fs::write(&path, model_of(graph).encode_to_vec()).unwrap();
    path
}

#[test]
fn controlnet_requests_that_cannot_work_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let refuse = assert_refused;
    let f = folder();
    let misfit = misfit_controlnet(dir.path());
    let image = f.join("reference/one/control_0.png");
    let out = dir.path().join("x.png");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "generate",
            f.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "-o",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&str], expected: &[&str]| {
        let args = base(extra);
        refuse(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            expected,
        );
    };
    let misfit_flag = format!("--controlnet={}", misfit.display());
    let image_flag = format!("--control-image={}", image.display());
    // Residuals of other channels: the ControlNet, the input and both shapes named.
    run(
        &[&misfit_flag, &image_flag],
        &[
            "misfit.onnx",
            "down_block_0_additional_residual",
            "do not fit",
        ],
    );
    // A control image that cannot be read.
    let broken = dir.path().join("broken.png");
    fs::write(&broken, b"not a png").unwrap();
    run(
        &[&format!("--control-image={}", broken.display())],
        &["broken.png", "not a readable PNG"],
    );
    // One image for two ControlNets.
    let cn = format!("--controlnet={}", f.join("controlnet").display());
    run(
        &[&cn, &cn, &image_flag],
        &["2 --controlnet and 1 --control-image"],
    );
    // --controlnet-scale without a merged ControlNet.
    run(
        &["--controlnet-scale=0.5", &image_flag],
        &["--controlnet-scale", "no merged ControlNet"],
    );
    assert!(!out.exists());
    // Merging it: named, nothing written.
    let merged = dir.path().join("merged");
    refuse(
        &[
            "compile",
            f.to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
            "--merge-controlnet",
            misfit.to_str().unwrap(),
        ],
        &[
            "misfit.onnx",
            "down_block_0_additional_residual",
            "do not fit",
        ],
    );
    assert!(!merged.exists());
    // A ControlNet exported at another opset (operators changed between 17 and 18).
    let dynamo = root().join("models/controlnet/b_dynamo");
    refuse(
        &[
            "compile",
            f.to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
            "--merge-controlnet",
            dynamo.to_str().unwrap(),
        ],
        &["b_dynamo", "opset Some(18)", "one opset"],
    );
    assert!(!merged.exists());
    // A UNet without residual inputs cannot take a ControlNet.
    let tiny = root().join("models/pipelines/sd15_tiny");
    refuse(
        &[
            "compile",
            tiny.to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
            "--merge-controlnet",
            f.join("controlnet").to_str().unwrap(),
        ],
        &["no residual inputs"],
    );
    assert!(!merged.exists());
}

#[test]
fn sdxl_controlnets_read_the_pooled_text_and_time_ids_in_two_sessions_or_merged() {
    let dir = tempfile::tempdir().unwrap();
    let sdxl = root().join("models/pipelines/sdxl_controlnet_tiny");
    let refs = sdxl.join("reference/one");
    let image = format!("--control-image={}", refs.join("control_0.png").display());
    let merged = dir.path().join("merged");
    let o = attune(&[
        "compile",
        sdxl.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
        "--merge-controlnet",
        sdxl.join("controlnet").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let runs = [
        (
            sdxl.clone(),
            format!("--controlnet={}:0.7", sdxl.join("controlnet").display()),
        ),
        (merged, "--controlnet-scale=0.7".to_string()),
    ];
    for (k, (model, flag)) in runs.iter().enumerate() {
        let (png, saved) = (
            dir.path().join(format!("{k}.png")),
            dir.path().join(format!("{k}.npy")),
        );
        let o = attune(&[
            "generate",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of an astronaut riding a horse on mars",
            "--steps",
            "4",
            "--scheduler",
            "ddim",
            "--latents",
            refs.join("latents.npy").to_str().unwrap(),
            "--save-latents",
            saved.to_str().unwrap(),
            flag,
            &image,
            "-o",
            png.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{flag}: {}", stderr(&o));
        let want = read_f32(&refs.join("final_latents.npy"));
        let c = compare(
            "final latents",
            &HostTensor::F32(want),
            &HostTensor::F32(read_f32(&saved)),
        )
        .unwrap();
        assert!(c.rel_l2 <= 1e-4, "{flag}: {c:?}");
        let worst = worst_pixel(
            &png,
            read_f32(&refs.join("image.npy")).index_axis(ndarray::Axis(0), 0),
        );
        assert!(worst <= 2.0, "{flag}: a pixel {worst}/255 off");
    }
}

#[test]
fn a_dynamo_unet_takes_controlnets_in_sessions_and_merged() {
    let dir = tempfile::tempdir().unwrap();
    // sd15_controlnet_tiny with its UNet exported by dynamo (dims as expressions).
    let copy = dir.path().join("dynamo");
    for entry in fs::read_dir(folder()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if name == "unet" || name == "reference" {
            continue;
        }
        if p.is_dir() {
            fs::create_dir_all(copy.join(&name)).unwrap();
            for f in fs::read_dir(&p).unwrap() {
                let f = f.unwrap().path();
                fs::copy(&f, copy.join(&name).join(f.file_name().unwrap())).unwrap();
            }
        } else {
            fs::copy(&p, copy.join(&name)).unwrap();
        }
    }
    let dynamo_unet = root().join("models/controlnet/unet_dynamo");
    fs::create_dir_all(copy.join("unet")).unwrap();
    for f in fs::read_dir(&dynamo_unet).unwrap() {
        let f = f.unwrap().path();
        fs::copy(&f, copy.join("unet").join(f.file_name().unwrap())).unwrap();
    }
    let out = dir.path().join("runs");
    fs::create_dir_all(&out).unwrap();
    // Two ControlNets (legacy and dynamo) into the dynamo UNet: diffusers' reference.
    let (latents, png) = generate(&copy, "two", &out, &control_flags("two"));
    assert_matches_reference("two", latents, &png, 1e-4);
    // The dynamo ControlNet merged into the dynamo UNet (both opset 18) = the two sessions.
    let b = root().join("models/controlnet/b_dynamo");
    let merged = dir.path().join("merged");
    let o = attune(&[
        "compile",
        copy.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
        "--merge-controlnet",
        b.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let image = format!(
        "--control-image={}",
        folder().join("reference/two/control_1.png").display()
    );
    let sessions_dir = dir.path().join("sessions");
    let merged_dir = dir.path().join("merged-run");
    fs::create_dir_all(&sessions_dir).unwrap();
    fs::create_dir_all(&merged_dir).unwrap();
    let two = vec![
        format!("--controlnet={}:0.5:0:1", b.display()),
        image.clone(),
    ];
    let (a, _) = generate(&copy, "one", &sessions_dir, &two);
    let (m, _) = generate(
        &merged,
        "one",
        &merged_dir,
        &["--controlnet-scale=0.5".into(), image],
    );
    assert_rel_l2(a, m, 1e-5, "merged vs sessions");
}
