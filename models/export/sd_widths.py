"""Fixtures at Stable Diffusion's own widths, for the CUDA fusions whose ONNX Runtime kernels
take only those widths (BiasAdd: 320/640/1280 channels; BiasSplitGelu: 2560/5120/10240),
which the tiny UNet fixtures are too narrow to reach. Real diffusers modules, random weights:

    h   = x + Linear(LayerNorm(x))                  residual of a projection (SkipLayerNorm)
    out = h + FeedForward(LayerNorm(h))             residual of the feed-forward (BiasAdd)
    gated = GEGLU(8 -> 1280)(Linear(out))           a 2560-wide GEGLU (BiasSplitGelu)

x: [batch, sequence, 320]. Outputs `out_sample` and `gated`; references from ONNX Runtime
CPU on the export (checked against torch). Writes models/sd_widths_{legacy,dynamo}/.

    python models/export/sd_widths.py
"""
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention import FeedForward

ROOT = Path(__file__).resolve().parents[1]
DIM = 320


class WidthBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(DIM)
        self.proj = torch.nn.Linear(DIM, DIM)
        self.norm2 = torch.nn.LayerNorm(DIM)
        self.ff = FeedForward(DIM, inner_dim=16, activation_fn="geglu")
        self.down = torch.nn.Linear(DIM, 8)
        self.geglu = GEGLU(8, 1280)

    def forward(self, sample):
        h = sample + self.proj(self.norm1(sample))
        out = h + self.ff(self.norm2(h))
        return out, self.geglu(self.down(out))


def main():
    torch.manual_seed(0)
    block = WidthBlock().eval()
    with torch.no_grad():  # LayerNorm γ/β away from 1/0, so a swapped γ/β would show
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, DIM)
    names = ["out_sample", "gated"]
    for exporter in ("legacy", "dynamo"):
        out_dir = ROOT / f"sd_widths_{exporter}"
        shutil.rmtree(out_dir, ignore_errors=True)
        (out_dir / "inputs").mkdir(parents=True)
        (out_dir / "ref").mkdir()
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.onnx"
            if exporter == "legacy":
                axes = {"sample": {0: "batch", 1: "sequence"}}
                axes.update({n: {0: "batch", 1: "sequence"} for n in names})
                torch.onnx.export(block, (x,), str(raw), dynamo=False, opset_version=17,
                                  input_names=["sample"], output_names=names,
                                  dynamic_axes=axes, do_constant_folding=True)
            else:
                dyn = {"sample": {0: torch.export.Dim("batch", min=1, max=64),
                                  1: torch.export.Dim("sequence", min=2, max=4096)}}
                torch.onnx.export(block, (x,), str(raw), dynamo=True, opset_version=18,
                                  input_names=["sample"], output_names=names,
                                  dynamic_shapes=dyn)
            m = onnx.load(str(raw))
            onnx.save(m, str(out_dir / "unet.onnx"), save_as_external_data=True,
                      all_tensors_to_one_file=True, location="unet.onnx.data",
                      size_threshold=1024)
        sess = ort.InferenceSession(str(out_dir / "unet.onnx"), providers=["CPUExecutionProvider"])
        np.save(out_dir / "inputs" / "sample.npy", x.numpy())
        outs = sess.run(names, {"sample": x.numpy()})
        with torch.no_grad():
            torch_outs = [t.numpy() for t in block(x)]
        rel = {}
        for n, o, t in zip(names, outs, torch_outs):
            np.save(out_dir / "ref" / f"{n}.npy", o)
            rel[n] = float(np.linalg.norm(o - t) / np.linalg.norm(t))
        spec = {"model": "unet.onnx", "exporter": exporter, "module": "WidthBlock (see script)",
                "outputs": names, "onnxruntime": ort.__version__, "torch": torch.__version__,
                "rel_l2_onnxruntime_vs_torch": rel}
        (out_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        print(exporter, rel)


if __name__ == "__main__":
    main()
