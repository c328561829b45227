"""LoRA fixtures for the sd15_legacy UNet (and one for the sd3 transformer), with reference
outputs from the reference implementations (diffusers + peft for LoRA, LyCORIS for
LoCon/LoHa/LoKr).

Each `models/loras/<name>.safetensors` holds random factors (fixed seeds); `ref/<name>.npy` is
the UNet's output for models/sd15_legacy/inputs with that LoRA applied in torch at multiplier
1.0 (and `ref/kohya+loha.npy` with kohya at 0.8 and LoHa at 0.5 together). Tests never run
Python. `sd3_peft.safetensors` is a PEFT LoRA in diffusers' SD3 format
(`transformer.<module>.lora_A.weight`) on both streams' attention projections, feed-forwards
and adaLN projections of the `sd3_legacy`/`sd3_dynamo` model; `ref/sd3_peft.npy` its output
for models/sd3_legacy/inputs. `flux_kohya.safetensors` is a kohya (sd-scripts) LoRA for the
`flux_dynamo` model in Black Forest Labs' module names, whose fused layers (`img_attn_qkv`,
single blocks' `linear1` = Q, K, V and the MLP's input) are split across diffusers' modules;
`ref/flux_kohya.npy` is kohya's merge rule applied to those rows (cross-checked against
diffusers' own kohya-Flux conversion on the double blocks, whose splits it can size).

    python models/export/loras.py
    python models/export/loras.py --dit      # only the SD3 and Flux files
    python models/export/loras.py --sd15-rank 64 --out models/large/lora_r64.safetensors   # benchmark file, not committed
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import unets

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "loras"
INPUTS = ROOT / "sd15_legacy" / "inputs"
RANK = 4

# The layers every format adapts: attention projections, feed-forward, transformer in/out
# (1x1 convs in SD1), resnet 3x3 conv and time embedding projection.
LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj")
CONV = ("proj_in", "proj_out", "conv1")


def base_unet():
    return unets.build_unet(unets.TINY_SD1, seed=0)


def targets(unet):
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(LINEAR + CONV):
            if "time_embedding" not in name:
                yield name, m


def run(unet):
    feeds = [torch.from_numpy(np.load(INPUTS / f"{n}.npy")) for n in ("sample", "timestep", "encoder_hidden_states")]
    with torch.no_grad():
        return unets.Wrapper(unet, False)(*feeds).numpy()


def kohya_factors(seed):
    """kohya LoRA/LoCon factors for every target: {module: (down, up, alpha or None)}."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, m) in enumerate(targets(base_unet())):
        if isinstance(m, torch.nn.Linear):
            down = torch.randn(RANK, m.in_features, generator=gen) * 0.1
            up = torch.randn(m.out_features, RANK, generator=gen) * 0.1
        else:
            k = m.kernel_size
            down = torch.randn(RANK, m.in_channels, *k, generator=gen) * 0.1
            up = torch.randn(m.out_channels, RANK, 1, 1, generator=gen) * 0.1
        # Some layers without alpha (means alpha = rank), the rest with alpha = rank / 2.
        alpha = None if i % 5 == 0 else RANK / 2
        out[name] = (down, up, alpha)
    return out


def kohya_file(factors, sgm=False):
    sd = {}
    for name, (down, up, alpha) in factors.items():
        key = "lora_unet_" + (to_sgm(name) if sgm else name).replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    # A text-encoder layer: not in a UNet graph, reported as such.
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(RANK, 8)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(8, RANK)
    return sd


def to_sgm(name):
    """diffusers module path -> SGM/LDM block names (layers_per_block = 1, as TINY_SD1)."""
    lpb = unets.TINY_SD1["layers_per_block"]
    parts = name.split(".")
    inner = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    if parts[0] == "down_blocks":
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        block = 1 + level * (lpb + 1) + j
        rest = parts[4:]
        head = ["input_blocks", str(block), "0" if kind == "resnets" else "1"]
    elif parts[0] == "up_blocks":
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        head = ["output_blocks", str(level * (lpb + 1) + j), "0" if kind == "resnets" else "1"]
        rest = parts[4:]
    elif parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        head = ["middle_block", str({("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)])]
        rest = parts[3:]
    else:
        return name
    if head and rest and rest[0] in inner and "transformer_blocks" not in rest:
        rest = inner[rest[0]].split(".") + rest[1:]
    return ".".join(head + rest)


def with_kohya(unet, factors, multiplier=1.0):
    """The definition kohya's networks/lora.py merges: W += m * alpha/rank * up @ down."""
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, (down, up, alpha) in factors.items():
            w = modules[name].weight
            scale = (alpha if alpha is not None else RANK) / RANK
            if w.dim() == 2:
                delta = up @ down
            else:
                delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            w += multiplier * scale * delta
    return unet


def via_diffusers(sd):
    """Reference through diffusers' own kohya/SGM conversion, load_lora_adapter and fuse_lora."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    unet = base_unet()
    sd = {k: v.clone() for k, v in sd.items() if not k.startswith("lora_te_")}
    sd = _maybe_map_sgm_blocks_to_diffusers(sd, unet.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(sd)
    unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name="kohya")
    unet.fuse_lora()
    return run(unet)


def with_peft(model, names, seed, **cfg):
    """A PEFT LoRA (lora_alpha 6 != r) on `names`, with random factors (fixed seed)."""
    from peft import LoraConfig
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=6, target_modules=names, init_lora_weights=False, **cfg),
                      adapter_name="peft")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def peft_lora(seed, rslora):
    """PEFT LoRA (diffusers' format): lora_alpha != r, optionally rsLoRA."""
    from peft.utils import get_peft_model_state_dict

    unet = base_unet()
    unet = with_peft(unet, [n for n, _ in targets(unet)], seed, use_rslora=rslora)
    ref = run(unet)  # adapter active, unmerged: the definition
    sd = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name="peft").items()}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": 6, "unet.use_rslora": rslora})}
    return sd, meta, ref


def legacy_diffusers(seed):
    """diffusers' old attention-processor format: unet.<attn>.processor.to_q_lora.down.weight."""
    gen = torch.Generator().manual_seed(seed)
    unet = base_unet()
    modules = dict(unet.named_modules())
    sd, factors = {}, {}
    for name, m in targets(unet):
        parent, leaf = name.rsplit(".", 1) if not name.endswith("to_out.0") else (name[: -len(".to_out.0")], "to_out")
        if leaf not in ("to_q", "to_k", "to_v", "to_out"):
            continue
        down = torch.randn(RANK, m.in_features, generator=gen) * 0.2
        up = torch.randn(m.out_features, RANK, generator=gen) * 0.2
        sd[f"unet.{parent}.processor.{leaf}_lora.down.weight"] = down
        sd[f"unet.{parent}.processor.{leaf}_lora.up.weight"] = up
        factors[name] = (down, up, None)
    del modules
    return sd, with_kohya(base_unet(), factors)


def lycoris_file(algo, seed, std, **kw):
    """A LyCORIS network on the UNet with random weights; reference = the UNet run with it."""
    from lycoris import create_lycoris, LycorisNetwork

    torch.manual_seed(seed)
    unet = base_unet()
    LycorisNetwork.apply_preset({
        "target_module": ["Transformer2DModel", "ResnetBlock2D"],
        "enable_conv": True,
        "lora_prefix": "lora_unet",
    })
    net = create_lycoris(unet, 1.0, linear_dim=RANK, linear_alpha=2.0, conv_dim=RANK, conv_alpha=2.0, algo=algo, **kw)
    net.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    ref = run(unet)
    path = OUT / f"{algo}{'_tucker' if kw.get('use_tucker') else ''}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": f"lycoris.kohya", "ss_network_args": json.dumps({"algo": algo, **kw})})
    return path, ref


def sd3_peft(seed=50):
    """PEFT LoRA on the SD3 fixture's transformer, as diffusers' SD3 pipelines save it."""
    from diffusers import SD3Transformer2DModel
    from peft.utils import get_peft_model_state_dict
    import dits

    model = dits.build(SD3Transformer2DModel, dits.SD3)
    names = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
             "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2", "norm1.linear", "norm1_context.linear"]
    model = with_peft(model, names, seed)
    inputs = ROOT / "sd3_legacy" / "inputs"
    feeds = [torch.from_numpy(np.load(inputs / f"{n}.npy"))
             for n in ("sample", "timestep", "encoder_hidden_states", "pooled_projections")]
    with torch.no_grad():
        ref = dits.Sd3Wrapper(model)(*feeds).numpy()
        model.disable_adapters()
        base = dits.Sd3Wrapper(model)(*feeds).numpy()
    sd = {f"transformer.{k}": v.contiguous()
          for k, v in get_peft_model_state_dict(model, adapter_name="peft").items()}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 6})}
    save_file(sd, OUT / "sd3_peft.safetensors", metadata=meta)
    np.save(OUT / "ref" / "sd3_peft.npy", ref)
    change = np.linalg.norm(ref - base) / np.linalg.norm(base)
    print(f"sd3_peft: {len(sd) // 2} layers, output changed by rel L2 {change:.3f}")


# kohya's Flux layers (BFL names) and the diffusers modules their rows are, in order.
def flux_layers(config):
    names = {}
    for i in range(config["num_layers"]):
        b = f"transformer_blocks.{i}"
        for stream, attn, ff, norm in (("img", ("to_q", "to_k", "to_v"), "ff", "norm1"),
                                       ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                        "ff_context", "norm1_context")):
            k = f"double_blocks_{i}_{stream}"
            names[f"{k}_attn_qkv"] = [f"{b}.attn.{a}" for a in attn]
            names[f"{k}_attn_proj"] = [f"{b}.attn.{'to_out.0' if stream == 'img' else 'to_add_out'}"]
            names[f"{k}_mlp_0"] = [f"{b}.{ff}.net.0.proj"]
            names[f"{k}_mlp_2"] = [f"{b}.{ff}.net.2"]
            names[f"{k}_mod_lin"] = [f"{b}.{norm}.linear"]
    for i in range(config["num_single_layers"]):
        b = f"single_transformer_blocks.{i}"
        names[f"single_blocks_{i}_linear1"] = [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"]
        names[f"single_blocks_{i}_linear2"] = [f"{b}.proj_out"]
        names[f"single_blocks_{i}_modulation_lin"] = [f"{b}.norm.linear"]
    return names


def flux_kohya(seed=60):
    """kohya LoRA for the Flux fixture: factors for the fused BFL layers, merged by kohya's
    rule (W += alpha/rank · up @ down) into the rows each diffusers module holds."""
    from diffusers import FluxTransformer2DModel
    import dits

    modules = dict(dits.build(FluxTransformer2DModel, dits.FLUX).named_modules())
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for i, (name, targets) in enumerate(flux_layers(dits.FLUX).items()):
        rows = sum(modules[t].out_features for t in targets)
        cols = modules[targets[0]].in_features
        alpha = None if i % 4 == 0 else RANK / 2
        factors[name] = (torch.randn(RANK, cols, generator=gen) * 0.1,
                         torch.randn(rows, RANK, generator=gen) * 0.1, alpha)

    def merged(factors):
        model = dits.build(FluxTransformer2DModel, dits.FLUX)
        modules = dict(model.named_modules())
        layers = flux_layers(dits.FLUX)
        with torch.no_grad():
            for name, (down, up, alpha) in factors.items():
                delta = (alpha if alpha is not None else RANK) / RANK * up @ down
                start = 0
                for t in layers[name]:
                    w = modules[t].weight
                    w += delta[start:start + w.shape[0]]
                    start += w.shape[0]
        return model

    def run(model):
        inputs = ROOT / "flux_dynamo" / "inputs"
        names = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
                 "img_ids", "txt_ids")
        feeds = [torch.from_numpy(np.load(inputs / f"{n}.npy")) for n in names]
        with torch.no_grad():
            return dits.FluxWrapper(model)(*feeds).numpy()

    def file_of(factors):
        sd = {}
        for name, (down, up, alpha) in factors.items():
            sd[f"lora_unet_{name}.lora_down.weight"] = down.contiguous()
            sd[f"lora_unet_{name}.lora_up.weight"] = up.contiguous()
            if alpha is not None:
                sd[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
        return sd

    # Cross-check on the double blocks: diffusers converts kohya's Flux keys itself (its
    # single-block split is sized for the full model, so those are left out here).
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    double = {k: v for k, v in factors.items() if k.startswith("double_blocks")}
    model = dits.build(FluxTransformer2DModel, dits.FLUX)
    model.load_lora_adapter(_convert_kohya_flux_lora_to_diffusers(file_of(double)), prefix="transformer")
    check, definition = run(model), run(merged(double))
    rel = np.linalg.norm(check - definition) / np.linalg.norm(definition)
    assert rel < 1e-5, f"flux_kohya: diffusers' conversion disagrees with kohya's rule: {rel}"

    ref, base = run(merged(factors)), run(dits.build(FluxTransformer2DModel, dits.FLUX))
    save_file(file_of(factors), OUT / "flux_kohya.safetensors", metadata={"ss_network_module": "networks.lora_flux"})
    np.save(OUT / "ref" / "flux_kohya.npy", ref)
    change = np.linalg.norm(ref - base) / np.linalg.norm(base)
    print(f"flux_kohya: {len(factors)} layers, output changed by rel L2 {change:.3f} (diffusers agrees: {rel:.1e})")


def sd15_benchmark_lora(rank, out):
    """A kohya LoRA of the given rank for every attention, feed-forward and transformer
    in/out layer of the full-size SD1.5 UNet (random factors; for timing, not numerics)."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(**unets.FULL_SD15)
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in unet.named_modules():
        if not (isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "attentions" in name):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(m, torch.nn.Linear):
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.01
            sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.01
        else:
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_channels, *m.kernel_size, generator=gen) * 0.01
            sd[f"{key}.lora_up.weight"] = torch.randn(m.out_channels, rank, 1, 1, generator=gen) * 0.01
        sd[f"{key}.alpha"] = torch.tensor(rank / 2)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, out)
    print(f"wrote {out}: {len(sd) // 3} layers, rank {rank}")


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd15-rank", type=int, help="write a benchmark LoRA for the full SD1.5 UNet instead")
    ap.add_argument("--out", default=str(ROOT / "large" / "lora_r64.safetensors"))
    ap.add_argument("--dit", action="store_true", help="write only the SD3 and Flux LoRAs")
    args = ap.parse_args()
    if args.sd15_rank:
        return sd15_benchmark_lora(args.sd15_rank, args.out)
    OUT.mkdir(exist_ok=True)
    (OUT / "ref").mkdir(exist_ok=True)
    sd3_peft()
    flux_kohya()
    if args.dit:
        return
    refs = {}

    # kohya: the reference is kohya-ss's own definition (networks/lora.py: a missing alpha means
    # alpha = rank). diffusers' loader gives alpha-less (and some per-layer) alphas its own
    # default, so it only cross-checks the key naming, on a copy with one alpha everywhere.
    factors = kohya_factors(seed=10)
    all_alpha = {n: (d, u, RANK / 2) for n, (d, u, _) in factors.items()}
    for name, sgm in (("kohya", False), ("kohya_sgm", True)):
        save_file(kohya_file(factors, sgm=sgm), OUT / f"{name}.safetensors", metadata={"ss_network_module": "networks.lora"})
        refs[name] = run(with_kohya(base_unet(), factors))
        check = via_diffusers(kohya_file(all_alpha, sgm=sgm))
        definition = run(with_kohya(base_unet(), all_alpha))
        rel = np.linalg.norm(check - definition) / np.linalg.norm(definition)
        assert rel < 1e-5, f"{name}: diffusers' loading disagrees with the naming/definition: {rel}"

    for name, rs in (("peft", False), ("peft_rslora", True)):
        sd, meta, refs[name] = peft_lora(seed=20 + rs, rslora=rs)
        save_file(sd, OUT / f"{name}.safetensors", metadata=meta)

    sd, unet = legacy_diffusers(seed=30)
    save_file(sd, OUT / "diffusers_legacy.safetensors")
    refs["diffusers_legacy"] = run(unet)

    for algo, kw, seed, std in (("locon", {"use_tucker": True}, 40, 0.1), ("loha", {}, 41, 0.3), ("lokr", {"factor": 4}, 42, 0.1)):
        path, refs[path.stem] = lycoris_file(algo, seed, std, **kw)

    # Two files at once with their own multipliers.
    unet = with_kohya(base_unet(), factors, multiplier=0.8)
    from lycoris import create_lycoris_from_weights
    net, _ = create_lycoris_from_weights(0.5, str(OUT / "loha.safetensors"), unet)
    net.apply_to()
    refs["kohya+loha"] = run(unet)

    base = run(base_unet())
    for name, out in refs.items():
        np.save(OUT / "ref" / f"{name}.npy", out)
        change = np.linalg.norm(out - base) / np.linalg.norm(base)
        print(f"{name}: output changed by rel L2 {change:.3f}")


if __name__ == "__main__":
    main()
