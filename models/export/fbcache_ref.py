"""References for `attune sample` on diffusion transformers compiled with `--step-cache
first-block[:THRESHOLD]` and `--step-cache teacache[:THRESHOLD]` (TeaCache: see `TeaCache`;
its cases in teacache.json and tea<threshold>.npy): ParaAttention's first-block cache (FBCache), written here in torch
over the tiny DiT fixtures (the torch models sampling.py builds, stepped as in sampling.py,
10 steps): every step runs transformer_blocks[0]; if its hidden-state residual differs from
the one of the last fully computed step by mean|prev - cur| / mean|prev| < threshold, the other
blocks are skipped and the first block's output gets the residual (last block's output - first
block's output) of that step added, as `para_attn.first_block_cache`'s
`CachedTransformerBlocks` does; else they run and the step's residuals are kept.

Writes models/fbcache/<case>/: the sampling inputs (as sampling.py's), scheduler_config.json,
uncached.npy, t<threshold>.npy final latents and cases.json (per threshold the steps that
computed every block and the smallest relative distance of a step's difference from the
threshold: thresholds too close to a difference are left out, as fp32 noise could flip them).

    venv/bin/python models/export/fbcache_ref.py
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel)

import dits
import sampling

OUT = Path(__file__).resolve().parents[1] / "fbcache"
STEPS = 10
THRESHOLDS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4]
TEA_THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2]


class FirstBlockCache:
    """Wraps a transformer's blocks (transformer_blocks, then single_transformer_blocks)."""

    def __init__(self, transformer, threshold):
        self.blocks = list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))
        self.threshold = threshold
        self.originals = [b.forward for b in self.blocks]
        self.prev = self.start = self.residual = None
        self.use = False
        self.computed, self.diffs, self.step = [], [], 0
        for i, b in enumerate(self.blocks):
            b.forward = self.wrap(i, self.originals[i])

    def remove(self):
        for b, f in zip(self.blocks, self.originals):
            b.forward = f

    @staticmethod
    def hidden(args, kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def wrap(self, i, forward):
        last = i == len(self.blocks) - 1

        def run(*args, **kwargs):
            h_in = self.hidden(args, kwargs)
            e_in = kwargs.get("encoder_hidden_states")
            joint = not isinstance(self.blocks[i], (dits_pixart_block(),))
            if i == 0:
                out = forward(*args, **kwargs)
                h1 = out[1] if isinstance(out, tuple) else out
                r1 = h1 - h_in
                if self.prev is None:
                    self.use = False
                else:
                    d = ((self.prev - r1).abs().mean() / self.prev.abs().mean()).item()
                    self.diffs.append(d)
                    self.use = d < self.threshold
                if not self.use:
                    self.prev, self.start = r1, h1
                    self.computed.append(self.step)
                self.step += 1
                return out
            if self.use:
                h = h_in + self.residual if last else h_in
                return (e_in, h) if isinstance_tuple_block(self.blocks[i]) else h
            out = forward(*args, **kwargs)
            if last:
                h_out = out[1] if isinstance(out, tuple) else out
                self.residual = h_out - self.start
            return out

        return run


FLUX_POLY = [4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01]


class TeaCache(FirstBlockCache):
    """TeaCache (TeaCache4FLUX's forward, generalised): the first block's attention input (the
    modulated hidden states) is compared with the last step's; its relative L1, rescaled by
    TeaCache4FLUX's polynomial for Flux (plain for the others: TeaCache publishes none),
    accumulates; under the threshold every block is skipped and the residual of all blocks on
    the last computed step is added to their input; the first and last steps compute. Block 0
    runs in every step here only to read its attention input (its output is dropped when
    skipping), which is what TeaCache computes separately."""

    def __init__(self, transformer, threshold, steps, flux):
        super().__init__(transformer, threshold)
        self.steps, self.poly, self.acc, self.prev_mod, self.mod = steps, FLUX_POLY if flux else None, 0.0, None, None
        attn = getattr(self.blocks[0], "attn1", None) or self.blocks[0].attn
        self.hook = attn.register_forward_pre_hook(self.capture, with_kwargs=True)

    def capture(self, module, args, kwargs):
        self.mod = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def remove(self):
        super().remove()
        self.hook.remove()

    def wrap(self, i, forward):
        last = i == len(self.blocks) - 1

        def run(*args, **kwargs):
            h_in = self.hidden(args, kwargs)
            e_in = kwargs.get("encoder_hidden_states")
            tuple_block = isinstance_tuple_block(self.blocks[i])
            if i == 0:
                out = forward(*args, **kwargs)
                cnt = self.step % self.steps
                if cnt == 0 or cnt == self.steps - 1:
                    compute, self.acc = True, 0.0
                else:
                    rel = ((self.mod - self.prev_mod).abs().mean() / self.prev_mod.abs().mean()).item()
                    self.acc += float(np.poly1d(self.poly)(rel)) if self.poly else rel
                    self.diffs.append(self.acc)
                    compute = self.acc >= self.threshold
                    if compute:
                        self.acc = 0.0
                self.prev_mod = self.mod
                self.use = not compute
                if compute:
                    self.start = h_in
                    self.computed.append(self.step)
                self.step += 1
                if self.use:
                    return (e_in, h_in) if tuple_block else h_in
            elif self.use:
                h = h_in + self.residual if last else h_in
                return (e_in, h) if tuple_block else h
            else:
                out = forward(*args, **kwargs)
            if last and not self.use:
                h_out = out[1] if isinstance(out, tuple) else out
                self.residual = h_out - self.start
            return out

        return run


def dits_pixart_block():
    from diffusers.models.attention import BasicTransformerBlock
    return BasicTransformerBlock


def isinstance_tuple_block(block):
    return not isinstance(block, dits_pixart_block())


def run_case(name, model, transformer, sched_factory, width, pooled_width=None, flux=False, guidance=sampling.GUIDANCE):
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sampling.STEPS = STEPS
    gen = torch.Generator().manual_seed(7)
    P, W = sampling.PROMPTS, sampling.WORDS
    latents = torch.randn(P, 4, 16, 16, generator=gen)
    cond = torch.randn(P, W, width, generator=gen)
    uncond = torch.randn(1, W, width, generator=gen)
    feeds = {"latents": latents, "cond": cond, "uncond": uncond}
    pooled = None
    if pooled_width:
        pooled = (torch.randn(P, pooled_width, generator=gen), torch.randn(1, pooled_width, generator=gen))
        feeds.update(pooled_cond=pooled[0], pooled_uncond=pooled[1])
    for k, v in feeds.items():
        np.save(folder / f"{k}.npy", v.numpy())
    sched_factory().save_config(folder)

    def sample():
        sched = sched_factory()
        if flux:
            return sampling.flux_loop(model, sched, latents, cond, uncond, pooled, guidance)[0]
        return sampling.loop(model, sched, latents, cond, uncond, pooled)[0]

    uncached = sample()
    np.save(folder / "uncached.npy", uncached.numpy())
    cases = []
    for t in THRESHOLDS:
        cache = FirstBlockCache(transformer, t)
        final = sample()
        cache.remove()
        margin = min((abs(d - t) / t for d in cache.diffs), default=1.0) if t > 0 else 1.0
        diff = float((final - uncached).norm() / uncached.norm())
        print(f"{name} threshold {t}: computed {cache.computed}, margin {margin:.3f}, rel L2 from uncached {diff:.2e}")
        if margin < 0.02:
            continue
        np.save(folder / f"t{t}.npy", final.numpy())
        cases.append(dict(threshold=t, computed=cache.computed, margin=margin, rel_l2_from_uncached=diff))
    (folder / "cases.json").write_text(json.dumps(dict(steps=STEPS, guidance=guidance, cases=cases), indent=1) + "\n")
    tea_cases = []
    for t in TEA_THRESHOLDS:
        cache = TeaCache(transformer, t, STEPS, flux)
        final = sample()
        cache.remove()
        margin = min((abs(d - t) / t for d in cache.diffs), default=1.0) if t > 0 else 1.0
        diff = float((final - uncached).norm() / uncached.norm())
        print(f"{name} TeaCache {t}: computed {cache.computed}, margin {margin:.3f}, rel L2 from uncached {diff:.2e}")
        if margin < 0.02:
            continue
        np.save(folder / f"tea{t}.npy", final.numpy())
        tea_cases.append(dict(threshold=t, computed=cache.computed, margin=margin, rel_l2_from_uncached=diff))
    (folder / "teacache.json").write_text(json.dumps(dict(steps=STEPS, guidance=guidance, cases=tea_cases), indent=1) + "\n")


def main():
    pixart_config = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0).config
    pixart = dits.build(PixArtTransformer2DModel, dits.PIXART)
    run_case("pixart", dits.Wrapper(pixart), pixart, lambda: DDIMScheduler.from_config(pixart_config),
             dits.PIXART["caption_channels"])
    sd3 = dits.build(SD3Transformer2DModel, dits.SD3)
    run_case("sd3", dits.Sd3Wrapper(sd3), sd3, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
             dits.SD3["joint_attention_dim"], dits.SD3["pooled_projection_dim"])
    flux = dits.build(FluxTransformer2DModel, dits.FLUX)
    run_case("flux", dits.FluxWrapper(flux), flux,
             lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                     base_image_seq_len=256, max_image_seq_len=4096),
             dits.FLUX["joint_attention_dim"], dits.FLUX["pooled_projection_dim"], flux=True, guidance=1.0)


if __name__ == "__main__":
    main()
