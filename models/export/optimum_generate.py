"""One image from a pipeline folder with optimum's ONNX Runtime pipelines (optimum-onnx), for the
interop test of `attune compile DIR -o OUT_DIR` (tests/folder_compile.rs): the folder attune wrote
must load in optimum's ORTStableDiffusion[Img2Img|Inpaint]Pipeline and generate there.

    python models/export/optimum_generate.py FOLDER REFERENCE_DIR CASE OUT.npy

Runs the reference case CASE (REFERENCE_DIR/manifest.json, as models/export/pipelines.py wrote it:
its prompt, steps, guidance, scheduler class and the initial noise REFERENCE_DIR/CASE/latents.npy)
on FOLDER and saves the `output_type="np"` image to OUT.npy; the test compares it with the
diffusers pipeline's REFERENCE_DIR/CASE/image.npy. Text-to-image cases only.

Runs with a python that can `import optimum.onnxruntime` (the venv `pipelines.py --setup-optimum`
makes at $TMPDIR/attune-optimum); exits with status 3 and a message when there is none.
"""
import json
import sys


def main():
    folder, ref, case, out = sys.argv[1:5]
    try:
        import diffusers
        import numpy as np
        import torch
        from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline
    except ImportError as e:
        print(f"optimum-onnx is not importable here: {e}", file=sys.stderr)
        sys.exit(3)
    c = json.load(open(f"{ref}/manifest.json"))["cases"][case]
    cls = {"StableDiffusionPipeline": ORTStableDiffusionPipeline,
           "StableDiffusionXLPipeline": ORTStableDiffusionXLPipeline}[c["pipeline"]]
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    # The reference's scheduler, made from the folder's scheduler config as diffusers was.
    pipe.scheduler = getattr(diffusers, c["scheduler"].split(".")[0]).from_config(pipe.scheduler.config)
    latents = torch.from_numpy(np.load(f"{ref}/{case}/latents.npy"))
    image = pipe(c["prompt"], negative_prompt=c["negative_prompt"], num_inference_steps=c["steps"],
                 guidance_scale=c["guidance"], latents=latents, height=c["height"], width=c["width"],
                 output_type="np").images
    np.save(out, np.asarray(image, dtype=np.float32))


if __name__ == "__main__":
    main()
