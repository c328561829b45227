"""A tiny ControlNet pipeline and diffusers' StableDiffusionControlNetPipeline references.

    python models/export/controlnet.py

sd15_tiny's torch pipeline (rebuilt by pipelines.py's `build_torch`, checked against its
committed txt2img_a reference) with two ControlNets made by `ControlNetModel.from_unet` from
its UNet (seeded perturbations, so the zero convolutions are not zero):

- `models/pipelines/sd15_controlnet_tiny/`: sd15_tiny's ONNX components (byte-identical copies)
  with `unet/model.onnx`, the same UNet exported with the residual inputs
  `down_block_{i}_additional_residual` [B, C_i, h_i, w_i] and `mid_block_additional_residual`
  (each with its own dim names, as tools exporting them write), and `controlnet/model.onnx`
  (legacy exporter, opset 17): inputs sample, timestep (int64 [B]), encoder_hidden_states,
  controlnet_cond [B, 3, H, W] (RGB in [0, 1]), conditioning_scale (float scalar); outputs named
  as the UNet's residual inputs. model_index.json names StableDiffusionControlNetPipeline.
- `models/pipelines/sdxl_controlnet_tiny/` (`--sdxl`): the same for sdxl_tiny (its ControlNet
  also reads text_embeds and time_ids), with StableDiffusionXLControlNetPipeline's `one`.
- `models/controlnet/unet_dynamo/model.onnx` (`--dynamo-unet`): sd15_controlnet_tiny's UNet
  exported by dynamo (opset 18), residual dims as expressions of the sample's.
- `models/controlnet/b_dynamo/model.onnx`: the second ControlNet, dynamo exporter (opset 18),
  without a conditioning_scale input (the runtime scales its outputs).
- `reference/` of the pipeline folder, per case (4 DDIM steps, guidance 7.5, negative ""):
  latents.npy (initial noise), the control image(s) as PNG, final_latents.npy, image.npy;
  `manifest.json` with each case's ControlNets, scales and guidance start/end.

    python models/export/controlnet.py --full OUT     # SD1.5-size, random weights, never committed

writes OUT/unet/model.onnx (the SD1.5-size UNet of unets.py --full, with residual inputs) and
OUT/controlnet/model.onnx (its ControlNetModel.from_unet, SD's 8x conditioning embedding,
with conditioning_scale), legacy exporter, opset 17, for benches/controlnet_cpu.sh.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pag  # noqa: E402
import pipelines  # noqa: E402
import unets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "pipelines" / "sd15_controlnet_tiny"
SECOND = ROOT / "controlnet" / "b_dynamo"
COPIED = ["text_encoder", "tokenizer", "vae_decoder", "vae_encoder", "scheduler"]


class UnetWithResiduals(torch.nn.Module):
    """SDXL's UNet takes text_embeds and time_ids after the text (`added` = 2)."""

    def __init__(self, unet, added=0):
        super().__init__()
        self.unet, self.added = unet, added

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.added else None
        residuals = rest[self.added:]
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         down_block_additional_residuals=residuals[:-1],
                         mid_block_additional_residual=residuals[-1], return_dict=False)[0]


class ControlNet(torch.nn.Module):
    def __init__(self, controlnet, scaled):
        super().__init__()
        self.controlnet, self.scaled = controlnet, scaled

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=None,
                text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=conditioning_scale if self.scaled else 1.0,
                                    added_cond_kwargs=added, return_dict=False)
        return (*down, mid)


def residual_names(n_down):
    return [f"down_block_{i}_additional_residual" for i in range(n_down)] + ["mid_block_additional_residual"]


def save_external(raw, path):
    m = onnx.load(str(raw))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


def export_unet(unet, residuals, feeds, path, tmp):
    added = ["text_embeds", "time_ids"][:len(feeds) - 3]
    names = ["sample", "timestep", "encoder_hidden_states", *added] + residual_names(len(residuals) - 1)
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"}, "out_sample": {0: "batch", 2: "height", 3: "width"}}
    axes.update({n: {0: "batch"} for n in added})
    for i, n in enumerate(names[3 + len(added):]):
        axes[n] = {0: "batch", 2: f"residual_{i}_height", 3: f"residual_{i}_width"}
    raw = tmp / "unet.onnx"
    torch.onnx.export(UnetWithResiduals(unet, len(added)).eval(), (*feeds, *residuals), str(raw), dynamo=False,
                      opset_version=17, input_names=names, output_names=["out_sample"], dynamic_axes=axes)
    save_external(raw, path)


def export_controlnet(cn, feeds, path, tmp, exporter, added=()):
    """`added`: SDXL's (text_embeds, time_ids) feeds."""
    scaled = exporter == "legacy"
    kw = {"added_cond_kwargs": dict(zip(("text_embeds", "time_ids"), added))} if added else {}
    n_down = len(cn(*feeds, return_dict=False, **kw)[0])
    outs = residual_names(n_down)
    names = ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"] + (["conditioning_scale"] if scaled else [])
    names += ["text_embeds", "time_ids"][:len(added)]
    args = ((*feeds, torch.tensor(0.7)) if scaled else tuple(feeds)) + tuple(added)
    raw = tmp / f"controlnet_{exporter}.onnx"
    wrapper = ControlNet(cn, scaled).eval()
    if exporter == "legacy":
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "sequence"},
                "controlnet_cond": {0: "batch", 2: "image_height", 3: "image_width"}}
        axes.update({n: {0: "batch"} for n in ("text_embeds", "time_ids")[:len(added)]})
        for i, n in enumerate(outs):
            axes[n] = {0: "batch", 2: f"residual_{i}_height", 3: f"residual_{i}_width"}
        torch.onnx.export(wrapper, args, str(raw), dynamo=False, opset_version=17, input_names=names,
                          output_names=outs, dynamic_axes=axes)
    else:
        batch = torch.export.Dim("batch", min=1, max=64)
        h, w = torch.export.Dim("height", min=2, max=256), torch.export.Dim("width", min=2, max=256)
        seq = torch.export.Dim("sequence", min=1, max=512)
        dyn = {"sample": {0: batch, 2: 2 * h, 3: 2 * w}, "timestep": {0: batch},
               "encoder_hidden_states": {0: batch, 1: seq},
               "controlnet_cond": {0: batch, 2: 4 * h, 3: 4 * w}}
        torch.onnx.export(wrapper, args, str(raw), dynamo=True, opset_version=18, input_names=names,
                          output_names=outs, dynamic_shapes=dyn)
    save_external(raw, path)
    return args


def ort_outputs(path, feeds):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: f.numpy() for n, f in zip(names, feeds)})


def make_controlnet(unet, seed):
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    # The tiny VAE's factor is 2: the conditioning embedding downsamples once (SD's 8: 3 times).
    return unets.perturb(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval())


def control_image(size, flip=False):
    from PIL import Image
    img = pipelines.input_image(size)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def main():
    import tempfile
    import diffusers
    spec = pipelines.PIPELINES["sd15_tiny"]
    pag.committed_tokenizers("sd15_tiny")
    torch_dir = pipelines.WORK / "sd15_tiny"
    pipelines.WORK.mkdir(parents=True, exist_ok=True)
    pipelines.build_torch("sd15_tiny", spec, torch_dir)
    pipe = pipelines.load_torch(spec, torch_dir)
    a = pipelines.OUT / "sd15_tiny" / "reference"
    case_a = json.loads((a / "manifest.json").read_text())["cases"]["txt2img_a"]
    arrays = pipelines.run_case(pipe, None, lambda p, cb, names: p(
        case_a["prompt"], negative_prompt="", num_inference_steps=4, guidance_scale=7.5,
        latents=torch.from_numpy(np.load(a / "txt2img_a" / "latents.npy")), output_type="np",
        callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names))
    want = np.load(a / "txt2img_a" / "final_latents.npy")
    assert np.linalg.norm(arrays["final_latents"].numpy() - want) / np.linalg.norm(want) < 1e-5

    first, second = make_controlnet(pipe.unet, 31), make_controlnet(pipe.unet, 32)
    shutil.rmtree(OUT, ignore_errors=True)
    shutil.rmtree(SECOND, ignore_errors=True)
    OUT.mkdir(parents=True)
    for comp in COPIED:
        shutil.copytree(pipelines.OUT / "sd15_tiny" / comp, OUT / comp)
    index = json.loads((pipelines.OUT / "sd15_tiny" / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionControlNetPipeline"
    index["_name_or_path"] = "sd15_controlnet_tiny"
    index["controlnet"] = ["diffusers", "ControlNetModel"]
    (OUT / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")

    gen = torch.Generator().manual_seed(3)
    feeds = [torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([601, 601]),
             torch.randn(2, 77, 16, generator=gen), torch.rand(2, 3, 16, 16, generator=gen)]
    report = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        for cn, path, exporter in ((first, OUT / "controlnet" / "model.onnx", "legacy"),
                                   (second, SECOND / "model.onnx", "dynamo")):
            args = export_controlnet(cn, feeds, path, tmp, exporter)
            got = ort_outputs(path, args)
            down, mid = cn(*feeds, conditioning_scale=0.7 if exporter == "legacy" else 1.0, return_dict=False)
            worst = max(float(np.abs(g - t.numpy()).max()) for g, t in zip(got, [*down, mid]))
            assert worst < 1e-4, (exporter, worst)
            report[str(path.relative_to(ROOT))] = {"exporter": exporter, "ort_vs_torch_max_abs": worst,
                                                   **pipelines.onnx_summary(path)}
        (OUT / "controlnet" / "config.json").write_text(json.dumps(dict(first.config), indent=2, default=list) + "\n")
        down, mid = first(*feeds, return_dict=False)
        residuals = [*down, mid]
        unet_feeds = [feeds[0], feeds[1].float(), feeds[2]]
        export_unet(pipe.unet, residuals, unet_feeds, OUT / "unet" / "model.onnx", tmp)
        shutil.copy(pipelines.OUT / "sd15_tiny" / "unet" / "config.json", OUT / "unet" / "config.json")
        got = ort_outputs(OUT / "unet" / "model.onnx", unet_feeds + residuals)[0]
        torch_out = UnetWithResiduals(pipe.unet)(*unet_feeds, *residuals).numpy()
        worst = float(np.abs(got - torch_out).max())
        assert worst < 1e-4, worst
        report["pipelines/sd15_controlnet_tiny/unet/model.onnx"] = {"ort_vs_torch_max_abs": worst,
                                                                   **pipelines.onnx_summary(OUT / "unet" / "model.onnx")}

    # references
    ref = OUT / "reference"
    ref.mkdir()
    size = 16
    cases = {
        "one": dict(controlnets=["controlnet"], scales=[0.8], start=[0.0], end=[1.0], images=[(size, False)], seed=21),
        "two": dict(controlnets=["controlnet", "b_dynamo"], scales=[0.8, 0.5], start=[0.0, 0.5], end=[0.75, 1.0],
                    images=[(size, False), (size, True)], seed=22),
        "resized": dict(controlnets=["controlnet"], scales=[1.0], start=[0.0], end=[1.0], images=[(24, True)], seed=23),
    }
    models = {"controlnet": first, "b_dynamo": second}
    manifest = {"made_by": "models/export/controlnet.py", "exports": report,
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}, "cases": {}}
    for case, c in cases.items():
        nets = [models[n] for n in c["controlnets"]]
        cp = diffusers.StableDiffusionControlNetPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            controlnet=nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets),
            scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        cp.set_progress_bar_config(disable=True)
        images = [control_image(s, flip) for s, flip in c["images"]]
        (ref / case).mkdir()
        for k, img in enumerate(images):
            img.save(ref / case / f"control_{k}.png")
        latents = pipelines.noise((1, 4, 8, 8), c["seed"])
        one = len(nets) == 1

        def call(p, cb, names, images=images, c=c, latents=latents, one=one):
            return p(pipelines.PROMPT_A, negative_prompt="", image=images[0] if one else images,
                     num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(), height=size, width=size,
                     controlnet_conditioning_scale=c["scales"][0] if one else c["scales"],
                     control_guidance_start=c["start"][0] if one else c["start"],
                     control_guidance_end=c["end"][0] if one else c["end"], output_type="np",
                     callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names)
        arrays = pipelines.run_case(cp, None, call)
        files = pipelines.save(ref / case, {"latents": latents, "final_latents": arrays["final_latents"],
                                            "image": arrays["image"]})
        manifest["cases"][case] = {
            "pipeline": "StableDiffusionControlNetPipeline" + ("" if one else " with MultiControlNetModel"),
            "prompt": pipelines.PROMPT_A, "negative_prompt": "", "steps": 4, "guidance": 7.5,
            "scheduler": "DDIMScheduler.from_config(scheduler/scheduler_config.json)", "height": size, "width": size,
            "controlnets": ["controlnet/" if n == "controlnet" else "models/controlnet/b_dynamo/model.onnx"
                            for n in c["controlnets"]],
            "controlnet_conditioning_scale": c["scales"], "control_guidance_start": c["start"],
            "control_guidance_end": c["end"], "control_images": [f"control_{k}.png" for k in range(len(images))],
            "control_image_sizes": [s for s, _ in c["images"]], "files": files}
        print(f"{case}: done")
    # No control image: the residual inputs get zeros, so it is sd15_tiny's txt2img_a.
    manifest["zeros"] = "sd15_tiny's reference/txt2img_a: the same UNet weights, residuals zero"
    (ref / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{pipelines.folder_size(OUT) / 1e6:.2f} MB in {OUT}; {pipelines.folder_size(SECOND) / 1e6:.2f} MB in {SECOND}")


def rebuilt(name):
    """pipelines.py's torch pipeline `name`, checked against its committed txt2img_a."""
    spec = pipelines.PIPELINES[name]
    pag.committed_tokenizers(name)
    torch_dir = pipelines.WORK / name
    pipelines.WORK.mkdir(parents=True, exist_ok=True)
    pipelines.build_torch(name, spec, torch_dir)
    pipe = pipelines.load_torch(spec, torch_dir)
    a = pipelines.OUT / name / "reference"
    case = json.loads((a / "manifest.json").read_text())["cases"]["txt2img_a"]
    arrays = pipelines.run_case(pipe, None, lambda p, cb, names: p(
        case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=4, guidance_scale=7.5,
        latents=torch.from_numpy(np.load(a / "txt2img_a" / "latents.npy")), output_type="np",
        height=case["height"], width=case["width"], callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=names))
    want = np.load(a / "txt2img_a" / "final_latents.npy")
    assert np.linalg.norm(arrays["final_latents"].numpy() - want) / np.linalg.norm(want) < 1e-5, name
    return pipe


def sdxl():
    """models/pipelines/sdxl_controlnet_tiny: sdxl_tiny with its UNet exported with residual
    inputs and a ControlNet (legacy, conditioning_scale, text_embeds and time_ids inputs), and
    diffusers' StableDiffusionXLControlNetPipeline reference `one`."""
    import tempfile
    import diffusers
    pipe = rebuilt("sdxl_tiny")
    out = ROOT / "pipelines" / "sdxl_controlnet_tiny"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for comp in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae_decoder", "vae_encoder", "scheduler"]:
        shutil.copytree(pipelines.OUT / "sdxl_tiny" / comp, out / comp)
    index = json.loads((pipelines.OUT / "sdxl_tiny" / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLControlNetPipeline", _name_or_path="sdxl_controlnet_tiny",
                 controlnet=["diffusers", "ControlNetModel"])
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    cn = make_controlnet(pipe.unet, 41)
    gen = torch.Generator().manual_seed(4)
    feeds = [torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([601, 601]),
             torch.randn(2, 77, 24, generator=gen), torch.rand(2, 3, 16, 16, generator=gen)]
    added = (torch.randn(2, 16, generator=gen), torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2))
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        args = export_controlnet(cn, feeds, out / "controlnet" / "model.onnx", tmp, "legacy", added)
        got = ort_outputs(out / "controlnet" / "model.onnx", args)
        down, mid = cn(*feeds, conditioning_scale=0.7, added_cond_kwargs=dict(zip(("text_embeds", "time_ids"), added)),
                       return_dict=False)
        assert max(float(np.abs(g - t.numpy()).max()) for g, t in zip(got, [*down, mid])) < 1e-4
        (out / "controlnet" / "config.json").write_text(json.dumps(dict(cn.config), indent=2, default=list) + "\n")
        down, mid = cn(*feeds, added_cond_kwargs=dict(zip(("text_embeds", "time_ids"), added)), return_dict=False)
        unet_feeds = [feeds[0], feeds[1].float(), feeds[2], *added]
        export_unet(pipe.unet, [*down, mid], unet_feeds, out / "unet" / "model.onnx", tmp)
        shutil.copy(pipelines.OUT / "sdxl_tiny" / "unet" / "config.json", out / "unet" / "config.json")
        got = ort_outputs(out / "unet" / "model.onnx", unet_feeds + [*down, mid])[0]
        want = UnetWithResiduals(pipe.unet, 2)(*unet_feeds, *down, mid).numpy()
        assert float(np.abs(got - want).max()) < 1e-4
    ref = out / "reference"
    (ref / "one").mkdir(parents=True)
    cp = diffusers.StableDiffusionXLControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, controlnet=cn, scheduler=pipe.scheduler,
        force_zeros_for_empty_prompt=True)
    cp.set_progress_bar_config(disable=True)
    image = control_image(16)
    image.save(ref / "one" / "control_0.png")
    latents = pipelines.noise((1, 4, 8, 8), 51)

    def call(p, cb, names):
        return p(pipelines.PROMPT_A, image=image, num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(),
                 height=16, width=16, controlnet_conditioning_scale=0.7, output_type="np",
                 callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names)
    arrays = pipelines.run_case(cp, None, call)
    files = pipelines.save(ref / "one", {"latents": latents, "final_latents": arrays["final_latents"],
                                         "image": arrays["image"]})
    manifest = {"made_by": "models/export/controlnet.py --sdxl", "cases": {"one": {
        "pipeline": "StableDiffusionXLControlNetPipeline", "prompt": pipelines.PROMPT_A, "negative_prompt": None,
        "steps": 4, "guidance": 7.5, "scheduler": "DDIMScheduler.from_config(scheduler/scheduler_config.json)",
        "height": 16, "width": 16, "controlnets": ["controlnet/"], "controlnet_conditioning_scale": [0.7],
        "control_guidance_start": [0.0], "control_guidance_end": [1.0], "control_images": ["control_0.png"],
        "files": files}}}
    (ref / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{pipelines.folder_size(out) / 1e6:.2f} MB in {out}")


def dynamo_unet():
    """models/controlnet/unet_dynamo/model.onnx: sd15_tiny's UNet with residual inputs, dynamo
    exporter (opset 18; its dims are expressions of the sample's)."""
    import tempfile
    pipe = rebuilt("sd15_tiny")
    cn = make_controlnet(pipe.unet, 31)
    gen = torch.Generator().manual_seed(3)
    feeds = [torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([601.0, 601.0]), torch.randn(2, 77, 16, generator=gen)]
    with torch.no_grad():
        down, mid = cn(feeds[0], feeds[1], feeds[2], torch.rand(2, 3, 16, 16, generator=gen), return_dict=False)
    residuals = [*down, mid]
    names = ["sample", "timestep", "encoder_hidden_states"] + residual_names(len(down))
    batch = torch.export.Dim("batch", min=1, max=64)
    h, w = torch.export.Dim("h", min=2, max=256), torch.export.Dim("w", min=2, max=256)
    seq = torch.export.Dim("sequence", min=1, max=512)
    dyn = {"sample": {0: batch, 2: 2 * h, 3: 2 * w}, "timestep": {0: batch}, "encoder_hidden_states": {0: batch, 1: seq}}
    for n, r in zip(names[3:], residuals):
        full_size = r.shape[2] == feeds[0].shape[2]
        dyn[n] = {0: batch, 2: 2 * h if full_size else h, 3: 2 * w if full_size else w}
    out = ROOT / "controlnet" / "unet_dynamo" / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        raw = Path(tmp) / "unet.onnx"
        wrapper = UnetWithResiduals(pipe.unet).eval()
        torch.onnx.export(wrapper, (*feeds, *residuals), str(raw), dynamo=True, opset_version=18,
                          input_names=names, output_names=["out_sample"],
                          dynamic_shapes=(dyn["sample"], dyn["timestep"], dyn["encoder_hidden_states"],
                                          tuple(dyn[n] for n in names[3:])))
        save_external(raw, out)
        got = ort_outputs(out, feeds + residuals)[0]
        want = wrapper(*feeds, *residuals).numpy()
    assert float(np.abs(got - want).max()) < 1e-4
    print(f"wrote {out}")


def full(out):
    """SD1.5-size UNet with residual inputs and its ControlNet (random weights)."""
    import tempfile
    from diffusers import ControlNetModel
    out = Path(out)
    unet = unets.build_unet(unets.FULL_SD15, 0)
    torch.manual_seed(1)
    cn = unets.perturb(ControlNetModel.from_unet(unet).eval())
    gen = torch.Generator().manual_seed(3)
    feeds = [torch.randn(2, 4, 64, 64, generator=gen), torch.tensor([601, 601]),
             torch.randn(2, 77, 768, generator=gen), torch.rand(2, 3, 512, 512, generator=gen)]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        export_controlnet(cn, feeds, out / "controlnet" / "model.onnx", tmp, "legacy")
        down, mid = cn(*feeds, return_dict=False)
        export_unet(unet, [*down, mid], [feeds[0], feeds[1].float(), feeds[2]], out / "unet" / "model.onnx", tmp)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--full":
        full(sys.argv[2])
    elif sys.argv[1:] == ["--sdxl"]:
        sdxl()
    elif sys.argv[1:] == ["--dynamo-unet"]:
        dynamo_unet()
    else:
        main()
