#!/usr/bin/env bash
# Issue 23, thirteenth session: the same code against two SeaweedFS volume settings,
# alternating: the tests' fixture (64 MiB volumes, one made at a time) and 1 GiB volumes made
# seven at a time (SeaweedFS's own growth; bench_s3's default is now 4 GiB). Each a
# bench_s3 run of the default path on 600 7B-shaped adapters with the null product, the
# set's copy warm. Run from the repository root:
# OUT=/tmp/vol bash benchmarks/results/issue23/session13/volumes.sh
set -u
OUT=${OUT:-/tmp/vol}; PY=${PY:-$PWD/.venv/bin/python}
mkdir -p "$OUT"
for vol in 64:1 1024:7 64:1 1024:7; do
  tag="vol${vol%:*}-$(date +%H%M%S)"
  echo "== $vol $tag"
  PYTHONPATH=$PWD timeout 1500 "$PY" benchmarks/bench_s3.py --arch 7b --layers 16 --n 600 \
      --null-product --repeats 1 --modes auto --set-cache warm --no-reader \
      --volume-size-mb "${vol%:*}" --volumes-per-growth "${vol#*:}" \
      --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
  grep -E "^\|\s+0 " "$OUT/$tag.log" | cut -c1-160
done
echo ALLDONE
