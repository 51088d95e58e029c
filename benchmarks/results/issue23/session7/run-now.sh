#!/usr/bin/env bash
# Issue 23, seventh session, the code now: the default path (auto: in process for 600
# adapters on 2 CPUs) on a node's first run (cold: the copy made inside the run, and the
# floor taken a second time with the set's GETs) and on a later run (warm), alternating.
# OUT: where the logs and JSONs go; TAG: their prefix (default now).
set -u
OUT=${OUT:-/tmp/s23n}; PY=${PY:-$PWD/.venv/bin/python}; TAG=${TAG:-now}
mkdir -p "$OUT"
for tag in cold-1 warm-1 cold-2 warm-2; do
  echo "== $tag $(date +%T)"
  PYTHONPATH=$PWD timeout 1500 "$PY" benchmarks/bench_s3.py --arch 7b --layers 16 --n 600 \
      --null-product --repeats 1 --modes auto --set-cache "${tag%-*}" --no-reader \
      --out-json "$OUT/$TAG-$tag.json" > "$OUT/$TAG-$tag.log" 2>&1
  grep -E "^\|\s+0 " "$OUT/$TAG-$tag.log" | cut -c1-160
done
echo ALLDONE
