"""The nightly job (``jobs/nightly.py``, ``safelora-ray nightly``): every configured catalog,
grouped by model pair, sanitized incrementally.

Its configuration is :mod:`.nightly_config`, the workflow :mod:`.nightly_run`; this module is
the job's entry point, above the command line it runs (``cli.main`` imports the workflow, never
this module, so the two do not import each other).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from safelora_ray.cli.nightly_config import CatalogSpec, ModelCatalogSpec, NightlyConfig, PairSpec
from safelora_ray.cli.nightly_run import MAX_LISTED, NIGHTLY_PREFIX, run_nightly, summary_text

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_LOCKED = 0, 1, 2, 3, 4


def main(argv: Sequence[str] | None = None) -> int:
    """``jobs/nightly.py``'s entry point: ``safelora-ray nightly`` (same flags, exit codes 0 ok,
    1 failed, 2 usage, 3 partial, 4 locked)."""
    from safelora_ray.cli.main import main as cli_main

    return cli_main(["nightly", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["MAX_LISTED", "NIGHTLY_PREFIX", "CatalogSpec", "ModelCatalogSpec", "NightlyConfig",
           "PairSpec", "main", "run_nightly", "summary_text"]
