"""PyTorch peers of the CUDA table: the SD1.5-size UNet (random weights, the same seed as
models/export/unets.py --full sd15) in fp16 with diffusers' SDPA attention, alone and with
tomesd. Optionally exports the fp32 ONNX model first, so that one process builds the UNet once.

    python3 benches/sd15_cuda_peers.py [--export DIR] [--latents 64 128] [--iters 20]

Prints one line per case: "torch <case> <latent> px=<px>: median <ms> ms, min <ms> ms".
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models" / "export"))
import unets  # noqa: E402


def timed(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], times[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", type=Path, help="write the fp32 ONNX export to DIR/unet.onnx first")
    ap.add_argument("--latents", type=int, nargs="*", default=[64, 128], help="none: only export")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tome-ratio", type=float, default=0.5)
    args = ap.parse_args()
    config, exporter, _ = unets.FULL["sd15"]
    unet = unets.build_unet(config, seed=0)
    if args.export:
        t = time.time()
        unets.export(unet, config, exporter, args.export / "unet.onnx",
                     {"batch": 2, "height": 64, "width": 64, "sequence": 77})
        print(f"exported {args.export / 'unet.onnx'} in {time.time() - t:.1f} s", flush=True)
    if not args.latents:
        return
    unet = unet.half().cuda().eval()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    def case(name, latent):
        x = torch.randn(2, 4, latent, latent, device="cuda", dtype=torch.half)
        t = torch.tensor([999.0, 500.0], device="cuda", dtype=torch.half)
        ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.half)
        with torch.inference_mode():
            med, low = timed(lambda: unet(x, t, ctx, return_dict=False), args.iters, args.warmup)
        print(f"torch {name} {latent} px={latent * 8}: median {med:.2f} ms, min {low:.2f} ms", flush=True)

    for latent in args.latents:
        case("sdpa", latent)
    import tomesd
    tomesd.apply_patch(unet, ratio=args.tome_ratio)
    for latent in args.latents:
        case(f"sdpa+tomesd{args.tome_ratio}", latent)


if __name__ == "__main__":
    main()
