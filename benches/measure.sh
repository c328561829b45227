# Sourced by the CPU benchmark scripts (which set $OUT).
# measure LABEL COMMAND...: runs COMMAND with its output in $OUT/LABEL.log and prints its wall
# time and peak RSS (/usr/bin/time); a command that fails says so, with its log's last lines.
measure() {
  local label=$1 wall kb; shift
  if ! /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@" > "$OUT/$label.log" 2>&1; then
    printf '%-56s failed (%s):\n' "$label" "$(head -1 "$OUT/time.txt")"
    tail -3 "$OUT/$label.log"
  fi
  read -r wall kb < <(tail -1 "$OUT/time.txt")
  printf '%-56s %8.1f s %8.0f MiB\n' "$label" "$wall" "$((kb / 1024))"
}
