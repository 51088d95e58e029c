"""Run reports: Parquet for machines, ``summary.json``, a text summary and HTML pages.

Under ``<out>/_reports/``:

- ``<run_id>/``: ``adapters.parquet`` and ``layers.parquet`` (this run's rows),
  ``fleet.parquet`` (every adapter known under ``--out``, as of this run), ``tenants.parquet``,
  ``summary.json`` and ``report.html`` (:mod:`.writer`, :mod:`.html`);
- ``index.json`` / ``index.html`` (every run), ``latest.json`` (the pointer to the current
  fleet state) and ``latest.html`` (:mod:`.fleet`).

Failures are grouped by cause (:mod:`.causes`); module figures are aggregated in fixed memory
(:mod:`.aggregate`).
"""

from safelora_ray.reports.causes import CAUSES, Cause, classify
from safelora_ray.reports.html import render_index, render_report
from safelora_ray.reports.writer import (
    ADAPTERS_SCHEMA,
    LAYERS_SCHEMA,
    ReportWriter,
    ledger_figures,
    text_summary,
)

__all__ = ["ADAPTERS_SCHEMA", "CAUSES", "LAYERS_SCHEMA", "Cause", "ReportWriter", "classify",
           "ledger_figures", "render_index", "render_report", "text_summary"]
