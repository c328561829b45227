#!/usr/bin/env bash
# Fuzz bench (#22): runs each fuzz target of tests/fuzz.rs (ONNX import+verify, compile with
# each pass family, safetensors/LoRA/adapter, npy, recipe/controller TOML) for SECS seconds,
# one after the other, and writes executions and findings per target to
# benches/results/fuzz.txt. Findings (inputs that panicked) are kept in target/fuzz-findings/.
#
#   benches/fuzz.sh [SECS] [SEED]      # default 120 s per target, seed 1
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-120}
seed=${2:-1}
report=benches/results/fuzz.txt
cargo build --release --tests --test fuzz >/dev/null
{
  echo "# benches/fuzz.sh $secs $seed — $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
} >>"$report"
for target in onnx_import_and_verify compile_with_each_pass_family safetensors_lora_and_adapter npy recipe_and_controller_toml; do
  ATTUNE_FUZZ_SECS=$secs ATTUNE_FUZZ_SEED=$seed ATTUNE_FUZZ_REPORT=$PWD/$report \
    cargo test --release --test fuzz -- --exact "fuzz_$target" --test-threads=1 --nocapture \
    2>&1 | grep -E "executions|panicked|FAILED" || true
done
tail -n 6 "$report"
