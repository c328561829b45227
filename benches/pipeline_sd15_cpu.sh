#!/usr/bin/env bash
# Whole pipeline, prompt to PNG, on CPU: an SD1.5-size StableDiffusionPipeline with random
# weights (models/export/pipeline_large.py), 512 px, 20 steps, batch 1 with CFG (guidance 7.5).
# Contenders, each a fresh process, alternating within each round:
#   attune           `attune generate` on the optimum ONNX folder (ORT CPU EP)
#   attune-compiled  `attune generate` on `attune compile DIR -o OUT --attention $ATTENTION`
#                    (left out, with the compile's error, when this build's compile takes no folder)
#   optimum          optimum-onnx's ORTStableDiffusionPipeline on the same ONNX folder (ORT CPU EP)
#   diffusers        diffusers' StableDiffusionPipeline in PyTorch (CPU, fp32) on the torch folder
# The peers use DDIM from the folder's scheduler config, as attune reads SD1.5's PNDM config.
# benches/pipeline_peers.py measures every run alike: wall time from spawn to exit (the PNG is
# written before; `PNG at`: the arrival of the `wrote` line), cold start (spawn to the first UNet call, from the step lines' arrival),
# seconds per step (attune's progress lines, the peers' step callbacks), peak RSS (wait4).
#
#   benches/pipeline_sd15_cpu.sh                       # 2 rounds at 512 px, 20 steps
#   ROUNDS=1 benches/pipeline_sd15_cpu.sh
#   HEIGHT=64 WIDTH=64 STEPS=2 ROUNDS=1 RESULTS=/tmp/small.txt benches/pipeline_sd15_cpu.sh
# Env: ROUNDS (2), STEPS (20), HEIGHT/WIDTH (512), GUIDANCE (7.5), PROMPT, ATTENTION (flash),
# CONTENDERS (attune attune-compiled optimum diffusers), STOP_AT (a time `date -d` reads: runs that
# would end after it are not started), RESULTS (benches/results/pipeline_sd15_cpu.txt),
# PIPELINE/TORCH_PIPELINE (the ONNX and torch folders), PYTHON (venv/bin/python), OPTIMUM_PYTHON (the optimum venv's, from
# `venv/bin/python models/export/pipelines.py --setup-optimum`).
# Needs the release build (cargo build --release). Disk: 8.6 GB under models/large (never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-venv/bin/python}
OPTIMUM_PYTHON=${OPTIMUM_PYTHON:-${TMPDIR:-/tmp}/attune-optimum/bin/python}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-20}
HEIGHT=${HEIGHT:-512}
WIDTH=${WIDTH:-512}
GUIDANCE=${GUIDANCE:-7.5}
PROMPT=${PROMPT:-a photo of an astronaut riding a horse on mars}
ATTENTION=${ATTENTION:-flash}
CONTENDERS=${CONTENDERS:-attune attune-compiled optimum diffusers}
RESULTS=${RESULTS:-benches/results/pipeline_sd15_cpu.txt}
BUILT=target/release/attune
DIR=${PIPELINE:-models/large/sd15_pipeline}
TORCH_DIR=${TORCH_PIPELINE:-models/large/sd15_pipeline_torch}
COMPILED=models/large/sd15_pipeline_compiled_$ATTENTION
OUT=models/large/pipeline_bench
RUNS=$OUT/runs.jsonl
mkdir -p "$OUT" "$(dirname "$RESULTS")"
rm -f "$RUNS" "$OUT"/*.log "$OUT"/*.png
# A copy: a rebuild during the run must not change the binary between rounds.
ATTUNE=$OUT/attune
cp "$BUILT" "$ATTUNE"
# attune keeps ORT's optimised graphs in a session cache ($ATTUNE_CACHE/sessions): emptied here,
# so that round 1 is a first run on this machine and later rounds load the saved graphs. The
# cache's ORT library is copied from the user's cache, if there, rather than fetched again.
export ATTUNE_CACHE=$OUT/attune_cache
rm -rf "$ATTUNE_CACHE/sessions"
mkdir -p "$ATTUNE_CACHE"
for lib in "${HOME:-/nonexistent}"/.cache/attune/onnxruntime-*/; do
  [ -d "$lib" ] && [ ! -e "$ATTUNE_CACHE/$(basename "$lib")" ] && cp -a "$lib" "$ATTUNE_CACHE/"
done

run() { # run LABEL COMMAND...: measured, its log in $OUT
  local label=$1; shift
  "$PYTHON" benches/pipeline_peers.py measure "$RUNS" "$label" "$OUT/${label// /_}.log" -- "$@" || true
}

{
echo "# benches/pipeline_sd15_cpu.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), attune $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src runtime compiler passes || echo ' (+ uncommitted changes)')"
echo "# attune binary: $BUILT built $(date -u -r "$BUILT" '+%Y-%m-%d %H:%M UTC')"
echo "# $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), $(free -g | awk '/Mem:/ {print $2}') GiB RAM;" \
  "onnxruntime $("$PYTHON" -c 'import onnxruntime; print(onnxruntime.__version__)'), torch $("$PYTHON" -c 'import torch; print(torch.__version__)')," \
  "diffusers $("$PYTHON" -c 'import diffusers; print(diffusers.__version__)') (optimum venv: optimum-onnx $("$OPTIMUM_PYTHON" -c 'import importlib.metadata as m; print(m.version("optimum-onnx"), "diffusers", m.version("diffusers"))'))"
echo "# attune's session cache emptied first: round 1 optimises every ORT session, later rounds load the saved graphs"
echo "# ${HEIGHT}x${WIDTH} px, $STEPS steps, guidance $GUIDANCE (batch 1 with CFG), seed 0, prompt \"$PROMPT\", $ROUNDS round(s)"

[ -f "$DIR/model_index.json" ] || "$PYTHON" models/export/pipeline_large.py

contenders=()
for c in $CONTENDERS; do
  if [ "$c" = attune-compiled ]; then
    echo "== attune compile $DIR -o $COMPILED --attention $ATTENTION"
    rm -rf "$COMPILED"
    run "attune compile" "$ATTUNE" compile "$DIR" -o "$COMPILED" --attention "$ATTENTION"
    if [ ! -f "$COMPILED/model_index.json" ]; then
      echo "== attune-compiled left out: the compile wrote no pipeline folder: $(grep -m1 -i error "$OUT/attune_compile.log" || tail -1 "$OUT/attune_compile.log")"
      continue
    fi
  fi
  contenders+=("$c")
done

ARGS=(--prompt "$PROMPT" --steps "$STEPS" --guidance "$GUIDANCE" --height "$HEIGHT" --width "$WIDTH" --seed 0)
echo "== ${contenders[*]}, alternating, each a fresh process"
declare -A last_wall
stop=${STOP_AT:+$(date -d "$STOP_AT" +%s)}
for round in $(seq 1 "$ROUNDS"); do
  for c in "${contenders[@]}"; do
    # With STOP_AT, a run that would end after it (by its contender's last wall time) is not started.
    if [ -n "$stop" ] && [ $(( $(date +%s) + ${last_wall[$c]:-0} )) -gt "$stop" ]; then
      echo "== stopped before $c #$round: it would end after STOP_AT ($STOP_AT)"
      break 2
    fi
    png="$OUT/$c-$round.png"
    case $c in
      attune) run "attune #$round" "$ATTUNE" generate "$DIR" "${ARGS[@]}" -o "$png" ;;
      attune-compiled) run "attune-compiled #$round" "$ATTUNE" generate "$COMPILED" "${ARGS[@]}" -o "$png" ;;
      optimum) run "optimum #$round" "$OPTIMUM_PYTHON" benches/pipeline_peers.py optimum "$DIR" "${ARGS[@]}" -o "$png" ;;
      diffusers) run "diffusers #$round" "$PYTHON" benches/pipeline_peers.py diffusers "$TORCH_DIR" "${ARGS[@]}" -o "$png" ;;
      *) echo "unknown contender $c"; exit 2 ;;
    esac
    last_wall[$c]=$(tail -1 "$RUNS" | "$PYTHON" -c 'import json, sys; print(round(json.load(sys.stdin)["wall_s"]))')
  done
done
echo "== table (cold start: process start to the first UNet call; after steps: VAE decoder, PNG, exit; wall: to exit)"
"$PYTHON" benches/pipeline_peers.py table "$RUNS"
} 2>&1 | tee "$RESULTS"

{
  echo
  echo "# raw logs (each line stamped with seconds since the process was spawned)"
  for f in "$OUT"/*.log; do
    echo "## $f"
    grep -v '^\[ *[0-9.]*\] *$' "$f" | tail -60
  done
} >> "$RESULTS"
