"""An SD1.5-size StableDiffusionPipeline with random weights, for the whole-pipeline benchmark
(benches/pipeline_sd15_cpu.sh). Never committed: 4.3 GB as a torch folder, 4.3 GB as ONNX.

The components have SD1.5's configs, written out here (no hub access): CLIPTextModel (ViT-L/14's
text tower: 12 layers, hidden 768, 12 heads, 77 positions, quick_gelu, SD1.5's legacy bos/eos/pad
ids 0/2/1) with the real CLIP vocabulary and tokenizer files as models/export/pipelines.py builds
them, UNet2DConditionModel (SD1.5's unet/config.json: 320/640/1280/1280, 2 layers per block,
cross_attention_dim 768, 8 heads), AutoencoderKL (SD's vae/config.json: 128/256/512/512, f = 8,
scaling_factor 0.18215) and SD1.5's PNDMScheduler config as the hub ships it. Weights are the
libraries' default initialisation at fixed seeds (text 0, UNet 1, VAE 2), untouched, so
activations stay in range and the images are finite.

The torch folder (`models/large/sd15_pipeline_torch/`, saved with diffusers' save_pretrained, the
text encoder's keys with the `text_model.` prefix that transformers 4 needs) is exported the way
users export, with optimum-onnx's `main_export` (task text-to-image) in the optimum venv, to
`models/large/sd15_pipeline/` (optimum's layout; the 3.4 GB UNet as `unet/model.onnx` with its
weights in `unet/model.onnx_data`). Then each ONNX component is checked against its torch
module in onnxruntime on small inputs (max abs diff printed; the UNet on an 8x8 latent).

    venv/bin/python models/export/pipeline_large.py            # both folders, if absent
    venv/bin/python models/export/pipeline_large.py --force    # rebuild both
    venv/bin/python models/export/pipeline_large.py --no-check
    venv/bin/python models/export/pipeline_large.py --check-only

Needs the optimum venv (`venv/bin/python models/export/pipelines.py --setup-optimum`). On the
2-core, 24 GB VM: peak RSS about 10 GB (the UNet's torch export), a few minutes.
"""
import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pipelines  # noqa: E402  (the tokenizer files, scheduler config and optimum export)

ROOT = HERE.parents[1]
LARGE = ROOT / "models" / "large"
TORCH_DIR = LARGE / "sd15_pipeline_torch"
ONNX_DIR = LARGE / "sd15_pipeline"

# openai/clip-vit-large-patch14's text config as SD1.5's text_encoder/config.json has it.
TEXT = dict(vocab_size=pipelines.VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=pipelines.MAX_LENGTH, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# SD1.5's unet/config.json.
UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
            freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
            norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
# SD1.5's vae/config.json.
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SEEDS = dict(text_encoder=0, unet=1, vae=2)


def build_torch(folder):
    """The pipeline at fixed seeds, saved into `folder`; components freed as soon as saved."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    tok_dir = LARGE / "sd15_pipeline_tok"
    pipelines.write_tokenizer(tok_dir, "<|endoftext|>")
    torch.manual_seed(SEEDS["text_encoder"])
    text = CLIPTextModel(CLIPTextConfig(**TEXT)).eval()
    torch.manual_seed(SEEDS["unet"])
    unet = UNet2DConditionModel(**UNET).eval()
    torch.manual_seed(SEEDS["vae"])
    vae = AutoencoderKL(**VAE).eval()
    sched = dict(pipelines.SD15_SCHEDULER)
    scheduler = getattr(diffusers, sched.pop("_class_name")).from_config(sched)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(str(folder))
    del pipe, text, unet, vae
    gc.collect()
    shutil.rmtree(tok_dir)
    pipelines.write_tokenizer(folder / "tokenizer", "<|endoftext|>")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(pipelines.SD15_SCHEDULER, indent=2) + "\n")
    pipelines.legacy_text_weights(folder / "text_encoder")


def check(torch_dir, onnx_dir):
    """Each ONNX component against its torch module on small inputs, one at a time (memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    diffs = {}
    tok = CLIPTokenizer.from_pretrained(str(torch_dir / "tokenizer"))
    ids = tok([pipelines.PROMPT_A, ""], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    text = CLIPTextModel.from_pretrained(str(torch_dir / "text_encoder")).eval()
    with torch.no_grad():
        want = text(ids).last_hidden_state.numpy()
    del text
    sess = pipelines.ort_session(onnx_dir / "text_encoder" / "model.onnx")
    got = sess.run(["last_hidden_state"], pipelines.feed(sess, {"input_ids": ids.numpy()}))[0]
    diffs["text_encoder.last_hidden_state"] = float(np.abs(got - want).max())
    del sess
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    hidden = torch.from_numpy(want)
    t = torch.tensor(981)  # optimum declares a float32 scalar
    unet = UNet2DConditionModel.from_pretrained(str(torch_dir / "unet")).eval()
    with torch.no_grad():
        want_eps = unet(latents, t, encoder_hidden_states=hidden).sample.numpy()
    del unet
    gc.collect()
    sess = pipelines.ort_session(onnx_dir / "unet" / "model.onnx")
    got = sess.run(None, pipelines.feed(sess, {"sample": latents.numpy(), "timestep": t.numpy(),
                                               "encoder_hidden_states": want}))[0]
    diffs["unet.out_sample"] = float(np.abs(got - want_eps).max())
    del sess
    gc.collect()
    vae = AutoencoderKL.from_pretrained(str(torch_dir / "vae")).eval()
    with torch.no_grad():
        want_img = vae.decode(latents[:1] / VAE["scaling_factor"]).sample.numpy()
    del vae
    sess = pipelines.ort_session(onnx_dir / "vae_decoder" / "model.onnx")
    got = sess.run(None, {"latent_sample": latents[:1].numpy() / VAE["scaling_factor"]})[0]
    diffs["vae_decoder.sample"] = float(np.abs(got - want_img).max())
    finite = bool(np.isfinite(want_eps).all() and np.isfinite(want_img).all())
    print("onnxruntime vs torch, max abs diff: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
          + f"; torch outputs finite: {finite} (|eps| max {np.abs(want_eps).max():.2f}, "
          f"image in [{want_img.min():.2f}, {want_img.max():.2f}])")
    return diffs


def size(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild the torch folder and the export")
    ap.add_argument("--no-check", action="store_true", help="skip the ONNX-vs-torch check")
    ap.add_argument("--check-only", action="store_true", help="only the ONNX-vs-torch check of existing folders")
    args = ap.parse_args()
    if args.check_only:
        check(TORCH_DIR, ONNX_DIR)
        return
    if not pipelines.optimum_python().exists():
        raise SystemExit(f"no optimum venv at {pipelines.OPTIMUM_VENV}: run "
                         "`venv/bin/python models/export/pipelines.py --setup-optimum` first")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    LARGE.mkdir(parents=True, exist_ok=True)
    built = False
    if args.force or not (TORCH_DIR / "model_index.json").exists():
        t0 = time.time()
        build_torch(TORCH_DIR)
        built = True
        print(f"torch folder: {TORCH_DIR} ({size(TORCH_DIR) / 1e9:.2f} GB, {time.time() - t0:.0f} s)")
    if built or args.force or not (ONNX_DIR / "model_index.json").exists():
        t0 = time.time()
        # A half-written export must not look complete: model_index.json is optimum's last file,
        # but write to a temporary name and rename to be sure.
        tmp = ONNX_DIR.with_name(ONNX_DIR.name + ".partial")
        pipelines.export_onnx(TORCH_DIR, tmp, "text-to-image")
        shutil.rmtree(ONNX_DIR, ignore_errors=True)
        tmp.rename(ONNX_DIR)
        print(f"optimum export: {ONNX_DIR} ({size(ONNX_DIR) / 1e9:.2f} GB, {time.time() - t0:.0f} s)")
        if not args.no_check:
            check(TORCH_DIR, ONNX_DIR)
    else:
        print(f"{ONNX_DIR} exists (--force to rebuild)")


if __name__ == "__main__":
    main()
