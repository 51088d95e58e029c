#!/usr/bin/env bash
# Issue 22, eleventh session: CPU-only nodes, old against new (the default 134M pair), two
# rounds each side, alternating. From the repository root:
#   OLD=/tmp/wt-old OUT=/tmp/s11d bash benchmarks/results/issue22/session11/cpu-only.sh
set -u
OUT=${OUT:-/tmp/s11d}; PY=${PY:-$PWD/.venv/bin/python}
mkdir -p "$OUT"
i=0
for tree in $PWD $OLD $PWD $OLD; do
  i=$((i + 1)); tag=$([ "$tree" = "$PWD" ] && echo new || echo old)-$i
  (cd "$tree" && PYTHONPATH=$tree "$PY" benchmarks/bench_fleet.py --n 64,256 --modes auto,ray \
     --repeats 2 --no-baseline --out-json "$OUT/cpu-only-$tag.json" > "$OUT/cpu-only-$tag.log" 2>&1)
  echo "$tag rc=$?"
done
