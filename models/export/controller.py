"""Attention-control references for the sd15_legacy UNet: diffusers attention processors that
apply Prompt-to-Prompt's edits (google/prompt-to-prompt: replace, refine, reweight,
self-attention replace, LocalBlend) and MasaCtrl's mutual self-attention
(TencentARC/MasaCtrl) to the attention probabilities, with the same hook values the compiled
graph takes as inputs (saved next to each reference, named like the graph inputs).

    python models/export/controller.py

Writes models/controller/: inputs/*.npy (2 prompts: batch [uncond, uncond, cond0, cond1]),
<case>.safetensors (hook inputs), <case>.npy (UNet output), capture.safetensors (head-averaged
cross-attention maps), and sample/ (a 4-step DDIM run with a P2P controller: its TOML, text
embeddings, initial latents and the final latents); models/controller/pixart/ the same
cases (no sampling run) for the pixart_legacy diffusion transformer; and
models/controller/joint/<fixture>.safetensors, the image-to-text maps of the joint attentions
of sd3_legacy and flux_dynamo (head-averaged probabilities of the image queries over the text
keys), for their own inputs.

    python models/export/controller.py            # all
    python models/export/controller.py --dit      # the PixArt cases and joint maps only
"""
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from safetensors.torch import save_file

import unets

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "controller"
WORDS = 77
P = 2  # prompts: the source and one edit


class Hooks:
    """Hook values of every site, as the graph inputs take them (defaults = no control)."""

    def __init__(self):
        self.values = {}

    def get(self, name, default):
        return self.values.get(name, default)


class ControlledAttention:
    """diffusers' classic attention, with the probabilities edited like P2P and K/V swapped
    like MasaCtrl, reading this site's hook values."""

    def __init__(self, path, hooks, store):
        self.path, self.hooks, self.store = path, hooks, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        is_cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if is_cross else hidden_states
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        gate = float(self.hooks.get(f"masactrl.{self.path}.gate", 0.0))
        if not is_cross and gate:
            # MasaCtrl: every query of a half attends to the K/V of that half's first image.
            half = b // 2
            src = torch.tensor([0] * half + [half] * half)
            k, v = k[src], v[src]
        h = attn.heads
        qb, kb, vb = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
        probs = attn.get_attention_scores(qb, kb, None)
        probs = self.control(probs.reshape(b, h, n, -1), is_cross, n).reshape(b * h, n, -1)
        out = attn.batch_to_head_dim(torch.bmm(probs, vb))
        return attn.to_out[1](attn.to_out[0](out))

    def control(self, probs, is_cross, n):
        get = self.hooks.get
        if is_cross:
            self.store[f"attn.{self.path}"] = probs.mean(1)  # head-averaged maps, every batch row
        uncond, base, edit = probs[:P], probs[P:P + 1], probs[P + 1:]
        if is_cross:
            alpha = get(f"p2p.{self.path}.alpha", torch.zeros(1, WORDS))
            mapper = get(f"p2p.{self.path}.mapper", torch.eye(WORDS)[None])
            eq = get(f"p2p.{self.path}.equalizer", torch.ones(1, WORDS))
            # Replace/refine: einsum('hpw,bwn->bhpn'); reweight on top (P2P's AttentionReweight).
            mapped = torch.einsum("hpw,bwn->bhpn", base[0], mapper) * eq[:, None, None, :]
            a = alpha[:, None, None, :]
            edit = mapped * a + edit * (1 - a)
        else:
            gate = float(get(f"p2p.{self.path}.self_gate", 0.0))
            if gate and n <= 16 * 16:
                edit = base.expand_as(edit)
        return torch.cat([uncond, base, edit])


def with_hooks(model, hooks, store):
    procs = {}
    for name in model.attn_processors:
        path = name.removesuffix(".processor")
        procs[name] = ControlledAttention(path, hooks, store)
    model.set_attn_processor(procs)
    return model


def unet_with_hooks(hooks, store):
    return with_hooks(unets.build_unet(unets.TINY_SD1, 0), hooks, store)


def control_cases(cross, selfs, masactrl_selfs):
    """Every control, as hook values (what `attune sample` computes from a controller each
    step), and the word swap mapper."""
    swap = torch.eye(WORDS)
    swap[[3, 4]] = swap[[4, 3]]  # word swap: token 3 <-> 4
    swap[5] = 0.5 * swap[5] + 0.5 * torch.eye(WORDS)[6]  # one word mapped to two
    refine_index = torch.arange(WORDS)
    refine_index[4:] = torch.arange(3, WORDS - 1)  # an inserted word at 3
    refine_alpha = torch.ones(WORDS)
    refine_alpha[3] = 0
    equalizer = torch.ones(1, WORDS)
    equalizer[0, 2], equalizer[0, 5] = 2.5, 0.3
    cases = {
        "default": {},
        "replace": {f"p2p.{s}.{k}": v for s in cross for k, v in (("alpha", torch.ones(1, WORDS)), ("mapper", swap[None]))},
        "refine": {f"p2p.{s}.{k}": v for s in cross for k, v in (("alpha", refine_alpha[None]), ("mapper", torch.eye(WORDS)[refine_index].T[None].contiguous()))},
        "reweight": {f"p2p.{s}.{k}": v for s in cross for k, v in (("alpha", torch.ones(1, WORDS)), ("equalizer", equalizer))},
        "self_replace": {f"p2p.{s}.self_gate": torch.tensor(1.0) for s in selfs},
        "masactrl": {f"masactrl.{s}.gate": torch.tensor(1.0) for s in masactrl_selfs},
    }
    return cases, swap


def run_cases(out, model, hooks, store, cases, run, plain):
    """Each case's output (and hook values), the default's captured maps; the processors
    without control must compute what the plain model does."""
    for case, values in cases.items():
        hooks.values = values
        y = run(model)
        np.save(out / f"{case}.npy", y)
        if values:
            save_file({k: v.clone().contiguous().float() for k, v in values.items()}, out / f"{case}.safetensors")
        if case == "default":
            save_file({k: v.contiguous() for k, v in store.items()}, out / "capture.safetensors")
    base = np.load(out / "default.npy")
    plain = run(plain)
    assert np.linalg.norm(base - plain) / np.linalg.norm(plain) < 1e-5, "processors without control must equal the plain model"
    for case in cases:
        y = np.load(out / f"{case}.npy")
        print(f"{out.name}/{case}: output changed by rel L2 {np.linalg.norm(y - base) / np.linalg.norm(base):.4f}")


def prompts(gen, width):
    """One latent for every row, unconditional text repeated, then the P prompts."""
    latent = torch.randn(1, 4, 16, 16, generator=gen)
    uncond = torch.randn(1, WORDS, width, generator=gen)
    cond = torch.randn(P, WORDS, width, generator=gen)
    feeds = [latent.repeat(2 * P, 1, 1, 1), torch.full((2 * P,), 601.0), torch.cat([uncond.repeat(P, 1, 1), cond])]
    return latent, uncond, cond, feeds


def save_inputs(out, feeds):
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    for name, t in zip(("sample", "timestep", "encoder_hidden_states"), feeds):
        np.save(out / "inputs" / f"{name}.npy", t.numpy())


def joint_maps():
    """The joint attentions' image-to-text maps, from every scaled_dot_product_attention
    call's probabilities (diffusers' SD3 and Flux processors both go through it)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    import dits

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def probabilities(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        assert attn_mask is None and not is_causal and not kw.get("enable_gqa", False)
        s = scale if scale is not None else query.shape[-1] ** -0.5
        probs = torch.softmax(query @ key.transpose(-2, -1) * s, dim=-1)
        calls.append(probs)
        return probs @ value

    out = OUT / "joint"
    out.mkdir(parents=True, exist_ok=True)
    # fixture, model, its joint sites in call order, text tokens first?
    cases = [("sd3_legacy", SD3Transformer2DModel, dits.SD3, dits.Sd3Wrapper,
              ["transformer_blocks.0.attn", "transformer_blocks.1.attn"], False),
             ("flux_dynamo", FluxTransformer2DModel, dits.FLUX, dits.FluxWrapper,
              ["transformer_blocks.0.attn"], True)]
    torch.nn.functional.scaled_dot_product_attention = probabilities
    try:
        for name, cls, config, wrapper, sites, text_first in cases:
            folder = ROOT / name / "inputs"
            feeds = [torch.from_numpy(np.load(folder / f"{n}.npy"))
                     for n in wrapper.forward.__code__.co_varnames[1:wrapper.forward.__code__.co_argcount]]
            text = feeds[2].shape[1]
            calls.clear()
            with torch.no_grad():
                y = wrapper(dits.build(cls, config))(*feeds).numpy()
            ref = np.load(ROOT / name / "ref" / "out_sample.npy")
            assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5, "the probabilities must compute the model"
            maps = {}
            for site, probs in zip(sites, calls):
                image_to_text = probs[:, :, text:, :text] if text_first else probs[:, :, :-text, -text:]
                maps[f"attn.{site}"] = image_to_text.mean(1).contiguous()
            save_file(maps, out / f"{name}.safetensors")
            print(f"joint/{name}: {', '.join(f'{k} {tuple(v.shape)}' for k, v in maps.items())}")
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


def pixart():
    """The controls on PixArt-α's blocks (attn1 self-, attn2 cross-attention)."""
    from diffusers import PixArtTransformer2DModel
    import dits

    out = OUT / "pixart"
    _, _, _, feeds = prompts(torch.Generator().manual_seed(12), dits.PIXART["caption_channels"])
    save_inputs(out, feeds)
    store, hooks = {}, Hooks()
    build = lambda: dits.build(PixArtTransformer2DModel, dits.PIXART)
    model = with_hooks(build(), hooks, store)
    names = [n.removesuffix(".processor") for n in model.attn_processors]
    cross = [s for s in names if s.endswith("attn2")]
    selfs = [s for s in names if s.endswith("attn1")]
    cases, _ = control_cases(cross, selfs, selfs[1:])

    def run(m):
        with torch.no_grad():
            return dits.Wrapper(m)(*feeds).numpy()

    run_cases(out, model, hooks, store, cases, run, build())


def sites(unet):
    """Attention modules in the order the UNet calls them (down, mid, up): MasaCtrl counts
    layers in that order."""
    names = [n.removesuffix(".processor") for n in unet.attn_processors]
    part = lambda n: 0 if n.startswith("down") else 1 if n.startswith("mid") else 2
    return sorted(names, key=lambda n: (part(n), names.index(n)))


def run(unet, feeds):
    with torch.no_grad():
        return unets.Wrapper(unet, False)(*feeds).numpy()


def main():
    import sys
    if "--dit" in sys.argv:
        pixart()
        return joint_maps()
    OUT.mkdir(exist_ok=True)
    latent, uncond, cond, feeds = prompts(torch.Generator().manual_seed(11), 32)
    save_inputs(OUT, feeds)

    store = {}
    hooks = Hooks()
    unet = unet_with_hooks(hooks, store)
    names = sites(unet)
    cross = [s for s in names if s.endswith("attn2")]
    selfs = [s for s in names if s.endswith("attn1")]

    cases, swap = control_cases(cross, selfs, selfs[3:])
    run_cases(OUT, unet, hooks, store, cases, lambda m: run(m, feeds), unets.build_unet(unets.TINY_SD1, 0))
    sample(unet, hooks, store, latent, uncond, cond, cross, selfs, swap)
    pixart()
    joint_maps()


def sample(unet, hooks, store, latent, uncond, cond, cross, selfs, mapper):
    """A 4-step DDIM run with classifier-free guidance and a P2P controller (replace with a
    mapper, cross_replace_steps 0.8, self_replace_steps 0.4, reweight, LocalBlend on words
    [3] and [4] at 16x16) and MasaCtrl from step 2 on blocks 4.., as attune's sampler runs it."""
    steps, guidance = 4, 7.5
    folder = OUT / "sample"
    folder.mkdir(exist_ok=True)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(steps)
    np.save(folder / "cond.npy", cond.numpy())
    np.save(folder / "uncond.npy", uncond.numpy())
    np.save(folder / "latents.npy", latent.numpy())
    np.save(folder / "mapper.npy", mapper[None].numpy())
    toml = """# Prompt-to-Prompt + MasaCtrl controller for `attune sample` (see README)
[p2p]
mapper = "mapper.npy"
cross_replace_steps = 0.8
self_replace_steps = 0.4
equalizer = { 5 = 0.3 }

[local_blend]
words = [[3], [4]]
threshold = 0.3
resolution = 16

[masactrl]
start_step = 2
start_layer = 4
"""
    (folder / "controller.toml").write_text(toml)
    # Hook values per step, P2P's schedules: alpha over num_steps + 1 rows.
    alpha_steps = torch.zeros(steps + 1)
    alpha_steps[: int(0.8 * (steps + 1))] = 1
    self_end = int(steps * 0.4)
    equalizer = torch.ones(1, WORDS)
    equalizer[0, 5] = 0.3
    words = torch.zeros(P, WORDS)
    words[0, 3] = words[1, 4] = 1
    x = latent.repeat(P, 1, 1, 1)
    blend_maps = None
    for i, t in enumerate(sched.timesteps):
        values = {}
        for s in cross:
            values[f"p2p.{s}.alpha"] = torch.full((1, WORDS), float(alpha_steps[i]))
            values[f"p2p.{s}.mapper"] = mapper[None]
            values[f"p2p.{s}.equalizer"] = equalizer
        for s in selfs:
            values[f"p2p.{s}.self_gate"] = torch.tensor(1.0 if i < self_end else 0.0)
        for layer, s in enumerate(selfs):
            values[f"masactrl.{s}.gate"] = torch.tensor(1.0 if i >= 2 and layer >= 4 else 0.0)
        hooks.values = values
        with torch.no_grad():
            out = unets.Wrapper(unet, False)(torch.cat([x, x]), torch.full((2 * P,), float(t)), torch.cat([uncond.repeat(P, 1, 1), cond]))
        eps_u, eps_c = out.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x = sched.step(eps, t, x).prev_sample
        # LocalBlend on the maps accumulated over the steps so far (P2P's attention store).
        maps = [store[f"attn.{s}"][P:] for s in cross if store[f"attn.{s}"].shape[1] == 16 * 16]
        step_maps = torch.stack(maps).mean(0)  # [P, 256, 77]
        blend_maps = step_maps if blend_maps is None else blend_maps + step_maps
        m = (blend_maps * words[:, None, :]).sum(-1).reshape(P, 1, 16, 16)
        m = torch.nn.functional.max_pool2d(m, 3, 1, padding=1)
        m = torch.nn.functional.interpolate(m, size=x.shape[2:])
        m = m / m.amax(dim=(2, 3), keepdim=True)
        m = m.gt(0.3)
        m = (m[:1] | m[1:]).float()
        x = x[:1] + m * (x - x[:1])
    np.save(folder / "final_latents.npy", x.numpy())
    print(f"sample: final latents {tuple(x.shape)}")


if __name__ == "__main__":
    main()
