#!/usr/bin/env bash
# Where the default model's `chatforge assistant` spends its wall time: two runs, the first with fresh chatforge
# and matplotlib caches (the GGUF is dequantised, the font list built), the second with both warm; every output
# line gets the seconds since the run started. On the GPU machine: bash bench/gpu_session.sh sh bash
# bench/assistant_timeline.sh [--importtime]  (with --importtime the first run also logs python -X importtime).
# Writes $OUT/b1.log, $OUT/b2.log and each run's timings, metrics and speed plan ($OUT/b1.tar, $OUT/b2.tar).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TIMEFORMAT='wall %R s'
stamp() { python3 -c "
import sys, time
t = time.time()
for line in sys.stdin: sys.stdout.write(f'{time.time() - t:7.2f} {line}')"; }
work=$(mktemp -d)
export CHATFORGE_CACHE=$work/cache MPLCONFIGDIR=$work/mpl
imports=(); [ "${1:-}" = --importtime ] && imports=(-X importtime)
for r in b1 b2; do
  echo "$r:"
  time (python3 "${imports[@]}" -m chatforge assistant --name "Ada Park" --out "$work/$r" --no-progress 2>&1 | stamp > "$OUT/$r.log")
  imports=()
  grep -E "\[data\]|train:|\[train\]|\[merge\]|stage times|identity \||general acc|not captured|Error" "$OUT/$r.log" | cut -c1-220
  tar cf "$OUT/$r.tar" -C "$work/$r" timings.json train/metrics.json train/log.jsonl train/speed_plan.json
done
