"""LoRA files with text-encoder keys for the tiny pipelines' text encoders, and references from
diffusers + peft (what `attune compile --lora` must fuse into text_encoder[_2]/model.onnx).

Written to `models/loras/text_encoder/` (manifest.json lists every file and case):
- `peft_mixed.safetensors`: a peft LoRA (rank 4, lora_alpha 8, random non-zero A and B) on
  sd15_tiny's text encoder (q/k/v/out_proj, mlp fc1/fc2 of every layer) and its UNet (attention
  to_q/k/v/out.0, lora_alpha 2), saved by `StableDiffusionPipeline.save_lora_weights` as the
  diffusers training scripts do (`text_encoder.<path>.lora_A.weight`, `unet.<path>...`, each
  component's peft config in the `lora_adapter_metadata`: the two alphas differ on purpose);
- `kohya_te.safetensors`: a kohya (sd-scripts) LoRA on the same text-encoder layers, other
  random factors (`lora_te_text_model_<module>.lora_down/lora_up.weight`, `.alpha` = 2 on every
  layer: diffusers reads a missing or a per-layer alpha of a text encoder otherwise than kohya
  does), no UNet key;
- `sdxl_kohya.safetensors`: a kohya LoRA for sdxl_tiny's two encoders (`lora_te1_` for
  text_encoder, `lora_te2_` for text_encoder_2, hidden 8).

References, per case (`<case>/<output>.npy`): every output of the ONNX text encoder (by the ONNX
output names: last_hidden_state, pooler_output or text_embeds, hidden_states.N) computed by the
torch pipeline after `pipe.load_lora_weights(file)` and `pipe.fuse_lora(lora_scale=S)` (diffusers'
own reading of each layout, kohya's converted by diffusers), for the token ids in
`inputs/input_ids.npy` (three prompts of the pipeline's token reference: plain, unicode, long);
`unet_peft_mixed/out_sample.npy` is sd15_tiny's UNet with the mixed file's UNet layers, for
`unet_inputs/` (sample, timestep, encoder_hidden_states). The script checks diffusers' loading
against the peft model the file was saved from, and the torch encoders without LoRA against the
committed ONNX files (ORT CPU).

    venv/bin/python models/export/lora_text_encoder.py
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipelines as P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "loras" / "text_encoder"
RANK = 4
TE_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT_ROWS = [0, 1, 6]  # plain, unicode, long (truncated)


def torch_pipe(name):
    """The tiny pipeline in torch (the folder pipelines.py saved, rebuilt if absent)."""
    spec = P.PIPELINES[name]
    folder = P.WORK / name
    if not (folder / "model_index.json").exists():
        P.WORK.mkdir(parents=True, exist_ok=True)
        P.build_torch(name, spec, folder)
    return P.load_torch(spec, folder)


def onnx_outputs(path, ids):
    sess = P.ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input_ids": ids})))


def torch_outputs(encoder, ids, names):
    with torch.no_grad():
        o = encoder(torch.from_numpy(ids), output_hidden_states=True)
    out = {}
    for n in names:
        if n.startswith("hidden_states."):
            out[n] = o.hidden_states[int(n.split(".")[1])]
        else:
            out[n] = getattr(o, n)
    return {n: v.numpy().astype(np.float32) for n, v in out.items()}


def max_diff(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def randomize_lora(model, seed, std):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def peft_state(model):
    """peft's state dict of an injected adapter (get_peft_model_state_dict's keys)."""
    return {k.replace(".default.", "."): v for k, v in model.state_dict().items() if ".lora_" in k}


def kohya_te(encoder, prefix, seed, std):
    """kohya factors for every linear target of a CLIP encoder: {key: tensor}."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in sorted(encoder.named_modules(), key=lambda nm: nm[0]):
        if not (isinstance(m, torch.nn.Linear) and name.split(".")[-1] in TE_MODULES):
            continue
        # kohya names modules as transformers 4 does (`text_model.encoder...`); transformers 5's
        # CLIPTextModel has no `text_model` wrapper.
        if not name.startswith("text_model."):
            name = "text_model." + name
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(RANK, m.in_features, generator=gen) * std
        sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, RANK, generator=gen) * std
        # One alpha for every layer: diffusers gives a layer without one the file's most common
        # alpha (kohya: alpha = rank), and with transformers 5 its per-layer alphas miss the text
        # encoder's modules (their `text_model.` names): it only agrees with kohya on this.
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    return sd


def kohya_merged(encoder, sd, prefix, scale):
    """kohya's definition on a copy of `encoder`: W += scale * alpha / rank * up @ down."""
    import copy
    enc = copy.deepcopy(encoder)
    with torch.no_grad():
        for name, m in enc.named_modules():
            full = name if name.startswith("text_model.") else "text_model." + name
            key = prefix + full.replace(".", "_")
            if f"{key}.lora_down.weight" in sd:
                down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
                alpha = float(sd.get(f"{key}.alpha", torch.tensor(float(down.shape[0]))))
                m.weight += scale * alpha / down.shape[0] * (up @ down)
    return enc


def reference(name, file, scale, components):
    """Outputs of each component after diffusers loads `file` and fuses it at `scale`."""
    pipe = torch_pipe(name)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    pipe.fuse_lora(lora_scale=scale, components=list(components))
    return {c: f(pipe) for c, f in components.items()}


def save_case(manifest, case, arrays, **info):
    folder = OUT / case
    folder.mkdir(parents=True, exist_ok=True)
    for n, v in arrays.items():
        np.save(folder / f"{n}.npy", v)
    manifest["cases"][case] = dict(info, files={f"{n}.npy": dict(dtype=str(v.dtype), shape=list(v.shape))
                                                for n, v in arrays.items()})


def main():
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    OUT.mkdir(parents=True, exist_ok=True)
    pipes = ROOT / "pipelines"
    ids = np.load(pipes / "sd15_tiny/reference/tokens/token_ids.npy")[PROMPT_ROWS]
    (OUT / "inputs").mkdir(exist_ok=True)
    np.save(OUT / "inputs" / "input_ids.npy", ids)
    manifest = dict(made_by="models/export/lora_text_encoder.py",
                    references_by=dict(diffusers=__import__("diffusers").__version__,
                                       peft=__import__("peft").__version__,
                                       transformers=__import__("transformers").__version__,
                                       torch=torch.__version__, device="cpu", dtype="float32"),
                    inputs=dict(input_ids=dict(rows_of="pipelines/sd15_tiny/reference/tokens/token_ids.npy",
                                               rows=PROMPT_ROWS, shape=list(ids.shape))),
                    files={}, cases={})

    te_onnx = pipes / "sd15_tiny/text_encoder/model.onnx"
    te_names = list(onnx_outputs(te_onnx, ids))
    base = torch_pipe("sd15_tiny")
    d = max_diff(torch_outputs(base.text_encoder, ids, te_names), onnx_outputs(te_onnx, ids))
    assert d < 1e-5, f"the torch sd15_tiny text encoder is not the committed ONNX one ({d})"

    # (a) peft, saved as diffusers' training scripts save a text-encoder + UNet LoRA.
    te_cfg = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, target_modules=TE_MODULES)
    unet_cfg = LoraConfig(r=RANK, lora_alpha=2, init_lora_weights=False, target_modules=UNET_MODULES)
    pipe = torch_pipe("sd15_tiny")
    # transformers 5's add_adapter wants a peft newer than PyPI's; peft's own injection is what
    # it calls.
    inject_adapter_in_model(te_cfg, pipe.text_encoder)
    pipe.unet.add_adapter(unet_cfg)
    randomize_lora(pipe.text_encoder, 11, 0.3)
    randomize_lora(pipe.unet, 12, 0.3)
    peft_direct = torch_outputs(pipe.text_encoder, ids, te_names)
    StableDiffusionPipeline.save_lora_weights(
        str(OUT), weight_name="peft_mixed.safetensors",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(peft_state(pipe.text_encoder)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    peft_file = OUT / "peft_mixed.safetensors"
    manifest["files"]["peft_mixed.safetensors"] = dict(
        layout="diffusers/PEFT (StableDiffusionPipeline.save_lora_weights)", pipeline="sd15_tiny",
        text_encoder=dict(rank=RANK, lora_alpha=8, modules=TE_MODULES),
        unet=dict(rank=RANK, lora_alpha=2, modules=UNET_MODULES))

    # (b) kohya, text encoder only.
    kohya = kohya_te(base.text_encoder, "lora_te_", 21, 0.3)
    kohya_file = OUT / "kohya_te.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(kohya_file))
    manifest["files"]["kohya_te.safetensors"] = dict(
        layout="kohya (lora_te_)", pipeline="sd15_tiny", rank=RANK, alpha=2,
        modules=TE_MODULES)

    te = {"text_encoder": lambda p: torch_outputs(p.text_encoder, ids, te_names)}
    for file, scale in [(peft_file, 1.0), (peft_file, 0.5), (kohya_file, 1.0), (kohya_file, 0.5)]:
        ref = reference("sd15_tiny", file, scale, te)["text_encoder"]
        if file == peft_file and scale == 1.0:
            # diffusers' loading (alphas from the metadata) against the peft model saved.
            d = max_diff(ref, peft_direct)
            assert d < 1e-5, f"diffusers' loading of the peft file differs from peft ({d})"
        if file == kohya_file:
            d = max_diff(ref, torch_outputs(kohya_merged(base.text_encoder, kohya, "lora_te_", scale), ids, te_names))
            assert d < 1e-5, f"diffusers' reading of the kohya file differs from kohya's rule ({d})"
        base_out = onnx_outputs(te_onnx, ids)
        change = max_diff(ref, base_out)
        assert change > 0.05, f"{file.name}:{scale} hardly changes the encoder ({change})"
        case = f"{file.stem}_x{scale}"
        print(f"{case}: max change vs. no LoRA {change:.3f}")
        save_case(manifest, case, ref, pipeline="sd15_tiny", component="text_encoder", lora=file.name,
                  scale=scale, reference="pipe.load_lora_weights(file); pipe.fuse_lora(lora_scale=scale)")

    # The mixed file's UNet layers, on sd15_tiny's UNet.
    gen = torch.Generator().manual_seed(31)
    unet_in = dict(sample=torch.randn(1, 4, 8, 8, generator=gen), timestep=torch.tensor(500.0),
                   encoder_hidden_states=torch.randn(1, 77, 16, generator=gen))
    (OUT / "unet_inputs").mkdir(exist_ok=True)
    for n, v in unet_in.items():
        np.save(OUT / "unet_inputs" / f"{n}.npy", v.numpy().astype(np.float32))

    def unet_out(p):
        with torch.no_grad():
            return dict(out_sample=p.unet(**unet_in).sample.numpy())
    ref = reference("sd15_tiny", peft_file, 1.0, {"unet": unet_out})["unet"]
    save_case(manifest, "unet_peft_mixed", ref, pipeline="sd15_tiny", component="unet", lora=peft_file.name,
              scale=1.0, inputs="unet_inputs/", reference="pipe.load_lora_weights(file); pipe.fuse_lora()")

    # (c) SDXL: kohya lora_te1_ / lora_te2_.
    if (pipes / "sdxl_tiny/text_encoder_2/model.onnx").exists():
        xl = torch_pipe("sdxl_tiny")
        onnx1 = pipes / "sdxl_tiny/text_encoder/model.onnx"
        onnx2 = pipes / "sdxl_tiny/text_encoder_2/model.onnx"
        names1, names2 = list(onnx_outputs(onnx1, ids)), list(onnx_outputs(onnx2, ids))
        for enc, path, names in [(xl.text_encoder, onnx1, names1), (xl.text_encoder_2, onnx2, names2)]:
            d = max_diff(torch_outputs(enc, ids, names), onnx_outputs(path, ids))
            assert d < 1e-5, f"the torch sdxl_tiny encoder is not {path} ({d})"
        sd = kohya_te(xl.text_encoder, "lora_te1_", 41, 0.3)
        sd.update(kohya_te(xl.text_encoder_2, "lora_te2_", 42, 0.3))
        xl_file = OUT / "sdxl_kohya.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(xl_file))
        manifest["files"]["sdxl_kohya.safetensors"] = dict(
            layout="kohya (lora_te1_, lora_te2_)", pipeline="sdxl_tiny", rank=RANK,
            alpha=2, modules=TE_MODULES)
        refs = reference("sdxl_tiny", xl_file, 1.0, {
            "text_encoder": lambda p: torch_outputs(p.text_encoder, ids, names1),
            "text_encoder_2": lambda p: torch_outputs(p.text_encoder_2, ids, names2)})
        for comp, path, prefix, names in [("text_encoder", onnx1, "lora_te1_", names1),
                                          ("text_encoder_2", onnx2, "lora_te2_", names2)]:
            d = max_diff(refs[comp], torch_outputs(kohya_merged(getattr(xl, comp), sd, prefix, 1.0), ids, names))
            assert d < 1e-5, f"diffusers' reading of sdxl_kohya ({comp}) differs from kohya's rule ({d})"
            change = max_diff(refs[comp], onnx_outputs(path, ids))
            assert change > 0.05, f"sdxl {comp} hardly changes ({change})"
            print(f"sdxl_kohya {comp}: max change vs. no LoRA {change:.3f}")
            save_case(manifest, f"sdxl_kohya_{comp}", refs[comp], pipeline="sdxl_tiny", component=comp,
                      lora=xl_file.name, scale=1.0,
                      reference="pipe.load_lora_weights(file); pipe.fuse_lora()")
    else:
        print("models/pipelines/sdxl_tiny not there: no SDXL file")

    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
