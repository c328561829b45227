"""The peers of `attune generate` in benches/pipeline_sd15_cpu.sh, and its measuring.

A peer is one text-to-image run, as a user runs it, in a fresh process:

    MODE optimum:   optimum-onnx's ORTStableDiffusionPipeline on the ONNX folder (ORT CPU EP),
                    run with the optimum venv's python
    MODE diffusers: diffusers' StableDiffusionPipeline on the torch folder (PyTorch CPU, fp32)

Both use DDIMScheduler.from_config(the folder's scheduler config), as `attune generate` reads
SD1.5's PNDM config (PNDM's PLMS would run 21 UNet calls for 20 steps, not 20). Times are from
the process's start (the kernel's start time, so interpreter start and imports count):
`load` when the pipeline is loaded, `first_step` when the first UNet call begins (after the text
encoder: what the benchmark calls cold start), a time at the end of each step
(callback_on_step_end, so a step's time excludes loading), `decoded` after the VAE, `written`
after the PNG. The last line is JSON with all of them.

    python benches/pipeline_peers.py MODE FOLDER --prompt TEXT --steps 20 --guidance 7.5 \\
        --height 512 --width 512 --seed 0 -o OUT.png

Measuring (any contender, attune included, the same way):

    python benches/pipeline_peers.py measure RUNS.jsonl LABEL LOG -- COMMAND...

runs COMMAND with stdout and stderr into LOG, each line stamped with its arrival time since the
spawn; wall time from the spawn to the exit (the PNG is written before), peak RSS from wait4
(what /usr/bin/time reports). A contender prints `step K/N ... S s/step` or `step K/N S s` per
step (attune's progress lines, the peers' callback): the step times are those; cold start is the
arrival of step 1's line minus step 1's time (process start to the first UNet call, the text
encoder included); `after steps` is the wall time after the last step's line (VAE decoder, PNG,
exit), `PNG at` the arrival of the first line starting `wrote ` (attune's and the peers'). One JSON
line per run is appended to RUNS.jsonl;

    python benches/pipeline_peers.py table RUNS.jsonl

prints the table: each run, then the mean per contender.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time


def since_start():
    """Seconds since this process started, from /proc (the kernel's boot-time clock, 10 ms)."""
    stat = open("/proc/self/stat").read()
    start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


STEP = re.compile(r"^step (\d+)/(\d+)\b.*?([0-9.]+) s(?:/step)?\b")


def measure(runs, label, log, command):
    t0 = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    lines = []
    with open(log, "w") as out:
        for raw in iter(child.stdout.readline, b""):
            at = time.monotonic() - t0
            # A terminal-style bar (\r) would hide all but the last update: every part counts.
            for part in raw.decode("utf-8", "replace").replace("\r", "\n").splitlines():
                lines.append((at, part))
                out.write(f"[{at:8.2f}] {part}\n")
                out.flush()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    steps = []
    for at, text in lines:
        m = STEP.match(text.strip())
        if m:
            steps.append((int(m.group(1)), int(m.group(2)), at, float(m.group(3))))
    png = next((at for at, text in lines if text.startswith("wrote ")), None)
    cold = steps[0][2] - steps[0][3] if steps and steps[0][0] == 1 else None
    step_s = [s[3] for s in steps]
    record = dict(label=label, exit=code, wall_s=round(wall, 2), peak_rss_mib=round(usage.ru_maxrss / 1024),
                  cold_start_s=None if cold is None else round(cold, 2), steps=len(step_s),
                  mean_step_s=round(sum(step_s) / len(step_s), 3) if step_s else None,
                  png_s=None if png is None else round(png, 2), after_steps_s=round(wall - steps[-1][2], 2) if steps else None, step_s=step_s, log=str(log))
    with open(runs, "a") as f:
        f.write(json.dumps(record) + "\n")
    status = "" if code == 0 else f"  FAILED (exit {code}), see {log}"
    print(f"{label:<28} wall {wall:7.1f} s  peak RSS {record['peak_rss_mib']:6d} MiB  cold start "
          f"{fmt(record['cold_start_s'])} s  {fmt(record['mean_step_s'], 3)} s/step{status}", flush=True)
    if code != 0:
        for _, text in lines[-5:]:
            print("    " + text)
    return code


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def table(runs):
    records = [json.loads(line) for line in open(runs) if line.strip()]
    head = f"{'contender':<28} {'wall s':>8} {'PNG at s':>9} {'cold start s':>13} {'s/step':>8} {'after steps s':>14} {'peak RSS MiB':>13}"
    print(head)
    print("-" * len(head))

    def row(name, rs):
        def mean(key):
            vals = [r[key] for r in rs if r[key] is not None]
            return sum(vals) / len(vals) if vals else None
        failed = "  (failed)" if any(r["exit"] != 0 for r in rs) else ""
        print(f"{name:<28} {fmt(mean('wall_s')):>8} {fmt(mean('png_s')):>9} {fmt(mean('cold_start_s')):>13} {fmt(mean('mean_step_s'), 3):>8} "
              f"{fmt(mean('after_steps_s')):>14} {fmt(mean('peak_rss_mib'), 0):>13}{failed}")
    for r in records:
        row(r["label"], [r])
    labels = list(dict.fromkeys(r["label"].rsplit(" #", 1)[0] for r in records))
    if len(records) > len(labels):
        print("mean over rounds:")
        for name in labels:
            row(name, [r for r in records if r["label"].rsplit(" #", 1)[0] == name])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        dash = sys.argv.index("--")
        runs, label, log = sys.argv[2:dash]
        return measure(runs, label, log, sys.argv[dash + 1:])
    if len(sys.argv) > 1 and sys.argv[1] == "table":
        return table(sys.argv[2])
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["optimum", "diffusers"])
    ap.add_argument("folder")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    marks = {"imports_start": since_start()}

    import numpy as np
    import torch
    from diffusers import DDIMScheduler
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.mode == "optimum":
        from optimum.onnxruntime import ORTStableDiffusionPipeline
        pipe = ORTStableDiffusionPipeline.from_pretrained(args.folder)
    else:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(args.folder, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    marks["load"] = since_start()
    print(f"loaded at {marks['load']:.2f} s", flush=True)

    # scale_model_input is called right before each UNet call: the first call marks the first step.
    scale = pipe.scheduler.scale_model_input

    def scale_and_mark(*a, **k):
        marks.setdefault("first_step", since_start())
        return scale(*a, **k)
    pipe.scheduler.scale_model_input = scale_and_mark
    ends = []

    def on_step_end(p, i, t, kwargs):
        ends.append(since_start())
        prev = ends[-2] if len(ends) > 1 else marks["first_step"]
        print(f"step {i + 1}/{args.steps} {ends[-1] - prev:.3f} s (at {ends[-1]:.2f} s)", flush=True)
        return kwargs

    generator = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        image = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, height=args.height, width=args.width, generator=generator,
                     output_type="np", callback_on_step_end=on_step_end).images
    marks["decoded"] = since_start()
    nonfinite = int((~np.isfinite(image)).sum())
    pipe.numpy_to_pil(image)[0].save(args.out)
    marks["written"] = since_start()
    steps = [b - a for a, b in zip([marks["first_step"]] + ends[:-1], ends)]
    result = dict(mode=args.mode, steps=len(steps), step_s=steps, nonfinite_pixels=nonfinite,
                  mean_step_s=sum(steps) / len(steps), **{k: round(v, 3) for k, v in marks.items()})
    print(f"wrote {args.out} ({args.width}x{args.height}), {nonfinite} non-finite values", flush=True)
    print(json.dumps(result), flush=True)
    return 1 if nonfinite else 0


if __name__ == "__main__":
    sys.exit(main())
