#!/usr/bin/env bash
# Issue 22, tenth session: the CPU proxy, two trees alternating (new = this one, OLD = a
# worktree of the commit before), inputs written once (--workdir /tmp/p22 --keep the first
# time, then --inputs). From the repository root:
#   OLD=/tmp/wt-old OUT=/tmp/s10 bash benchmarks/results/issue22/session10/old-new.sh
set -u
OUT=${OUT:-/tmp/s10}; PY=${PY:-$PWD/.venv/bin/python}; INPUTS=${INPUTS:-/tmp/p22}
mkdir -p "$OUT"
i=0
for tree in $PWD $OLD $PWD $OLD; do
  i=$((i + 1)); tag=$([ "$tree" = "$PWD" ] && echo new || echo old)-$i
  (cd "$tree" && PYTHONPATH=$tree "$PY" benchmarks/bench_fleet.py --arch llama2-7b \
     --fill holes --modes ray --n 512 --batch-size 16 --repeats 1 --null-product --fake-gpu \
     --io-floor --inputs "$INPUTS" --out-json "$OUT/proxy-$tag.json" > "$OUT/proxy-$tag.log" 2>&1)
  "$PY" - "$OUT/proxy-$tag.json" "$tag" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
print(sys.argv[2], f"sanitize {r['sanitize_s']:.1f} s, floor {r['io_floor_s']:.1f} s "
      f"(uncached {r['io_floor_uncached_s_median']:.1f} s), busiest thread "
      f"{r['max_thread_cpu_ms_per_adapter']:.2f} ms, all {r['total_cpu_ms_per_adapter']:.1f} ms")
PY
done
