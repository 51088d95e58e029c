#!/usr/bin/env bash
# Issue 23, eighth session: do the in-process run's knobs move the 7B null-product figure?
# Each CONFIG is "IO_THREADS IN_FLIGHT" (SAFELORA_IO_THREADS, --max-in-flight), one bench_s3
# run of 2 repeats each (its own SeaweedFS, floor before each repeat), in process (inline),
# the node's copy of the set warm. An extra ENV (e.g. OMP_NUM_THREADS=1) applies to all.
# Run from the repository root: OUT=/tmp/knobs bash benchmarks/results/issue23/session8/knobs.sh
set -u
OUT=${OUT:-/tmp/knobs}; PY=${PY:-$PWD/.venv/bin/python}; REPEATS=${REPEATS:-2}
CONFIGS=${CONFIGS:-"16:3 8:3 16:4 8:3 8:2 4:3 6:3 8:3"}
mkdir -p "$OUT"
for cfg in $CONFIGS; do
  io=${cfg%:*}; fl=${cfg#*:}; tag="io$io-f$fl-$(date +%H%M%S)"
  echo "== $tag"
  env ${ENV:-X=1} SAFELORA_IO_THREADS=$io PYTHONPATH=$PWD timeout 1500 "$PY" benchmarks/bench_s3.py \
      --arch 7b --layers 16 --n 600 --null-product --repeats "$REPEATS" --modes inline \
      --max-in-flight "$fl" --set-cache warm --no-reader --out-json "$OUT/$tag.json" \
      > "$OUT/$tag.log" 2>&1
  "$PY" - "$OUT/$tag.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print(r["rep"], r["mode"], f"{r['sanitize_s']:.1f} s, floor {r['floor_s']:.1f} s:",
          f"{100 * r['floor_fraction']:.0f} %", r["cpu_s"], r["floor_cpu_s"])
PY
done
echo ALLDONE
