#!/usr/bin/env bash
# Issue 23, seventh session: a node's first run (the set's copy made inside the run), the
# code before (OLD, a worktree of it) and now (NEW) alternating, each its own SeaweedFS and
# floor: bench_s3.py --arch 7b --layers 16 --n 600 --null-product --set-cache cold, MODES
# (default auto). OUT: where the logs and JSONs go; ROUNDS: pairs (default 2).
set -u
OUT=${OUT:-/tmp/s23c}; PY=${PY:-$PWD/.venv/bin/python}; MODES=${MODES:-auto}
NEW=${NEW:-$PWD}; OLD=${OLD:?a worktree of the code before}
mkdir -p "$OUT"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for side in new old; do
    tree=$NEW; [ "$side" = old ] && tree=$OLD
    tag=cold-$side-$round
    echo "== $tag $(date +%T)"
    (cd "$tree" && PYTHONPATH=$tree timeout 1500 "$PY" benchmarks/bench_s3.py --arch 7b \
        --layers 16 --n 600 --null-product --repeats 1 --modes "$MODES" --set-cache cold \
        --no-reader --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1)
    grep -E "^\|\s+0 " "$OUT/$tag.log" | cut -c1-120
  done
done
echo ALLDONE
