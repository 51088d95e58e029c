#!/usr/bin/env bash
# One in-process sanitize (--workers 0, the null product) of the proxy's 512 adapters, with
# /usr/bin/time's CPU: less noisy than the Ray run for an A/B of the I/O path's own CPU.
#   bash benchmarks/results/issue22/session10/inproc.sh TREE TAG   (inputs: /tmp/p22)
T=$1; tag=$2; INPUTS=${INPUTS:-/tmp/p22}; PY=${PY:-/work/main/.venv/bin/python}
rm -rf "/tmp/inproc-$tag"
cd "$T" && export PYTHONPATH=$T SAFELORA_BENCH_NULL_PRODUCT=1
/usr/bin/time -f "$tag wall %e user %U sys %S" "$PY" -m safelora_ray.cli.main sanitize \
  --alignment "$INPUTS/set-once" --adapters "$INPUTS/catalog-512" --out "/tmp/inproc-$tag" \
  --workers 0 --cpu --batch-size 16 --threshold 0.35 --no-progress -q 2>&1 | tail -1
rm -rf "/tmp/inproc-$tag"
