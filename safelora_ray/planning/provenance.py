"""Was this output made from these inputs? One answer for every pipeline that reuses its output.

An output records its inputs when it is written: each input checkpoint as its
:meth:`~safelora_ray.formats.checkpoint.Checkpoint.source_info` (URI, layout, file versions,
Hub revision), and the parameters that shape it (targets, method, selection...). A rerun
proposes the same record; the output is reused only when the two name the same inputs. A
URI is not compared: a moved copy with the same file versions is the same input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from safelora_ray.core.errors import CheckpointError
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

_MISSING = object()


def _get(record: Mapping[str, Any], path: str) -> Any:
    """``record["a"]["b"]`` for ``path`` ``a.b``; None where a level is missing."""
    value: Any = record
    for key in path.split("."):
        value = value.get(key, _MISSING) if isinstance(value, Mapping) else _MISSING
        if value is _MISSING:
            return None
    return value


def same_source(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two source records (``Checkpoint.source_info``) name the same input: the same file
    versions and Hub revision."""
    return a.get("files") == b.get("files") and a.get("revision") == b.get("revision")


def same_inputs(existing: Mapping[str, Any], proposed: Mapping[str, Any], *,
                equal: Iterable[str] = (), sources: Iterable[str] = ()) -> bool:
    """Whether the record an earlier run wrote (``existing``) was made from the inputs this
    run proposes.

    Args:
        existing: The record found with the output.
        proposed: This run's record.
        equal: Keys whose values must be equal (``a.b``: a key of a nested record).
        sources: Keys of input checkpoints' source records (:func:`same_source`).
    """
    if any(_get(existing, k) != _get(proposed, k) for k in equal):
        return False
    return all(same_source(_get(existing, k) or {}, _get(proposed, k) or {}) for k in sources)


def aligned_matches_set(aset: AlignmentSet, aligned: Checkpoint, files: set[str]) -> str:
    """Whether ``aligned`` is the aligned model the set was built from: ``same`` (same URI
    and versions of ``files``), ``unverified`` (another URI: a copy, presumably).

    Raises:
        CheckpointError: the same URI, but its files changed since the build.
    """
    recorded = aset.metadata.get("aligned", {})
    if recorded.get("uri", "").rstrip("/") != aligned.uri.rstrip("/"):
        logger.warning("--aligned %s is not the aligned model alignment set %s was built from "
                       "(%s); assuming it is a copy of it", aligned.uri, aset.content_id,
                       recorded.get("uri"))
        return "unverified"
    now = aligned.versions(files)
    then = recorded.get("files", {})
    changed = sorted(p for p in now if p in then and then[p] != now[p])
    if changed:
        raise CheckpointError(
            f"{aligned.uri}: {', '.join(changed[:3])} changed since alignment set "
            f"{aset.content_id} was built from it")
    return "same"


__all__ = ["aligned_matches_set", "same_inputs", "same_source"]
