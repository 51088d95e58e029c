#!/usr/bin/env bash
# Issue 22, fifth session: the CPU proxy of a GPU node, old (a worktree of 4885fdb) against
# new (read buffers allocated without the GIL, none twice), interleaved. Both sides run this
# checkout's benchmark (it adds the floor timed with its writes dropped from the cache too);
# PYTHONPATH picks the side's code.
set -u
OLD=${OLD:-../old}; NEW=${NEW:-$PWD}; OUT=${OUT:-/tmp/s22}; PY=${PY:-$NEW/.venv/bin/python}
ORDER=${ORDER:-"new old old new"}
mkdir -p "$OUT"
P=(--arch llama2-7b --fill holes --modes ray --n 512 --batch-size 16 --repeats 1 --null-product
   --fake-gpu --io-floor --inputs /tmp/p22)
i=0
for side in $ORDER; do
  i=$((i + 1)); tree=$([ "$side" = old ] && echo "$OLD" || echo "$NEW"); tag=proxy-$side-$i
  echo "== $tag $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 1200 "$PY" "$NEW/benchmarks/bench_fleet.py" "${P[@]}" \
      --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1)
  grep -E "run 0:" "$OUT/$tag.log" | tail -1
done
