"""The ledger under ``--out``: one JSON record per sanitized adapter, written after its output.

A later run reads it to skip an adapter already sanitized from the same bytes, with the same
alignment set and selection, whose outputs are still as written; and to refuse to overwrite
another catalog's adapter that has the same id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from safelora_ray.core.errors import AdapterError, NotFoundError, SafeLoraError
from safelora_ray.core.redact import redact
from safelora_ray.core.selection import Selection
from safelora_ray.planning.catalog import AdapterRef
from safelora_ray.storage.base import Storage

logger = logging.getLogger(__name__)

LEDGER_PREFIX = "_ledger"


def ledger_path(adapter_id: str) -> str:
    """Where the ledger record of ``adapter_id`` lives under ``--out``."""
    return f"{LEDGER_PREFIX}/{adapter_id}.json"


def source_uri(ref: AdapterRef) -> str:
    """The adapter's URI as reports and the ledger show it (signed-URL parts masked)."""
    return redact(f"{ref.uri.rstrip('/')}/{ref.prefix}".rstrip("/")) or ""


def recorded_ids(out: Storage) -> frozenset[str] | None:
    """The ids of the adapters that have a record under ``out``, from one listing of the
    ledger, when ``out`` is an object store (there, reading a new adapter's record is a GET
    that answers 404: a round trip per adapter, where one LIST serves a thousand); None
    elsewhere (a missing local file costs no more than a listing of it).

    Taken once a run holds ``out``'s lease (no other run writes records then); what this run
    writes afterwards is not in it, so a batch retried within the run reads its records.
    """
    if not out.remote:
        return None
    suffix = ".json"
    cut = len(LEDGER_PREFIX) + 1
    return frozenset(o.path[cut:-len(suffix)] for o in out.list(LEDGER_PREFIX)
                     if o.path.endswith(suffix))


def all_recorded(out: Storage, ids: Iterable[str], known: frozenset[str] | None) -> bool:
    """Whether every one of ``ids`` has a record under ``out`` (from ``known``, the listing
    :func:`recorded_ids` took, else one existence check each): a run of only those may
    skip them all and need no product."""
    if known is not None:
        return all(i in known for i in ids)
    return all(out.exists(ledger_path(i)) for i in ids)


class Ledger:
    """The ledger of one output root, for one alignment set and selection.

    Args:
        out: The output root.
        alignment_id: The set's content id (part of every record's key).
        selection: The run's selection (part of every record's key).
        force: Nothing is done already, and any output may be replaced.
        merge: SafeMERGE's safety adapter digest, weights and combination (part of the key:
            a changed safety adapter redoes every adapter).
    """

    def __init__(self, out: Storage, alignment_id: str, selection: Selection,
                 force: bool = False, merge: Mapping[str, Any] | None = None) -> None:
        self.out = out
        self.alignment_id = alignment_id
        params = selection.record()
        if merge is not None:  # (Safe LoRA and SaLoRA keys keep their form)
            params = {**params, "merge": dict(merge)}
        self.params = json.dumps(params, sort_keys=True)
        self.force = force

    def key(self, digest: str | None) -> dict[str, str | None]:
        """What a record must hold to make an adapter of content ``digest`` done."""
        return {"content_digest": digest, "alignment_id": self.alignment_id,
                "params": self.params}

    def read(self, adapter_id: str, recorded: frozenset[str] | None = None
             ) -> dict[str, Any] | None:
        """The adapter's record; None when there is none or it cannot be read.

        Args:
            adapter_id: The adapter.
            recorded: The ids that have a record (:func:`recorded_ids`) when the caller
                knows them: one not among them is not read.
        """
        if recorded is not None and adapter_id not in recorded:
            return None
        try:
            rec = json.loads(self.out.read(ledger_path(adapter_id), max_bytes=1024**2))
        except NotFoundError:
            return None
        except (ValueError, SafeLoraError):
            logger.warning("unreadable ledger record for %s; redoing it", adapter_id)
            return None
        return rec if isinstance(rec, dict) else None

    def write(self, adapter_id: str, record: dict[str, Any]) -> None:
        # Compact: json's C encoder (an indent runs the pure-Python one, ~1 ms a record).
        self.out.put_bytes(ledger_path(adapter_id),
                           json.dumps(record, separators=(",", ":")).encode())

    def check_owner(self, record: dict[str, Any] | None, ref: AdapterRef) -> None:
        """Refuse to overwrite another adapter's output that has the same id (ids are relative
        to each catalog: two catalogs into one ``--out`` would overwrite each other)."""
        theirs, ours = (record or {}).get("source"), source_uri(ref)
        if self.force or not theirs or theirs == ours:
            return
        raise AdapterError(
            f"adapter {ref.adapter_id!r}: {self.out.describe(ref.adapter_id)} already holds "
            f"the sanitized output of {theirs}, not of {ours}: two catalogs write into one "
            "--out (adapter ids are relative to each catalog); give each catalog its own "
            "--out, or pass --force to replace it")

    def done(self, record: dict[str, Any] | None, key: dict[str, str | None],
             ref: AdapterRef) -> bool:
        """Whether ``record`` has ``key`` and the adapter's outputs are still as written."""
        if self.force or not record or record.get("key") != key:
            return False
        recorded = record.get("outputs")
        if not isinstance(recorded, dict):  # a record from before outputs were recorded
            return self.out.exists(f"{ref.adapter_id}/adapter_config.json")
        # Each output as written (size and version: S3 ETag, local mtime): one listing, no
        # download. One deleted, cut short or replaced since is written again.
        now = self.outputs(ref.adapter_id)
        changed = sorted(rel for rel, rec in recorded.items() if now.get(rel) != rec)
        if changed:
            logger.warning("adapter %s: its output %s changed since the run that wrote it "
                           "(deleted, cut short or replaced): sanitizing it again",
                           ref.adapter_id, self.out.describe(f"{ref.adapter_id}/{changed[0]}"))
        return not changed

    def outputs(self, adapter_id: str, names: Sequence[str] | None = None
                ) -> dict[str, dict[str, Any]]:
        """``{file: {"bytes", "version"}}`` of the adapter's output files (``names`` only)."""
        cut = len(adapter_id) + 1
        found = {o.path[cut:]: {"bytes": o.size, "version": o.version}
                 for o in self.out.list(adapter_id)}
        return found if names is None else {n: found[n] for n in names if n in found}


__all__ = ["LEDGER_PREFIX", "Ledger", "all_recorded", "ledger_path", "recorded_ids",
           "source_uri"]
