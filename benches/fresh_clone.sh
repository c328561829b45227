#!/usr/bin/env bash
# The README's two set-up commands on a fresh clone, as a new user runs them: wall time and
# peak RSS of each (the largest single process: /usr/bin/time reads the kernel's maximum over
# the command and every process it waited for, so for the tests it is the largest test binary
# or attune run), and the disk `target/` takes. Empty ONNX Runtime cache unless KEEP_CACHE=1.
#   bash benches/fresh_clone.sh [OUT_DIR]        (default /tmp/attune_fresh)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/attune_fresh}
rm -rf "$OUT" && mkdir -p "$OUT"
git clone -q "$src" "$OUT/attune"
[ "${KEEP_CACHE:-0}" = 1 ] || export ATTUNE_CACHE="$OUT/cache"
# shellcheck source=benches/measure.sh
. "$src/benches/measure.sh"
cd "$OUT/attune"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(rustc --version)"
measure "cargo run --release -- demo" cargo run --release -- demo
du -sh target | awk '{print "target/ after the demo: " $1}'
measure "cargo test --workspace --release" cargo test --workspace --release
du -sh target | awk '{print "target/ after the tests: " $1}'
grep -E "^test result" "$OUT/cargo test --workspace --release.log" |
  awk '{p += $4; f += $6; i += $8} END {print p " passed, " f " failed, " i " ignored"}'
