#!/usr/bin/env bash
# Issue 23, fifth session: S3 7B-shaped null-product runs (inline and auto), old (a worktree of
# 4885fdb) against new (read buffers allocated without the GIL, none twice), interleaved
# (ORDER="new old old new"). Both sides run this checkout's benchmark, which now waits for the
# machine to go quiet before each timed phase (--settle 0.25; SETTLE=0 turns it off); PYTHONPATH
# picks the side's code. MODES alternates the order of the two modes between runs.
set -u
OLD=${OLD:-../old}; NEW=${NEW:-$PWD}; OUT=${OUT:-/tmp/s23}; PY=${PY:-$NEW/.venv/bin/python}
ORDER=${ORDER:-"new old old new"}; i=${i:-0}; SETTLE=${SETTLE:-0.25}
mkdir -p "$OUT"
for side in $ORDER; do
  tree=$([ "$side" = old ] && echo "$OLD" || echo "$NEW"); i=$((i + 1)); tag=s3-$side-$i
  modes=$([ $((i % 2)) = 1 ] && echo inline,auto || echo auto,inline)
  echo "== $tag $modes $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 1500 "$PY" "$NEW/benchmarks/bench_s3.py" --arch 7b \
      --layers 16 --n 600 --null-product --repeats 1 --modes "$modes" --no-reader \
      --settle "$SETTLE" --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1)
  grep -E "^\| 0 " "$OUT/$tag.log" | head -2
done
