//! `attune compile DIR -o OUT_DIR` on pipeline folders (`models/pipelines/`, made by
//! `models/export/pipelines.py`): each component compiled with what applies to it, everything
//! else copied byte for byte, the compiled folder generating the diffusers pipeline's image (with
//! attune and with optimum's ORT pipeline), and bad input refused with nothing written.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

mod common;

use attune_runtime::HostTensor;

fn pipeline(name: &str) -> PathBuf {
    common::root().join("models/pipelines").join(name)
}

fn manifest(name: &str) -> serde_json::Value {
    let path = pipeline(name).join("reference/manifest.json");
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// Every file under `dir` (relative path → bytes).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn copy_dir(src: &Path, dst: &Path) {
    for (rel, bytes) in tree(src) {
        let to = dst.join(rel);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::write(to, bytes).unwrap();
    }
}

/// `attune compile DIR -o OUT FLAGS`, succeeding or not.
fn compile(dir: &Path, out: &Path, flags: &[&str]) -> std::process::Output {
    common::compile_to(dir, out, flags)
}

fn compiled(dir: &Path, out: &Path, flags: &[&str]) -> String {
    let o = compile(dir, out, flags);
    assert!(
        o.status.success(),
        "{flags:?}: {}{}",
        common::stdout(&o),
        common::stderr(&o)
    );
    common::stdout(&o)
}

fn ops(model: &Path) -> std::collections::HashMap<String, usize> {
    common::op_counts(&attune_compiler::import::read(model).unwrap())
}

fn read_f32(path: &Path) -> ndarray::ArrayD<f32> {
    match attune_runtime::npy::read(path).unwrap() {
        HostTensor::F32(a) => a,
        other => panic!("{}: {:?}", path.display(), other.dtype()),
    }
}

/// Worst pixel difference (in 1/255) of a PNG and the reference's `image.npy` row `k`.
fn png_vs_reference(png: &Path, want: &ndarray::ArrayD<f32>, k: usize) -> f32 {
    let got = attune_runtime::image::read_png(png).unwrap();
    let want = want.index_axis(ndarray::Axis(0), k);
    assert_eq!([got.height, got.width, 3], want.shape());
    got.pixels
        .iter()
        .zip(want.iter())
        .map(|(&g, &w)| (f32::from(g) - w * 255.0).abs())
        .fold(0.0, f32::max)
}

/// `attune generate FOLDER` on a reference case (its prompt, steps, guidance and initial noise;
/// with its input image and mask where it has them); the worst pixel off diffusers' image.
fn generate_case(folder: &Path, name: &str, case: &str, png: &Path) -> f32 {
    let c = &manifest(name)["cases"][case];
    let refs = pipeline(name).join("reference").join(case);
    let steps = c["steps"].to_string();
    let guidance = c["guidance"].to_string();
    let latents = refs.join("latents.npy");
    // The reference's scheduler class (made from the folder's config, as here).
    let scheduler = match c["scheduler"].as_str().unwrap().split('.').next().unwrap() {
        "DDIMScheduler" => "ddim",
        "EulerDiscreteScheduler" => "euler",
        other => panic!("{case}: scheduler {other}"),
    };
    let mut args = vec![
        "generate".to_string(),
        folder.display().to_string(),
        "--prompt".into(),
        c["prompt"].as_str().unwrap().into(),
        "--scheduler".into(),
        scheduler.into(),
        "--steps".into(),
        steps,
        "--guidance".into(),
        guidance,
        "--latents".into(),
        latents.display().to_string(),
        "-o".into(),
        png.display().to_string(),
    ];
    // None: no negative prompt (SDXL then uses zeros, force_zeros_for_empty_prompt).
    if let Some(negative) = c["negative_prompt"].as_str() {
        args.extend(["--negative-prompt".into(), negative.into()]);
    }
    if c.get("mask").is_some() {
        args.extend([
            "--image".into(),
            refs.join("input.png").display().to_string(),
            "--mask".into(),
            refs.join("mask.png").display().to_string(),
        ]);
    }
    let o = common::attune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{case}: {}", common::stderr(&o));
    png_vs_reference(png, &read_f32(&refs.join("image.npy")), 0)
}

/// The component model files (replaced by compiled ones); every other file is copied.
const MODELS: [&str; 4] = [
    "text_encoder/model.onnx",
    "unet/model.onnx",
    "vae_decoder/model.onnx",
    "vae_encoder/model.onnx",
];

#[test]
fn a_compiled_folder_copies_the_rest_and_generates_the_diffusers_image() {
    let src = pipeline("sd15_tiny");
    let before = tree(&src);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("compiled");
    let stdout = compiled(&src, &out, &["--attention", "flash"]);
    assert_eq!(tree(&src), before, "the input folder is only read");
    // Only the output in its parent: the temporary folder was renamed, none left behind.
    let siblings: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(siblings.len(), 1);

    // Every file but the component models is byte-identical; the models are compiled.
    let after = tree(&out);
    for (rel, bytes) in &before {
        let rel_s = rel.to_str().unwrap();
        if MODELS.contains(&rel_s) {
            assert_ne!(&after[rel], bytes, "{rel_s} is compiled");
        } else {
            assert_eq!(after.get(rel), Some(bytes), "{rel_s} copied as it is");
        }
    }
    // Small components stay inline (no data file below a tensor of 1 KiB... as written).
    let extra: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(
        extra
            .iter()
            .all(|k| k.to_str().unwrap().ends_with("model.onnx.data")),
        "{extra:?}"
    );

    // A component's lines: its heading and the indented lines under it.
    let section = |name: &str| {
        let mut lines = stdout
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{name} (")));
        let head = lines.next().unwrap_or_else(|| panic!("{name} in {stdout}"));
        let body: Vec<&str> = lines.take_while(|l| l.starts_with(' ')).collect();
        format!("{head}\n{}", body.join("\n"))
    };
    // Each component's graph holds as many fused attention nodes as its report says it
    // rewrote: the UNet's 8 sites and the VAE decoder's one; a site not fused is said with
    // its reason.
    let mha = "com.microsoft.MultiHeadAttention";
    for (component, at_least) in [
        ("unet", 8),
        ("vae_decoder", 1),
        ("text_encoder", 0),
        ("vae_encoder", 0),
    ] {
        let text = section(component);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("attention: "))
            .unwrap_or_else(|| panic!("{text}"));
        let n = |key: &str| -> usize {
            let before = &line[..line.find(key).unwrap()];
            before
                .trim_end()
                .rsplit([' ', ','])
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (rewritten, skipped) = (n(" rewritten"), n(" skipped"));
        let got = ops(&out.join(component).join("model.onnx"));
        assert_eq!(got.get(mha).copied().unwrap_or(0), rewritten, "{text}");
        assert!(rewritten >= at_least, "{text}");
        assert_eq!(text.matches("\n    - ").count(), skipped, "{text}");
        assert_eq!(ops(&src.join(component).join("model.onnx")).get(mha), None);
    }
    assert_eq!(
        ops(&out.join("unet/model.onnx"))[mha] + ops(&out.join("vae_decoder/model.onnx"))[mha],
        9
    );
    assert!(stdout.contains("copied "), "{stdout}");

    // The compiled folder generates diffusers' image (fp32 passes: within 2/255).
    for case in ["txt2img_a", "txt2img_b"] {
        let worst = generate_case(
            &out,
            "sd15_tiny",
            case,
            &tmp.path().join(format!("{case}.png")),
        );
        assert!(worst <= 2.0, "{case}: a pixel {worst}/255 off");
    }
}

#[test]
fn an_inpainting_folder_compiles_and_inpaints_as_diffusers() {
    let src = pipeline("sd15_inpaint_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("compiled");
    let stdout = compiled(&src, &out, &["--attention", "flash"]);
    assert!(
        stdout.contains("StableDiffusionInpaintPipeline"),
        "{stdout}"
    );
    let unet = ops(&out.join("unet/model.onnx"));
    assert!(unet["com.microsoft.MultiHeadAttention"] > 0, "{unet:?}");
    // The VAE encoder (which inpainting runs) and the 9-channel UNet, compiled, give
    // diffusers' inpainted image.
    let worst = generate_case(
        &out,
        "sd15_inpaint_tiny",
        "inpaint",
        &tmp.path().join("i.png"),
    );
    assert!(worst <= 2.0, "inpaint: a pixel {worst}/255 off");
}

/// The reference's final latents decoded by the folder's VAE decoder: raw output [1, 3, H, W].
fn decode(folder: &Path, case: &str) -> ndarray::ArrayD<f32> {
    decode_scaled(folder, case, 1.0)
}

/// [`decode`] of the latents times `k`.
fn decode_scaled(folder: &Path, case: &str, k: f32) -> ndarray::ArrayD<f32> {
    let model = folder.join("vae_decoder/model.onnx");
    let latents = read_f32(
        &pipeline("sd15_tiny")
            .join("reference")
            .join(case)
            .join("final_latents.npy"),
    );
    let z = HostTensor::F32(latents.mapv(|x| k * x / 0.18215));
    let declared =
        attune_runtime::inputs::input_specs(&attune_compiler::import::read(&model).unwrap())[0]
            .dtype()
            .unwrap();
    let z = z.float_as(declared).unwrap_or(z);
    let mut session = attune_runtime::Backend::open(
        &model,
        attune_runtime::Ep::Cpu,
        &attune_runtime::ort_backend::OrtOptions::default(),
    )
    .unwrap();
    let outs = session.run(&[("latent_sample".into(), z)]).unwrap();
    match &outs[0].1 {
        HostTensor::F32(a) => a.clone(),
        HostTensor::F16(a) => a.mapv(half::f16::to_f32),
        other => panic!("{:?}", other.dtype()),
    }
}

#[test]
fn fp16_folder_decodes_without_overflow_and_close_to_fp32() {
    let src = pipeline("sd15_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fp16");
    let stdout = compiled(&src, &out, &["--precision", "fp16", "--attention", "flash"]);
    // StableDiffusionPipeline runs the VAE in the pipeline's precision whatever force_upcast
    // says: fp16, said so.
    assert!(
        stdout.contains("force_upcast in vae_decoder/config.json is not used"),
        "{stdout}"
    );
    for component in ["text_encoder", "unet", "vae_decoder", "vae_encoder"] {
        let m = attune_compiler::import::read(&out.join(component).join("model.onnx")).unwrap();
        let fp16 = m
            .graph
            .initializers()
            .filter(|(_, t)| t.proto.data_type == attune_compiler::onnx::DataType::Float16 as i32)
            .count();
        assert!(fp16 > 10, "{component}: {fp16} fp16 weights");
    }
    // The fp16 decoder (ORT CPU runs it, fp32 kernels between Casts where it has no fp16
    // one): no inf/NaN, and the image within 2/255 of diffusers' fp32 image.
    let want = read_f32(&src.join("reference/txt2img_a/image.npy"));
    let raw = decode(&out, "txt2img_a");
    assert!(
        raw.iter().all(|x| x.is_finite()),
        "inf/NaN in the fp16 decode"
    );
    let image = raw
        .permuted_axes(vec![0, 2, 3, 1])
        .mapv(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0));
    let worst = image
        .iter()
        .zip(want.iter())
        .map(|(g, w)| (g - w).abs() * 255.0)
        .fold(0.0, f32::max);
    eprintln!("fp16 VAE decoder: worst pixel {worst}/255 off diffusers' fp32 image");
    assert!(worst <= 2.0, "fp16 decode: a pixel {worst}/255 off");
    // The whole fp16 pipeline from a prompt.
    let worst = generate_case(&out, "sd15_tiny", "txt2img_a", &tmp.path().join("a.png"));
    eprintln!("fp16 pipeline: worst pixel {worst}/255 off diffusers' fp32 image");
    assert!(worst <= 3.0, "fp16 pipeline: a pixel {worst}/255 off");
}

/// The VAE's weights, counted by type.
fn fp16_weights(model: &Path) -> usize {
    let m = attune_compiler::import::read(model).unwrap();
    m.graph
        .initializers()
        .filter(|(_, t)| t.proto.data_type == attune_compiler::onnx::DataType::Float16 as i32)
        .count()
}

fn set_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut j: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    j[key] = value;
    fs::write(path, serde_json::to_string_pretty(&j).unwrap()).unwrap();
}

#[test]
fn force_upcast_keeps_the_vae_in_fp32_where_diffusers_does() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("xl");
    copy_dir(&pipeline("sd15_tiny"), &src);
    // An SDXL-class pipeline (its VAE config says force_upcast: true, as SDXL's does): diffusers'
    // SDXL pipelines decode and encode in fp32.
    set_json(
        &src.join("model_index.json"),
        "_class_name",
        "StableDiffusionXLPipeline".into(),
    );
    let out = tmp.path().join("out");
    let stdout = compiled(&src, &out, &["--precision", "fp16"]);
    for vae in ["vae_decoder", "vae_encoder"] {
        assert_eq!(fp16_weights(&out.join(vae).join("model.onnx")), 0, "{vae}");
        assert!(
            stdout.contains(&format!(
                "not applied: --precision: force_upcast in {vae}/config.json: kept in fp32"
            )),
            "{stdout}"
        );
    }
    assert!(fp16_weights(&out.join("unet/model.onnx")) > 0);
    // The fp32 decoder decodes the reference as the original does.
    let want = decode(&pipeline("sd15_tiny"), "txt2img_a");
    let got = decode(&out, "txt2img_a");
    let d = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-4, "{d}");
    // What it guards against: latents 1000 times larger (values fp16 holds) drive the
    // decoder's activations past fp16's range. The fp16 decoder of the SD1.5-class compile
    // overflows to NaN there; the one kept in fp32 decodes as the original does.
    let sd15 = tmp.path().join("sd15");
    compiled(&pipeline("sd15_tiny"), &sd15, &["--precision", "fp16"]);
    let overflowed = decode_scaled(&sd15, "txt2img_a", 1000.0);
    assert!(overflowed.iter().any(|x| !x.is_finite()));
    let want = decode_scaled(&pipeline("sd15_tiny"), "txt2img_a", 1000.0);
    let got = decode_scaled(&out, "txt2img_a", 1000.0);
    assert!(got.iter().all(|x| x.is_finite()));
    let d = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-4, "{d}");
    // An fp16-safe VAE (force_upcast: false, as madebyollin's sdxl-vae-fp16-fix) goes to fp16.
    set_json(
        &src.join("vae_decoder/config.json"),
        "force_upcast",
        false.into(),
    );
    let out2 = tmp.path().join("out2");
    compiled(&src, &out2, &["--precision", "fp16"]);
    assert!(fp16_weights(&out2.join("vae_decoder/model.onnx")) > 0);
    assert_eq!(fp16_weights(&out2.join("vae_encoder/model.onnx")), 0);
}

/// Moves every initializer of 1 KiB or more of `model` into `location` next to it, as optimum
/// writes large models (`model.onnx` + `model.onnx_data`).
fn externalize(model: &Path, location: &str) {
    use attune_compiler::onnx::{ModelProto, StringStringEntryProto, tensor_proto::DataLocation};
    use prost::Message;
    let mut m = ModelProto::decode(fs::read(model).unwrap().as_slice()).unwrap();
    let mut data = Vec::new();
    for t in &mut m.graph.as_mut().unwrap().initializer {
        if t.raw_data.len() < 1024 {
            continue;
        }
        let offset = data.len();
        data.extend_from_slice(&t.raw_data);
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        t.external_data = vec![
            entry("location", location.into()),
            entry("offset", offset.to_string()),
            entry("length", t.raw_data.len().to_string()),
        ];
        t.raw_data = Default::default();
        t.data_location = DataLocation::External as i32;
    }
    assert!(!data.is_empty());
    fs::write(model.with_file_name(location), data).unwrap();
    fs::write(model, m.encode_to_vec()).unwrap();
}

#[test]
fn external_data_as_optimum_writes_it_is_read_and_written_next_to_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ext");
    copy_dir(&pipeline("sd15_tiny"), &src);
    externalize(&src.join("unet/model.onnx"), "model.onnx_data");
    externalize(&src.join("text_encoder/model.onnx"), "weights.bin");
    let out = tmp.path().join("out");
    compiled(&src, &out, &["--attention", "flash"]);
    // The inputs' data files are replaced by the compiled models' own, not copied.
    assert!(!out.join("unet/model.onnx_data").exists());
    assert!(!out.join("text_encoder/weights.bin").exists());
    assert!(out.join("unet/model.onnx.data").is_file());
    assert!(out.join("text_encoder/model.onnx.data").is_file());
    let worst = generate_case(&out, "sd15_tiny", "txt2img_a", &tmp.path().join("a.png"));
    assert!(worst <= 2.0, "a pixel {worst}/255 off");
    // --weights link: the original data travels as it is (reflinked or copied), next to the
    // changed tensors.
    let out2 = tmp.path().join("linked");
    compiled(&src, &out2, &["--attention", "flash", "--weights", "link"]);
    assert_eq!(
        fs::read(out2.join("unet/model.onnx_data")).unwrap(),
        fs::read(src.join("unet/model.onnx_data")).unwrap()
    );
    let worst = generate_case(&out2, "sd15_tiny", "txt2img_a", &tmp.path().join("b.png"));
    assert!(worst <= 2.0, "linked: a pixel {worst}/255 off");
}

#[test]
fn fixed_shapes_go_to_the_components_they_name() {
    let src = pipeline("sd15_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let stdout = compiled(
        &src,
        &out,
        &[
            "--fix-shapes",
            "batch_size=2,height=8,width=8,sequence_length=77,text_encoder:batch_size=1,text_encoder:sequence_length=77",
        ],
    );
    let dims = |c: &str| {
        let m = attune_compiler::import::read(&out.join(c).join("model.onnx")).unwrap();
        m.graph
            .inputs
            .iter()
            .map(|i| {
                let s = i.info.r#type.as_ref().unwrap();
                format!("{:?}", s)
            })
            .collect::<Vec<_>>()
            .join(";")
    };
    assert!(!dims("unet").contains("batch_size"), "{}", dims("unet"));
    assert!(!dims("text_encoder").contains("batch_size"));
    // The VAE got no entry: still dynamic, and said.
    assert!(dims("vae_decoder").contains("batch_size"));
    assert!(
        stdout.contains("not applied: --fix-shapes: no vae_decoder:NAME=SIZE entry"),
        "{stdout}"
    );
    let bad = compile(
        &src,
        &tmp.path().join("bad"),
        &["--fix-shapes", "vae:batch_size=1"],
    );
    assert!(!bad.status.success());
    let err = common::stderr(&bad);
    assert!(
        err.contains("'vae' is not a compiled component") && err.contains("vae_decoder"),
        "{err}"
    );
}

#[test]
fn bad_folders_and_outputs_are_refused_with_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("in");
    copy_dir(&pipeline("sd15_tiny"), &src);
    let before = tree(&src);
    let refused = |input: &Path, out: &Path, flags: &[&str], want: &[&str]| {
        let o = compile(input, out, flags);
        assert!(!o.status.success(), "{}", common::stdout(&o));
        let err = common::stderr(&o);
        for w in want {
            assert!(err.contains(w), "want '{w}' in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    };
    // The output is the input, inside it, or holds it.
    refused(&src, &src, &[], &["is the input folder"]);
    refused(&src, &src.join("out"), &[], &["inside the input folder"]);
    refused(&src, &src.join("unet/x"), &[], &["inside the input folder"]);
    refused(&src, tmp.path(), &[], &["holds the input folder"]);
    assert_eq!(tree(&src), before);
    // An existing output folder with something in it.
    let existing = tmp.path().join("existing");
    fs::create_dir(&existing).unwrap();
    fs::write(existing.join("keep.txt"), b"mine").unwrap();
    refused(&src, &existing, &[], &["is not a pipeline folder"]);
    assert_eq!(fs::read(existing.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(fs::read_dir(&existing).unwrap().count(), 1);
    // A folder without model_index.json.
    let plain = tmp.path().join("plain");
    fs::create_dir(&plain).unwrap();
    refused(
        &plain,
        &tmp.path().join("o1"),
        &[],
        &["not a pipeline folder"],
    );
    // A model path as the output of a folder.
    refused(
        &src,
        &tmp.path().join("o.onnx"),
        &[],
        &["compiles to a new folder"],
    );
    // One-graph flags.
    refused(
        &src,
        &tmp.path().join("o2"),
        &["--stop-after", "canonical"],
        &["--stop-after", "unet/model.onnx"],
    );
    // A component that does not parse: named, with its file; nothing written, not even a
    // temporary folder.
    let corrupt = tmp.path().join("corrupt");
    copy_dir(&src, &corrupt);
    let bad = corrupt.join("vae_decoder/model.onnx");
    let bytes = fs::read(&bad).unwrap();
    fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("o3");
    refused(
        &corrupt,
        &out,
        &["--attention", "flash"],
        &["vae_decoder", &bad.display().to_string()],
    );
    // An earlier compile's folder in the way of a failing one stays as it was.
    let earlier = tmp.path().join("earlier");
    compiled(&src, &earlier, &[]);
    let earlier_files = tree(&earlier);
    refused(&corrupt, &earlier, &[], &["vae_decoder"]);
    assert_eq!(tree(&earlier), earlier_files);
    // A component model_index.json names, missing.
    let missing = tmp.path().join("missing");
    copy_dir(&src, &missing);
    fs::remove_dir_all(missing.join("text_encoder")).unwrap();
    refused(
        &missing,
        &tmp.path().join("o4"),
        &[],
        &["text_encoder", "no text_encoder/model.onnx"],
    );
    fs::remove_dir_all(missing.join("tokenizer")).unwrap();
    copy_dir(&src.join("text_encoder"), &missing.join("text_encoder"));
    refused(&missing, &tmp.path().join("o5"), &[], &["no tokenizer/"]);
    let mut left: Vec<String> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["corrupt", "earlier", "existing", "in", "missing", "plain"],
        "no output, no temporary folder"
    );
    assert_eq!(tree(&src), before, "the input folder is only read");

    // The VAE encoder is optional (text-to-image): its absence is a note.
    let txt2img = tmp.path().join("txt2img");
    copy_dir(&src, &txt2img);
    fs::remove_dir_all(txt2img.join("vae_encoder")).unwrap();
    let stdout = compiled(&txt2img, &tmp.path().join("o6"), &[]);
    assert!(
        stdout.contains("note: vae_encoder: not in the folder"),
        "{stdout}"
    );
}

/// A python that can import optimum-onnx: $ATTUNE_OPTIMUM_PYTHON, the venv
/// `pipelines.py --setup-optimum` makes, or the project's.
fn optimum_python() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("ATTUNE_OPTIMUM_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(std::env::temp_dir().join("attune-optimum/bin/python"));
    candidates.push(common::root().join("venv/bin/python"));
    candidates.into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import optimum.onnxruntime"])
            .env("PYTHONWARNINGS", "ignore")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn optimum_loads_the_compiled_folder_and_generates_the_diffusers_image() {
    let Some(python) = optimum_python() else {
        eprintln!(
            "skipped: no python that imports optimum.onnxruntime (set ATTUNE_OPTIMUM_PYTHON, or run venv/bin/python models/export/pipelines.py --setup-optimum)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for (name, case) in [("sd15_tiny", "txt2img_a"), ("sdxl_tiny", "txt2img_a")] {
        let src = pipeline(name);
        let out = tmp.path().join(name);
        compiled(&src, &out, &["--attention", "flash"]);
        let npy = tmp.path().join(format!("{name}.npy"));
        let o = std::process::Command::new(&python)
            .arg(common::root().join("models/export/optimum_generate.py"))
            .arg(&out)
            .arg(src.join("reference"))
            .arg(case)
            .arg(&npy)
            .env("PYTHONWARNINGS", "ignore")
            .env("TOKENIZERS_PARALLELISM", "false")
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}: {}",
            python.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let got = read_f32(&npy);
        let want = read_f32(&src.join("reference").join(case).join("image.npy"));
        assert_eq!(got.shape(), want.shape());
        let worst = got
            .iter()
            .zip(want.iter())
            .map(|(g, w)| (g - w).abs() * 255.0)
            .fold(0.0, f32::max);
        eprintln!("optimum on the compiled {name}: worst pixel {worst}/255 off diffusers");
        assert!(worst <= 2.0, "optimum, {name}: a pixel {worst}/255 off");
    }
}

/// Worst absolute difference of two tensors of one shape.
fn max_abs(got: &HostTensor, want: &ndarray::ArrayD<f32>) -> f32 {
    let HostTensor::F32(got) = got else {
        panic!("{:?}", got.dtype())
    };
    assert_eq!(got.shape(), want.shape());
    got.iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_lora_file_goes_to_the_unet_and_the_text_encoder_it_has_layers_for() {
    // A LoRA saved by StableDiffusionPipeline.save_lora_weights with layers for the UNet and
    // the text encoder (models/export/lora_text_encoder.py); references from diffusers'
    // load_lora_weights + fuse_lora on sd15_tiny.
    let loras = common::root().join("models/loras/text_encoder");
    let lora = loras.join("peft_mixed.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let stdout = compiled(
        &pipeline("sd15_tiny"),
        &out,
        &["--lora", lora.to_str().unwrap()],
    );
    let outputs = common::run_outputs(
        &out.join("text_encoder/model.onnx"),
        &loras.join("inputs"),
        &[],
    );
    let want = loras.join("peft_mixed_x1.0");
    for (name, got) in &outputs {
        let d = max_abs(got, &read_f32(&want.join(format!("{name}.npy"))));
        assert!(d < 1e-4, "text_encoder {name}: {d} off diffusers");
    }
    assert_eq!(outputs.len(), 2);
    let out_sample = common::run_unet(
        &out.join("unet/model.onnx"),
        &loras.join("unet_inputs"),
        &[],
    );
    let d = max_abs(
        &out_sample,
        &read_f32(&loras.join("unet_peft_mixed/out_sample.npy")),
    );
    assert!(d < 1e-4, "unet: {d} off diffusers");
    assert!(
        stdout.contains(
            "not applied: --lora: LoRAs adapt the denoiser and the text encoders, not the VAE"
        ),
        "{stdout}"
    );
    // A kohya file with text-encoder layers only, at 0.5.
    let te_only = loras.join("kohya_te.safetensors");
    let out2 = tmp.path().join("out2");
    compiled(
        &pipeline("sd15_tiny"),
        &out2,
        &["--lora", &format!("{}:0.5", te_only.display())],
    );
    let want = loras.join("kohya_te_x0.5");
    for (name, got) in common::run_outputs(
        &out2.join("text_encoder/model.onnx"),
        &loras.join("inputs"),
        &[],
    ) {
        let d = max_abs(&got, &read_f32(&want.join(format!("{name}.npy"))));
        assert!(d < 1e-4, "kohya text_encoder {name}: {d} off diffusers");
    }
    // One graph's --lora-component makes no sense for a folder.
    let o = compile(
        &pipeline("sd15_tiny"),
        &tmp.path().join("out3"),
        &["--lora", lora.to_str().unwrap(), "--lora-component", "unet"],
    );
    assert!(!o.status.success());
    assert!(common::stderr(&o).contains("--lora-component"));
}

#[test]
fn an_sdxl_folder_compiles_both_encoders_and_keeps_its_vae_in_fp32() {
    let src = pipeline("sdxl_tiny");
    let tmp = tempfile::tempdir().unwrap();
    // A recipe gives the same options as flags.
    let recipe = tmp.path().join("recipe.toml");
    fs::write(&recipe, "[attention]\nmode = \"flash\"\n").unwrap();
    let out = tmp.path().join("fp32");
    let stdout = compiled(&src, &out, &["--recipe", recipe.to_str().unwrap()]);
    assert!(stdout.contains("text_encoder_2 (text encoder)"), "{stdout}");
    let mha = |c: &str| {
        ops(&out.join(c).join("model.onnx"))
            .get("com.microsoft.MultiHeadAttention")
            .copied()
            .unwrap_or(0)
    };
    assert_eq!((mha("unet"), mha("vae_decoder")), (16, 1));
    for case in ["txt2img_a", "txt2img_b", "txt2img_a_euler"] {
        let worst = generate_case(
            &out,
            "sdxl_tiny",
            case,
            &tmp.path().join(format!("{case}.png")),
        );
        assert!(worst <= 2.0, "{case}: a pixel {worst}/255 off");
    }
    // fp16: both encoders and the UNet; the VAE stays fp32 (force_upcast, as diffusers' SDXL
    // pipeline runs it), reported.
    let out = tmp.path().join("fp16");
    let stdout = compiled(&src, &out, &["--attention", "flash", "--precision", "fp16"]);
    for c in ["text_encoder", "text_encoder_2", "unet"] {
        assert!(fp16_weights(&out.join(c).join("model.onnx")) > 0, "{c}");
    }
    for c in ["vae_decoder", "vae_encoder"] {
        assert_eq!(fp16_weights(&out.join(c).join("model.onnx")), 0, "{c}");
        assert!(
            stdout.contains(&format!(
                "not applied: --precision: force_upcast in {c}/config.json"
            )),
            "{stdout}"
        );
    }
    let worst = generate_case(&out, "sdxl_tiny", "txt2img_b", &tmp.path().join("h.png"));
    eprintln!("sdxl fp16 (VAE fp32): worst pixel {worst}/255 off diffusers' fp32 image");
    assert!(worst <= 3.0, "fp16: a pixel {worst}/255 off");
}

#[test]
fn inspect_and_diff_take_folders() {
    let src = pipeline("sd15_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    compiled(&src, &out, &["--attention", "flash"]);
    let o = common::attune(&["inspect", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let text = common::stdout(&o);
    for c in ["text_encoder", "unet", "vae_decoder", "vae_encoder"] {
        assert!(text.contains(&format!("== {c} (")), "{text}");
    }
    assert!(text.contains("StableDiffusionPipeline"), "{text}");
    let o = common::attune(&["diff", src.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let text = common::stdout(&o);
    // The UNet's section shows its 8 fused sites.
    let unet = &text[text.find("== unet").unwrap()..text.find("== vae_decoder").unwrap()];
    assert!(
        unet.lines()
            .any(|l| l.contains("com.microsoft.MultiHeadAttention") && l.contains("+8")),
        "{unet}"
    );
    let o = common::attune(&[
        "diff",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--numeric",
    ]);
    assert!(!o.status.success());
    assert!(common::stderr(&o).contains("unet/model.onnx"));
}

#[test]
fn an_earlier_compiled_folder_is_replaced_whole() {
    let src = pipeline("sd15_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    compiled(&src, &out, &[]);
    fs::write(out.join("stale.txt"), b"from before").unwrap();
    let mha = |out: &Path| {
        ops(&out.join("unet/model.onnx"))
            .get("com.microsoft.MultiHeadAttention")
            .copied()
    };
    assert_eq!(mha(&out), None);
    let stdout = compiled(&src, &out, &["--attention", "flash"]);
    assert!(stdout.contains("replaced the pipeline folder"), "{stdout}");
    assert_eq!(mha(&out), Some(8));
    assert!(
        !out.join("stale.txt").exists(),
        "the old folder is gone whole"
    );
    let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "no folder moved aside is left");
}
