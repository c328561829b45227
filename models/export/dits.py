"""Export the diffusion-transformer fixtures attune's tests run on.

Tiny diffusers transformers (random weights, fixed seed, no hub downloads), exported by the
legacy TorchScript exporter at opset 17 (or the dynamo exporter at opset 18: `*_dynamo`) with
dynamic batch/height/width/sequence:
- `pixart_legacy`: PixArt-α (PixArtTransformer2DModel: patchify, adaLN-single blocks with
  self- and cross-attention, unpatchify; its sin-cos position table and unpatchify are Einsums);
- `sd3_legacy`: SD3 (SD3Transformer2DModel, MM-DiT: joint attention over the image and text
  tokens concatenated, `JointAttnProcessor2_0`);
- `sd35_legacy`: SD3.5-style, the same with RMS qk-norm on every head and a second,
  image-only self-attention in the first block (`dual_attention_layers`);
- `sd3_dynamo`, `sd35_dynamo`: the same two through the dynamo exporter (heads folded to 3-D
  around K's transpose, qk-norm's `1/√` as Reciprocal);
- `flux_dynamo`: Flux (FluxTransformer2DModel: one double-stream block with joint attention,
  one single-stream block, RMS qk-norm and rotary position embeddings on Q and K; packed
  latent tokens with their ids). The dynamo exporter only: torch's `rms_norm` has no opset-17
  export.
- `flux_dev_dynamo`: the same with Flux-dev's embedded guidance (a `guidance` input per row),
  for the sampler's tests.
Each writes `models/<name>/`: `unet.onnx` + `unet.onnx.data`, `spec.json`, `inputs/*.npy` and
`ref/out_sample.npy` (onnxruntime's outputs, the tests' reference).

    python models/export/dits.py [--only NAME ...]
    python models/export/dits.py --full pixart --out models/large/pixart   # PixArt-α XL size, 2.4 GB, never committed
"""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

ROOT = Path(__file__).resolve().parents[1]
PIXART = dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
              in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=16,
              patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False)
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
           pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
SD35 = dict(SD3, qk_norm="rms_norm", dual_attention_layers=(0,))
# PixArt-α XL-2 at 512 px (PixArt-alpha/PixArt-XL-2-512x512's configuration), for benchmarks.
FULL_PIXART = dict(sample_size=64, num_layers=28, attention_head_dim=72, num_attention_heads=16,
                   in_channels=4, out_channels=8, cross_attention_dim=1152, caption_channels=4096,
                   patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False)
FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
            pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
# Flux-dev's: an embedded guidance scale.
FLUX_DEV = dict(FLUX, guidance_embeds=True)


class Wrapper(torch.nn.Module):
    """The UNet-style signature attune's `run`/`sample` feed: sample, timestep, text states."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                          return_dict=False)[0]


class Sd3Wrapper(torch.nn.Module):
    """SD3's signature: the UNet-style inputs plus the pooled text embedding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return self.model(sample, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep,
                          return_dict=False)[0]


def build(cls, config, init="perturb"):
    """The fixture's model: random weights, fixed seed. `init` as unets.perturb's: the
    fixtures perturb every parameter (zero-initialised layers must matter too)."""
    from unets import perturb
    torch.manual_seed(0)
    model = cls(**config).eval()
    return perturb(model, init)


class FluxWrapper(torch.nn.Module):
    """Flux's signature: packed latent tokens and the position ids of image and text."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections,
                img_ids, txt_ids):
        return self.model(hidden_states=hidden_states, timestep=timestep,
                          encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, img_ids=img_ids,
                          txt_ids=txt_ids, return_dict=False)[0]


class FluxDevWrapper(FluxWrapper):
    """Flux-dev's signature: Flux's and the embedded guidance scale per row."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections,
                img_ids, txt_ids, guidance):
        return self.model(hidden_states=hidden_states, timestep=timestep,
                          encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, img_ids=img_ids,
                          txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def torch_export(model, config, wrapper, inputs, raw, dynamo=False, opset=None, fold=True):
    """torch.onnx.export of `wrapper(model)` to `raw` with the fixtures' dynamic axes: the legacy
    exporter (opset 17 unless given) or the dynamo exporter (opset 18 unless given)."""
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "pooled_projections": {0: "batch"},
            "hidden_states": {0: "batch", 1: "tokens"}, "img_ids": {0: "tokens"},
            "txt_ids": {0: "sequence"}, "guidance": {0: "batch"},
            "out_sample": {0: "batch", 2: "height", 3: "width"}}
    if "hidden_states" in inputs:
        axes["out_sample"] = {0: "batch", 1: "tokens"}
    axes = {k: v for k, v in axes.items() if k in inputs or k == "out_sample"}
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        # Patches of 2: the latent's sizes are even.
        largest = config.get("pos_embed_max_size", 64)
        height = torch.export.Dim("height", min=1, max=largest)
        width = torch.export.Dim("width", min=1, max=largest)
        sequence = torch.export.Dim("sequence", min=1, max=512)
        tokens = torch.export.Dim("tokens", min=1, max=4096)
        dims = {"batch": batch, "height": 2 * height, "width": 2 * width, "sequence": sequence,
                "tokens": tokens}
        # In the order of the inputs: the exporter pairs them by position.
        shapes = {k: {i: dims[d] for i, d in axes[k].items()} for k in inputs}
        torch.onnx.export(wrapper(model), tuple(inputs.values()), str(raw), dynamo=True,
                          opset_version=opset or 18, input_names=list(inputs),
                          output_names=["out_sample"], dynamic_shapes=shapes)
    else:
        torch.onnx.export(wrapper(model), tuple(inputs.values()), str(raw), dynamo=False,
                          opset_version=opset or 17, input_names=list(inputs),
                          output_names=["out_sample"], dynamic_axes=axes,
                          do_constant_folding=fold)


def export(name, cls, config, wrapper, inputs, dynamo=False):
    import onnxruntime as ort
    model = build(cls, config)
    out_dir = ROOT / name
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "inputs").mkdir(parents=True)
    (out_dir / "ref").mkdir()
    raw = out_dir / "raw.onnx"
    torch_export(model, config, wrapper, inputs, raw, dynamo)
    m = onnx.load(str(raw))
    for f in out_dir.glob("raw.onnx*"):  # the dynamo exporter's external data too
        f.unlink()
    path = out_dir / "unet.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="unet.onnx.data", size_threshold=1024)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    for k, v in feeds.items():
        np.save(out_dir / "inputs" / f"{k}.npy", v)
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.save(out_dir / "ref" / "out_sample.npy", out)
    with torch.no_grad():
        torch_out = wrapper(model)(*inputs.values()).numpy()
    rel = float(np.linalg.norm(out - torch_out) / np.linalg.norm(torch_out))
    spec = {"model": "unet.onnx", "exporter": "dynamo" if dynamo else "legacy",
            "opset": 18 if dynamo else 17,
            "class": cls.__name__, "config": config,
            "reference": {"onnxruntime": ort.__version__, "torch": torch.__version__,
                          "rel_l2_onnxruntime_vs_torch": rel}}
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"{name}: onnxruntime vs torch rel L2 {rel:.2e}")


def export_full(out_dir):
    """The full-size PixArt-α transformer (random weights), dynamic batch/height/width/sequence,
    for benchmarks: only the model, no references."""
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**FULL_PIXART).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = (torch.randn(2, 4, 32, 32), torch.tensor([999.0, 500.0]), torch.randn(2, 120, 4096))
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "out_sample": {0: "batch", 2: "height", 3: "width"}}
    raw = out_dir / "raw.onnx"
    with torch.no_grad():
        torch.onnx.export(Wrapper(model), inputs, str(raw), dynamo=False, opset_version=17,
                          input_names=list(axes)[:3], output_names=["out_sample"],
                          dynamic_axes=axes, do_constant_folding=True)
    m = onnx.load(str(raw))
    raw.unlink()
    for f in out_dir.glob("*"):
        f.unlink()
    onnx.save(m, str(out_dir / "unet.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="unet.onnx.data", size_threshold=1024)
    params = sum(p.numel() for p in model.parameters())
    print(f"{out_dir}: PixArt-α XL-2, {params / 1e6:.0f} M parameters")


def fixtures():
    """name: (class, config, wrapper, test inputs, dynamo) for every tiny fixture."""
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    timestep = torch.tensor([999.0, 500.0])
    text = torch.randn(2, 7, 16, generator=gen)
    pooled = torch.randn(2, 8, generator=gen)
    # Flux: the 16x16 latent packed into 8x8 tokens of 2x2 patches, ids (0, row, column).
    packed = sample.reshape(2, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 64, 16)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(64), rows.flatten(), cols.flatten()], dim=1)
    flux_inputs = {"hidden_states": packed.contiguous(), "timestep": timestep / 1000,
                   "encoder_hidden_states": text, "pooled_projections": pooled, "img_ids": img_ids,
                   "txt_ids": torch.zeros(7, 3)}
    sd3_inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text,
                  "pooled_projections": pooled}
    fixtures = {
        "pixart_legacy": (PixArtTransformer2DModel, PIXART, Wrapper,
                          {"sample": sample, "timestep": timestep, "encoder_hidden_states": text}, False),
        "flux_dynamo": (FluxTransformer2DModel, FLUX, FluxWrapper, flux_inputs, True),
        "flux_dev_dynamo": (FluxTransformer2DModel, FLUX_DEV, FluxDevWrapper,
                            dict(flux_inputs, guidance=torch.tensor([3.5, 3.5])), True),
    }
    for name, config in [("sd3", SD3), ("sd35", SD35)]:
        for dynamo in [False, True]:
            fixtures[f"{name}_{'dynamo' if dynamo else 'legacy'}"] = (
                SD3Transformer2DModel, config, Sd3Wrapper, sd3_inputs, dynamo)
    return fixtures


def main():
    import sys
    if "--full" in sys.argv:
        args = sys.argv[sys.argv.index("--full") + 1:]
        assert args[:1] == ["pixart"] and "--out" in args, "usage: --full pixart --out DIR"
        return export_full(args[args.index("--out") + 1])
    all_fixtures = fixtures()
    only = sys.argv[sys.argv.index("--only") + 1:] if "--only" in sys.argv else list(all_fixtures)
    for name in only:
        export(name, *all_fixtures[name])

if __name__ == "__main__":
    main()
