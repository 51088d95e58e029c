#!/usr/bin/env bash
# Issue 23, sixth session, after the node's copy is written around the page cache (O_DIRECT):
# the default path with the copy made inside the run (cold), then with a copy a run before
# left (warm). OUT: where the logs and JSONs go.
set -u
OUT=${OUT:-/tmp/s23d}; PY=${PY:-$PWD/.venv/bin/python}; i=0
mkdir -p "$OUT"
for spec in "auto cold" "auto,inline warm"; do
  set -- $spec; i=$((i + 1)); tag=s3-direct-$2-$i
  echo "== $tag $1 $(date +%T)"
  PYTHONPATH=$PWD timeout 1500 "$PY" benchmarks/bench_s3.py --arch 7b --layers 16 --n 600 \
      --null-product --repeats 1 --modes "$1" --set-cache "$2" --no-reader \
      --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
  grep -E "^\|\s+0 " "$OUT/$tag.log" | cut -c1-120
done
echo ALLDONE
