#!/usr/bin/env bash
# Issue 22, third session: the CPU proxy of a GPU node, old (a worktree of 85b16f1) against new
# (the set's local files mapped), interleaved; then CPU-only nodes at N = 64 and 256.
set -u
OLD=${OLD:-../old}; NEW=${NEW:-$PWD}; OUT=${OUT:-/tmp/s22}; PY=${PY:-$NEW/.venv/bin/python}
mkdir -p "$OUT"
P=(--arch llama2-7b --fill holes --modes ray --n 512 --batch-size 16 --repeats 1 --null-product
   --fake-gpu --io-floor --inputs /tmp/p22)
run() { local tag=$1 tree=$2; shift 2; echo "== $tag $(date +%T)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 1200 "$PY" benchmarks/bench_fleet.py "$@" \
      --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1); }
run proxy-old-1 "$OLD" "${P[@]}"; run proxy-new-1 "$NEW" "${P[@]}"
run proxy-new-2 "$NEW" "${P[@]}"; run proxy-old-2 "$OLD" "${P[@]}"
for side in new old old new; do
  run "cpu-$side" "$( [ $side = old ] && echo "$OLD" || echo "$NEW")" \
      --n 64,256 --modes auto,ray --repeats 2 --no-baseline
done
