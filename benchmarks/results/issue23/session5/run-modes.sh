#!/usr/bin/env bash
# Issue 23, fifth session: this checkout alone, the three modes (inline; ray: a local Ray started
# before the clock, as a cluster is; auto: the product's choice, a private local Ray started
# inside the run), their order rotated between runs.
set -u
OUT=${OUT:-/tmp/s23m}; PY=${PY:-$PWD/.venv/bin/python}; i=${i:-0}
LIST=${LIST:-"inline,ray,auto ray,auto,inline auto,inline,ray"}
mkdir -p "$OUT"
for modes in $LIST; do
  i=$((i + 1)); tag=s3-modes-$i
  echo "== $tag $modes $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  PYTHONPATH=$PWD timeout 1500 "$PY" benchmarks/bench_s3.py --arch 7b --layers 16 --n 600 \
      --null-product --repeats 1 --modes "$modes" --no-reader --out-json "$OUT/$tag.json" \
      > "$OUT/$tag.log" 2>&1
  grep -E "^\|\s+0 " "$OUT/$tag.log" | cut -c1-110
done
