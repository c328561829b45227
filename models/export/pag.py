"""Perturbed-attention guidance references (diffusers' PAG processors and pipelines).

    python models/export/pag.py

Writes models/pag/:
- `<fixture>/` for the single-UNet fixtures sd15_legacy, sd15_dynamo (the dynamo export of the
  same UNet) and sdxl_legacy: the fixture's UNet rebuilt in torch (checked against its
  ref/out_sample.npy) with diffusers' `PAGCFGIdentitySelfAttnProcessor2_0` at the self-attention
  modules diffusers' `pag_applied_layers` pick, run on a batch [uncond, cond, cond]
  (`cfg/inputs/*.npy`, `cfg/out_sample.npy`), and with `PAGIdentitySelfAttnProcessor2_0` on
  [cond, cond] (`nocfg/`). `manifest.json` names the layers, the attune globs that pick the
  same modules, and the modules.
- `pipelines/<name>/<case>/` for the tiny pipelines sd15_tiny and sdxl_tiny (models/pipelines/;
  their torch pipelines rebuilt by pipelines.py's `build_torch`, checked against the committed
  txt2img_a reference): `StableDiffusionPAGPipeline` / `StableDiffusionXLPAGPipeline` runs
  (4 DDIM steps) with `latents.npy` (the initial noise), `final_latents.npy` and `image.npy`.
"""
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pipelines  # noqa: E402
import unets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "pag"


def self_attention_modules(model, layers):
    """diffusers' PAGMixin._set_pag_attn_processor's selection: self-attention modules whose
    name a layer id regex-searches (and not a bare-number id matching a bare-number name)."""
    from diffusers.models.attention_processor import Attention

    def fake_integral(layer_id, name):
        a, b = layer_id.split(".")[-1], name.split(".")[-1]
        return a.isnumeric() and b.isnumeric() and a == b

    picked = []
    for layer_id in layers:
        hits = [name for name, m in model.named_modules()
                if isinstance(m, Attention) and not m.is_cross_attention
                and re.search(layer_id, name) and not fake_integral(layer_id, name)]
        assert hits, layer_id
        picked += hits
    return sorted(set(picked))


def with_pag(model, modules, cfg):
    from diffusers.models.attention_processor import (PAGCFGIdentitySelfAttnProcessor2_0,
                                                      PAGIdentitySelfAttnProcessor2_0)
    proc = PAGCFGIdentitySelfAttnProcessor2_0() if cfg else PAGIdentitySelfAttnProcessor2_0()
    for name, m in model.named_modules():
        if name in modules:
            m.set_processor(proc)
    return model


# fixture: (config, layers as diffusers names them, the attune globs that pick the same modules)
UNETS = {
    "sd15_legacy": (unets.TINY_SD1, ["mid", "up_blocks.1"], "mid_block.*.attn1,up_blocks.1.*.attn1"),
    "sd15_dynamo": (unets.TINY_SD1, ["mid", "up_blocks.1"], "mid_block.*.attn1,up_blocks.1.*.attn1"),
    "sdxl_legacy": (unets.TINY_SDXL, ["mid", "down_blocks.1.attentions.0"],
                    "mid_block.*.attn1,down_blocks.1.attentions.0.*.attn1"),
}


def unet_references():
    manifest = {}
    for name, (config, layers, globs) in UNETS.items():
        folder = ROOT / name
        sdxl = "addition_embed_type" in config
        names = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if sdxl else [])
        feeds = {n: torch.from_numpy(np.load(folder / "inputs" / f"{n}.npy")) for n in names}
        unet = unets.build_unet(config, 0)
        wrapper = unets.Wrapper(unet, sdxl)
        with torch.no_grad():
            y = wrapper(*feeds.values()).numpy()
        ref = np.load(folder / "ref" / "out_sample.npy")
        rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        assert rel < 1e-5, f"{name}: the rebuilt UNet differs from the fixture ({rel})"
        modules = self_attention_modules(unet, layers)
        out = OUT / name
        shutil.rmtree(out, ignore_errors=True)
        # Row 0 is the fixture's unconditional row, row 1 its conditional one.
        for case, rows, cfg in (("cfg", [0, 1, 1], True), ("nocfg", [1, 1], False)):
            batch = {n: t[rows] for n, t in feeds.items()}
            batch["sample"] = feeds["sample"][[1] * len(rows)]
            (out / case / "inputs").mkdir(parents=True)
            for n, t in batch.items():
                np.save(out / case / "inputs" / f"{n}.npy", t.numpy())
            with torch.no_grad():
                plain = wrapper(*batch.values()).numpy()
                saved = unet.attn_processors
                with_pag(unet, modules, cfg)
                y = wrapper(*batch.values()).numpy()
                unet.set_attn_processor(saved)
            np.save(out / case / "out_sample.npy", y)
            moved = float(np.linalg.norm(y[-1] - plain[-1]) / np.linalg.norm(plain[-1]))
            same = float(np.abs(y[:-1] - plain[:-1]).max())
            assert same < 1e-5 and moved > 1e-3, (name, case, same, moved)
            print(f"{name}/{case}: perturbed row moved by rel L2 {moved:.4f}; other rows equal ({same:.1e})")
        manifest[name] = {"pag_applied_layers": layers, "hooks_layers": globs, "modules": modules,
                          "cfg": "PAGCFGIdentitySelfAttnProcessor2_0, batch [uncond, cond, cond]",
                          "nocfg": "PAGIdentitySelfAttnProcessor2_0, batch [cond, cond]"}
    return manifest


# pipeline: (PAG pipeline class, cases: name -> (prompt, layers, globs, pag_scale,
# pag_adaptive_scale, guidance, noise seed))
PIPELINE_CASES = {
    "sd15_tiny": ("StableDiffusionPAGPipeline", {
        "pag_mid": (pipelines.PROMPT_A, ["mid"], "mid_block.*.attn1", 3.0, 0.0, 7.5, 11),
        "pag_adaptive": (pipelines.PROMPT_B, ["mid", "down_blocks.0"],
                         "mid_block.*.attn1,down_blocks.0.*.attn1", 5.0, 0.004, 7.5, 12),
        "pag_nocfg": (pipelines.PROMPT_A, ["up"], "up_blocks.*.attn1", 3.0, 0.0, 1.0, 13),
    }),
    "sdxl_tiny": ("StableDiffusionXLPAGPipeline", {
        "pag_mid": (pipelines.PROMPT_A, ["mid"], "mid_block.*.attn1", 3.0, 0.0, 7.5, 11),
    }),
}


def committed_tokenizers(name):
    """build_torch writes the hub's tokenizer files; the committed ONNX folder holds them."""
    def write(folder, pad_token):
        src = pipelines.OUT / name / ("tokenizer_2" if pad_token == "!" else "tokenizer")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(src, folder)
    pipelines.write_tokenizer = write


def pipeline_references():
    import diffusers
    manifest = {}
    for name, (cls, cases) in PIPELINE_CASES.items():
        spec = pipelines.PIPELINES[name]
        committed_tokenizers(name)
        torch_dir = pipelines.WORK / name
        pipelines.WORK.mkdir(parents=True, exist_ok=True)
        pipelines.build_torch(name, spec, torch_dir)
        pipe = pipelines.load_torch(spec, torch_dir)
        ref = pipelines.OUT / name / "reference"
        sdxl = "text_2" in spec
        # The rebuilt pipeline reproduces the committed txt2img_a.
        a = json.loads((ref / "manifest.json").read_text())["cases"]["txt2img_a"]
        latents = torch.from_numpy(np.load(ref / "txt2img_a" / "latents.npy"))
        call = dict(negative_prompt=a["negative_prompt"], num_inference_steps=a["steps"],
                    guidance_scale=a["guidance"], height=a["height"], width=a["width"], output_type="np")
        arrays = pipelines.run_case(pipe, None, lambda p, cb, names: p(
            a["prompt"], latents=latents.clone(), callback_on_step_end=cb,
            callback_on_step_end_tensor_inputs=names, **call))
        want = np.load(ref / "txt2img_a" / "final_latents.npy")
        got = arrays["final_latents"].numpy()
        rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        assert rel < 1e-5, f"{name}: the rebuilt pipeline differs from the committed reference ({rel})"
        size = a["height"]
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        entries = {}
        for case, (prompt, layers, globs, scale, adaptive, guidance, seed) in cases.items():
            pp = getattr(diffusers, cls).from_pipe(pipe, pag_applied_layers=layers)
            pp.set_progress_bar_config(disable=True)
            noise = pipelines.noise((1, pipe.unet.config.in_channels, size // f, size // f), seed)
            negative = None if sdxl else ""

            def call(p, cb, names, prompt=prompt, noise=noise, scale=scale, adaptive=adaptive,
                     guidance=guidance, negative=negative):
                return p(prompt, negative_prompt=negative, num_inference_steps=pipelines.STEPS,
                         guidance_scale=guidance, pag_scale=scale, pag_adaptive_scale=adaptive,
                         latents=noise.clone(), height=size, width=size, output_type="np",
                         callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names)
            arrays = pipelines.run_case(pp, None, call)
            out = OUT / "pipelines" / name / case
            shutil.rmtree(out, ignore_errors=True)
            keep = {k: arrays[k] for k in ("final_latents", "image", "timesteps")}
            files = pipelines.save(out, dict(keep, latents=noise))
            entries[case] = {"pipeline": cls, "prompt": prompt, "negative_prompt": negative,
                             "pag_applied_layers": layers, "hooks_layers": globs, "pag_scale": scale,
                             "pag_adaptive_scale": adaptive, "guidance": guidance, "steps": pipelines.STEPS,
                             "height": size, "width": size,
                             "scheduler": "DDIMScheduler.from_config(scheduler/scheduler_config.json)",
                             "modules": self_attention_modules(pipe.unet, layers), "files": files}
            print(f"{name}/{case}: {len(entries[case]['modules'])} PAG modules")
        manifest[name] = entries
    return manifest


def main():
    import diffusers
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {"made_by": "models/export/pag.py",
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
                "unets": unet_references(), "pipelines": pipeline_references()}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
