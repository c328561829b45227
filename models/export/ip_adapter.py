"""A tiny IP-Adapter pipeline and diffusers' references for it.

    python models/export/ip_adapter.py            # sd15_ip_tiny and the IP-Adapter files
    python models/export/ip_adapter.py --sdxl     # sdxl_ip_tiny (after the first: its image encoder)

Writes
- `models/ip_adapter/ip-adapter_tiny.safetensors`: an IP-Adapter for sd15_tiny in the published
  key layout of `ip-adapter_sd15.safetensors` (`image_proj.proj.weight` [4·16, 32],
  `image_proj.proj.bias`, `image_proj.norm.weight/bias` [16], and `ip_adapter.N.to_k_ip.weight`
  / `.to_v_ip.weight` [hidden, 16] for N = 1, 3, 5, 7: the UNet's cross-attention processors
  in diffusers' order), seeded random values; `ip-adapter_wide.safetensors` the same for a
  cross-attention width of 24 (another model's: a file compile must refuse).
- `models/pipelines/sd15_ip_tiny/`: sd15_tiny's ONNX components (byte-identical copies) with
  `image_encoder/model.onnx` (a tiny CLIPVisionModelWithProjection: hidden 16, 2 layers, patch
  32 at 224 px, projection 32; legacy exporter, input pixel_values, outputs image_embeds and
  last_hidden_state) and `feature_extractor/preprocessor_config.json` (CLIPImageProcessor's
  defaults: OpenAI CLIP's, bicubic resize of the shortest edge to 224, centre crop). Its
  `reference/`: diffusers' StableDiffusionPipeline with `load_ip_adapter` (the processor is
  transformers' PIL one, CLIPImageProcessorPil: torchvision is not installed), 4 DDIM steps:
  `ip_one` (scale 0.6) and `ip_layers` (`set_ip_adapter_scale` with per-block scales) with the
  plain file, `plus_one` (0.7) with `ip-adapter-plus_tiny.safetensors` (a Resampler: 4 blocks,
  4 queries) and `full_face_one` (0.5) with `ip-adapter-full-face_tiny.safetensors`
  (MLPProjModel; the Plus file also as `ip-adapter-plus_tiny.bin`, torch.save of the nested dict
  the published .bin files hold), each with latents.npy, ip_image.png, pixel_values.npy, image_embeds.npy,
  final_latents.npy, image.npy. The image encoder also outputs its hidden states
  (hidden_states.0 .. .2): Plus and Full Face read the penultimate one.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import controlnet  # noqa: E402
import pipelines  # noqa: E402
import unets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "pipelines" / "sd15_ip_tiny"
FILES = ROOT / "ip_adapter"
EMBED = 32


def ip_adapter_state(unet, width, seed):
    """The published layout for `unet`'s cross-attention processors, in diffusers' order."""
    gen = torch.Generator().manual_seed(seed)
    state = {"image_proj.proj.weight": torch.randn(4 * width, EMBED, generator=gen) * 0.2,
             "image_proj.proj.bias": torch.randn(4 * width, generator=gen) * 0.1,
             "image_proj.norm.weight": 1 + torch.randn(width, generator=gen) * 0.1,
             "image_proj.norm.bias": torch.randn(width, generator=gen) * 0.1}
    key = 1
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            continue
        block = unet.get_submodule(name.removesuffix(".processor"))
        hidden = block.to_q.out_features
        state[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(hidden, width, generator=gen) * 0.3
        state[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(hidden, width, generator=gen) * 0.3
        key += 2
    return {k: v.contiguous() for k, v in state.items()}


def image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(61)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=224, patch_size=32, projection_dim=EMBED)
    return unets.perturb(CLIPVisionModelWithProjection(config).eval())


class Encoder(torch.nn.Module):
    """image_embeds, last_hidden_state and every hidden state (hidden_states.0 .. .2): Plus and
    Full Face read the penultimate one."""

    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, pixel_values):
        out = self.enc(pixel_values=pixel_values, output_hidden_states=True)
        return (out.image_embeds, out.last_hidden_state, *out.hidden_states)


def plus_state(unet, width, seed, hidden=32, queries=4, embed=16):
    """IP-Adapter Plus in the published layout: a Resampler (4 blocks, one head of 64)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=gen) * s  # noqa: E731
    state = {"image_proj.latents": r(1, queries, hidden, s=hidden ** -0.5),
             "image_proj.proj_in.weight": r(hidden, embed), "image_proj.proj_in.bias": r(hidden, s=0.05),
             "image_proj.proj_out.weight": r(width, hidden), "image_proj.proj_out.bias": r(width, s=0.05),
             "image_proj.norm_out.weight": 1 + r(width, s=0.1), "image_proj.norm_out.bias": r(width, s=0.1)}
    for i in range(4):
        p = f"image_proj.layers.{i}"
        state.update({f"{p}.0.norm1.weight": 1 + r(hidden, s=0.1), f"{p}.0.norm1.bias": r(hidden, s=0.1),
                      f"{p}.0.norm2.weight": 1 + r(hidden, s=0.1), f"{p}.0.norm2.bias": r(hidden, s=0.1),
                      f"{p}.0.to_q.weight": r(64, hidden), f"{p}.0.to_kv.weight": r(128, hidden),
                      f"{p}.0.to_out.weight": r(hidden, 64),
                      f"{p}.1.0.weight": 1 + r(hidden, s=0.1), f"{p}.1.0.bias": r(hidden, s=0.1),
                      f"{p}.1.1.weight": r(4 * hidden, hidden), f"{p}.1.3.weight": r(hidden, 4 * hidden)})
    state.update({k: v for k, v in ip_adapter_state(unet, width, seed + 1).items() if k.startswith("ip_adapter.")})
    return {k: v.contiguous() for k, v in state.items()}


def full_face_state(unet, width, seed, embed=16):
    """IP-Adapter Full Face in the published layout: MLPProjModel (Linear, GELU, Linear, LayerNorm)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=gen) * s  # noqa: E731
    state = {"image_proj.proj.0.weight": r(embed, embed), "image_proj.proj.0.bias": r(embed, s=0.05),
             "image_proj.proj.2.weight": r(width, embed), "image_proj.proj.2.bias": r(width, s=0.05),
             "image_proj.proj.3.weight": 1 + r(width, s=0.1), "image_proj.proj.3.bias": r(width, s=0.1)}
    state.update({k: v for k, v in ip_adapter_state(unet, width, seed + 1).items() if k.startswith("ip_adapter.")})
    return {k: v.contiguous() for k, v in state.items()}


def ip_image():
    """A 40x30 picture (not square: the processor resizes the short side and crops)."""
    from PIL import Image
    y, x = np.mgrid[0:30, 0:40]
    img = np.stack([x / 39, y / 29, ((x - 25) ** 2 + (y - 12) ** 2 < 60).astype(float)], -1)
    return Image.fromarray((img * 255).round().astype(np.uint8), "RGB")


def main():
    import diffusers
    import onnx
    from transformers import CLIPImageProcessor
    pipe = controlnet.rebuilt("sd15_tiny")
    FILES.mkdir(parents=True, exist_ok=True)
    state = ip_adapter_state(pipe.unet, pipe.unet.config.cross_attention_dim, 71)
    save_file(state, str(FILES / "ip-adapter_tiny.safetensors"))
    save_file(ip_adapter_state(pipe.unet, 24, 72), str(FILES / "ip-adapter_wide.safetensors"))
    plus = plus_state(pipe.unet, 16, 73)
    save_file(plus, str(FILES / "ip-adapter-plus_tiny.safetensors"))
    # The same as the published .bin files are: torch.save of {"image_proj": ..., "ip_adapter": ...}.
    nested = {outer: {k.removeprefix(outer + "."): v for k, v in plus.items() if k.startswith(outer + ".")}
              for outer in ("image_proj", "ip_adapter")}
    torch.save(nested, str(FILES / "ip-adapter-plus_tiny.bin"))
    save_file(full_face_state(pipe.unet, 16, 75), str(FILES / "ip-adapter-full-face_tiny.safetensors"))

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    for comp in ["text_encoder", "tokenizer", "unet", "vae_decoder", "vae_encoder", "scheduler"]:
        shutil.copytree(pipelines.OUT / "sd15_tiny" / comp, OUT / comp)
    index = json.loads((pipelines.OUT / "sd15_tiny" / "model_index.json").read_text())
    index.update(_name_or_path="sd15_ip_tiny", image_encoder=["transformers", "CLIPVisionModelWithProjection"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (OUT / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    processor = CLIPImageProcessor()
    (OUT / "feature_extractor").mkdir()
    config = {k: (int(v) if k == "resample" else v) for k, v in processor.to_dict().items()}
    config["image_processor_type"] = "CLIPImageProcessor"
    (OUT / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")

    enc = image_encoder()
    (OUT / "image_encoder").mkdir()
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    raw = OUT / "image_encoder" / "raw.onnx"
    with torch.no_grad():
        hidden = [f"hidden_states.{i}" for i in range(enc.config.num_hidden_layers + 1)]
        outputs = ["image_embeds", "last_hidden_state", *hidden]
        torch.onnx.export(Encoder(enc), (pixels,), str(raw), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in ["pixel_values", *outputs]})
    controlnet.save_external(raw, OUT / "image_encoder" / "model.onnx")
    raw.unlink()
    (OUT / "image_encoder" / "config.json").write_text(enc.config.to_json_string())
    got = controlnet.ort_outputs(OUT / "image_encoder" / "model.onnx", [pixels])[0]
    with torch.no_grad():
        want = enc(pixel_values=pixels).image_embeds.numpy()
    assert np.abs(got - want).max() < 1e-4

    # references
    ref = OUT / "reference"
    image = ip_image()
    # case: (file, set_ip_adapter_scale, noise seed)
    cases = {"ip_one": ("ip-adapter_tiny.safetensors", 0.6, 81),
             "ip_layers": ("ip-adapter_tiny.safetensors", {"down": 0.9, "mid": 0.0, "up": {"block_1": [0.3, 1.2]}}, 82),
             "plus_one": ("ip-adapter-plus_tiny.safetensors", 0.7, 83),
             "full_face_one": ("ip-adapter-full-face_tiny.safetensors", 0.5, 84)}
    manifest = {"made_by": "models/export/ip_adapter.py", "files": "models/ip_adapter/",
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}, "cases": {}}
    for case, (weights, scale, seed) in cases.items():
        if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
            pipe.unload_ip_adapter()
        pipe.load_ip_adapter(str(FILES), subfolder="", weight_name=weights, image_encoder_folder=None)
        pipe.register_modules(image_encoder=enc, feature_extractor=processor)
        pipe.set_ip_adapter_scale(scale)
        # The scale each cross-attention processor got, by module path.
        scales = {name.removesuffix(".processor"): float(proc.scale[0])
                  for name, proc in pipe.unet.attn_processors.items() if hasattr(proc, "scale")}
        latents = pipelines.noise((1, 4, 8, 8), seed)

        def call(p, cb, names, latents=latents):
            return p(pipelines.PROMPT_A, negative_prompt="", ip_adapter_image=image, num_inference_steps=4,
                     guidance_scale=7.5, latents=latents.clone(), height=16, width=16, output_type="np",
                     callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names)
        arrays = pipelines.run_case(pipe, None, call)
        pixel_values = processor(image, return_tensors="pt").pixel_values
        with torch.no_grad():
            embeds = enc(pixel_values=pixel_values).image_embeds
        (ref / case).mkdir(parents=True)
        image.save(ref / case / "ip_image.png")
        files = pipelines.save(ref / case, {"latents": latents, "final_latents": arrays["final_latents"],
                                            "image": arrays["image"], "pixel_values": pixel_values,
                                            "image_embeds": embeds})
        manifest["cases"][case] = {"pipeline": "StableDiffusionPipeline + load_ip_adapter", "ip_adapter": weights,
                                   "prompt": pipelines.PROMPT_A, "negative_prompt": "", "steps": 4, "guidance": 7.5,
                                   "height": 16, "width": 16,
                                   "scheduler": "DDIMScheduler.from_config(scheduler/scheduler_config.json)",
                                   "set_ip_adapter_scale": scale, "scales": scales, "files": files}
        print(f"{case}: {scales}")
    (ref / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{pipelines.folder_size(OUT) / 1e6:.2f} MB in {OUT}")
    del onnx


def sdxl():
    """models/pipelines/sdxl_ip_tiny: sdxl_tiny (its ONNX components copied) with the tiny image
    encoder and `ip-adapter_sdxl_tiny.safetensors` (the plain layout for sdxl_tiny's cross
    sites, width 24), and StableDiffusionXLPipeline + load_ip_adapter's `ip_one` (scale 0.6)."""
    import diffusers
    from transformers import CLIPImageProcessor
    pipe = controlnet.rebuilt("sdxl_tiny")
    state = ip_adapter_state(pipe.unet, pipe.unet.config.cross_attention_dim, 91)
    save_file(state, str(FILES / "ip-adapter_sdxl_tiny.safetensors"))
    out = ROOT / "pipelines" / "sdxl_ip_tiny"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for comp in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae_decoder", "vae_encoder",
                 "scheduler"]:
        shutil.copytree(pipelines.OUT / "sdxl_tiny" / comp, out / comp)
    for comp in ["image_encoder", "feature_extractor"]:
        shutil.copytree(OUT / comp, out / comp)
    index = json.loads((pipelines.OUT / "sdxl_tiny" / "model_index.json").read_text())
    index.update(_name_or_path="sdxl_ip_tiny", image_encoder=["transformers", "CLIPVisionModelWithProjection"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    enc = image_encoder()
    processor = CLIPImageProcessor()
    pipe.load_ip_adapter(str(FILES), subfolder="", weight_name="ip-adapter_sdxl_tiny.safetensors",
                         image_encoder_folder=None)
    pipe.register_modules(image_encoder=enc, feature_extractor=processor)
    pipe.set_ip_adapter_scale(0.6)
    image = ip_image()
    latents = pipelines.noise((1, 4, 8, 8), 92)

    def call(p, cb, names):
        return p(pipelines.PROMPT_A, ip_adapter_image=image, num_inference_steps=4, guidance_scale=7.5,
                 latents=latents.clone(), height=16, width=16, output_type="np",
                 callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names)
    arrays = pipelines.run_case(pipe, None, call)
    ref = out / "reference" / "ip_one"
    ref.mkdir(parents=True)
    image.save(ref / "ip_image.png")
    files = pipelines.save(ref, {"latents": latents, "final_latents": arrays["final_latents"], "image": arrays["image"]})
    sites = [n.removesuffix(".processor") for n, p in pipe.unet.attn_processors.items() if hasattr(p, "scale")]
    manifest = {"made_by": "models/export/ip_adapter.py --sdxl", "cases": {"ip_one": {
        "pipeline": "StableDiffusionXLPipeline + load_ip_adapter", "ip_adapter": "ip-adapter_sdxl_tiny.safetensors",
        "prompt": pipelines.PROMPT_A, "negative_prompt": None, "steps": 4, "guidance": 7.5, "scale": 0.6,
        "scheduler": "DDIMScheduler.from_config(scheduler/scheduler_config.json)", "sites": sites, "files": files}}}
    (out / "reference" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(sites)} sites; {pipelines.folder_size(out) / 1e6:.2f} MB in {out}")
    del diffusers


if __name__ == "__main__":
    if sys.argv[1:] == ["--sdxl"]:
        sdxl()
    else:
        main()
