#!/usr/bin/env bash
# Issue 23, sixth session, the final code: auto (in process for 600 adapters on 2 CPUs),
# inline and ray with the node's copy of the S3 set made before the clock, then auto with the
# copy made inside the run (cold). OUT: where the logs and JSONs go; SPECS: "modes copy"
# pairs separated by "|"; TAG: the files' prefix (run-direct.sh sets both).
set -u
OUT=${OUT:-/tmp/s23f}; PY=${PY:-$PWD/.venv/bin/python}; TAG=${TAG:-s3-final}; i=0
SPECS=${SPECS:-"auto,inline warm|inline,auto,ray warm|auto cold"}
mkdir -p "$OUT"
IFS='|' read -ra specs <<< "$SPECS"
for spec in "${specs[@]}"; do
  read -r modes copy <<< "$spec"; i=$((i + 1)); tag=$TAG-$copy-$i
  echo "== $tag $modes $(date +%T)"
  PYTHONPATH=$PWD timeout 1500 "$PY" benchmarks/bench_s3.py --arch 7b --layers 16 --n 600 \
      --null-product --repeats 1 --modes "$modes" --set-cache "$copy" --no-reader \
      --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
  grep -E "^\|\s+0 " "$OUT/$tag.log" | cut -c1-120
done
echo ALLDONE
