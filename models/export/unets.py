"""Export the UNet fixtures attune's tests run on.

Real exports of diffusers' UNet2DConditionModel with random weights (fixed seed, no hub
downloads), made the way deployments make them: the legacy TorchScript exporter at opset 17
with dynamic batch/height/width (as diffusers' conversion script and optimum do), and the
dynamo exporter. Each fixture is `models/<name>/unet.onnx` + `unet.onnx.data` (external data),
`spec.json` (inputs with symbolic dims, the dims tests use) and `inputs/*.npy` + `ref/*.npy`
(onnxruntime's outputs for those inputs, the reference the Rust tests compare against).

    python models/export/unets.py                 # all tiny fixtures
    python models/export/unets.py --full sd15 --out models/large/sd15   # SD1.5-size, for benchmarks
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from diffusers import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]

TINY_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
)
TINY_SD2 = dict(TINY_SD1, use_linear_projection=True, attention_head_dim=(2, 4, 4))
TINY_SDXL = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=32, attention_head_dim=(2, 4),
    norm_num_groups=8, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)
# Two levels only: the classic-processor and no-attention variants need no more.
SMALL_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
)
NO_ATTENTION = dict(SMALL_SD1, down_block_types=("DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None)
# runwayml/stable-diffusion-v1-5 unet/config.json (diffusers defaults fill the rest).
FULL_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)

# name: (config, exporter, options)
TINY = {
    "sd15_legacy": (TINY_SD1, "legacy", {}),
    "sd15_dynamo": (TINY_SD1, "dynamo", {}),
    "sd2_legacy": (TINY_SD2, "legacy", {}),
    "sdxl_legacy": (TINY_SDXL, "legacy", {}),
    # diffusers' classic AttnProcessor (baddbmm + softmax + bmm, heads folded into the batch)
    "sd15_classic_legacy": (SMALL_SD1, "legacy", {"processor": "classic"}),
    # fp16 weights and activations, softmax upcast to fp32: Cast wrappers around it
    "sd15_fp16_legacy": (SMALL_SD1, "legacy", {"processor": "classic", "fp16": True}),
    "noattn_legacy": (NO_ATTENTION, "legacy", {}),
    # sd15_legacy's UNet as diffusers' convert_stable_diffusion_checkpoint_to_onnx.py writes
    # it: opset 14 (also optimum's default), so no LayerNormalization op yet (LayerNorms
    # written out), and a dynamic `channels` axis on the sample
    "sd15_op14_legacy": (TINY_SD1, "legacy", {"opset": 14, "axes": "script"}),
    # sd15_legacy's UNet with a dim symbol per input, as Olive's Stable Diffusion example
    # names them (unet_sample_batch, unet_time_batch, unet_hidden_batch, ...), and an int64
    # timestep, as optimum exports it
    "sd15_olive_legacy": (TINY_SD1, "legacy", {"axes": "olive", "int_timestep": True}),
}
# Dynamic axes other exporting tools write, by input (the output's follow the sample's).
AXES = {
    "script": {"sample": {0: "batch", 1: "channels", 2: "height", 3: "width"},
               "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "sequence"}},
    "olive": {"sample": {0: "unet_sample_batch", 2: "unet_sample_height", 3: "unet_sample_width"},
              "timestep": {0: "unet_time_batch"},
              "encoder_hidden_states": {0: "unet_hidden_batch", 1: "unet_hidden_sequence"}},
}
FULL = {"sd15": (FULL_SD15, "legacy", {})}

# Dims the tests run at: batch 2 (a CFG pair), 16x16 latents, 77 text tokens.
TEST_DIMS = {"batch": 2, "height": 16, "width": 16, "sequence": 77}


class Wrapper(torch.nn.Module):
    """Positional inputs and a plain tensor output, as optimum's export wrappers do. Every
    node scope and parameter name gets the wrapper's `unet` prefix, which attune strips."""

    def __init__(self, unet, sdxl):
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]


def input_specs(config):
    dim = config["cross_attention_dim"]
    specs = [
        ("sample", ["batch", config["in_channels"], "height", "width"]),
        ("timestep", ["batch"]),
        ("encoder_hidden_states", ["batch", "sequence", dim]),
    ]
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        specs += [("text_embeds", ["batch", text_dim]), ("time_ids", ["batch", 6])]
    return specs


def example_inputs(specs, dims, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in specs:
        concrete = [dims[d] if isinstance(d, str) else d for d in shape]
        if name == "timestep":
            out[name] = torch.tensor([999.0, 500.0][: concrete[0]] * (concrete[0] // 2 or 1))[: concrete[0]]
        elif name == "time_ids":
            out[name] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * concrete[0])
        else:
            out[name] = torch.randn(*concrete, generator=gen)
    return out


def norm_parameters(model):
    """The parameters of the model's normalisation layers (GroupNorm, LayerNorm, RMSNorm)."""
    import diffusers.models.normalization as dn
    kinds = tuple(k for k in (torch.nn.GroupNorm, torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", None),
                              getattr(dn, "RMSNorm", None), getattr(dn, "LayerNorm", None)) if k)
    return {id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)}


def perturb(model, init="perturb"):
    """diffusers' init leaves some parameters zero or identical (norm biases 0, norm weights 1);
    perturb everything so that every weight matters in the outputs tests compare. `init="norms_default"` leaves the
    normalisation layers at diffusers' default (weight 1, bias 0) and perturbs the rest with
    the same noise as "perturb"; `init="pure"` leaves diffusers' initialisation untouched."""
    assert init in ("perturb", "norms_default", "pure"), init
    if init == "pure":
        return model
    skip = norm_parameters(model) if init == "norms_default" else set()
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn_like(p) * 0.02  # drawn for every parameter: the same noise stream
            if id(p) not in skip:
                p.add_(noise)
    return model


def build_unet(config, seed, init="perturb"):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    return perturb(unet, init)


def export(unet, config, exporter, path, dims, dtype=torch.float32, options=None):
    options = options or {}
    specs = input_specs(config)
    names = [n for n, _ in specs]
    inputs = {k: v.to(dtype) for k, v in example_inputs(specs, dims, seed=1).items()}
    if options.get("int_timestep"):
        inputs["timestep"] = inputs["timestep"].to(torch.int64)
    model = Wrapper(unet, sdxl="text_embeds" in names).eval()
    args = tuple(inputs[n] for n in names)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        if exporter == "legacy":
            axes = {n: {i: d for i, d in enumerate(shape) if isinstance(d, str)} for n, shape in specs}
            axes.update(AXES.get(options.get("axes"), {}))
            axes["out_sample"] = {i: d for i, d in axes["sample"].items() if i != 1}
            torch.onnx.export(model, args, str(raw), dynamo=False, opset_version=options.get("opset", 17),
                              input_names=names, output_names=["out_sample"],
                              dynamic_axes=axes, do_constant_folding=options.get("fold", True))
        else:
            batch = torch.export.Dim("batch", min=1, max=64)
            height = torch.export.Dim("height", min=2, max=512)
            width = torch.export.Dim("width", min=2, max=512)
            sequence = torch.export.Dim("sequence", min=1, max=512)
            dyn = {"sample": {0: batch, 2: 8 * height, 3: 8 * width},
                   "timestep": {0: batch},
                   "encoder_hidden_states": {0: batch, 1: sequence}}
            if "text_embeds" in names:  # SDXL's added conditions
                dyn.update(text_embeds={0: batch}, time_ids={0: batch})
            torch.onnx.export(model, args, str(raw), dynamo=True, opset_version=18,
                              input_names=names, output_names=["out_sample"],
                              dynamic_shapes=dyn)
        m = onnx.load(str(raw))
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    return specs, inputs


def graph_shape(path, name):
    """The input's shape as the exporter declared it (dynamo names dims like `8*height`)."""
    m = onnx.load(str(path), load_external_data=False)
    found = [i for i in m.graph.input if i.name == name]
    if not found:
        return None  # dropped by the exporter: the model does not read it
    return [d.dim_param or d.dim_value for d in found[0].type.tensor_type.shape.dim]


def write_reference(path, specs, inputs, unet, model_dir):
    import onnxruntime as ort
    for sub in ("inputs", "ref"):
        shutil.rmtree(model_dir / sub, ignore_errors=True)
        (model_dir / sub).mkdir()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # The exporter drops inputs the model never reads (no cross-attention, no text states).
    used = {i.name for i in sess.get_inputs()}
    feeds = {n: inputs[n].numpy() for n, _ in specs if n in used}
    for n, a in feeds.items():
        np.save(model_dir / "inputs" / f"{n}.npy", a)
    (out,) = sess.run(["out_sample"], feeds)
    np.save(model_dir / "ref" / "out_sample.npy", out)
    with torch.no_grad():
        torch_out = Wrapper(unet, "text_embeds" in inputs)(*[inputs[n] for n, _ in specs]).float().numpy()
    out32 = out.astype(np.float32)
    rel = float(np.linalg.norm(out32 - torch_out) / np.linalg.norm(torch_out))
    return {"onnxruntime": ort.__version__, "torch": torch.__version__,
            "rel_l2_onnxruntime_vs_torch": rel}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", choices=sorted(FULL), help="export a full-size model instead")
    ap.add_argument("--out", type=Path, help="output folder for --full")
    ap.add_argument("--only", nargs="*", help="tiny fixtures to export (default: all)")
    args = ap.parse_args()
    if args.full:
        config, exporter, _ = FULL[args.full]
        out = args.out or ROOT / "large" / args.full
        unet = build_unet(config, seed=0)
        dims = {"batch": 2, "height": 64, "width": 64, "sequence": 77}
        export(unet, config, exporter, out / "unet.onnx", dims)
        # The layout diffusers' conversion script writes: one external file named weights.pb.
        m = onnx.load(str(out / "unet.onnx"))
        (out / "unet.onnx.data").unlink()
        onnx.save(m, str(out / "unet.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location="weights.pb", size_threshold=1024)
        print(f"wrote {out}")
        return
    for name in args.only or TINY:
        config, exporter, options = TINY[name]
        model_dir = ROOT / name
        unet = build_unet(config, seed=0)
        if options.get("processor") == "classic":
            from diffusers.models.attention_processor import AttnProcessor
            unet.set_attn_processor(AttnProcessor())
        dtype = torch.float16 if options.get("fp16") else torch.float32
        if options.get("fp16"):
            unet = unet.half()
            for m in unet.modules():
                if hasattr(m, "upcast_softmax"):
                    m.upcast_softmax = True
        path = model_dir / "unet.onnx"
        specs, inputs = export(unet, config, exporter, path, TEST_DIMS, dtype, options)
        provenance = write_reference(path, specs, inputs, unet, model_dir)
        spec = {
            "model": "unet.onnx",
            "exporter": exporter,
            "opset": options.get("opset", 17) if exporter == "legacy" else 18,
            "attention_processor": options.get("processor", "default (SDPA)"),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
            "inputs": [{"name": n, "dtype": str(inputs[n].dtype).removeprefix("torch."), "shape": graph_shape(path, n),
                        "test_shape": list(inputs[n].shape)} for n, _ in specs if graph_shape(path, n) is not None],
            "outputs": [{"name": "out_sample", "dtype": str(dtype).removeprefix("torch.")}],
            "torch_parameters": sum(p.numel() for p in unet.parameters()),
            "reference": provenance,
        }
        (model_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
        print(f"{name}: {size / 1e6:.2f} MB, onnxruntime vs torch rel L2 {provenance['rel_l2_onnxruntime_vs_torch']:.2e}")


if __name__ == "__main__":
    main()
