"""Ray Job entrypoint: the nightly sanitization of every configured adapter catalog.

    ray job submit --working-dir . --submission-id nightly-$(date -u +%Y%m%d-%H%M%S) -- \
        python jobs/nightly.py --config jobs/nightly.example.yaml

Exit codes: 0 all adapters ok/skipped, 3 some adapters failed or matched no model pair,
4 another nightly run holds the lock, 1 the run failed, 2 usage/config error.
"""

from __future__ import annotations

import sys

from _bootstrap import ensure_importable

ensure_importable()

from safelora_ray.cli.main import run  # noqa: E402

if __name__ == "__main__":
    run(["nightly", *sys.argv[1:]])
