#!/usr/bin/env bash
# The GPU measurements of issue 11 ("The GPU data path"), for one H100, one part per call so
# that each fits the device tool's 10 minutes per command (docs/benchmarks.md, section 6).
#
#   bash benchmarks/gpu_issue11.sh fleet      # sanitize 2,048 7B r=8 q/v adapters + I/O floor
#   bash benchmarks/gpu_issue11.sh build7b    # build, 7B-shaped pair, all 32 layers
#   bash benchmarks/gpu_issue11.sh scale70b   # build, 70B-shaped pair, all 80 layers
#
# JSON and logs go to $OUT (the device tool's output folder; default benchmarks/results).
# SMALL=1 runs every part at tiny sizes on the CPU: how to check this script here first.
# On the GPU machine, through /work/shared/device/README.md's recipe (carry .device-site):
#   mkdir -p /tmp/site && tar -xJf .device-site/site.tar.xz -C /tmp/site &&
#   export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 &&
#   bash benchmarks/gpu_issue11.sh fleet
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
SMALL=${SMALL:-0}
mkdir -p "$OUT"
if [ "$SMALL" = 1 ]; then
  DEV=cpu TAG=small LIMIT=300
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
# Whatever the GPU is, its name and memory go with the figures.
$PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" \
  | tee "$OUT/device.txt"
case "${1:-}" in
  fleet)
    # One run (--repeats 1) of build + sanitize; the baseline would load both 13.5 GB models
    # per adapter (--no-baseline); the plain read + write/fsync floor of the same catalog is
    # measured right after (--io-floor); the RSS of every process is sampled throughout.
    timeout "$LIMIT" $PY benchmarks/bench_fleet.py --arch llama2-7b --fill holes \
      --device "$DEV" --modes ray --repeats 1 --no-baseline --io-floor "${FLEET[@]}" \
      --out-json "$OUT/fleet-7b-n2048-$TAG.json" 2>&1 | tee "$OUT/fleet-7b-$TAG.log"
    ;;
  build7b)
    # Raw read of the target bytes, one worker's reader loop, the build, and writing + fsyncing
    # the set's bytes: build / max(read, write) is the issue's bound (<= 1.25).
    timeout "$LIMIT" $PY benchmarks/bench_build.py --device "$DEV" --repeats 2 "${B7[@]}" \
      --out-json "$OUT/build-7b-32layers-$TAG.json" 2>&1 | tee "$OUT/build-7b-$TAG.log"
    ;;
  scale70b)
    # All 80 layers' q/v real (~23 GB for the pair, 21 GB of set written): ~46 GB of disk.
    timeout "$LIMIT" $PY benchmarks/bench_scale.py --device "$DEV" "${S70[@]}" \
      --out-json "$OUT/scale-70b-80layers-$TAG.json" 2>&1 | tee "$OUT/scale-70b-$TAG.log"
    ;;
  *)
    echo "usage: $0 fleet|build7b|scale70b" >&2
    exit 2
    ;;
esac
