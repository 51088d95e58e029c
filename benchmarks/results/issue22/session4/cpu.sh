#!/usr/bin/env bash
# Issue 22, fourth session: CPU-only nodes (the default 134M pair), old (a worktree of 361d39c)
# against new, interleaved (ORDER="old new new old", then "new old old new"); both sides run
# this checkout's benchmark, PYTHONPATH picks the side's code.
set -u
OLD=${OLD:-../old}; NEW=${NEW:-$PWD}; OUT=${OUT:-/tmp/s22}; PY=${PY:-$NEW/.venv/bin/python}
ORDER=${ORDER:-"old new new old"}; i=${i:-0}
for side in $ORDER; do
  tree=$([ "$side" = old ] && echo "$OLD" || echo "$NEW"); i=$((i + 1)); tag=cpu-$side-$i
  echo "== $tag $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 1200 "$PY" "$NEW/benchmarks/bench_fleet.py" \
      --n 64,256 --modes auto,ray --repeats 2 --no-baseline --out-json "$OUT/$tag.json" \
      > "$OUT/$tag.log" 2>&1)
done
