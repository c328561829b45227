"""Tiny whole pipelines (random weights, real CLIP vocabulary) and diffusers' references for them.

Each pipeline is assembled from tiny diffusers/transformers components with fixed seeds, saved
with diffusers' `save_pretrained` (a torch folder under $TMPDIR/attune-pipelines, not committed)
and exported the way users export: `optimum-cli export onnx --model <torch folder> <out>` from
optimum-onnx, which writes optimum's layout (`model_index.json`, `text_encoder[_2]/model.onnx`,
`unet/model.onnx`, `vae_decoder/model.onnx`, `vae_encoder/model.onnx`, `tokenizer[_2]/`,
`scheduler/scheduler_config.json`, each component's `config.json`). Only that ONNX folder is
committed, as `models/pipelines/<name>/`, with `reference/` next to it.

Pipelines:
- `sd15_tiny`: StableDiffusionPipeline. CLIPTextModel (vocab 49408, hidden 16, 2 layers,
  2 heads, 77 positions, quick_gelu, SD1.5's legacy bos/eos/pad ids 0/2/1 so the pooled output
  is taken at argmax(input_ids)), UNet2DConditionModel (block_out_channels (32, 32), one layer
  per block, CrossAttnDownBlock2D + DownBlock2D, cross_attention_dim 16, 2 heads,
  norm_num_groups 8, sample_size 8), AutoencoderKL (block_out_channels (32, 32), so
  f = 2^(2 - 1) = 2, latent_channels 4, norm_num_groups 8, scaling_factor 0.18215, an
  attention in its mid block), SD1.5's PNDMScheduler config as the hub folder ships it.
  The default image is unet.sample_size * f = 16 px (latents 8x8).
- `sd15_inpaint_tiny`: StableDiffusionInpaintPipeline, sd15_tiny's text encoder and VAE (the
  same weights: their ONNX files are byte-identical, git stores them once) and a 9-channel
  UNet (latents 4 + mask 1 + masked-image latents 4), as SD1.5-inpainting is built.
- `sdxl_tiny`: StableDiffusionXLPipeline. text_encoder sd15_tiny's CLIPTextModel (its weights),
  text_encoder_2 a CLIPTextModelWithProjection (hidden 8, intermediate 32, projection_dim 16,
  gelu), tokenizer_2 padding with "!" (id 0) as SDXL's does; UNet with text_time added
  conditions (addition_time_embed_dim 8, projection_class_embeddings_input_dim 16 + 6 * 8: the
  pooled projection and six time ids), linear projections, transformer_layers_per_block (1, 2),
  cross_attention_dim 24 (16 + 8, both encoders' penultimate hidden states concatenated);
  sd15_tiny's VAE weights with SDXL's VAE config (scaling_factor 0.13025, force_upcast); SDXL's
  EulerDiscreteScheduler config; force_zeros_for_empty_prompt (model_index.json), as SDXL base
  ships.
- `sd3_tiny`: StableDiffusion3Pipeline (`make_sd3`). text_encoder and text_encoder_2
  CLIPTextModelWithProjection with sdxl_tiny's second encoder's config (hidden 8, projection
  16; text_encoder_2 is sdxl_tiny's, byte-identical ONNX), tokenizer_2 padding with "!";
  text_encoder_3 a T5EncoderModel (T5 v1.1's gated-gelu, d_model 32, 2 layers, 4 heads, vocab
  512) with tokenizer_3 a T5TokenizerFast on a sentencepiece unigram model trained here
  (400 pieces, pad 0, eos 1, unk 2, no bos; trained on CLIP's alphabetic ASCII words and the
  prompt set; + 100 extra ids) saved by transformers 4.57 (spiece.model + tokenizer.json;
  model_index.json names T5TokenizerFast as the hub does: transformers 5 would write
  T5Tokenizer, which optimum saves without tokenizer.json); SD3Transformer2DModel (patch 2,
  16 latent channels, 2 layers, 2 heads of 8, joint_attention_dim 32, pooled 32, sample_size 8);
  sd15_tiny's VAE layout with SD3's config (latent_channels 16, scaling_factor 1.5305,
  shift_factor 0.0609, no quant convs); FlowMatchEulerDiscreteScheduler, shift 3.0. optimum
  exports the transformer as `transformer/model.onnx` with inputs hidden_states [B, 16, h, w],
  timestep [B] float32, encoder_hidden_states, pooled_projections (output out_hidden_states);
  the CLIP encoders with their hidden_states.N; T5 with last_hidden_state. References:
  tokens/token_ids{,_2,_3}.npy on the prompt set plus "longer" (348 T5 tokens: cut at 256),
  T5's at the pipeline's max_sequence_length 256 (tokenizer_config says 512); txt2img_a and
  txt2img_b (negative "", 4 steps, guidance 7.5, the folder's scheduler) with prompt_embeds
  [1, 77 + 256, 32], pooled [1, 32], timesteps (sigma * 1000 as fed), final latents, image.
  sd3_tiny adds 3.1 MB to git (its CLIP tokenizers and text_encoder_2 are stored once).
- `flux_tiny`: FluxPipeline (`make_flux`). text_encoder a CLIPTextModel (sd15_tiny's config, seed 3;
  pooled = pooler_output), text_encoder_2 sd3_tiny's T5 config and seed with tokenizer_2 a copy of
  sd3_tiny's tokenizer_3; FluxTransformer2DModel (1 double + 1 single block, 2 heads of 8, rope
  axes (2, 2, 4), joint_attention_dim 32, pooled 16, guidance_embeds False: schnell-style); SD3's
  tiny VAE layout with Flux's scaling 0.3611 / shift 0.1159; FlowMatchEulerDiscreteScheduler with
  Flux-dev's dynamic shifting (base/max shift 0.5/1.15, image seq len 256/4096). optimum exports
  the transformer with hidden_states [B, hw/4, 64], img_ids, txt_ids, pooled_projections.
  References at max_sequence_length 32 (manifest): T5 ids on the prompt set; txt2img_a/b (4
  steps, guidance 1) with latents.npy the unpacked [1, 16, 8, 8] noise and packed_latents.npy
  what FluxPipeline was given, prompt/pooled embeds, final latents (unpacked and packed), image.

Sizes: the CLIP vocabulary is real, so every text encoder carries a 49408 x hidden embedding;
hidden 16 makes it 3.2 MB in fp32 (hidden 32 would be 6.3 MB; sdxl_tiny's second encoder,
hidden 8, 1.6 MB), and UNet/VAE use (32, 32) channels rather than (32, 64) (1.7 MB / 1.0 MB
of ONNX rather than about 3.2 / 2.6 MB; sdxl_tiny's UNet 2.3 MB). Each tokenizer folder is
1.6 MB (vocab.json + merges.txt). On disk: sd15_tiny 7.7 MB, sd15_inpaint_tiny 7.6 MB,
sdxl_tiny 11.5 MB (26.7 MB); 16.6 MB of distinct files. sdxl_tiny adds 3.1 MiB to a git pack
(its tokenizers and VAE are sd15_tiny's files, stored once; its first text encoder, sd15_tiny's
weights with hidden-state outputs, a delta; new: the second encoder, the UNet, the references).

The vocabulary: open-clip-torch ships OpenAI CLIP's BPE merges (`bpe_simple_vocab_16e6.txt.gz`);
vocab.json and merges.txt are built from it exactly as CLIP's tokenizer builds its encoder
(the 256 bytes_to_unicode characters, the same with '</w>', the first 48894 merges joined,
'<|startoftext|>', '<|endoftext|>': 49408 tokens) and written in the hub's tokenizer layout
(vocab.json, merges.txt with its '#version: 0.2' header line, special_tokens_map.json,
tokenizer_config.json with model_max_length 77). The script checks that transformers'
CLIPTokenizer gives open_clip's SimpleTokenizer's ids on a prompt set (open_clip pads with 0:
compared up to its end token).

transformers 5 writes CLIPTextModel's weights without the `text_model.` prefix, which
transformers 4 (what optimum-onnx needs) does not recognise: it would silently load random
weights. The torch folder's text encoders are rewritten with the prefix (the hub's layout,
which transformers 5 also reads); the ONNX components are checked against the torch ones.

References (`models/pipelines/<name>/reference/`, `manifest.json` describes every case and file):
- `tokens/`: ids from transformers' CLIPTokenizer (the ONNX folder's `tokenizer[_2]/`, no ftfy)
  with padding="max_length", max_length=77, truncation=True, int64 [8 prompts, 77] (the
  manifest lists the prompts in row order: plain, unicode (accents, emoji, CJK), decomposed
  (NFD), punctuation, extra whitespace, upper case, longer than 77 tokens, empty), padded with
  the folder's pad token (49407, or 0 = "!" for sdxl_tiny's tokenizer_2), truncated with the
  end token last.
- one folder per case, run by diffusers' pipeline (loaded back from the torch folder) in fp32
  on CPU, output_type="np", guidance 7.5, 4 steps, scheduler DDIM built from the folder's
  scheduler_config.json (`DDIMScheduler.from_config`) unless the case says otherwise, negative
  prompt "" (sdxl_tiny's txt2img_a and txt2img_a_euler: none, so force_zeros_for_empty_prompt
  makes its embeddings zeros; txt2img_b: "" encoded). Files: `latents.npy` the unscaled
  initial noise as diffusers' `latents=` takes it [batch, 4, H/f, W/f] float32 (the pipeline
  multiplies it by init_noise_sigma, in the manifest: 1 for DDIM); `image.npy` the pipeline's
  output [batch, H, W, 3] float32 in [0, 1]; `final_latents.npy` the latents after the last
  scheduler step, before 1/scaling_factor and the VAE decoder; `step_latents.npy` [steps run,
  batch, 4, h, w] the latents after each step; `timesteps.npy` the timestep of each step run as
  the pipeline passed it to the UNet (int64 for DDIM, float32 for Euler; optimum's ONNX UNet
  declares a float32 scalar); `prompt_embeds.npy` / `negative_prompt_embeds.npy` from the
  pipeline's encode_prompt [batch, 77, D] (sdxl_tiny: also `pooled_prompt_embeds.npy`,
  `negative_pooled_prompt_embeds.npy` [batch, 16] and `add_time_ids.npy` [2 * batch, 6]).
  sd15_tiny has txt2img_a, txt2img_b, txt2img_wide (16 x 24 px), txt2img_batch (two prompts,
  batch 2), img2img and inpaint; sdxl_tiny txt2img_a, txt2img_b, txt2img_a_euler (the folder's
  own EulerDiscreteScheduler); sd15_inpaint_tiny inpaint.
- img2img (StableDiffusionImg2ImgPipeline, strength 0.75: int(4 * 0.75) = 3 steps): input.png
  (RGB, committed), deterministic encoding: diffusers' DiagonalGaussianDistribution.sample is
  patched to return its mean, so image_latents = scaling_factor * mean(vae.encode(image)); the
  img2img pipeline takes no `latents=`, so its one random draw (randn_tensor in the img2img
  module, the noise add_noise mixes in at the first timestep) is patched to return latents.npy.
- inpaint (StableDiffusionInpaintPipeline, strength 1.0): input.png + mask.png (L, white =
  repaint), latents.npy as `latents=`; the encoder's mean as for img2img; `mask.npy`,
  `masked_image_latents.npy`, `image_latents.npy`. For a 4-channel UNet (sd15_tiny) the
  pipeline blends the noised image latents back in after each step.

Run in the project's venv (torch 2.15, diffusers 0.42.1, transformers 5.25, onnxruntime 1.31.1,
open-clip-torch 3.3.0 for the BPE merges). optimum-onnx 0.1.0 pins transformers < 4.58 and
huggingface_hub < 1, which diffusers 0.42 cannot use, so it lives in its own venv whose
packages shadow the project venv's (optimum 2.1.0, optimum-onnx 0.1.0, transformers 4.57.6,
huggingface_hub 0.36.2, tokenizers 0.22.2, diffusers 0.39.0; torch, onnx and onnxruntime come
from the project venv through a .pth file); `--setup-optimum` makes it:

    venv/bin/pip install open-clip-torch==3.3.0
    python models/export/pipelines.py --setup-optimum     # once: $TMPDIR/attune-optimum
    python models/export/pipelines.py                     # all pipelines, ~2 min on 2 cores
    python models/export/pipelines.py --only sd15_tiny

Checks, all printed: the tokenizer against open_clip's; each ONNX component against its torch
module in onnxruntime (max abs diff, in the manifest, < 1e-3 asserted; measured ~2e-6); in the
optimum venv, optimum's ORT pipelines (ORTStableDiffusion[XL|Img2Img|Inpaint|3]Pipeline) load
each folder and redo every case from its files (max abs diff to image.npy in the manifest,
~2e-6), and transformers 4.57's python CLIPTokenizer (and, for sd3_tiny, the sentencepiece
T5Tokenizer from spiece.model) redoes the token ids (equal, in the manifest). Re-running
rewrites byte-identical files.
"""
import argparse
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "pipelines"
WORK = Path(tempfile.gettempdir()) / "attune-pipelines"
OPTIMUM_VENV = Path(os.environ.get("ATTUNE_OPTIMUM_VENV", Path(tempfile.gettempdir()) / "attune-optimum"))
OPTIMUM_PACKAGES = ["optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "huggingface_hub==0.36.2",
                    "tokenizers==0.22.2", "diffusers==0.39.0", "httpx==0.29.0", "httpcore==1.0.9"]

VOCAB_SIZE = 49408
MAX_LENGTH = 77
STEPS, GUIDANCE, STRENGTH = 4, 7.5, 0.75

PROMPTS = {
    "plain": "a photo of a cat",
    "unicode": "café crème brûlée, naïve Zoë 🐱🚀 東京の夜景 und Straße",
    "decomposed": "cafe\u0301 in the rain",  # NFD é: the tokenizer's NFC makes it "café"
    "punctuation": "Hello, world!!! (masterpiece:1.2), [dog]; it's 3.14 -- 50% off? #art @user a_b",
    "whitespace": "  a   red\tcar \n\n parked   on a  street  ",
    "case": "A DSLR Photo of an ASTRONAUT riding a Horse, 4K, HDR",
    "long": ", ".join(["a very detailed painting of a castle on a hill at sunset"] * 8),
    "empty": "",
}
PROMPTS_KEYS = list(PROMPTS)
PROMPT_A = "a photo of an astronaut riding a horse on mars"
PROMPT_B = "a watercolor painting of a fox in the snow, highly detailed"

# SD1.5's scheduler/scheduler_config.json as the hub folder ships it (clip_sample matters:
# DDIMScheduler.from_config would otherwise clip).
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
# SDXL base 1.0's scheduler/scheduler_config.json.
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}

TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
TEXT_2 = dict(TEXT, hidden_size=8, intermediate_size=32, hidden_act="gelu", projection_dim=16)
UNET_SD15 = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
UNET_INPAINT = dict(UNET_SD15, in_channels=9)
UNET_SDXL = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2), cross_attention_dim=16 + 8, attention_head_dim=(2, 2),
                 norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), latent_channels=4,
           layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)
VAE_SDXL = dict(VAE, scaling_factor=0.13025, force_upcast=True)

# Seeds per component: equal seeds and configs give equal weights. sd15_inpaint_tiny shares
# sd15_tiny's text encoder and VAE (byte-identical ONNX files), sdxl_tiny its VAE (identical
# files) and its text encoder's weights (SDXL's first encoder is SD1.5's CLIP ViT-L; optimum
# exports it with its hidden states as outputs, so only git's delta compression shares them).
PIPELINES = {
    "sd15_tiny": dict(cls="StableDiffusionPipeline", text=(TEXT, 0), unet=(UNET_SD15, 1), vae=(VAE, 2),
                      scheduler=SD15_SCHEDULER),
    "sd15_inpaint_tiny": dict(cls="StableDiffusionInpaintPipeline", text=(TEXT, 0), unet=(UNET_INPAINT, 3),
                              vae=(VAE, 2), scheduler=SD15_SCHEDULER),
    "sdxl_tiny": dict(cls="StableDiffusionXLPipeline", text=(TEXT, 0), text_2=(TEXT_2, 5), unet=(UNET_SDXL, 6),
                      vae=(VAE_SDXL, 2), scheduler=SDXL_SCHEDULER),
}


# ---------------------------------------------------------------- tokenizer

def clip_bpe():
    """CLIP's vocabulary and merges, as OpenAI CLIP's SimpleTokenizer builds them."""
    import open_clip.tokenizer as oct
    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE and len(set(vocab)) == VOCAB_SIZE
    return {v: i for i, v in enumerate(vocab)}, merges


def write_tokenizer(folder, pad_token):
    """The hub's CLIP tokenizer folder (SD1.5's tokenizer/, SDXL's tokenizer_2/ pads with "!")."""
    vocab, merges = clip_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        f.unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    config = dict(special, add_prefix_space=False, do_lower_case=True, errors="replace",
                  model_max_length=MAX_LENGTH, tokenizer_class="CLIPTokenizer")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_tokenizer(folder):
    """transformers' CLIPTokenizer from our files against open_clip's SimpleTokenizer (OpenAI's
    code with ftfy): equal ids up to open_clip's end token (it pads with 0)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    ours = CLIPTokenizer.from_pretrained(str(folder))
    theirs = SimpleTokenizer()
    assert len(ours) == VOCAB_SIZE, len(ours)
    report = {}
    for key, prompt in PROMPTS.items():
        a = ours(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
        b = theirs(prompt)[0].tolist()
        end = b.index(theirs.eot_token_id) + 1
        same = a[:end] == b[:end] and all(t == ours.pad_token_id for t in a[end:])
        report[key] = same
        if not same:
            print(f"tokenizer: {key!r} differs from open_clip:\n  transformers {a[:end]}\n  open_clip    {b[:end]}")
    assert all(report.values()), report
    print(f"tokenizer: transformers' CLIPTokenizer equals open_clip's SimpleTokenizer on {len(report)} prompts")
    return report


# ---------------------------------------------------------------- torch pipelines

def build_text(config, seed, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    import unets
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return unets.perturb(cls(CLIPTextConfig(**config)).eval())


def build_torch(name, spec, folder):
    """The pipeline with seeded random weights, saved with save_pretrained into `folder`."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    import unets
    torch.manual_seed(spec["unet"][1])
    unet = unets.perturb(UNet2DConditionModel(**spec["unet"][0]).eval())
    torch.manual_seed(spec["vae"][1])
    vae = unets.perturb(AutoencoderKL(**spec["vae"][0]).eval())
    sched_cfg = dict(spec["scheduler"])
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    parts = dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=build_text(*spec["text"]), tokenizer=None)
    cls = getattr(diffusers, spec["cls"])
    if "text_2" in spec:
        parts.update(text_encoder_2=build_text(*spec["text_2"], projection=True), tokenizer_2=None,
                     force_zeros_for_empty_prompt=True)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # Tokenizers are written by hand below (the hub's files); a placeholder to construct.
    from transformers import CLIPTokenizer
    tmp_tok = folder.parent / f"{name}_tok"
    write_tokenizer(tmp_tok, "<|endoftext|>")
    tok = CLIPTokenizer.from_pretrained(str(tmp_tok))
    parts["tokenizer"] = tok
    if "tokenizer_2" in parts:
        parts["tokenizer_2"] = tok
    pipe = cls(**parts)
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(str(folder))
    shutil.rmtree(tmp_tok)
    write_tokenizer(folder / "tokenizer", "<|endoftext|>")
    if "text_2" in spec:
        write_tokenizer(folder / "tokenizer_2", "!")
    # The scheduler config as the hub ships it (save_pretrained adds the defaults of its class).
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"], indent=2) + "\n")
    legacy_text_weights(folder / "text_encoder")
    return pipe


def legacy_text_weights(folder):
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix; the hub's files (and
    transformers 4, which optimum-onnx runs on) have it. transformers 5 reads both."""
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})


def load_torch(spec, folder):
    import diffusers
    pipe = getattr(diffusers, spec["cls"]).from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- export

def optimum_python():
    return OPTIMUM_VENV / "bin" / "python"


def setup_optimum():
    """A venv with optimum-onnx and the transformers/huggingface_hub it pins; everything else
    (torch, onnx, onnxruntime, numpy) from this venv through a .pth file placed after its own
    site-packages."""
    if not optimum_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(OPTIMUM_VENV)], check=True)
    import site
    ours = site.getsitepackages()[0]
    theirs = next((OPTIMUM_VENV / "lib").glob("python*/site-packages"))
    pth = theirs / "zz_attune_venv.pth"
    pth.unlink(missing_ok=True)  # pip must not see (and try to replace) this venv's packages
    subprocess.run([str(optimum_python()), "-m", "pip", "install", "--no-deps", *OPTIMUM_PACKAGES], check=True)
    pth.write_text(ours + "\n")
    print(f"optimum venv: {OPTIMUM_VENV}")


def run_optimum(code, *args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([str(optimum_python()), "-c", code, *map(str, args)], env=env, cwd=cwd,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-8000:])
        raise SystemExit(f"optimum venv ({optimum_python()}) failed")
    return out.stdout


EXPORT = """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task=sys.argv[3], device="cpu", opset=None, do_validation=False)
"""


def export_onnx(torch_folder, out, task):
    """optimum-cli export onnx --model torch_folder --task task out (main_export), run from the
    torch folder's parent so that the `_name_or_path` optimum writes is the bare name."""
    shutil.rmtree(out, ignore_errors=True)
    run_optimum(EXPORT, torch_folder.name, out.resolve(), task, cwd=torch_folder.parent)


def onnx_summary(path):
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    types = {1: "float32", 6: "int32", 7: "int64", 10: "float16"}

    def io(values):
        return [{"name": v.name, "dtype": types.get(v.type.tensor_type.elem_type, v.type.tensor_type.elem_type),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]
    return {"opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "producer": f"{m.producer_name} {m.producer_version}",
            "inputs": io(m.graph.input), "outputs": io(m.graph.output),
            "nodes": len(m.graph.node), "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# ---------------------------------------------------------------- ORT vs torch, per component

def ort_session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feed(sess, values):
    """Cast each input to the dtype the graph declares (int64 ids, float32 timestep)."""
    kinds = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(float16)": np.float16}
    return {i.name: np.asarray(values[i.name]).astype(kinds[i.type]) for i in sess.get_inputs()}


def check_components(pipe, out):
    """Each ONNX component against the torch module it was exported from (max abs diff)."""
    gen = torch.Generator().manual_seed(7)
    diffs = {}
    ids = pipe.tokenizer([PROMPT_A, ""], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                         return_tensors="pt").input_ids
    for comp in ("text_encoder", "text_encoder_2"):
        if not (out / comp).exists():
            continue
        sess = ort_session(out / comp / "model.onnx")
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(None, feed(sess, {"input_ids": ids.numpy()}))))
        with torch.no_grad():
            ref = getattr(pipe, comp)(ids, output_hidden_states=True)
        want = {"last_hidden_state": ref.last_hidden_state,
                "pooler_output": getattr(ref, "pooler_output", None),
                "text_embeds": getattr(ref, "text_embeds", None)}
        want.update({f"hidden_states.{i}": h for i, h in enumerate(ref.hidden_states)})
        diffs[comp] = {n: float(np.abs(got[n] - want[n].numpy()).max()) for n in names}
    unet = pipe.unet
    c = unet.config
    sample = torch.randn(2, c.in_channels, 8, 8, generator=gen)
    ctx = torch.randn(2, MAX_LENGTH, c.cross_attention_dim, generator=gen)
    t = torch.tensor(981.0)
    values = {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()}
    added = None
    if c.addition_embed_type == "text_time":
        text_embeds = torch.randn(2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim,
                                  generator=gen)
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)
        values.update(text_embeds=text_embeds.numpy(), time_ids=time_ids.numpy())
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
    sess = ort_session(out / "unet" / "model.onnx")
    (got,) = sess.run(None, feed(sess, values))
    with torch.no_grad():
        want = unet(sample, t, ctx, added_cond_kwargs=added).sample.numpy()
    diffs["unet"] = {"out_sample": float(np.abs(got - want).max())}
    latent = torch.randn(1, 4, 8, 8, generator=gen)
    sess = ort_session(out / "vae_decoder" / "model.onnx")
    (got,) = sess.run(None, feed(sess, {"latent_sample": latent.numpy()}))
    with torch.no_grad():
        want = pipe.vae.decode(latent).sample.numpy()
    diffs["vae_decoder"] = {"sample": float(np.abs(got - want).max())}
    image = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    sess = ort_session(out / "vae_encoder" / "model.onnx")
    name = sess.get_outputs()[0].name
    (got,) = sess.run(None, feed(sess, {"sample": image.numpy()}))
    with torch.no_grad():
        dist = pipe.vae.encode(image).latent_dist
    want = dist.parameters.numpy() if name == "latent_parameters" else dist.mean.numpy()
    diffs["vae_encoder"] = {name: float(np.abs(got - want).max())}
    return diffs


# ---------------------------------------------------------------- references

@contextlib.contextmanager
def encoder_mean():
    """diffusers' VAE encoding made deterministic: latent_dist.sample() returns the mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    orig = DiagonalGaussianDistribution.sample
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    try:
        yield
    finally:
        DiagonalGaussianDistribution.sample = orig


@contextlib.contextmanager
def fixed_noise(module, noise):
    """The img2img pipeline draws its noise with randn_tensor and takes no `latents=`."""
    orig = module.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        return noise.clone().to(dtype=dtype or noise.dtype)
    module.randn_tensor = draw
    try:
        yield
    finally:
        module.randn_tensor = orig


def noise(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def input_image(size=16):
    """A deterministic RGB picture: gradients, a disc, a bar (values across the range)."""
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    r = x
    g = y
    b = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(float)
    img = np.stack([r, g, b], -1)
    img[size // 4: size // 4 + 2, :, :] = [1.0, 0.9, 0.1]
    return Image.fromarray((img * 255).round().astype(np.uint8), "RGB")


def mask_image(size=16):
    from PIL import Image
    m = np.zeros((size, size), np.uint8)
    m[size // 4: 3 * size // 4, size // 2:] = 255
    return Image.fromarray(m, "L")


def save(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for k, v in arrays.items():
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        np.save(folder / f"{k}.npy", a)
        files[f"{k}.npy"] = {"dtype": str(a.dtype), "shape": list(a.shape)}
    return files


def run_case(pipe, folder, call, scheduler="DDIM", capture=()):
    """Run a diffusers pipeline with a step callback capturing latents (and `capture`)."""
    import diffusers
    cfg = dict(pipe.scheduler.config)
    pipe.scheduler = getattr(diffusers, f"{scheduler}Scheduler").from_config(cfg)
    steps, fed, extra = [], [], {}

    def callback(p, i, t, kw):
        steps.append(kw["latents"].clone())
        fed.append(t.clone())
        for k in capture:
            extra[k] = kw[k].clone()
        return kw
    with torch.no_grad():
        result = call(pipe, callback, ["latents", *capture])
    timesteps = torch.stack(fed)  # what the UNet was fed, one per step run
    arrays = {"image": result.images.astype(np.float32), "final_latents": steps[-1],
              "step_latents": torch.stack(steps), "timesteps": timesteps, **extra}
    return arrays


def negatives(prompt, negative=""):
    return [negative] * len(prompt) if isinstance(prompt, list) and negative is not None else negative


def encode(pipe, prompt, sdxl, negative=""):
    negative = negatives(prompt, negative)
    with torch.no_grad():
        if sdxl:
            pe, ne, pp, npp = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=True, negative_prompt=negative)
            return {"prompt_embeds": pe, "negative_prompt_embeds": ne, "pooled_prompt_embeds": pp,
                    "negative_pooled_prompt_embeds": npp}
        pe, ne = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
        return {"prompt_embeds": pe, "negative_prompt_embeds": ne}


def references(name, spec, pipe, out):
    """Everything under out/reference; returns the manifest's case list."""
    import diffusers
    ref = out / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    sdxl = "text_2" in spec
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size * f
    cases = {}

    # token ids, from the ONNX folder's tokenizer files
    from transformers import CLIPTokenizer
    tokens = {}
    for tok_dir in ("tokenizer", "tokenizer_2"):
        if not (out / tok_dir).exists():
            continue
        tok = CLIPTokenizer.from_pretrained(str(out / tok_dir))
        ids = tok(list(PROMPTS.values()), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                  return_tensors="np").input_ids.astype(np.int64)
        suffix = tok_dir.removeprefix("tokenizer")
        tokens[f"token_ids{suffix}"] = ids
        # the torch folder's tokenizer (what the pipeline runs) gives the same ids
        assert (getattr(pipe, tok_dir)(list(PROMPTS.values()), padding="max_length", max_length=MAX_LENGTH,
                                       truncation=True, return_tensors="np").input_ids == ids).all()
    cases["tokens"] = {"prompts": PROMPTS, "pad_token_id": {k: int(v[PROMPTS_KEYS.index("plain")][-1])
                                                            for k, v in tokens.items()},
                       "files": save(ref / "tokens", tokens)}

    lat_shape = (1, 4, size // f, size // f)
    txt_cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline

    def txt2img(prompt, negative, latents, height=None, width=None):
        def call(p, cb, names):
            return p(prompt, negative_prompt=negatives(prompt, negative),
                     num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.clone(),
                     height=height or size, width=width or size, output_type="np",
                     callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names)
        return call

    if spec["cls"] != "StableDiffusionInpaintPipeline":
        tp = txt_cls.from_pipe(pipe)
        tp.set_progress_bar_config(disable=True)
        capture = ("add_time_ids",) if sdxl else ()
        # SDXL: no negative prompt (None) gives zero negative embeddings (force_zeros_for_empty_prompt),
        # an explicit "" is encoded like any prompt
        runs = [("txt2img_a", PROMPT_A, None if sdxl else "", lat_shape, 1, "DDIM"),
                ("txt2img_b", PROMPT_B, "", lat_shape, 2, "DDIM")]
        if sdxl:
            runs.append(("txt2img_a_euler", PROMPT_A, None, lat_shape, 1, "EulerDiscrete"))
        else:
            runs.append(("txt2img_wide", PROMPT_A, "", (1, 4, size // f, 3 * size // (2 * f)), 3, "DDIM"))
            runs.append(("txt2img_batch", [PROMPT_A, PROMPT_B], "", (2, 4, size // f, size // f), 4, "DDIM"))
        for case, prompt, negative, shape, seed, sched in runs:
            latents = noise(shape, seed)
            call = txt2img(prompt, negative, latents, shape[2] * f, shape[3] * f)
            arrays = run_case(tp, ref / case, call, sched, capture)
            arrays.update(encode(tp, prompt, sdxl, negative), latents=latents)
            cases[case] = {"pipeline": type(tp).__name__, "prompt": prompt, "negative_prompt": negative,
                           "height": shape[2] * f, "width": shape[3] * f, "steps": STEPS, "guidance": GUIDANCE,
                           "scheduler": f"{sched}Scheduler.from_config(scheduler/scheduler_config.json)",
                           "init_noise_sigma": float(tp.scheduler.init_noise_sigma),
                           "files": save(ref / case, arrays)}
            if sdxl:
                cases[case]["note"] = (
                    "prompt_embeds = cat(text_encoder hidden_states.1, text_encoder_2 hidden_states.1) (the "
                    "penultimate layer's, before the final LayerNorm); pooled (the UNet's text_embeds) = "
                    "text_encoder_2's text_embeds; add_time_ids (the UNet's time_ids) = [original h, w, crop top, "
                    "left, target h, w] for the CFG batch [negative, positive]; "
                    + ("negative_prompt null (not given): force_zeros_for_empty_prompt makes the negative "
                       "embeddings and pooled embeddings zeros" if negative is None else
                       "negative_prompt \"\" given explicitly: encoded like any prompt (no zeros)"))

    img = input_image(size)
    if spec["cls"] == "StableDiffusionPipeline":
        # img2img
        ip = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        ip.set_progress_bar_config(disable=True)
        latents = noise(lat_shape, 5)
        case = "img2img"
        (ref / case).mkdir(parents=True)
        img.save(ref / case / "input.png")
        from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod

        def call(p, cb, names):
            return p(PROMPT_A, image=img, strength=STRENGTH, negative_prompt="", num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, output_type="np", callback_on_step_end=cb,
                     callback_on_step_end_tensor_inputs=names)
        with encoder_mean(), fixed_noise(mod, latents):
            arrays = run_case(ip, ref / case, call)
        with torch.no_grad():
            x = ip.image_processor.preprocess(img)
            image_latents = ip.vae.encode(x).latent_dist.mean * ip.vae.config.scaling_factor
        arrays.update(encode(ip, PROMPT_A, False), latents=latents, image_latents=image_latents)
        cases[case] = {"pipeline": "StableDiffusionImg2ImgPipeline", "prompt": PROMPT_A, "negative_prompt": "",
                       "strength": STRENGTH, "steps": STEPS, "steps_run": int(STEPS * STRENGTH),
                       "guidance": GUIDANCE, "input": "input.png",
                       "scheduler": "DDIMScheduler.from_config(scheduler/scheduler_config.json)",
                       "note": ("image_latents = scaling_factor * mean of vae.encode(image in [-1, 1]) "
                                "(DiagonalGaussianDistribution.sample patched to return the mean); the start "
                                "latents are scheduler.add_noise(image_latents, latents.npy, timesteps[0]) "
                                "(randn_tensor patched to return latents.npy); the last int(steps * strength) of "
                                "the 4 timesteps are run (timesteps.npy)"),
                       "files": save(ref / case, arrays)}
        cases[case]["files"]["input.png"] = {"mode": "RGB", "size": [size, size]}

    if not sdxl:
        # inpaint: 9-channel UNet, or latent blending for the 4-channel one
        pp = diffusers.StableDiffusionInpaintPipeline.from_pipe(pipe)
        pp.set_progress_bar_config(disable=True)
        case = "inpaint"
        (ref / case).mkdir(parents=True, exist_ok=True)
        mask = mask_image(size)
        img.save(ref / case / "input.png")
        mask.save(ref / case / "mask.png")
        latents = noise(lat_shape, 6)
        nine = pp.unet.config.in_channels == 9
        capture = ("mask", "masked_image_latents")

        def call(p, cb, names):
            return p(PROMPT_B, image=img, mask_image=mask, negative_prompt="", num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, latents=latents.clone(), height=size, width=size,
                     output_type="np", callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names)
        with encoder_mean():
            arrays = run_case(pp, ref / case, call, capture=capture)
        for k in capture:  # the CFG batch's copies are equal: keep one
            arrays[k] = arrays[k][:1]
        with torch.no_grad():
            x = pp.image_processor.preprocess(img)
            image_latents = pp.vae.encode(x).latent_dist.mean * pp.vae.config.scaling_factor
        arrays.update(encode(pp, PROMPT_B, False), latents=latents, image_latents=image_latents)
        cases[case] = {"pipeline": "StableDiffusionInpaintPipeline", "prompt": PROMPT_B, "negative_prompt": "",
                       "strength": 1.0, "steps": STEPS, "guidance": GUIDANCE, "input": "input.png",
                       "mask": "mask.png (white = repaint)",
                       "scheduler": "DDIMScheduler.from_config(scheduler/scheduler_config.json)",
                       "note": ("mask.npy is mask.png scaled to [0, 1], binarised (>= 0.5) and resized to the "
                                "latents (nearest); masked_image_latents.npy = scaling_factor * mean of "
                                "vae.encode(image * (mask < 0.5)) and image_latents.npy = scaling_factor * mean of "
                                "vae.encode(image) (image in [-1, 1], DiagonalGaussianDistribution.sample patched to "
                                "return the mean); the initial latents are latents.npy * init_noise_sigma (strength 1); "
                                + ("9-channel UNet: its input is cat(latents, mask, masked_image_latents) "
                                   "(scale_model_input on the latents only)" if nine else
                                   "4-channel UNet: after each step the latents are blended, (1 - mask) * "
                                   "add_noise(image_latents, latents.npy, next timestep) + mask * latents (after the "
                                   "last step with image_latents as they are); step_latents.npy are after the blend")
                                + "; the decoded image is not pasted back onto the input"),
                       "files": save(ref / case, arrays)}
        cases[case]["files"].update({"input.png": {"mode": "RGB", "size": [size, size]},
                                     "mask.png": {"mode": "L", "size": [size, size]}})
    return cases



# ---------------------------------------------------------------- optimum's ORT pipelines

ORT_CHECK = """
import json, sys
import numpy as np, torch
import diffusers
from optimum.onnxruntime import (ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline,
                                 ORTStableDiffusionImg2ImgPipeline, ORTStableDiffusionInpaintPipeline,
                                 ORTStableDiffusion3Pipeline)
folder, ref = sys.argv[1], sys.argv[2]
manifest = json.load(open(ref + "/manifest.json"))
cls = {"StableDiffusionPipeline": ORTStableDiffusionPipeline, "StableDiffusionXLPipeline": ORTStableDiffusionXLPipeline,
       "StableDiffusionImg2ImgPipeline": ORTStableDiffusionImg2ImgPipeline,
       "StableDiffusionInpaintPipeline": ORTStableDiffusionInpaintPipeline,
       "StableDiffusion3Pipeline": ORTStableDiffusion3Pipeline}
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
from PIL import Image
result = {}
for case, c in manifest["cases"].items():
    if case == "tokens" or c["pipeline"] not in cls:
        continue
    pipe = cls[c["pipeline"]].from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    sched = c["scheduler"].split(".")[0]
    pipe.scheduler = getattr(diffusers, sched).from_config(pipe.scheduler.config)
    latents = torch.from_numpy(np.load(f"{ref}/{case}/latents.npy"))
    neg = c["negative_prompt"]
    kw = dict(negative_prompt=[neg] * len(c["prompt"]) if isinstance(c["prompt"], list) and neg is not None else neg,
              num_inference_steps=c["steps"], guidance_scale=c["guidance"], output_type="np")
    if "strength" in c and "mask" not in c:  # img2img: its noise is latents.npy, as for the reference
        kw.update(image=Image.open(f"{ref}/{case}/input.png"), strength=c["strength"])
        import diffusers.utils.torch_utils as tu
        draw = tu.randn_tensor
        for mod in [m for m in list(sys.modules.values()) if getattr(m, "randn_tensor", None) is draw]:
            mod.randn_tensor = lambda shape, generator=None, device=None, dtype=None, layout=None, x=latents: x.clone()
    elif "mask" in c:
        kw.update(image=Image.open(f"{ref}/{case}/input.png"), mask_image=Image.open(f"{ref}/{case}/mask.png"),
                  latents=latents, height=c.get("height", 16), width=c.get("width", 16))
    else:
        kw.update(latents=latents, height=c["height"], width=c["width"])
    image = pipe(c["prompt"], **kw).images
    want = np.load(f"{ref}/{case}/image.npy")
    result[case] = float(np.abs(image - want).max())
# transformers 4's CLIPTokenizer (the python one, with ftfy when installed) on the prompt set
from transformers import CLIPTokenizer
tokens = manifest["cases"]["tokens"]
same = {}
for sub in ("", "_2"):
    try:
        tok = CLIPTokenizer.from_pretrained(folder + "/tokenizer" + sub)
    except OSError:
        continue
    ids = tok(list(tokens["prompts"].values()), padding="max_length", max_length=77, truncation=True).input_ids
    want = np.load(f"{ref}/tokens/token_ids{sub}.npy")
    same["tokenizer" + sub] = {k: bool((np.array(i) == w).all()) for k, i, w in zip(tokens["prompts"], ids, want)}
# SD3's T5: the python (sentencepiece) T5Tokenizer from spiece.model against tokenizer.json's ids
import os
if os.path.isdir(folder + "/tokenizer_3"):
    from transformers import T5Tokenizer
    tok = T5Tokenizer.from_pretrained(folder + "/tokenizer_3", legacy=True)
    n = tokens["max_length"]["token_ids_3"]
    ids = tok(list(tokens["prompts"].values()), padding="max_length", max_length=n, truncation=True).input_ids
    want = np.load(f"{ref}/tokens/token_ids_3.npy")
    same["tokenizer_3"] = {k: bool((np.array(i) == w).all()) for k, i, w in zip(tokens["prompts"], ids, want)}
print(json.dumps({"images": result, "tokens": same}))
"""


def check_optimum_pipelines(out):
    return json.loads(run_optimum(ORT_CHECK, out, out / "reference").strip().splitlines()[-1])


# ---------------------------------------------------------------- sd3_tiny (StableDiffusion3Pipeline)

SD3_PROMPT_LEN = 256  # StableDiffusion3Pipeline's max_sequence_length default (T5's ids)
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
T5 = dict(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
          is_gated_act=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                       pooled_projection_dim=32, out_channels=16, pos_embed_max_size=8)
VAE_SD3 = dict(VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
T5_WORDS = 12
# The prompt set and one longer than T5's 256 tokens (the set's "long" is 232 T5 tokens).
SD3_PROMPTS = dict(PROMPTS, longer=", ".join(["a very detailed painting of a castle on a hill at sunset"] * 12))


def t5_tokenizer(folder):
    """A T5 tokenizer folder as the hub's (spiece.model, tokenizer.json, special_tokens_map.json,
    tokenizer_config.json): a unigram sentencepiece model (pad 0, eos 1, unk 2, no bos, 400 pieces)
    trained on CLIP's alphabetic ASCII words (12 a line) and the prompt set, saved by transformers
    4.57's T5TokenizerFast (100 extra ids: 500 tokens)."""
    import io
    import sentencepiece as spm
    vocab, _ = clip_bpe()
    words = [w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha()]
    lines = [" ".join(words[i:i + T5_WORDS]) for i in range(0, len(words), T5_WORDS)] + list(PROMPTS.values())
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=400,
                                   model_type="unigram", num_threads=1, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    shutil.rmtree(folder, ignore_errors=True)
    src = folder.parent / (folder.name + "_spm")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / "spiece.model").write_bytes(buf.getvalue())
    run_optimum("""
import sys
from transformers import T5TokenizerFast
t = T5TokenizerFast.from_pretrained(sys.argv[1], legacy=True, model_max_length=512)
t.save_pretrained(sys.argv[2])
""", src, folder)
    shutil.rmtree(src)


def build_sd3_torch(folder):
    import diffusers
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    import unets
    torch.manual_seed(11)
    transformer = unets.perturb(diffusers.SD3Transformer2DModel(**SD3_TRANSFORMER).eval())
    torch.manual_seed(2)
    vae = unets.perturb(diffusers.AutoencoderKL(**VAE_SD3).eval())
    torch.manual_seed(12)
    t5 = unets.perturb(T5EncoderModel(T5Config(**T5)).eval())
    sched_cfg = dict(SD3_SCHEDULER)
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    tmp_tok = folder.parent / "sd3_tiny_tok"
    write_tokenizer(tmp_tok, "<|endoftext|>")
    t5_tokenizer(folder.parent / "sd3_tiny_t5tok")
    tok = CLIPTokenizer.from_pretrained(str(tmp_tok))
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=scheduler,
        text_encoder=build_text(TEXT_2, 10, projection=True), tokenizer=tok,
        text_encoder_2=build_text(TEXT_2, 5, projection=True), tokenizer_2=tok,
        text_encoder_3=t5, tokenizer_3=T5TokenizerFast.from_pretrained(str(folder.parent / "sd3_tiny_t5tok")))
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(str(folder))
    shutil.rmtree(tmp_tok)
    write_tokenizer(folder / "tokenizer", "<|endoftext|>")
    write_tokenizer(folder / "tokenizer_2", "!")  # SD3's tokenizer_2 (OpenCLIP bigG's) pads with "!"
    shutil.rmtree(folder / "tokenizer_3")
    shutil.copytree(folder.parent / "sd3_tiny_t5tok", folder / "tokenizer_3")
    shutil.rmtree(folder.parent / "sd3_tiny_t5tok")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD3_SCHEDULER, indent=2) + "\n")
    # transformers 5 names its T5 tokenizer class T5Tokenizer; the hub's SD3 folders say
    # T5TokenizerFast, which optimum (transformers 4) loads and saves with its tokenizer.json.
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return pipe


def check_sd3_components(pipe, out):
    gen = torch.Generator().manual_seed(7)
    diffs = {}
    for comp, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")):
        t = getattr(pipe, tok)
        n = SD3_PROMPT_LEN if comp == "text_encoder_3" else MAX_LENGTH
        ids = t([PROMPT_A, ""], padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        sess = ort_session(out / comp / "model.onnx")
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(None, feed(sess, {"input_ids": ids.numpy()}))))
        with torch.no_grad():
            ref = getattr(pipe, comp)(ids, output_hidden_states=True)
        want = {"last_hidden_state": ref.last_hidden_state, "text_embeds": getattr(ref, "text_embeds", None)}
        want.update({f"hidden_states.{i}": h for i, h in enumerate(ref.hidden_states)})
        diffs[comp] = {n: float(np.abs(got[n] - want[n].numpy()).max()) for n in names}
    c = pipe.transformer.config
    x = torch.randn(2, 16, 8, 8, generator=gen)
    ctx = torch.randn(2, MAX_LENGTH + SD3_PROMPT_LEN, c.joint_attention_dim, generator=gen)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=gen)
    t = torch.tensor([750.0, 750.0])
    sess = ort_session(out / "transformer" / "model.onnx")
    (got,) = sess.run(None, feed(sess, {"hidden_states": x.numpy(), "encoder_hidden_states": ctx.numpy(),
                                        "pooled_projections": pooled.numpy(), "timestep": t.numpy()}))
    with torch.no_grad():
        want = pipe.transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                                timestep=t).sample.numpy()
    diffs["transformer"] = {"out_hidden_states": float(np.abs(got - want).max())}
    latent = torch.randn(1, 16, 8, 8, generator=gen)
    sess = ort_session(out / "vae_decoder" / "model.onnx")
    (got,) = sess.run(None, feed(sess, {"latent_sample": latent.numpy()}))
    with torch.no_grad():
        want = pipe.vae.decode(latent).sample.numpy()
    diffs["vae_decoder"] = {"sample": float(np.abs(got - want).max())}
    return diffs


def sd3_references(pipe, out):
    ref = out / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    cases = {}
    from transformers import CLIPTokenizer, T5TokenizerFast
    tokens = {}
    for tok_dir in ("tokenizer", "tokenizer_2"):
        tok = CLIPTokenizer.from_pretrained(str(out / tok_dir))
        tokens["token_ids" + tok_dir.removeprefix("tokenizer")] = tok(
            list(SD3_PROMPTS.values()), padding="max_length", max_length=MAX_LENGTH, truncation=True,
            return_tensors="np").input_ids.astype(np.int64)
    t5 = T5TokenizerFast.from_pretrained(str(out / "tokenizer_3"))
    ids3 = t5(list(SD3_PROMPTS.values()), padding="max_length", max_length=SD3_PROMPT_LEN, truncation=True,
              add_special_tokens=True, return_tensors="np").input_ids.astype(np.int64)
    assert (pipe.tokenizer_3(list(SD3_PROMPTS.values()), padding="max_length", max_length=SD3_PROMPT_LEN,
                             truncation=True, return_tensors="np").input_ids == ids3).all()
    tokens["token_ids_3"] = ids3
    untruncated = [len(i) for i in t5(list(SD3_PROMPTS.values())).input_ids]
    cases["tokens"] = {"prompts": SD3_PROMPTS, "t5_untruncated_lengths": dict(zip(SD3_PROMPTS, untruncated)),
                       "max_length": {"token_ids": MAX_LENGTH, "token_ids_2": MAX_LENGTH,
                                                          "token_ids_3": SD3_PROMPT_LEN},
                       "note": ("token_ids_3: transformers' T5TokenizerFast (tokenizer_3/tokenizer.json) with "
                                "padding='max_length', max_length=256 (the pipeline's max_sequence_length), "
                                "truncation, add_special_tokens: </s> (1) appended, pad 0, no start token"),
                       "files": save(ref / "tokens", tokens)}
    size = pipe.transformer.config.sample_size * 2
    for case, prompt, seed in (("txt2img_a", PROMPT_A, 1), ("txt2img_b", PROMPT_B, 2)):
        latents = noise((1, 16, size // 2, size // 2), seed)

        def call(p, cb, names, prompt=prompt, latents=latents):
            return p(prompt, negative_prompt="", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                     latents=latents.clone(), height=size, width=size, output_type="np",
                     callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names)
        arrays = run_case(pipe, ref / case, call, "FlowMatchEulerDiscrete")
        with torch.no_grad():
            pe, ne, pp, npp = pipe.encode_prompt(prompt, prompt, prompt, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=True, negative_prompt="")
        arrays.update(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
                      negative_pooled_prompt_embeds=npp, latents=latents)
        cases[case] = {"pipeline": "StableDiffusion3Pipeline", "prompt": prompt, "negative_prompt": "",
                       "height": size, "width": size, "steps": STEPS, "guidance": GUIDANCE,
                       "scheduler": "FlowMatchEulerDiscreteScheduler.from_config(scheduler/scheduler_config.json)",
                       "init_noise_sigma": 1.0,
                       "note": ("prompt_embeds [1, 77 + 256, 32] = cat(pad(cat(text_encoder hidden_states[-2], "
                                "text_encoder_2 hidden_states[-2], features), to 32 with zeros), text_encoder_3 "
                                "last_hidden_state, tokens); pooled [1, 32] = cat(text_encoder text_embeds, "
                                "text_encoder_2 text_embeds); timesteps.npy = sigma * 1000 as the transformer was "
                                "fed; final_latents before latents / scaling_factor + shift_factor"),
                       "files": save(ref / case, arrays)}
    return cases


def make_sd3(name, check_ort_pipelines=True):
    torch_dir, out = WORK / name, OUT / name
    WORK.mkdir(parents=True, exist_ok=True)
    build_sd3_torch(torch_dir)
    import diffusers
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(torch_dir))
    pipe.set_progress_bar_config(disable=True)
    export_onnx(torch_dir, out, "text-to-image")
    diffs = check_sd3_components(pipe, out)
    print(f"{name}: onnxruntime vs torch: " + ", ".join(f"{c}.{n} {v:.1e}" for c, d in diffs.items()
                                                        for n, v in d.items()))
    assert max(v for d in diffs.values() for v in d.values()) < 1e-3, diffs
    cases = sd3_references(pipe, out)
    components = {str(p.parent.relative_to(out)): onnx_summary(p) for p in sorted(out.glob("*/model.onnx"))}
    import onnxruntime
    import transformers
    manifest = {
        "pipeline": "StableDiffusion3Pipeline", "made_by": "models/export/pipelines.py",
        "exporter": "optimum-onnx 0.1.0 main_export (optimum-cli export onnx), task text-to-image; optimum 2.1.0, "
                    "transformers 4.57.6, diffusers 0.39.0, torch " + torch.__version__,
        "references_by": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                          "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "device": "cpu",
                          "dtype": "float32"},
        "vae_scale_factor": 2, "scaling_factor": VAE_SD3["scaling_factor"], "shift_factor": VAE_SD3["shift_factor"],
        "default_size": pipe.transformer.config.sample_size * 2, "max_sequence_length": SD3_PROMPT_LEN,
        "components": components, "onnxruntime_vs_torch_max_abs_diff": diffs, "cases": cases,
    }
    (out / "reference" / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    if check_ort_pipelines:
        checked = check_optimum_pipelines(out)
        print(f"{name}: optimum's ORTStableDiffusion3Pipeline vs diffusers' images, max abs diff: {checked['images']}")
        manifest["optimum_ort_pipeline_vs_reference_image_max_abs_diff"] = checked["images"]
        manifest["transformers_4_57_python_tokenizer_equal"] = checked["tokens"]
        (out / "reference" / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"{name}: {folder_size(out) / 1e6:.2f} MB in {out.relative_to(ROOT.parent)}")


# ---------------------------------------------------------------- flux_tiny (FluxPipeline)

FLUX_PROMPT_LEN = 32  # the max_sequence_length the references are made at (FluxPipeline's default: 512)
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                        guidance_embeds=False, axes_dims_rope=(2, 2, 4))
VAE_FLUX = dict(VAE_SD3, scaling_factor=0.3611, shift_factor=0.1159)


def build_flux_torch(folder):
    import diffusers
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    import unets
    torch.manual_seed(13)
    transformer = unets.perturb(diffusers.FluxTransformer2DModel(**FLUX_TRANSFORMER).eval())
    torch.manual_seed(2)
    vae = unets.perturb(diffusers.AutoencoderKL(**VAE_FLUX).eval())
    torch.manual_seed(12)
    t5 = unets.perturb(T5EncoderModel(T5Config(**T5)).eval())
    sched_cfg = dict(FLUX_SCHEDULER)
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    tmp_tok = folder.parent / "flux_tiny_tok"
    write_tokenizer(tmp_tok, "<|endoftext|>")
    t5_dir = OUT / "sd3_tiny" / "tokenizer_3"  # sd3_tiny's T5 tokenizer, reused
    pipe = diffusers.FluxPipeline(
        transformer=transformer, vae=vae, scheduler=scheduler,
        text_encoder=build_text(TEXT, 3), tokenizer=CLIPTokenizer.from_pretrained(str(tmp_tok)),
        text_encoder_2=t5, tokenizer_2=T5TokenizerFast.from_pretrained(str(t5_dir)))
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(str(folder))
    shutil.rmtree(tmp_tok)
    write_tokenizer(folder / "tokenizer", "<|endoftext|>")
    shutil.rmtree(folder / "tokenizer_2")
    shutil.copytree(t5_dir, folder / "tokenizer_2")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(FLUX_SCHEDULER, indent=2) + "\n")
    legacy_text_weights(folder / "text_encoder")
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def flux_references(pipe, out):
    ref = out / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    from transformers import T5TokenizerFast
    t5 = T5TokenizerFast.from_pretrained(str(out / "tokenizer_2"))
    ids = t5(list(SD3_PROMPTS.values()), padding="max_length", max_length=FLUX_PROMPT_LEN, truncation=True,
             return_tensors="np").input_ids.astype(np.int64)
    untruncated = [len(i) for i in t5(list(SD3_PROMPTS.values())).input_ids]
    cases = {"tokens": {"prompts": SD3_PROMPTS, "max_length": {"token_ids_2": FLUX_PROMPT_LEN},
                        "t5_untruncated_lengths": dict(zip(SD3_PROMPTS, untruncated)),
                        "note": "token_ids_2: tokenizer_2 (T5TokenizerFast) at max_sequence_length 32, truncation",
                        "files": save(ref / "tokens", {"token_ids_2": ids})}}
    size = 16
    h = w = size // 2  # VAE factor 2
    for case, prompt, seed in (("txt2img_a", PROMPT_A, 1), ("txt2img_b", PROMPT_B, 2)):
        latents = noise((1, 16, h, w), seed)
        packed = pipe._pack_latents(latents, 1, 16, h, w)

        def call(p, cb, names, prompt=prompt, packed=packed):
            return p(prompt, num_inference_steps=STEPS, guidance_scale=1.0, latents=packed.clone(),
                     height=size, width=size, max_sequence_length=FLUX_PROMPT_LEN, output_type="np",
                     callback_on_step_end=cb, callback_on_step_end_tensor_inputs=names)
        arrays = run_case(pipe, ref / case, call, "FlowMatchEulerDiscrete")
        arrays["packed_final_latents"] = arrays["final_latents"]
        arrays["final_latents"] = pipe._unpack_latents(arrays["final_latents"], size, size, 2)
        arrays.pop("step_latents")
        with torch.no_grad():
            pe, pp, _ = pipe.encode_prompt(prompt, None, device="cpu", num_images_per_prompt=1,
                                           max_sequence_length=FLUX_PROMPT_LEN)
        arrays.update(prompt_embeds=pe, pooled_prompt_embeds=pp, latents=latents, packed_latents=packed)
        cases[case] = {"pipeline": "FluxPipeline", "prompt": prompt, "height": size, "width": size,
                       "steps": STEPS, "guidance": 1.0, "max_sequence_length": FLUX_PROMPT_LEN,
                       "note": ("latents [1, 16, h, w] unpacked noise (attune's --latents), packed_latents what "
                                "FluxPipeline was given (latents=); prompt_embeds = text_encoder_2 (T5) "
                                "last_hidden_state at 32 tokens; pooled = text_encoder pooler_output; "
                                "final_latents unpacked, before / scaling_factor + shift_factor"),
                       "files": save(ref / case, arrays)}
    return cases


def make_flux(name):
    torch_dir, out = WORK / name, OUT / name
    WORK.mkdir(parents=True, exist_ok=True)
    build_flux_torch(torch_dir)
    import diffusers
    pipe = diffusers.FluxPipeline.from_pretrained(str(torch_dir))
    pipe.set_progress_bar_config(disable=True)
    export_onnx(torch_dir, out, "text-to-image")
    cases = flux_references(pipe, out)
    components = {str(p.parent.relative_to(out)): onnx_summary(p) for p in sorted(out.glob("*/model.onnx"))}
    import onnxruntime
    import transformers
    manifest = {
        "pipeline": "FluxPipeline", "made_by": "models/export/pipelines.py",
        "exporter": "optimum-onnx main_export, task text-to-image",
        "references_by": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                          "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "device": "cpu",
                          "dtype": "float32"},
        "vae_scale_factor": 2, "scaling_factor": VAE_FLUX["scaling_factor"], "shift_factor": VAE_FLUX["shift_factor"],
        "max_sequence_length": FLUX_PROMPT_LEN, "components": components, "cases": cases,
    }
    (out / "reference" / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"{name}: {folder_size(out) / 1e6:.2f} MB in {out.relative_to(ROOT.parent)}")


# ---------------------------------------------------------------- main

TASKS = {"StableDiffusionPipeline": "text-to-image", "StableDiffusionXLPipeline": "text-to-image",
         "StableDiffusionInpaintPipeline": "inpainting"}


def folder_size(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def make(name, check_ort_pipelines=True):
    spec = PIPELINES[name]
    torch_dir, out = WORK / name, OUT / name
    WORK.mkdir(parents=True, exist_ok=True)
    built = build_torch(name, spec, torch_dir)
    pipe = load_torch(spec, torch_dir)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(built, comp) and getattr(built, comp) is not None:
            assert same_weights(getattr(built, comp), getattr(pipe, comp)), f"{name}: {comp} reloads differently"
    export_onnx(torch_dir, out, TASKS[spec["cls"]])
    diffs = check_components(pipe, out)
    worst = max(v for d in diffs.values() for v in d.values())
    print(f"{name}: onnxruntime vs torch, max abs diff per component output: "
          + ", ".join(f"{c}.{n} {v:.1e}" for c, d in diffs.items() for n, v in d.items()))
    assert worst < 1e-3, diffs
    cases = references(name, spec, pipe, out)
    components = {str(p.parent.relative_to(out)): onnx_summary(p) for p in sorted(out.glob("*/model.onnx"))}
    import diffusers
    import onnxruntime
    import open_clip
    import transformers
    manifest = {
        "pipeline": spec["cls"],
        "made_by": "models/export/pipelines.py",
        "exporter": "optimum-onnx 0.1.0 main_export (optimum-cli export onnx), task " + TASKS[spec["cls"]]
                    + "; optimum 2.1.0, transformers 4.57.6, diffusers 0.39.0, torch " + torch.__version__,
        "references_by": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                          "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                          "open_clip_torch": open_clip.__version__, "device": "cpu", "dtype": "float32"},
        "vae_scale_factor": 2 ** (len(pipe.vae.config.block_out_channels) - 1),
        "scaling_factor": pipe.vae.config.scaling_factor,
        "default_size": pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1),
        "components": components,
        "onnxruntime_vs_torch_max_abs_diff": diffs,
        "cases": cases,
    }
    ref = out / "reference"
    (ref / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    if check_ort_pipelines:
        checked = check_optimum_pipelines(out)
        print(f"{name}: optimum's ORT pipelines vs diffusers' images, max abs diff: {checked['images']}")
        manifest["optimum_ort_pipeline_vs_reference_image_max_abs_diff"] = checked["images"]
        manifest["transformers_4_57_python_tokenizer_equal"] = checked["tokens"]
        for tok, same in checked["tokens"].items():
            if not all(same.values()):
                print(f"{name}: transformers 4.57's python CLIPTokenizer differs on {tok}: "
                      + ", ".join(k for k, v in same.items() if not v))
        (ref / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"{name}: {folder_size(out) / 1e6:.2f} MB in {out.relative_to(ROOT.parent)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=sorted(PIPELINES) + ["sd3_tiny", "flux_tiny"], help="pipelines to make (default: all)")
    ap.add_argument("--setup-optimum", action="store_true", help=f"make the optimum venv ({OPTIMUM_VENV})")
    ap.add_argument("--no-ort-pipelines", action="store_true", help="skip the optimum ORT pipeline check")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.setup_optimum:
        setup_optimum()
        return
    if not optimum_python().exists():
        raise SystemExit(f"no optimum venv at {OPTIMUM_VENV}: run with --setup-optimum first")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    WORK.mkdir(parents=True, exist_ok=True)
    write_tokenizer(WORK / "tokenizer_check", "<|endoftext|>")
    check_tokenizer(WORK / "tokenizer_check")
    for name in args.only or [*PIPELINES, "sd3_tiny", "flux_tiny"]:
        if name == "sd3_tiny":
            make_sd3(name, not args.no_ort_pipelines)
        elif name == "flux_tiny":
            make_flux(name)
        else:
            make(name, not args.no_ort_pipelines)
    total = sum(folder_size(OUT / n) for n in [*PIPELINES, "sd3_tiny", "flux_tiny"] if (OUT / n).exists())
    unique = {}
    for f in OUT.rglob("*"):
        if f.is_file():
            unique[hashlib.sha256(f.read_bytes()).hexdigest()] = f.stat().st_size
    print(f"models/pipelines: {total / 1e6:.2f} MB, {sum(unique.values()) / 1e6:.2f} MB of distinct files")


if __name__ == "__main__":
    main()
