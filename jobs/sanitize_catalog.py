"""Ray Job entrypoint: sanitize a catalog. Takes the flags of ``safelora-ray sanitize``.

    ray job submit --working-dir . --submission-id sanitize-tenants-20261123 -- \
        python jobs/sanitize_catalog.py --alignment s3://bucket/alignment/llama2-7b-qv \
        --adapters s3://bucket/tenants/ --out s3://bucket/sanitized/ --threshold 0.35
"""

from __future__ import annotations

import sys

from _bootstrap import ensure_importable

ensure_importable()

from safelora_ray.cli.main import run  # noqa: E402

if __name__ == "__main__":
    run(["sanitize", *sys.argv[1:]])
