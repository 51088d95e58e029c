#!/usr/bin/env bash
# Issue 23, eighth session: two trees alternating (TREES, default: this one and OLD), each
# a bench_s3 run of the default path (auto) on 600 7B-shaped adapters with the null product,
# the set's copy warm. Run from the repository root:
# OLD=/tmp/old OUT=/tmp/s23 bash benchmarks/results/issue23/session8/old-new.sh
set -u
OUT=${OUT:-/tmp/s23}; PY=${PY:-$PWD/.venv/bin/python}; MODE=${MODE:-auto}
TREES=${TREES:-"$PWD $OLD $PWD $OLD"}
mkdir -p "$OUT"
for tree in $TREES; do
  tag="$(basename "$tree")-$(date +%H%M%S)"
  echo "== $tree $tag"
  (cd "$tree" && PYTHONPATH=$tree timeout 1500 "$PY" benchmarks/bench_s3.py --arch 7b \
      --layers 16 --n 600 --null-product --repeats 1 --modes "$MODE" --set-cache warm \
      --no-reader --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1)
  "$PY" - "$OUT/$tag.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print(r["rep"], r["mode"], f"{r['sanitize_s']:.1f} s, floor {r['floor_s']:.1f} s:",
          f"{100 * r['floor_fraction']:.0f} %", r["cpu_s"], r["floor_cpu_s"],
          r["requests_per_adapter"])
PY
done
echo ALLDONE
