"""References for the samplers people pick (`attune sample --scheduler-config`): diffusers'
own scheduler objects, built as a pipeline folder's scheduler_config.json builds them,
stepping the fixtures' torch UNets the way diffusers' pipelines loop (classifier-free guidance
5 over 2 prompts, `scale_model_input`, `init_noise_sigma`). Stochastic schedulers get their
noise from a list drawn beforehand (their module's `randn_tensor` replaced), saved as
noise.npy [draws, 2, 4, 16, 16] in the order they took it, for `--noise-file`.

Writes models/sample/<case>/: scheduler_config.json (saved by diffusers), cond.npy,
uncond.npy, latents.npy, timesteps.npy (what the model was fed, per call), final_latents.npy
and noise.npy where the scheduler draws noise. The UNets are sd15_legacy's, sd2_legacy's
(v-prediction cases) and lcm_legacy's, an LCM-distilled UNet (sd15_legacy's config with
`time_cond_proj_dim` 8, so it takes `timestep_cond`), which this script also exports.

Also writes models/pipelines/sd15_tiny/reference/samplers/<case>/ for `attune generate` on the
folder (pipelines.py's torch pipeline rebuilt): `txt2img_pndm` (StableDiffusionPipeline with the
folder's own PNDMScheduler config, as diffusers loads it), `img2img_heun` and
`img2img_euler_ancestral` (StableDiffusionImg2ImgPipeline, strength 0.75 of 4 steps: Heun starts
at call 2·t_start; the ancestral steps' noise saved as noise.npy), with latents.npy (the
txt2img noise, or img2img's noise drawn by the pipeline), input.png, final_latents.npy and
image.npy; and models/pipelines/lcm_tiny, a LatentConsistencyModelPipeline folder with its
reference (see `lcm_pipeline`).

    python models/export/samplers.py
"""
import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSDEScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, LCMScheduler, PNDMScheduler, TCDScheduler, UniPCMultistepScheduler)

import unets

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sample"
PROMPTS, WORDS, GUIDANCE = 2, 8, 5.0
# Stable Diffusion's training schedule, as its folders configure every scheduler.
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
LCM_CONFIG = dict(unets.TINY_SD1, time_cond_proj_dim=8)


class Draws:
    """The noise a scheduler asks `randn_tensor` for, from draws made beforehand."""

    def __init__(self, module):
        self.module = importlib.import_module(module)
        self.original = self.module.randn_tensor
        gen = torch.Generator().manual_seed(11)
        self.pool = [torch.randn(PROMPTS, 4, 16, 16, generator=gen) for _ in range(64)]
        self.taken = []

    def __enter__(self):
        def draw(shape, generator=None, device=None, dtype=None, layout=None):
            noise = self.pool[len(self.taken)]
            assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
            self.taken.append(noise)
            return noise.to(dtype or torch.float32)
        self.module.randn_tensor = draw
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self.original


class BrownianDraws:
    """What DPMSolverSDEScheduler's Brownian-tree noise sampler returns, in order."""

    def __init__(self):
        from diffusers.schedulers import scheduling_dpmsolver_sde as module
        self.cls = module.BrownianTreeNoiseSampler
        self.original = self.cls.__call__
        self.taken = []

    def __enter__(self):
        def call(sampler, sigma, sigma_next):
            noise = self.original(sampler, sigma, sigma_next)
            self.taken.append(noise.clone())
            return noise
        self.cls.__call__ = call
        return self

    def __exit__(self, *exc):
        self.cls.__call__ = self.original


class LcmWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         return_dict=False)[0]


def guidance_embedding(w, dim):
    """LatentConsistencyModelPipeline.get_guidance_scale_embedding."""
    w = w * 1000.0
    half = dim // 2
    emb = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * emb[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def loop(unet, sched, steps, latents, cond, uncond, guidance, lcm_unet=False, eta=None):
    """diffusers' pipeline loop: CFG batch [uncond x P, cond x P] above guidance 1 (none for an
    LCM-distilled UNet, which takes the guidance embedded), one scheduler step per call."""
    sched.set_timesteps(steps)
    x = latents * sched.init_noise_sigma
    cfg = guidance > 1 and not lcm_unet
    context = torch.cat([uncond.repeat(PROMPTS, 1, 1), cond]) if cfg else cond
    extra = ()
    if lcm_unet:
        extra = (guidance_embedding(torch.tensor(guidance - 1).repeat(PROMPTS), LCM_CONFIG["time_cond_proj_dim"]),)
    for t in sched.timesteps:
        with torch.no_grad():
            batch = torch.cat([x, x]) if cfg else x
            batch = sched.scale_model_input(batch, t)
            out = unet(batch, t.expand(batch.shape[0]).float(), context, *extra)
        if cfg:
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        x = sched.step(out, t, x, **({} if eta is None else {"eta": eta})).prev_sample
    return x, sched.timesteps


def case(name, unet, sched, steps, width=32, guidance=GUIDANCE, noise_module=None, lcm_unet=False, config=None,
         eta=None):
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sched.save_config(folder)
    if config is not None:  # the file as a pipeline folder ships it
        (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(PROMPTS, 4, 16, 16, generator=gen)
    cond = torch.randn(PROMPTS, WORDS, width, generator=gen)
    uncond = torch.randn(1, WORDS, width, generator=gen)
    if noise_module == "brownian":
        with BrownianDraws() as draws:
            final, timesteps = loop(unet, sched, steps, latents, cond, uncond, guidance, lcm_unet, eta)
        np.save(folder / "noise.npy", torch.stack(draws.taken).numpy())
    elif noise_module:
        with Draws(noise_module) as draws:
            final, timesteps = loop(unet, sched, steps, latents, cond, uncond, guidance, lcm_unet, eta)
        np.save(folder / "noise.npy", torch.stack(draws.taken).numpy())
    else:
        final, timesteps = loop(unet, sched, steps, latents, cond, uncond, guidance, lcm_unet, eta)
    for k, v in {"latents": latents, "cond": cond, "uncond": uncond}.items():
        np.save(folder / f"{k}.npy", v.numpy())
    np.save(folder / "timesteps.npy", timesteps.numpy().astype(np.float32))
    np.save(folder / "final_latents.npy", final.numpy())
    moved = float((final - latents).norm() / latents.norm())
    drawn = f", {len(draws.taken)} noise draws" if noise_module else ""
    print(f"{name}: {len(timesteps)} calls {[round(float(t), 2) for t in timesteps]}{drawn}, moved {moved:.3f}")


def export_lcm_unet():
    """sd15_legacy's UNet with a guidance embedding (LCM-distilled UNets' `timestep_cond`)."""
    unet = unets.build_unet(LCM_CONFIG, 3)
    model = LcmWrapper(unet).eval()
    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([500.0, 500.0]),
            torch.randn(2, WORDS, 32, generator=gen), torch.randn(2, 8, generator=gen))
    names = ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"}, "timestep_cond": {0: "batch"},
            "out_sample": {0: "batch", 2: "height", 3: "width"}}
    path = ROOT / "lcm_legacy" / "unet.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_name("raw.onnx")
    torch.onnx.export(model, args, str(raw), dynamo=False, opset_version=17, input_names=names,
                      output_names=["out_sample"], dynamic_axes=axes)
    m = onnx.load(str(raw))
    raw.unlink()
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return model


def pipeline_cases():
    import diffusers
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
    import controlnet
    import pipelines as P
    pipe = controlnet.rebuilt("sd15_tiny")
    folder = ROOT / "pipelines" / "sd15_tiny"
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    out = folder / "reference" / "samplers"
    shutil.rmtree(out, ignore_errors=True)
    size = 16
    lat_shape = (1, 4, size // 2, size // 2)  # the tiny VAE halves
    latents = P.noise(lat_shape, 5)

    def txt2img(p, cb, names):
        return p(P.PROMPT_A, negative_prompt="", num_inference_steps=P.STEPS, guidance_scale=P.GUIDANCE,
                 latents=latents, height=size, width=size, output_type="np", callback_on_step_end=cb,
                 callback_on_step_end_tensor_inputs=names)
    # The folder's scheduler config as diffusers loads it (the rebuilt pipeline's differs).
    pipe.scheduler = diffusers.PNDMScheduler.from_config(config)
    arrays = P.run_case(pipe, None, txt2img, scheduler="PNDM")
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    P.save(out / "txt2img_pndm", {**arrays, "latents": latents})
    image = P.input_image(size)
    ip = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    ip.set_progress_bar_config(disable=True)

    def img2img(p, cb, names):
        return p(P.PROMPT_A, image=image, strength=P.STRENGTH, negative_prompt="", num_inference_steps=P.STEPS,
                 guidance_scale=P.GUIDANCE, output_type="np", callback_on_step_end=cb,
                 callback_on_step_end_tensor_inputs=names)
    for case, scheduler, module in [
        ("img2img_heun", "HeunDiscrete", None),
        ("img2img_euler_ancestral", "EulerAncestralDiscrete",
         "diffusers.schedulers.scheduling_euler_ancestral_discrete"),
    ]:
        with P.encoder_mean(), P.fixed_noise(img2img_module, latents):
            if module:
                draws = Draws(module)
                draws.pool = [P.noise(lat_shape, 20 + k) for k in range(8)]
                with draws:
                    arrays = P.run_case(ip, None, img2img, scheduler=scheduler)
                arrays["noise"] = torch.stack(draws.taken)
            else:
                arrays = P.run_case(ip, None, img2img, scheduler=scheduler)
        P.save(out / case, {**arrays, "latents": latents})
        image.save(out / case / "input.png")
        print(f"{case}: calls {[round(float(t), 2) for t in arrays['timesteps']]}")
    (out / "README").write_text(
        "References of models/export/samplers.py for `attune generate` on sd15_tiny: the folder's\n"
        f"scheduler config ({config['_class_name']}) as PNDM, and img2img with Heun and Euler ancestral.\n")


def lcm_pipeline():
    """models/pipelines/lcm_tiny: a LatentConsistencyModelPipeline folder, sd15_tiny's text encoder,
    tokenizer and VAE decoder with an LCM-distilled UNet of sd15_tiny's config (time_cond_proj_dim
    8, exported with `timestep_cond` as optimum names it) and LCMScheduler; reference/lcm: diffusers'
    pipeline, 4 steps at guidance 8.5 (its default), given latents, its noise replayed."""
    import diffusers
    from diffusers import UNet2DConditionModel
    import controlnet
    import pipelines as P
    pipe = controlnet.rebuilt("sd15_tiny")
    src, out = ROOT / "pipelines" / "sd15_tiny", ROOT / "pipelines" / "lcm_tiny"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for comp in ["text_encoder", "tokenizer", "vae_decoder"]:
        shutil.copytree(src / comp, out / comp)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = 8
    torch.manual_seed(4)
    unet = unets.perturb(UNet2DConditionModel(**config).eval())
    (out / "unet").mkdir()
    unet.save_config(out / "unet")
    model = LcmWrapper(unet).eval()
    gen = torch.Generator().manual_seed(1)
    width = config["cross_attention_dim"]
    args = (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, width, generator=gen), torch.randn(2, 8, generator=gen))
    names = ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"}, "timestep_cond": {0: "batch"},
            "out_sample": {0: "batch", 2: "height", 3: "width"}}
    torch.onnx.export(model, args, str(out / "unet" / "model.onnx"), dynamo=False, opset_version=17,
                      input_names=names, output_names=["out_sample"], dynamic_axes=axes)
    scheduler = LCMScheduler(**SD)
    scheduler.save_config(out / "scheduler")
    index = json.loads((src / "model_index.json").read_text())
    index.update(_class_name="LatentConsistencyModelPipeline", _name_or_path="lcm_tiny",
                 scheduler=["diffusers", "LCMScheduler"])
    for key in ["image_encoder", "requires_safety_checker"]:
        index.pop(key, None)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    lcm = diffusers.LatentConsistencyModelPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    lcm.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.load(src / "reference" / "txt2img_a" / "latents.npy"))
    captured = []
    with Draws("diffusers.schedulers.scheduling_lcm") as draws:
        draws.pool = [P.noise(latents.shape, 30 + k) for k in range(8)]
        with torch.no_grad():
            image = lcm(P.PROMPT_A, num_inference_steps=4, guidance_scale=8.5, latents=latents, height=16, width=16,
                        output_type="np", callback_on_step_end=lambda p, i, t, kw: captured.append(kw["denoised"]) or kw,
                        callback_on_step_end_tensor_inputs=["latents", "denoised"]).images
    ref = out / "reference" / "lcm"
    P.save(ref, {"latents": latents, "final_latents": captured[-1], "image": image.astype(np.float32),
                 "noise": torch.stack(draws.taken)})
    print(f"lcm_tiny: {len(draws.taken)} noise draws, image {image.shape}")


def main():
    sd15 = unets.Wrapper(unets.build_unet(unets.TINY_SD1, 0), False)
    sd2 = unets.Wrapper(unets.build_unet(unets.TINY_SD2, 0), False)
    # SD1.5's own folder: PNDM (PLMS) with its skip_prk_steps, 4 steps = 5 calls. The file keeps
    # the `clip_sample: false` SD1.5's folder has (PNDM does not use it).
    pndm = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **SD)
    config = {"_class_name": "PNDMScheduler", **{k: v for k, v in pndm.config.items() if not k.startswith("_")},
              "clip_sample": False}
    case("sd15_pndm", sd15, pndm, 4, config=config)
    case("pndm_vpred_trailing", sd2, PNDMScheduler(skip_prk_steps=True, prediction_type="v_prediction",
                                                   timestep_spacing="trailing", **SD), 5)
    module = "diffusers.schedulers.scheduling_euler_ancestral_discrete"
    case("euler_ancestral", sd15, EulerAncestralDiscreteScheduler(**SD), 4, noise_module=module)
    case("euler_ancestral_vpred", sd2, EulerAncestralDiscreteScheduler(
        prediction_type="v_prediction", timestep_spacing="trailing", **SD), 4, noise_module=module)
    case("euler_karras", sd15, EulerDiscreteScheduler(use_karras_sigmas=True, **SD), 4)
    case("euler_exponential_sigma_min", sd15, EulerDiscreteScheduler(
        use_exponential_sigmas=True, final_sigmas_type="sigma_min", **SD), 4)
    case("heun", sd15, HeunDiscreteScheduler(**SD), 4)
    case("heun_beta_vpred", sd2, HeunDiscreteScheduler(use_beta_sigmas=True, prediction_type="v_prediction",
                                                       **SD), 3)
    case("dpm_karras", sd15, DPMSolverMultistepScheduler(use_karras_sigmas=True, **SD), 6)
    case("dpm3m", sd15, DPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min",
                                                    lower_order_final=False, **SD), 6)
    module = "diffusers.schedulers.scheduling_dpmsolver_multistep"
    case("dpm_sde_karras", sd15, DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True,
                                                             **SD), 6, noise_module=module)
    case("dpm3m_sde_heun_beta", sd2, DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun", use_beta_sigmas=True,
        prediction_type="v_prediction", **SD), 6, noise_module=module)
    case("dpm_sde_exponential", sd15, DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", solver_type="heun", use_exponential_sigmas=True, **SD), 5,
        noise_module=module)
    # DPM++ SDE: two calls per step, Brownian-tree noise over both intervals.
    case("dpm_sde_single_karras", sd15, DPMSolverSDEScheduler(use_karras_sigmas=True, noise_sampler_seed=3, **SD), 4,
         noise_module="brownian")
    case("dpm_sde_single_vpred", sd2, DPMSolverSDEScheduler(prediction_type="v_prediction", noise_sampler_seed=3,
                                                            timestep_spacing="trailing", **SD), 3,
         noise_module="brownian")
    case("unipc", sd15, UniPCMultistepScheduler(**SD), 5)
    # bh1 ends at σ = 0 in NaN in diffusers (B(h) = h is infinite there, times a zero
    # residual); its references end at the smallest σ instead.
    case("unipc3_bh1_karras", sd15, UniPCMultistepScheduler(solver_order=3, solver_type="bh1", use_karras_sigmas=True,
                                                            final_sigmas_type="sigma_min", **SD), 6)
    case("unipc_noise_vpred", sd2, UniPCMultistepScheduler(
        predict_x0=False, prediction_type="v_prediction", timestep_spacing="trailing", disable_corrector=[1],
        final_sigmas_type="sigma_min", **SD), 5)
    case("unipc3_exponential", sd15, UniPCMultistepScheduler(solver_order=3, use_exponential_sigmas=True, **SD), 5)
    module = "diffusers.schedulers.scheduling_lcm"
    # LCM-LoRA style: LCMScheduler on a plain UNet, the prompts alone (guidance 1).
    case("lcm_plain", sd15, LCMScheduler(**SD), 4, guidance=1.0, noise_module=module)
    # An LCM-distilled UNet: guidance 8 as its embedding, no CFG batch.
    lcm = export_lcm_unet()
    case("lcm", lcm, LCMScheduler(**SD), 4, guidance=8.0, noise_module=module, lcm_unet=True)
    # The pipelines' eta: DDIM's stochastic steps, TCD's gamma.
    case("ddim_eta", sd15, DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **SD), 4, eta=0.5,
         noise_module="diffusers.schedulers.scheduling_ddim")
    case("tcd", sd15, TCDScheduler(**SD), 4, eta=0.3, noise_module="diffusers.schedulers.scheduling_tcd")
    pipeline_cases()
    lcm_pipeline()


if __name__ == "__main__":
    main()
