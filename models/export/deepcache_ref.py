"""References for `attune sample --cache-interval` on UNets compiled with `--step-cache
deepcache[:BRANCH]`: DeepCache's own helper (`DeepCache.DeepCacheSDHelper` from the `deepcache`
package, 0.1.1) wrapping the fixtures' torch UNets (rebuilt from their spec.json and seed, and
checked against the fixtures' saved ONNX outputs), stepped by diffusers' DDIMScheduler with
classifier-free guidance as StableDiffusionPipeline(XL) does: the UNet called as the pipelines
call it, `unet(latents, t, encoder_hidden_states=...)`, so the helper's step counter (the index
of t in scheduler.timesteps) works.

Uniform: `set_params(cache_interval, cache_branch_id, skip_mode='uniform')`, as the helper is
documented. Non-uniform: the helper's own non-uniform mode never refreshes after step 0 in
0.1.1 (`is_skip_step` checks the interval only in uniform mode), so the refresh steps are those
of DeepCache's pipelines (`uniform=False`: ceil(steps/interval) steps from
`sample_from_quad_center(steps, n, center, pow)`, imported from DeepCache.sd), and the helper's
block rule decides what is skipped on the others.

Writes models/deepcache/<fixture>/: cond.npy, uncond.npy [1, 8, D], latents.npy [1, 4, 16, 16]
(text_embeds_cond/uncond.npy for SDXL), scheduler_config.json, uncached.npy (no cache) and
<case>.npy final latents for each case, cases.json (interval, branch, mode, center, pow and the
refresh steps the reference took).

    venv/bin/pip install deepcache && venv/bin/python models/export/deepcache_ref.py
"""
import json
import types
from pathlib import Path

import numpy as np
import torch
import DeepCache
from DeepCache import DeepCacheSDHelper
from diffusers import DDIMScheduler

import unets

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "deepcache"
STEPS, GUIDANCE, WORDS = 10, 5.0, 8
CASES = {
    "sd15_legacy": [(2, 0, "uniform"), (3, 0, "uniform"), (3, 3, "uniform"), (3, 1, "uniform"),
                    (3, 0, "non-uniform"), (1, 0, "uniform")],
    "sdxl_legacy": [(2, 0, "uniform"), (3, 3, "uniform"), (3, 3, "non-uniform")],
}
CENTER, POW = 4, 1.4


def pipeline_function(name):
    """A function of DeepCache's SD pipeline module, taken from its source: the module itself
    no longer imports with current diffusers (it imports diffusers' removed PositionNet)."""
    import ast
    path = Path(DeepCache.__file__).parent / "sd" / "pipeline_stable_diffusion.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"np": np}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), scope)
    return scope[name]


sample_from_quad_center = pipeline_function("sample_from_quad_center")


class PipelineRefresh(DeepCacheSDHelper):
    """The helper's block rule, refreshed on the steps DeepCache's pipelines refresh on."""

    def __init__(self, pipe, refresh):
        super().__init__(pipe=pipe)
        self.refresh = set(refresh)

    def is_skip_step(self, block_i, layer_i, blocktype="down"):
        if self.cur_timestep in self.refresh:
            return False
        p = self.params
        if block_i > p["cache_block_id"] or blocktype == "mid":
            return True
        if block_i < p["cache_block_id"]:
            return False
        return layer_i >= p["cache_layer_id"] if blocktype == "down" else layer_i > p["cache_layer_id"]


def run(unet, sched, latents, cond, uncond, added):
    sched.set_timesteps(STEPS)
    x = latents * sched.init_noise_sigma
    context = torch.cat([uncond, cond])
    for t in sched.timesteps:
        with torch.no_grad():
            batch = sched.scale_model_input(torch.cat([x, x]), t)
            out = unet(batch, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]
        u, c = out.chunk(2)
        x = sched.step(u + GUIDANCE * (c - u), t, x).prev_sample
    return x


def refresh_steps(interval, mode):
    if interval == 1:
        return list(range(STEPS))
    if mode == "uniform":
        return list(range(0, STEPS, interval))
    n = STEPS // interval + (STEPS % interval != 0)
    steps, _ = sample_from_quad_center(STEPS, n, center=CENTER, pow=POW)
    return sorted(int(s) for s in steps)


def main():
    for name, cases in CASES.items():
        spec = json.loads((ROOT / name / "spec.json").read_text())
        config = spec["config"]
        unet = unets.build_unet(config, seed=0)
        # The rebuilt torch UNet is the exported one: its output on the fixture's inputs.
        inputs = {i["name"]: torch.from_numpy(np.load(ROOT / name / "inputs" / f"{i['name']}.npy"))
                  for i in spec["inputs"]}
        sdxl = "text_embeds" in inputs
        with torch.no_grad():
            got = unets.Wrapper(unet, sdxl)(*inputs.values()).numpy()
        want = np.load(ROOT / name / "ref" / "out_sample.npy")
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-5, f"{name}: rebuilt UNet is {err} from the fixture"
        gen = torch.Generator().manual_seed(7)
        dim = config["cross_attention_dim"]
        cond, uncond = torch.randn(1, WORDS, dim, generator=gen), torch.randn(1, WORDS, dim, generator=gen)
        latents = torch.randn(1, config["in_channels"], 16, 16, generator=gen)
        added = None
        out = OUT / name
        out.mkdir(parents=True, exist_ok=True)
        if sdxl:
            text_dim = inputs["text_embeds"].shape[1]
            pc, pu = torch.randn(1, text_dim, generator=gen), torch.randn(1, text_dim, generator=gen)
            # StableDiffusionXLPipeline's default time ids: original = target = the image's size.
            ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(2, 1)
            added = {"text_embeds": torch.cat([pu, pc]), "time_ids": ids}
            np.save(out / "text_embeds_cond.npy", pc.numpy())
            np.save(out / "text_embeds_uncond.npy", pu.numpy())
        # Stable Diffusion's DDIM schedule.
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        sched.save_config(out)
        for n_, a in [("cond", cond), ("uncond", uncond), ("latents", latents)]:
            np.save(out / f"{n_}.npy", a.numpy())
        pipe = types.SimpleNamespace(unet=unet, scheduler=sched)
        uncached = run(unet, sched, latents, cond, uncond, added)
        np.save(out / "uncached.npy", uncached.numpy())
        manifest = []
        for interval, branch, mode in cases:
            refresh = refresh_steps(interval, mode)
            helper = DeepCacheSDHelper(pipe=pipe) if mode == "uniform" else PipelineRefresh(pipe, refresh)
            helper.set_params(cache_interval=interval, cache_branch_id=branch,
                              skip_mode="uniform" if mode == "uniform" else "non-uniform")
            helper.enable()
            final = run(unet, sched, latents, cond, uncond, added)
            helper.disable()
            case = f"{mode}_i{interval}_b{branch}"
            np.save(out / f"{case}.npy", final.numpy())
            diff = float(np.linalg.norm(final - uncached) / np.linalg.norm(uncached))
            manifest.append(dict(case=case, interval=interval, branch=branch, mode=mode, center=CENTER, pow=POW,
                                 refresh=refresh, rel_l2_from_uncached=diff))
            print(name, case, "refresh", refresh, "rel L2 from uncached", f"{diff:.3e}")
        (out / "cases.json").write_text(json.dumps(dict(steps=STEPS, guidance=GUIDANCE, cases=manifest), indent=1) + "\n")


if __name__ == "__main__":
    main()
