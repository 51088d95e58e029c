"""Failure causes: the error messages the fleet run produces, grouped into what to do about them.

Every failure row carries one message (``adapter '<id>': <reason>``, or a catalog entry's
``adapter id ...`` message). The operator reads groups, not 75 messages, so each message is
mapped to a cause by the first rule of :data:`RULES` that matches it. The rules follow the
messages the code raises (``formats/peft_adapter.py``, ``sanitize.py``, ``catalog.py``,
``storage/``); ``tests/test_reports.py`` feeds them real messages of each kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Cause:
    """One failure cause.

    Attributes:
        key: Stable identifier (Parquet/JSON value).
        label: What the operator reads.
        action: What usually fixes it.
    """

    key: str
    label: str
    action: str


#: (cause, pattern) in order: the first pattern found in a message gives its cause.
RULES: tuple[tuple[Cause, re.Pattern[str]], ...] = tuple(
    (Cause(key, label, action), re.compile(pattern))
    for key, label, action, pattern in (
        ("worker_died", "Worker died on it", "a poison adapter or an out-of-memory worker: "
         "inspect it alone", r"worker died"),
        ("invalid_id", "Invalid adapter id", "rename the directory or fix the manifest id",
         r"^adapter id '.*' (starts with '_'|has unsupported|has an empty|is empty|appears twice)"),
        ("symlink", "Symlink out of the catalog", "copy the files into the catalog",
         r"outside the storage root|symlinks out of the catalog"),
        ("dora", "DoRA (not covered)", "not covered by Safe LoRA; retrain as plain LoRA",
         r"DoRA"),
        ("not_lora", "Not a LoRA adapter", "not covered by Safe LoRA (IA3, LoHa, ...)",
         r"is not LoRA|has no peft_type"),
        ("variant", "LoRA variant not covered", "embedding/conv LoRA or another variant: "
         "not covered by Safe LoRA", r"not covered|only Linear LoRA"),
        ("pickle", "Pickle only (no safetensors)", "convert adapter_model.bin to safetensors",
         r"pickle-only"),
        ("no_alignment_entry", "Module not in the alignment set", "build the alignment set "
         "with these target modules, or map the adapter to its model pair",
         r"no entry in alignment set"),
        ("shape", "Shape or rank mismatch", "an adapter for another base model, or a config "
         "whose r does not match the tensors",
         r"alignment set's weight is|rank mismatch|has shape"),
        ("non_finite", "NaN / Inf values", "the fine-tune diverged: retrain or drop it",
         r"non-finite|\bNaN\b"),
        ("too_large", "Too large", "raise max_adapter_bytes if the size is expected",
         r"more than the \d+ allowed"),
        ("storage", "Storage access", "check permissions / credentials / the object store",
         r"permission denied|read-only|failed \(|timed out|[Cc]onnection|throttl|SlowDown"),
        ("missing", "Missing file or tensors", "incomplete upload: re-upload the adapter",
         r"is missing in|no LoRA modules|but no lora_[AB]|names no module|not found"),
        ("unreadable", "Unreadable or corrupt file", "the file is truncated or not what its "
         "name says: re-upload it",
         r"not valid JSON|not a valid safetensors|cannot read|cannot list|is a JSON|header"),
        ("invalid_config", "Invalid config or tensor", "fix adapter_config.json / the tensors' "
         "dtype", r"adapter_config\.json: |must be|has dtype|is empty \(shape"),
        ("write", "Writing the output failed", "check the output storage",
         r"cannot copy extra file|written adapter files|unsafe path|new lora_B"),
        ("internal", "Unexpected error", "a bug: report it with the message",
         r"^adapter '.*?': [A-Z]\w*(Error|Exception): |\b[A-Z]\w*(Error|Exception)\b.* at "
         r"\S+\.py:\d+$"),
    )
)

OTHER = Cause("other", "Other", "read the message")
CAUSES: dict[str, Cause] = {c.key: c for c, _ in RULES} | {OTHER.key: OTHER}


def classify(message: str | None) -> Cause:
    """The cause of one failure message (:data:`OTHER` when no rule matches)."""
    if message:
        for cause, pattern in RULES:
            if pattern.search(message):
                return cause
    return OTHER


def short_message(adapter_id: str, message: str | None) -> str:
    """The message without its ``adapter '<id>': `` prefix (the id is shown beside it)."""
    msg = message or ""
    for prefix in (f"adapter {adapter_id!r}: ", f"adapter {adapter_id!r} "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


__all__ = ["CAUSES", "OTHER", "RULES", "Cause", "classify", "short_message"]
