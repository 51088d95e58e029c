"""An adapter's row of the run's report (``adapters.parquet``): made, skipped, failed."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from safelora_ray.core.errors import SafeLoraError
from safelora_ray.core.redact import redact
from safelora_ray.pipelines.sanitize.ledger import source_uri
from safelora_ray.planning.catalog import AdapterRef
from safelora_ray.reports import ledger_figures

# The pipeline's name (``safelora_ray.pipelines.sanitize``), not this module's: an adapter's
# failure is the pipeline's record, and log files are searched for it under that name.
logger = logging.getLogger(__package__)


def base_row(ref: AdapterRef) -> dict[str, Any]:
    """A row with nothing done yet (an error until the adapter is sanitized or skipped)."""
    return {
        "adapter_id": ref.adapter_id, "source_uri": source_uri(ref), "status": "error",
        "error": None, "modules": 0, "projected": 0,
        "pdst": None, "source_digest": None, "output_digest": None, "base_model": None,
        "bytes_in": 0, "bytes_out": 0, "read_s": 0.0, "compute_s": 0.0, "write_s": 0.0,
        "batch_s": 0.0, "untouched": 0, "note": None,
    }


def mark_skipped(row: dict[str, Any], ledger: dict[str, Any], why: str,
                 run_id: str | None = None) -> None:
    """The adapter is done already (its ledger record ``ledger``): skipped, or ok when this
    very run ``run_id`` did it."""
    row.update(status="skipped", note=why, output_digest=ledger.get("output_digest"),
               source_digest=ledger.get("key", {}).get("content_digest"),
               projected=len(ledger.get("projected", [])), prior=ledger_figures(ledger))
    if run_id is not None and ledger.get("run_id") == run_id:
        # Written by this very run: a batch whose reply was lost with its worker and that Ray
        # ran again. The adapter was sanitized once, now; its per-module rows were lost.
        row.update(status="ok", modules=ledger.get("modules", 0),
                   note="sanitized by an earlier attempt of this batch in this run (the "
                        "worker died before replying); per-module rows were lost with it")


def mark_failed(row: dict[str, Any], e: BaseException) -> None:
    """The adapter failed with ``e``: its message, naming the adapter once, redacted."""
    row["status"] = "error"
    if isinstance(e, SafeLoraError):
        msg = str(e)
        name = f"adapter {row['adapter_id']!r}"
        row["error"] = redact(msg if msg.startswith(name) else f"{name}: {msg}")
    else:  # unexpected: keep the type and the last frame for the operator
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        row["error"] = redact(f"adapter {row['adapter_id']!r}: {type(e).__name__}: {e}{where}")
    # Printed once, by the driver's summary (and kept in the reports); not here as well.
    logger.debug("%s", row["error"])


__all__ = ["base_row", "mark_failed", "mark_skipped"]
