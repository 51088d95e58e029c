#!/usr/bin/env bash
# The GPU measurements of issue 11 ("The GPU data path"), for one H100 (docs/benchmarks.md,
# section 6).
#
#   bash benchmarks/gpu_issue11.sh check      # tests/test_gpu.py: GPU build + sanitize = dense ref
#   bash benchmarks/gpu_issue11.sh fleet      # sanitize 2,048 7B r=8 q/v adapters + I/O floor
#   bash benchmarks/gpu_issue11.sh fleetholder  # the same inputs, products by the holder (old)
#   bash benchmarks/gpu_issue11.sh build7b    # build, 7B-shaped pair, all 32 layers
#   bash benchmarks/gpu_issue11.sh scale70b   # build, 70B-shaped pair, all 80 layers
#   bash benchmarks/gpu_issue11.sh all        # check, fleet, fleetholder, build7b, in BUDGET s
#                                             # (scale70b needs a call of its own: its disk)
#
# JSON and logs go to $OUT (the device tool's output folder; default benchmarks/results);
# `all` writes one log (all.log) and one JSON per part, as the tool brings back 8 files.
# SMALL=1 runs every part at tiny sizes on the CPU: how to check this script here first.
# On the GPU machine, through /work/shared/device/README.md's recipe (carry .device-site):
#   mkdir -p /tmp/site && tar -xJf .device-site/site.tar.xz -C /tmp/site &&
#   export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 &&
#   BUDGET=540 bash benchmarks/gpu_issue11.sh all
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
SMALL=${SMALL:-0}
mkdir -p "$OUT"
if [ "$SMALL" = 1 ]; then
  DEV=cpu TAG=small LIMIT=300
  export SAFELORA_GPU_TESTS_ON_CPU=1
  FLEET=(--layers 2 --n 16 --batch-size 4)
  B7=(--layers 1 --hidden 512 --heads 4 --kv-heads 4 --intermediate 1024 --vocab 1024)
  S70=(--smoke)
else
  DEV=cuda TAG=h100 LIMIT=570
  # 15 I/O workers (one per CPU left beside the holder) x 2 batches of 16 in flight
  FLEET=(--n 2048 --batch-size 16 --max-in-flight 2)
  B7=(--layers 32 --fill holes)
  S70=(--layers 80)
fi
# The device bundle is unpacked with Python's zipfile, which drops the executable bits of
# Ray's gcs_server and raylet ("Permission denied" at ray.init): put them back.
RAYDIR=$($PY -c "import os, ray; print(os.path.dirname(ray.__file__))" 2>/dev/null || true)
if [ -n "$RAYDIR" ] && [ -d "$RAYDIR/core/src" ] && [ -w "$RAYDIR/core/src" ]; then
  find "$RAYDIR/core/src" -type f ! -perm -u+x -exec chmod u+x {} + 2>/dev/null || true
fi
# blake3 (adapter digests) is not in the shared bundle: its wheel, downloaded into
# .device-site beside it (docs/benchmarks.md §14.3), is unpacked where the bundle was.
if ! $PY -c "import blake3" 2>/dev/null; then
  for w in .device-site/blake3-*.whl; do
    [ -f "$w" ] && $PY -m zipfile -e "$w" "${SITE:-/tmp/site}"
  done
fi
device_info() {  # whatever the GPU is, its name and memory go with the figures
  $PY -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', torch.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  echo "cpus: $(nproc), memory: $(free -g | awk '/Mem:/{print $2}') GiB, disk free: $(df -h --output=avail . | tail -1)"
}
# Each part runs in its own scratch folder, removed afterwards even when a part ran out of
# time (the next part needs the disk). SIGINT first, so that Ray shuts down with the script.
SCRATCH=${SCRATCH:-/tmp/slr-gpu-bench}
# The fleet's inputs, kept from fleet for fleetholder (removed after it, or by hand).
INPUTS=${INPUTS:-/tmp/slr-gpu-fleet-inputs}
run_part() {  # run_part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 rc=0
  shift 2
  rm -rf "$SCRATCH" && mkdir -p "$SCRATCH"
  echo "=== $name (limit ${limit} s) $(date -u +%T) disk free: $(df -h --output=avail "$SCRATCH" | tail -1)"
  local t0=$SECONDS
  TMPDIR=$SCRATCH timeout -s INT -k 20 "$limit" "$@" || rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  rm -rf "$SCRATCH"
  return $rc
}
part() {  # the command of one part
  case "$1" in
    check)
      # The GPU build (fast and exact) and the sanitize pipeline (holder on the GPU, I/O
      # workers) and in-process, threshold and number modes, against the float64 reference.
      if [ "$SMALL" = 1 ]; then export SAFELORA_GPU_TESTS_ON_CPU=1; fi
      echo "$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py"
      ;;
    fleet)
      # One run (--repeats 1) of build + sanitize, each I/O worker computing on the holder's
      # set through CUDA IPC (issue 22); the baseline would load both 13.5 GB models per
      # adapter (--no-baseline); the plain read + write/fsync floor of the same catalog is
      # measured right after (--io-floor); the RSS and the CPU of every process and thread
      # are sampled. The inputs stay in $INPUTS for fleetholder.
      echo "$PY benchmarks/bench_fleet.py --arch llama2-7b --fill holes --device $DEV --modes ray --repeats 1 --no-baseline --io-floor ${FLEET[*]} --workdir $INPUTS --keep --out-json $OUT/fleet-7b-n2048-$TAG.json"
      ;;
    fleetholder)
      # The same inputs, the products computed by the holder (the design before issue 22:
      # every adapter's B through one process per GPU), for old against new on one card.
      echo "env SAFELORA_GPU_PRODUCTS=holder $PY benchmarks/bench_fleet.py --arch llama2-7b --fill holes --device $DEV --modes ray --repeats 1 --no-baseline --io-floor ${FLEET[*]} --inputs $INPUTS --out-json $OUT/fleet-7b-n2048-holder-$TAG.json"
      ;;
    build7b)
      # Raw read of the target bytes, one worker's reader loop, the build, and writing +
      # fsyncing the set's bytes: build / max(read, write) is the issue's bound (<= 1.25).
      echo "$PY benchmarks/bench_build.py --device $DEV --repeats 2 ${B7[*]} --out-json $OUT/build-7b-32layers-$TAG.json"
      ;;
    scale70b)
      # All 80 layers' q/v real (~24 GB for the pair, ~22 GB of set; the write floor after
      # the set is removed when both do not fit).
      echo "$PY benchmarks/bench_scale.py --device $DEV ${S70[*]} --out-json $OUT/scale-70b-80layers-$TAG.json"
      ;;
    *) return 2 ;;
  esac
}
case "${1:-}" in
  check|fleet|fleetholder|build7b|scale70b)
    cmd=$(part "$1")
    # shellcheck disable=SC2086
    { device_info; run_part "$1" "$LIMIT" $cmd; } 2>&1 | tee "$OUT/$1-$TAG.log"
    exit "${PIPESTATUS[0]}"
    ;;
  all)
    # Parts in order of what matters most, each given what is left of BUDGET (less a margin).
    BUDGET=${BUDGET:-540}
    start=$SECONDS
    (
    device_info
    status=0
    for name in check fleet fleetholder build7b; do
      left=$((BUDGET - (SECONDS - start) - 10))
      if [ "$left" -lt 30 ]; then
        echo "=== $name: skipped, ${left} s left of the budget"
        status=1
        continue
      fi
      case "$name" in check) cap=150 ;; fleet) cap=240 ;; fleetholder) cap=150 ;; *) cap=$left ;; esac
      cmd=$(part "$name")
      # shellcheck disable=SC2086
      run_part "$name" "$((left < cap ? left : cap))" $cmd || status=1
      if [ "$name" = fleetholder ]; then rm -rf "$INPUTS"; fi  # the build parts need the disk
    done
    exit "$status"
    ) 2>&1 | tee "$OUT/all-$TAG.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: $0 check|fleet|fleetholder|build7b|scale70b|all" >&2
    exit 2
    ;;
esac
