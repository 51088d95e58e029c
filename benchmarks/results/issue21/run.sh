#!/usr/bin/env bash
# Issue 21's old-against-new runs (docs/benchmarks.md section 13), as they ran: the code before
# the change in a worktree (git worktree add ../old 43d3911), each side with its own benchmark
# scripts and the same venv, interleaved in four rounds.
#   usage: benchmarks/results/issue21/run.sh OLD_TREE [OUT_DIR]
set -u
NEW=$(git rev-parse --show-toplevel)
OLD=$(realpath "$1")
OUT=$(realpath -m "${2:-$NEW/benchmarks/results/issue21}")
mkdir -p "$OUT"
PY=$NEW/.venv/bin/python
tree_of() { [ "$1" = new ] && echo "$NEW" || echo "$OLD"; }
run() {  # run TAG SIDE SCRIPT ARGS...
  local tag=$1 tree; tree=$(tree_of "$2"); local script=$3; shift 3
  echo "== $tag $(date +%T)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 900 "$PY" "benchmarks/$script" "$@" \
     --out-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1; echo "rc=$?" >> "$OUT/$tag.log")
}
fleet=(--n 64,256 --modes auto,ray --repeats 2 --no-baseline)
for side in old new; do run "build-$side-1" $side bench_build.py --repeats 2; done
for side in old new; do run "fleet-$side-1" $side bench_fleet.py "${fleet[@]}"; done
for side in old new; do run "finetune-$side" $side bench_finetune.py; done
for side in old new; do run "setload-$side" $side bench_set_load.py --repeats 5; done
for side in new old; do run "build-$side-2" $side bench_build.py --repeats 2; done
for side in new old; do run "fleet-$side-2" $side bench_fleet.py "${fleet[@]}"; done
for r in 3 4; do
  for side in old new; do run "fleet-$side-$r" $side bench_fleet.py "${fleet[@]}"; done
  for side in new old; do run "build-$side-$r" $side bench_build.py --repeats 2; done
done
"$PY" "$NEW/benchmarks/results/issue21/aggregate.py"
