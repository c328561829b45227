"""References for `attune sample`'s schedulers: diffusers' own scheduler objects, built from a
scheduler_config.json as a pipeline folder ships it, stepping the fixtures' torch models with
classifier-free guidance the way diffusers' pipelines do. 4 steps, guidance 5, 2 prompts.

Writes models/sample/<case>/: scheduler_config.json (saved by diffusers), cond.npy [2, 8, D],
uncond.npy [1, 8, D], latents.npy [2, 4, 16, 16] (pooled_cond.npy, pooled_uncond.npy for SD3),
timesteps.npy (what the model was fed) and final_latents.npy.
- `sd2_vpred`: sd2_legacy, DDIMScheduler with v-prediction, `trailing` spacing and betas
  rescaled to zero terminal SNR;
- `pixart`: pixart_legacy, PixArt-α's DPMSolverMultistepScheduler config (linear betas
  0.0001-0.02, `linspace` spacing) run as `DDIMScheduler.from_config` (so DDIM's defaults fill
  the rest: clip_sample, set_alpha_to_one); the model predicts variance too (8 channels), the
  pipeline keeps the first 4;
- `pixart_dpm`: the same config as DPMSolverMultistepScheduler (DPM-Solver++ 2M, midpoint);
  `sd2_dpm`: sd2_legacy with DPM-Solver++ 2M, v-prediction, Heun's correction, leading spacing;
- `sd3`: sd3_legacy, FlowMatchEulerDiscreteScheduler with shift 3 (SD3's), pooled text;
- `sdxl`: sdxl_legacy, its pooled text as `text_embeds` and the pipeline's default time ids
  (original and target size the image's, no crop), SDXL's EulerDiscreteScheduler config read as
  DDIM; `sdxl_euler`: the same config as the Euler scheduler it is (noise scaled by its
  init_noise_sigma, inputs by scale_model_input);
- `sd3_dynamic`: the same with the shift set by the image's patch tokens
  (`use_dynamic_shifting`, linear `time_shift_type`);
- `flux`, `flux_cfg`: flux_dynamo, Flux-dev's dynamically shifted FlowMatchEulerDiscreteScheduler
  as FluxPipeline drives it (packed latents and their ids, its own σs, timestep/1000), guidance 1
  (its default: no CFG; the model is guidance-distilled) and true CFG at 5; latents are saved
  unpacked [2, 4, 16, 16]; `flux_dev`: flux_dev_dynamo with its embedded guidance at 3.5
  (FluxPipeline's default), no CFG;
(SD1.5's PNDM config, `sd15_pndm`, and the other samplers' cases: models/export/samplers.py.)

    python models/export/sampling.py
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel)

import dits
import unets

OUT = Path(__file__).resolve().parents[1] / "sample"
STEPS, GUIDANCE, PROMPTS, WORDS = 4, 5.0, 2, 8


def loop(model, sched, latents, cond, uncond, pooled=None):
    """diffusers' pipeline loop: CFG batch [uncond x P, cond x P], the scheduler's timesteps
    fed as they are, guidance, a learned variance dropped, one scheduler step."""
    kwargs = {}
    if sched.config.get("use_dynamic_shifting"):  # SD3's pipeline: shifted by the patch tokens
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
        patch = model.model.config.patch_size
        tokens = (latents.shape[2] // patch) * (latents.shape[3] // patch)
        c = sched.config
        kwargs["mu"] = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(STEPS, **kwargs)
    x = latents * getattr(sched, "init_noise_sigma", 1.0)
    context = torch.cat([uncond.repeat(PROMPTS, 1, 1), cond])
    extra = () if pooled is None else (torch.cat([pooled[1].repeat(PROMPTS, 1), pooled[0]]),)
    if getattr(model, "sdxl", False):
        # SDXL's micro-conditioning, as StableDiffusionXLPipeline._get_add_time_ids makes it
        # by default: original size and target size the image's (latent x 8), no crop.
        h, w = latents.shape[2] * 8, latents.shape[3] * 8
        extra += (torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(2 * PROMPTS, 1),)
    for t in sched.timesteps:
        with torch.no_grad():
            batch = torch.cat([x, x])
            if hasattr(sched, "scale_model_input"):
                batch = sched.scale_model_input(batch, t)
            out = model(batch, t.expand(2 * PROMPTS).float(), context, *extra)
        u, c = out.chunk(2)
        guided = u + GUIDANCE * (c - u)
        if guided.shape[1] == 2 * x.shape[1]:
            guided = guided.chunk(2, dim=1)[0]
        x = sched.step(guided, t, x).prev_sample
    return x, sched.timesteps


def flux_loop(model, sched, latents, cond, uncond, pooled, guidance, embedded=None):
    """FluxPipeline's loop: latents packed into 2x2-patch tokens with their ids, its own σs
    (1 to 1/steps) shifted by the token count, timestep/1000, true CFG above 1."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
    _, c, h, w = latents.shape
    x = FluxPipeline._pack_latents(latents, PROMPTS, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(PROMPTS, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(cond.shape[1], 3)
    cfg = sched.config
    mu = calculate_shift(x.shape[1], cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    timesteps, _ = retrieve_timesteps(sched, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    extra = () if embedded is None else (torch.full([PROMPTS], embedded),)
    for t in timesteps:
        def velocity(text, pool):
            with torch.no_grad():
                return model(x, t.expand(PROMPTS) / 1000, text, pool, img_ids, txt_ids, *extra)
        v = velocity(cond, pooled[0])
        if guidance > 1:
            neg = velocity(uncond.repeat(PROMPTS, 1, 1), pooled[1].repeat(PROMPTS, 1))
            v = neg + guidance * (v - neg)
        x = sched.step(v, t, x).prev_sample
    return FluxPipeline._unpack_latents(x, h * 8, w * 8, 8), timesteps


def case(name, model, sched, width, pooled_width=None, guidance=GUIDANCE, flux=False, embedded=None):
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sched.save_config(folder)
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(PROMPTS, 4, 16, 16, generator=gen)
    cond = torch.randn(PROMPTS, WORDS, width, generator=gen)
    uncond = torch.randn(1, WORDS, width, generator=gen)
    feeds = {"latents": latents, "cond": cond, "uncond": uncond}
    pooled = None
    if pooled_width:
        pooled = (torch.randn(PROMPTS, pooled_width, generator=gen), torch.randn(1, pooled_width, generator=gen))
        feeds.update(pooled_cond=pooled[0], pooled_uncond=pooled[1])
    if flux:
        final, timesteps = flux_loop(model, sched, latents, cond, uncond, pooled, guidance, embedded)
    else:
        final, timesteps = loop(model, sched, latents, cond, uncond, pooled)
    for k, v in feeds.items():
        np.save(folder / f"{k}.npy", v.numpy())
    np.save(folder / "timesteps.npy", timesteps.numpy().astype(np.float32))
    np.save(folder / "final_latents.npy", final.numpy())
    moved = float((final - latents).norm() / latents.norm())
    print(f"{name}: timesteps {[round(float(t), 3) for t in timesteps]}, latents moved by rel L2 {moved:.3f}")


def main():
    sd2 = unets.Wrapper(unets.build_unet(unets.TINY_SD2, 0), False)
    case("sd2_vpred", sd2, DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
        timestep_spacing="trailing", rescale_betas_zero_snr=True), unets.TINY_SD2["cross_attention_dim"])
    pixart_config = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0).config
    pixart = dits.Wrapper(dits.build(PixArtTransformer2DModel, dits.PIXART))
    case("pixart", pixart, DDIMScheduler.from_config(pixart_config), dits.PIXART["caption_channels"])
    # The case's config file is the DPMSolver one a PixArt folder ships, not DDIM's.
    DPMSolverMultistepScheduler.from_config(pixart_config).save_config(OUT / "pixart")
    # The same config as the DPM-Solver++ (2M, midpoint) it is.
    case("pixart_dpm", pixart, DPMSolverMultistepScheduler.from_config(pixart_config), dits.PIXART["caption_channels"])
    # DPM-Solver++ with v-prediction, Heun's correction and leading spacing (SD2).
    case("sd2_dpm", sd2, DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        prediction_type="v_prediction", solver_type="heun", timestep_spacing="leading"),
        unets.TINY_SD2["cross_attention_dim"])
    sd3 = dits.Sd3Wrapper(dits.build(SD3Transformer2DModel, dits.SD3))
    case("sd3", sd3, FlowMatchEulerDiscreteScheduler(shift=3.0), dits.SD3["joint_attention_dim"],
         dits.SD3["pooled_projection_dim"])
    case("sd3_dynamic", sd3, FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                             time_shift_type="linear"),
         dits.SD3["joint_attention_dim"], dits.SD3["pooled_projection_dim"])
    # Flux-dev's scheduler config (shift by the image's token count) on the Flux fixture,
    # which has no guidance embedding: without CFG (FluxPipeline's default) and with true CFG.
    flux = dits.FluxWrapper(dits.build(FluxTransformer2DModel, dits.FLUX))
    flux_sched = lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    for name, guidance in [("flux", 1.0), ("flux_cfg", GUIDANCE)]:
        case(name, flux, flux_sched(), dits.FLUX["joint_attention_dim"], dits.FLUX["pooled_projection_dim"],
             guidance, flux=True)
    # Flux-dev's embedded guidance (FluxPipeline's guidance_scale, default 3.5), no CFG.
    flux_dev = dits.FluxDevWrapper(dits.build(FluxTransformer2DModel, dits.FLUX_DEV))
    case("flux_dev", flux_dev, flux_sched(), dits.FLUX["joint_attention_dim"], dits.FLUX["pooled_projection_dim"],
         1.0, flux=True, embedded=3.5)
    # SDXL: pooled text as `text_embeds`, time ids; its pipeline folder's scheduler config
    # (stabilityai/stable-diffusion-xl-base-1.0: an EulerDiscreteScheduler's) read as DDIM.
    sdxl_config = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                   "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                   "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                   "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
    sdxl = unets.Wrapper(unets.build_unet(unets.TINY_SDXL, 0), True)
    text_dim = unets.TINY_SDXL["projection_class_embeddings_input_dim"] - 6 * unets.TINY_SDXL["addition_time_embed_dim"]
    for name, sched in [("sdxl", DDIMScheduler), ("sdxl_euler", EulerDiscreteScheduler)]:
        case(name, sdxl, sched.from_config(sdxl_config), unets.TINY_SDXL["cross_attention_dim"], text_dim)
        (OUT / name / "scheduler_config.json").write_text(json.dumps(sdxl_config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
