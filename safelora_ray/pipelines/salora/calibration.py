"""The safety calibration set: reading and validating its JSONL, tokenizing it, sharing it out.

A calibration file is JSONL, one sample per line, in one of two forms (never mixed):

- text: ``{"prompt": "...", "response": "..."}`` — a harmful prompt and the aligned model's
  refusal, rendered with the model's chat template (user turn, then assistant turn) and
  tokenized with the model's tokenizer; only the assistant turn's tokens count;
- tokens: ``{"input_ids": [...], "labels": [...]}`` — pre-tokenized, Hugging Face convention:
  a position counts where ``labels`` is not −100.

Other keys on a line (an id, a category) are ignored. Blank lines are skipped. Everything
else is an error naming the file and line. Only :func:`load_tokenizer` needs
``transformers``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from safelora_ray.core.errors import ConfigError, NotFoundError
from safelora_ray.storage import Storage, open_storage

logger = logging.getLogger(__name__)

#: The label that marks a position that does not count (Hugging Face's ignore index).
IGNORE_INDEX = -100
#: Largest calibration file read (a safety calibration set is small: hundreds of samples).
MAX_CALIBRATION_BYTES = 1024**3
#: Files a Hugging Face tokenizer may consist of (copied into a temp dir to load it).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
)

Form = Literal["text", "tokens"]


@dataclass(frozen=True)
class CalibrationRecord:
    """One validated line of the calibration file (text or tokens form)."""

    line: int
    prompt: str | None = None
    response: str | None = None
    input_ids: tuple[int, ...] | None = None
    labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class CalibrationFile:
    """A parsed calibration file.

    Attributes:
        uri: Where it was read.
        sha256: SHA-256 of its bytes (recorded in the safety-module set).
        form: ``text`` or ``tokens``.
        records: The samples in file order.
    """

    uri: str
    sha256: str
    form: Form
    records: tuple[CalibrationRecord, ...]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_calibration(raw: bytes, uri: str) -> CalibrationFile:
    """Validate the JSONL bytes of a calibration file (see the module docstring).

    Raises:
        ConfigError: not UTF-8, a line that is not a JSON object, missing or mistyped fields,
            both forms on one line or across lines, ``labels`` of another length than
            ``input_ids``, a sample with no counted token, or no sample at all; the message
            names the file and line.
    """
    sha = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{uri}: not UTF-8 text: {e}") from None
    records: list[CalibrationRecord] = []
    form: Form | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{uri}: line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON: {e}") from None
        if not isinstance(rec, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        has_text = "prompt" in rec or "response" in rec
        has_tokens = "input_ids" in rec or "labels" in rec
        if has_text and has_tokens:
            raise ConfigError(f"{where}: give either prompt/response or input_ids/labels, "
                              "not both")
        if not has_text and not has_tokens:
            raise ConfigError(f"{where}: needs 'prompt' and 'response' (text) or 'input_ids' "
                              "and 'labels' (pre-tokenized)")
        this: Form = "text" if has_text else "tokens"
        if form is None:
            form = this
        elif this != form:
            raise ConfigError(f"{where}: a {this} sample in a file of {form} samples (the "
                              "first sample's form); one file uses one form")
        if this == "text":
            for key in ("prompt", "response"):
                if not isinstance(rec.get(key), str):
                    raise ConfigError(f"{where}: '{key}' must be a string"
                                      + ("" if key in rec else " (missing)"))
            if not rec["response"].strip():
                raise ConfigError(f"{where}: the response is empty: no token would count")
            records.append(CalibrationRecord(n, prompt=rec["prompt"], response=rec["response"]))
            continue
        ids, labels = rec.get("input_ids"), rec.get("labels")
        for key, val in (("input_ids", ids), ("labels", labels)):
            if not isinstance(val, list):
                raise ConfigError(f"{where}: '{key}' must be a list of integers"
                                  + ("" if key in rec else " (missing)"))
            bad = next((v for v in val if not _is_int(v)), None)
            if bad is not None:
                raise ConfigError(f"{where}: '{key}' holds {bad!r}, not an integer")
        assert isinstance(ids, list) and isinstance(labels, list)
        if not ids:
            raise ConfigError(f"{where}: 'input_ids' is empty")
        if len(labels) != len(ids):
            raise ConfigError(f"{where}: 'labels' has {len(labels)} entries, 'input_ids' "
                              f"{len(ids)}")
        if min(ids) < 0:
            raise ConfigError(f"{where}: 'input_ids' holds a negative id {min(ids)}")
        if all(v == IGNORE_INDEX for v in labels):
            raise ConfigError(f"{where}: every label is {IGNORE_INDEX}: no token counts")
        records.append(CalibrationRecord(n, input_ids=tuple(ids), labels=tuple(labels)))
    if not records or form is None:
        raise ConfigError(f"{uri}: the calibration file holds no sample")
    return CalibrationFile(uri, sha, form, tuple(records))


def read_calibration(uri: str) -> CalibrationFile:
    """Read and validate the calibration file at ``uri`` (a path or ``s3://``/``hf://`` URI)."""
    parent, name = uri.rstrip("/").rsplit("/", 1) if "/" in uri else (".", uri)
    storage = open_storage(parent)
    try:
        raw = storage.read(name, max_bytes=MAX_CALIBRATION_BYTES)
    except NotFoundError as e:
        raise ConfigError(f"{uri}: calibration file not found") from e
    return parse_calibration(raw, uri)


# ---------------------------------------------------------------------------------------------
# Tokenized samples
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedSamples:
    """Samples as flat tensors (compact to ship to workers).

    Attributes:
        ids: Every sample's token ids, concatenated (int64).
        counted: Whether each position counts (bool, same length).
        lengths: Each sample's length, in order.
        lines: Each sample's line in the calibration file (for error messages).
    """

    ids: torch.Tensor
    counted: torch.Tensor
    lengths: tuple[int, ...]
    lines: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        """Counted tokens (those whose inputs enter Σ)."""
        return int(self.counted.sum())

    @property
    def positions(self) -> int:
        """All positions (what the forward pass computes)."""
        return int(self.ids.numel())

    @property
    def offsets(self) -> list[int]:
        """Where each sample starts in :attr:`ids`."""
        return [0, *itertools.accumulate(self.lengths)][:-1]

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, counted)`` of sample ``i``."""
        start = self.offsets[i]
        end = start + self.lengths[i]
        return self.ids[start:end], self.counted[start:end]

    def subset(self, indices: Sequence[int]) -> TokenizedSamples:
        """The samples at ``indices``, in that order."""
        offsets = self.offsets
        parts = [(self.ids[offsets[i]:offsets[i] + self.lengths[i]],
                  self.counted[offsets[i]:offsets[i] + self.lengths[i]]) for i in indices]
        if not parts:
            return TokenizedSamples(torch.zeros(0, dtype=torch.int64),
                                    torch.zeros(0, dtype=torch.bool), (), ())
        return TokenizedSamples(torch.cat([p[0] for p in parts]),
                                torch.cat([p[1] for p in parts]),
                                tuple(self.lengths[i] for i in indices),
                                tuple(self.lines[i] for i in indices))

    def split(self, n: int) -> list[TokenizedSamples]:
        """At most ``n`` contiguous shares of balanced length (one per worker), in order."""
        n = max(1, min(n, len(self)))
        total = sum(self.lengths)
        shares: list[list[int]] = [[] for _ in range(n)]
        acc = 0
        for i, length in enumerate(self.lengths):
            # By the midpoint of each sample's token range, as the build shards its layers.
            k = min(n - 1, int((acc + length / 2) * n / total)) if total else 0
            shares[k].append(i)
            acc += length
        return [self.subset(s) for s in shares if s]

    @classmethod
    def of(cls, samples: Sequence[tuple[Sequence[int], Sequence[bool]]],
           lines: Sequence[int]) -> TokenizedSamples:
        """From ``(ids, counted)`` pairs."""
        return cls(torch.tensor([t for ids, _ in samples for t in ids], dtype=torch.int64),
                   torch.tensor([bool(c) for _, cs in samples for c in cs], dtype=torch.bool),
                   tuple(len(ids) for ids, _ in samples), tuple(lines))


def pretokenized(cal: CalibrationFile) -> TokenizedSamples:
    """The samples of a tokens-form file (counted where ``labels`` ≠ −100)."""
    if cal.form != "tokens":
        raise ValueError("not a pre-tokenized calibration file")
    samples = []
    for r in cal.records:
        assert r.input_ids is not None and r.labels is not None
        samples.append((r.input_ids, [v != IGNORE_INDEX for v in r.labels]))
    return TokenizedSamples.of(samples, [r.line for r in cal.records])


def tokenize(cal: CalibrationFile, tokenizer: Any, where: str) -> TokenizedSamples:
    """Render and tokenize a text-form file with the model's chat template.

    For each sample, ``P`` = the template of the user turn with the generation prompt and
    ``F`` = the template of the user turn then the assistant turn (the response). ``P`` must
    be a prefix of ``F``; the tokens of ``P`` (not counted) are followed by the tokens of the
    rest of ``F`` (counted: the response and the template's end-of-turn). Tokenizing the two
    parts apart keeps the boundary exact whatever the tokenizer merges across it.

    Args:
        cal: A text-form file.
        tokenizer: A Hugging Face tokenizer with a chat template.
        where: The model's URI (for messages).

    Raises:
        ConfigError: no chat template, a template that does not render the user turn as a
            prefix of the conversation, or a response that renders to no token.
    """
    if cal.form != "text":
        raise ValueError("not a text calibration file")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the tokenizer of {where} has no chat template: give the calibration set "
            "pre-tokenized (input_ids + labels) instead")
    samples = []
    for r in cal.records:
        at = f"{cal.uri}: line {r.line}"
        user = [{"role": "user", "content": r.prompt}]
        try:
            p_text = tokenizer.apply_chat_template(user, add_generation_prompt=True,
                                                   tokenize=False)
            f_text = tokenizer.apply_chat_template(
                [*user, {"role": "assistant", "content": r.response}], tokenize=False)
        except Exception as e:  # a template that raises (e.g. a role it refuses)
            raise ConfigError(f"{at}: the chat template of {where} failed: {e}") from None
        if not isinstance(p_text, str) or not isinstance(f_text, str):
            raise ConfigError(f"{at}: the chat template of {where} did not render text")
        if not f_text.startswith(p_text):
            raise ConfigError(
                f"{at}: the chat template of {where} does not render the prompt as a prefix "
                "of the conversation; give the calibration set pre-tokenized instead")
        p_ids = list(tokenizer(p_text, add_special_tokens=False)["input_ids"])
        r_ids = list(tokenizer(f_text[len(p_text):], add_special_tokens=False)["input_ids"])
        if not r_ids:
            raise ConfigError(f"{at}: the response renders to no token")
        samples.append((p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids)))
    return TokenizedSamples.of(samples, [r.line for r in cal.records])


def check_samples(samples: TokenizedSamples, cal_uri: str, *, vocab_size: int | None,
                  max_positions: int | None) -> None:
    """Check token ids against the model's vocabulary and lengths against its context.

    Raises:
        ConfigError: naming the file and line of the first offending sample.
    """
    start = 0
    for length, line in zip(samples.lengths, samples.lines, strict=True):
        ids = samples.ids[start:start + length]
        start += length
        if vocab_size is not None and int(ids.max()) >= vocab_size:
            raise ConfigError(f"{cal_uri}: line {line}: token id {int(ids.max())} is outside "
                              f"the model's vocabulary (size {vocab_size})")
        if max_positions is not None and length > max_positions:
            raise ConfigError(f"{cal_uri}: line {line}: {length} tokens, more than the "
                              f"model's {max_positions} positions")


def load_tokenizer(storage: Storage) -> Any:
    """The Hugging Face tokenizer stored beside a checkpoint (local, ``s3://`` or ``hf://``).

    Its files are copied into a temp dir and loaded from there with ``AutoTokenizer``
    (``local_files_only``: nothing is fetched from a hub, no remote code runs).

    Raises:
        ConfigError: transformers is not installed, or no tokenizer is there.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ConfigError("tokenizing the calibration set needs transformers: "
                          "pip install 'safelora-ray[salora]'") from e
    with tempfile.TemporaryDirectory(prefix="safelora-tokenizer-") as tmp:
        found = []
        for name in TOKENIZER_FILES:
            try:
                data = storage.read(name, max_bytes=512 * 1024**2)
            except NotFoundError:
                continue
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
            found.append(name)
        if not any(n not in ("chat_template.jinja", "chat_template.json") for n in found):
            raise ConfigError(f"{storage.uri}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}"
                              ", ...) beside the checkpoint: give the calibration set "
                              "pre-tokenized (input_ids + labels) instead")
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True,
                                                 trust_remote_code=False)
        except Exception as e:
            raise ConfigError(f"{storage.uri}: cannot load the tokenizer: {e}") from None


__all__ = ["IGNORE_INDEX", "CalibrationFile", "CalibrationRecord", "TokenizedSamples",
           "check_samples", "load_tokenizer", "parse_calibration", "pretokenized",
           "read_calibration", "tokenize"]
