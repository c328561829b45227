"""Export the diffusion-transformer fixture attune's tests run on.

A tiny PixArt-α transformer (diffusers' PixArtTransformer2DModel: patchify, adaLN-single
blocks with self- and cross-attention, unpatchify; random weights, fixed seed, no hub
downloads), exported by the legacy TorchScript exporter at opset 17 with dynamic
batch/height/width/sequence. PixArt computes its sin-cos position table and unpatchifies
with Einsum. Writes `models/pixart_legacy/`: `unet.onnx` + `unet.onnx.data`, `spec.json`,
`inputs/*.npy` and `ref/out_sample.npy` (onnxruntime's outputs, the tests' reference).

    python models/export/dits.py
"""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from diffusers import PixArtTransformer2DModel

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
              in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=16,
              patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False)


class Wrapper(torch.nn.Module):
    """The UNet-style signature attune's `run`/`sample` feed: sample, timestep, text states."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                          return_dict=False)[0]


def main():
    import onnxruntime as ort
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers must matter too
            p.add_(torch.randn_like(p) * 0.02)
    gen = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, 16, 16, generator=gen),
              "timestep": torch.tensor([999.0, 500.0]),
              "encoder_hidden_states": torch.randn(2, 7, 16, generator=gen)}
    out_dir = ROOT / "pixart_legacy"
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "inputs").mkdir(parents=True)
    (out_dir / "ref").mkdir()
    raw = out_dir / "raw.onnx"
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "out_sample": {0: "batch", 2: "height", 3: "width"}}
    torch.onnx.export(Wrapper(model), tuple(inputs.values()), str(raw), dynamo=False,
                      opset_version=17, input_names=list(inputs), output_names=["out_sample"],
                      dynamic_axes=axes, do_constant_folding=True)
    m = onnx.load(str(raw))
    raw.unlink()
    path = out_dir / "unet.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="unet.onnx.data", size_threshold=1024)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    for k, v in feeds.items():
        np.save(out_dir / "inputs" / f"{k}.npy", v)
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.save(out_dir / "ref" / "out_sample.npy", out)
    with torch.no_grad():
        torch_out = Wrapper(model)(*inputs.values()).numpy()
    rel = float(np.linalg.norm(out - torch_out) / np.linalg.norm(torch_out))
    spec = {"model": "unet.onnx", "exporter": "legacy", "opset": 17,
            "class": "PixArtTransformer2DModel", "config": CONFIG,
            "reference": {"onnxruntime": ort.__version__, "torch": torch.__version__,
                          "rel_l2_onnxruntime_vs_torch": rel}}
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"pixart_legacy: onnxruntime vs torch rel L2 {rel:.2e}")


if __name__ == "__main__":
    main()
