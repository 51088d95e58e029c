#!/usr/bin/env bash
# Issue 23, fourth session: S3 7B-shaped null-product inline runs, old (a worktree of 361d39c)
# against new (the set's matrices allocated without holding the GIL), interleaved
# (ORDER="new old old new"); both sides run this checkout's benchmark, PYTHONPATH picks the
# side's code. s3-new-5 / s3-new-6: SAFELORA_IO_THREADS=16 / 4. s3-if-*: docs/benchmarks.md §15.3 (this
# checkout alone, --max-in-flight 2 against the default); s3-depth3/4: one-off worktrees.
set -u
OLD=${OLD:-../old}; NEW=${NEW:-$PWD}; OUT=${OUT:-/tmp/s22}; PY=${PY:-$NEW/.venv/bin/python}
ORDER=${ORDER:-"new old old new"}; i=${i:-0}
for side in $ORDER; do
  tree=$([ "$side" = old ] && echo "$OLD" || echo "$NEW"); i=$((i + 1)); tag=s3-$side-$i
  echo "== $tag $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 1500 "$PY" "$NEW/benchmarks/bench_s3.py" --arch 7b \
      --layers 16 --n 600 --null-product --repeats 1 --modes inline --no-reader \
      --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1)
done
