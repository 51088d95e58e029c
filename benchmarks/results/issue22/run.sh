#!/usr/bin/env bash
# Issue 22's old-against-new runs (docs/benchmarks.md section 14), as they ran: the code before
# the change in a worktree (git worktree add ../base22 d1046ce: the tree of ca68542 plus the
# benchmarks' null-product hook), both sides measured by this checkout's benchmark scripts,
# run from the side's own tree (Ray's workers import the package from the driver's working
# directory, whatever PYTHONPATH says), interleaved. INPUTS holds a llama2-7b holes pair and a pool
# of 512 r=8 q/v adapters (bench_fleet.py --workdir INPUTS --keep writes them).
#   usage: benchmarks/results/issue22/run.sh OLD_TREE INPUTS [OUT_DIR]
set -u
NEW=$(git rev-parse --show-toplevel)
OLD=$(realpath "$1")
INPUTS=$(realpath "$2")
OUT=$(realpath -m "${3:-$NEW/benchmarks/results/issue22}")
mkdir -p "$OUT"
PY=$NEW/.venv/bin/python
tree_of() { [ "$1" = new ] && echo "$NEW" || echo "$OLD"; }
run() {  # run TAG SIDE SCRIPT ARGS...
  local tag=$1 tree; tree=$(tree_of "$2"); local script=$3; shift 3
  echo "== $tag $(date +%T)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 1200 "$PY" "$NEW/benchmarks/$script" "$@" \
     --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1; echo "rc=$?" >> "$OUT/$tag.log")
}
proxy=(--arch llama2-7b --fill holes --modes ray --n 512 --batch-size 16 --repeats 1
       --null-product --fake-gpu --io-floor --inputs "$INPUTS")
cpu=(--n 64,256 --modes auto,ray --repeats 2 --no-baseline)
for side in old new; do run "proxy-$side-1" $side bench_fleet.py "${proxy[@]}"; done
for side in old new; do run "cpu-$side-1" $side bench_fleet.py "${cpu[@]}"; done
for side in new old; do run "proxy-$side-2" $side bench_fleet.py "${proxy[@]}"; done
for side in new old; do run "cpu-$side-2" $side bench_fleet.py "${cpu[@]}"; done
run "proxy-new-gil" new bench_fleet.py "${proxy[@]}" --gil
# A third round, run after the floor's own CPU was added to --io-floor (benchlib/floors.py).
for side in new old; do run "proxy-$side-3" $side bench_fleet.py "${proxy[@]}"; done
