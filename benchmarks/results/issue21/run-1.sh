#!/usr/bin/env bash
set -u
PY=/work/main/.venv/bin/python
OUT=/tmp/bench
run() {
  local tag=$1 tree=$2 script=$3; shift 3
  echo "== $tag $(date +%T)"
  (cd "$tree" && PYTHONPATH="$tree" timeout 900 $PY "benchmarks/$script" "$@" > "$OUT/$tag.log" 2>&1; echo "rc=$?" >> "$OUT/$tag.log")
  tail -1 "$OUT/$tag.log"
}
tree_of() { [ "$1" = new ] && echo /work/main || echo /work/wt/old; }
for side in old new; do run "build-$side-1" $(tree_of $side) bench_build.py --repeats 2 --out-json "$OUT/build-$side-1.json"; done
for side in old new; do run "fleet-$side-1" $(tree_of $side) bench_fleet.py --n 64,256 --modes auto,ray --repeats 2 --no-baseline --out-json "$OUT/fleet-$side-1.json"; done
for side in old new; do run "finetune-$side" $(tree_of $side) bench_finetune.py --out-json "$OUT/finetune-$side.json"; done
for side in old new; do run "setload-$side" $(tree_of $side) bench_set_load.py --repeats 5 --out-json "$OUT/setload-$side.json"; done
for side in new old; do run "build-$side-2" $(tree_of $side) bench_build.py --repeats 2 --out-json "$OUT/build-$side-2.json"; done
for side in new old; do run "fleet-$side-2" $(tree_of $side) bench_fleet.py --n 64,256 --modes auto,ray --repeats 2 --no-baseline --out-json "$OUT/fleet-$side-2.json"; done
echo "== done $(date +%T)"
