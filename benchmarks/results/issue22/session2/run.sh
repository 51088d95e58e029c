#!/usr/bin/env bash
# proxy old vs new, interleaved, 2 rounds
set -u
NEW=/work/main; OLD=/work/base22; OUT=/tmp/s22/r; PY=$NEW/.venv/bin/python
run() { local tag=$1 tree=$2; shift 2; echo "== $tag $(date +%T)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 1200 "$PY" "$NEW/benchmarks/bench_fleet.py" "$@" --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1; echo "rc=$?" >> "$OUT/$tag.log"); }
proxy=(--arch llama2-7b --fill holes --modes ray --n 512 --batch-size 16 --repeats 1 --null-product --fake-gpu --io-floor --inputs /tmp/p22)
run proxy-old-1 $OLD "${proxy[@]}"; run proxy-new-1 $NEW "${proxy[@]}"
run proxy-new-2 $NEW "${proxy[@]}"; run proxy-old-2 $OLD "${proxy[@]}"
