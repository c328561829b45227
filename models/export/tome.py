"""Token-merging references for the sd15_legacy UNet, made with tomesd 0.1.3 (ToMe) and a
direct torch implementation of ToDo's key/value downsampling.

Writes models/tome/<case>.npy (outputs for models/sd15_legacy/inputs) and a second input
size, models/tome/inputs_24x16/*.npy, with its own references, for the dynamic-shape tests;
and models/tome/pixart_<case>.npy, ToDo on the pixart_legacy diffusion transformer (its
attn1 reads norm1's output modulated by adaLN; its patch grid is the latent halved, so
max_downsample 2).

    python models/export/tome.py
    python models/export/tome.py --pixart   # the PixArt references only
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tomesd

import unets

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tome"
INPUTS = ROOT / "sd15_legacy" / "inputs"

# case: tomesd.apply_patch arguments (None: ToDo, with its own arguments)
CASES = {
    "tome_r05": dict(ratio=0.5),
    "tome_r03_all": dict(ratio=0.3, merge_crossattn=True, merge_mlp=True),
    "tome_r05_ds2": dict(ratio=0.5, max_downsample=2),
    "tome_r05_sx3": dict(ratio=0.5, sx=3, sy=3),  # 3 does not divide the 16x16 latent
}
TODO = {
    "todo_avg": dict(factor=2, mode="avg"),
    "todo_nearest": dict(factor=2, mode="nearest"),
}


def load_inputs(folder):
    return [torch.from_numpy(np.load(folder / f"{n}.npy")) for n in ("sample", "timestep", "encoder_hidden_states")]


def run(unet, feeds):
    with torch.no_grad():
        return unets.Wrapper(unet, False)(*feeds).numpy()


def with_todo(unet, factor, mode, latent_hw, max_downsample=1):
    """ToDo: self-attention keys/values read the norm1 output pooled over factor x factor windows."""
    h0, w0 = latent_hw
    for name, m in unet.named_modules():
        if not name.endswith("attn1"):
            continue

        def pool(module, args, kwargs, m=m):
            x = args[0] if args else kwargs["hidden_states"]
            b, n, c = x.shape
            ds = int(round((h0 * w0 / n) ** 0.5))
            if ds > max_downsample:
                return None
            h, w = -(-h0 // ds), -(-w0 // ds)
            grid = x.transpose(1, 2).reshape(b, c, h, w)
            if mode == "avg":
                small = F.avg_pool2d(grid, factor)
            else:
                small = grid[:, :, ::factor, ::factor]
            kv = small.reshape(b, c, -1).transpose(1, 2)
            kwargs = dict(kwargs)
            kwargs["encoder_hidden_states"] = kv
            if args:
                return (x,), kwargs
            kwargs["hidden_states"] = x
            return args, kwargs

        m.register_forward_pre_hook(pool, with_kwargs=True)
    return unet


def references(feeds, latent_hw):
    out = {"base": run(unets.build_unet(unets.TINY_SD1, 0), feeds)}
    for case, args in CASES.items():
        unet = unets.build_unet(unets.TINY_SD1, 0)
        tomesd.apply_patch(unet, use_rand=False, **args)
        out[case] = run(unet, feeds)
    for case, args in TODO.items():
        out[case] = run(with_todo(unets.build_unet(unets.TINY_SD1, 0), latent_hw=latent_hw, **args), feeds)
    return out


def random_slots_reference(feeds):
    """tomesd with use_rand=True, its random dst slots replaced by known ones (saved as the
    `tome_slots_ds1` input) so the compiled graph can be fed the same."""
    slots = torch.randint(4, (8, 8), generator=torch.Generator().manual_seed(3))
    real = torch.randint

    def fixed(high, size, **kw):
        assert high == 4 and tuple(size) == (8, 8, 1), (high, size)
        return slots[..., None].clone()

    unet = unets.build_unet(unets.TINY_SD1, 0)
    tomesd.apply_patch(unet, ratio=0.5, use_rand=True)
    torch.randint = fixed
    try:
        out = run(unet, feeds)
    finally:
        torch.randint = real
    np.save(OUT / "tome_slots_ds1.npy", slots.numpy().astype(np.int64))
    np.save(OUT / "tome_r05_rand.npy", out)


def pixart_todo():
    from diffusers import PixArtTransformer2DModel
    import dits

    feeds = load_inputs(ROOT / "pixart_legacy" / "inputs")
    build = lambda: dits.build(PixArtTransformer2DModel, dits.PIXART)
    with torch.no_grad():
        base = dits.Wrapper(build())(*feeds).numpy()
    for case, args in TODO.items():
        model = with_todo(build(), latent_hw=feeds[0].shape[2:], max_downsample=2, **args)
        with torch.no_grad():
            y = dits.Wrapper(model)(*feeds).numpy()
        np.save(OUT / f"pixart_{case}.npy", y)
        print(f"pixart_{case}: output changed by rel L2 {np.linalg.norm(y - base) / np.linalg.norm(base):.4f}")


def main():
    import sys
    if "--pixart" in sys.argv:
        return pixart_todo()
    OUT.mkdir(exist_ok=True)
    feeds = load_inputs(INPUTS)
    random_slots_reference(feeds)
    refs = references(feeds, latent_hw=feeds[0].shape[2:])
    base = refs.pop("base")
    for case, y in refs.items():
        np.save(OUT / f"{case}.npy", y)
        print(f"{case}: output changed by rel L2 {np.linalg.norm(y - base) / np.linalg.norm(base):.4f}")

    # A second size (24x16 latents) for graphs compiled with dynamic shapes.
    other = OUT / "inputs_24x16"
    other.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    feeds2 = [torch.randn(2, 4, 24, 16, generator=gen), feeds[1], feeds[2]]
    for n, t in zip(("sample", "timestep", "encoder_hidden_states"), feeds2):
        np.save(other / f"{n}.npy", t.numpy())
    refs2 = references(feeds2, latent_hw=(24, 16))
    for case in ("base", "tome_r05", "todo_avg"):
        np.save(other / f"ref_{case}.npy", refs2[case])
    (OUT / "cases.json").write_text(json.dumps({"tomesd": CASES, "todo": TODO, "tomesd_version": tomesd.__version__ if hasattr(tomesd, "__version__") else "0.1.3"}, indent=2) + "\n")
    pixart_todo()


if __name__ == "__main__":
    main()
