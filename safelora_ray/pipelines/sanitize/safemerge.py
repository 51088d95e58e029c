"""SafeMERGE on the sanitize path (SPEC §5): the safety adapter, read once per worker; the checks
that refuse an adapter it does not fit; and an adapter's output factors and config.

The cosine test and the selection are Safe LoRA's (computed by the same products, selected by
:meth:`~safelora_ray.core.selection.Selection.pick` with ``cos < τ``); only what a selected
module becomes differs: the merge of :func:`~safelora_ray.core.merge.merge_module` instead of
B ← C B.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from safelora_ray.core.errors import AdapterError, ConfigError, SafeLoraError
from safelora_ray.core.merge import MergeRule, merge_module
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.peft import Adapter, module_scaling, read_adapter, unit_scaling_config
from safelora_ray.storage import open_storage

logger = logging.getLogger(__name__)

#: The name the safety adapter goes by in messages.
SAFETY_ID = "safety adapter"


@dataclass(frozen=True)
class SafetySpec:
    """The safety adapter of a SafeMERGE run and how it is merged (hashable: in the job).

    Attributes:
        uri: Where the safety adapter is (any storage URI).
        digest: Its content digest when the run started: a worker reading other bytes refuses
            them, and the ledger keys every adapter on it (a changed safety adapter redoes
            the fleet).
        rule: Weights and combination.
    """

    uri: str
    digest: str
    rule: MergeRule

    def record(self) -> dict[str, Any]:
        """What ledgers and reports record of it."""
        return {"safety_adapter": self.digest, "safety_uri": self.uri, **self.rule.record()}

    def ledger_key(self) -> dict[str, Any]:
        """What an adapter's ledger key holds of it (not the URI: the same bytes moved
        elsewhere need not redo the fleet)."""
        return {"safety_adapter": self.digest, **self.rule.record()}


def read_safety(uri: str, max_bytes: int, expect: str | None = None) -> Adapter:
    """Read the safety adapter at ``uri`` (a PEFT LoRA adapter directory).

    Raises:
        ConfigError: it cannot be read, is not a plain LoRA adapter, carries LoRA biases, or
            its bytes are not those of ``expect`` (replaced during the run).
    """
    try:
        # Its digest is part of every record's key: kept in the scheme records were keyed
        # in before BLAKE3 (one adapter read per worker), so no fleet is redone for it.
        safety = read_adapter(open_storage(uri), "", SAFETY_ID, max_bytes=max_bytes,
                              schemes=("sha256",))
    except SafeLoraError as e:
        raise ConfigError(f"--safety-adapter {uri}: {e}") from None
    if expect is not None and safety.digest != expect:
        raise ConfigError(f"--safety-adapter {uri}: its content changed during the run "
                          f"({expect} at the start, {safety.digest} now); run again")
    biases = [n for n in safety.untouched if n.endswith("lora_B.bias")]
    if biases:
        raise ConfigError(f"--safety-adapter {uri}: it has LoRA biases ({biases[0]}, ...), "
                          "which SafeMERGE's rule does not cover")
    return safety


def check_safety_set(safety: Adapter, uri: str, aset: AlignmentSet) -> None:
    """The safety adapter must be for the alignment set's model: some module in common, and
    the set's d_out x d_in for each of those.

    Raises:
        ConfigError: naming the first module that does not fit.
    """
    common = [m for m in safety.modules if m in aset.rows]
    if not common:
        raise ConfigError(f"--safety-adapter {uri}: none of its {len(safety.modules)} modules "
                          f"is in alignment set {aset.content_id} (targets "
                          f"{','.join(aset.targets)}): a safety adapter for another model?")
    for m in common:
        lm = safety.modules[m]
        got = (int(lm.b.shape[0]), int(lm.a.shape[1]))
        if got != tuple(aset.rows[m].shape):
            raise ConfigError(
                f"--safety-adapter {uri}: module {m!r} updates a {got[0]}x{got[1]} weight but "
                f"alignment set {aset.content_id} holds it as {aset.rows[m].shape[0]}x"
                f"{aset.rows[m].shape[1]}: a safety adapter for another model")


def check_pair(adapter: Adapter, safety: Adapter, combination: str) -> None:
    """Refuse an adapter the safety adapter does not fit (SPEC §5), in one line naming the
    cause: another base model, a module it lacks, other shapes, another rank under
    ``linear``, or LoRA biases (their scaling is not covered).

    Raises:
        AdapterError: the first cause found.
    """
    who = f"adapter {adapter.adapter_id!r}"
    mine, theirs = adapter.base_model, safety.base_model
    if mine and theirs and mine.rstrip("/") != theirs.rstrip("/"):
        raise AdapterError(f"{who}: base_model_name_or_path is {mine!r} but the safety "
                           f"adapter's is {theirs!r}: it targets another model")
    if bool(adapter.config.get("fan_in_fan_out")) != bool(safety.config.get("fan_in_fan_out")):
        raise AdapterError(f"{who}: fan_in_fan_out differs from the safety adapter's: they "
                           "target another layer type (another model)")
    biases = [n for n in adapter.untouched if n.endswith("lora_B.bias")]
    if biases:
        raise AdapterError(f"{who}: LoRA biases (lora_bias: {biases[0]}) are not covered by "
                           "SafeMERGE's rule")
    missing = sorted(m for m in adapter.modules if m not in safety.modules)
    if missing:
        raise AdapterError(f"{who}: the safety adapter lacks {len(missing)} of its module(s): "
                           + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    for m, lm in adapter.modules.items():
        sm = safety.modules[m]
        mine_s = (int(lm.b.shape[0]), int(lm.a.shape[1]))
        their_s = (int(sm.b.shape[0]), int(sm.a.shape[1]))
        if mine_s != their_s:
            raise AdapterError(f"{who}: module {m!r} updates a {mine_s[0]}x{mine_s[1]} weight "
                               f"but the safety adapter's a {their_s[0]}x{their_s[1]} one: it "
                               "targets another model")
        for whose, mod in (("its", lm), ("the safety adapter's", sm)):
            if not (mod.alpha or 0) > 0:  # the merge takes √(w s): a scaling must be > 0
                raise AdapterError(f"{who}: module {m!r}: {whose} lora_alpha is {mod.alpha}; "
                                   "SafeMERGE needs a positive scaling")
        if combination == "linear" and lm.rank != sm.rank:
            raise AdapterError(f"{who}: module {m!r} has rank {lm.rank} but the safety "
                               f"adapter's has rank {sm.rank}: --combination linear needs "
                               "equal ranks; use --combination cat (the exact weighted sum, "
                               "any ranks)")


def merged_factors(adapter: Adapter, safety: Adapter, chosen: set[str], rule: MergeRule
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bytes]:
    """Every module's output (A', B') and the output's config (scaling 1; per-module ranks
    in ``rank_pattern``/``alpha_pattern``).

    Args:
        adapter: The task adapter (checked by :func:`check_pair`).
        safety: The safety adapter.
        chosen: Modules the cosine test selected.
        rule: Weights and combination.

    Returns:
        ``(new_a, new_b, config_bytes)``; the factors in float64 (the writer casts them to the
        adapter's dtypes).
    """
    new_a: dict[str, torch.Tensor] = {}
    new_b: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for m, lm in adapter.modules.items():
        sm = safety.modules[m]
        a, b = merge_module(lm.a, lm.b, module_scaling(adapter.config, lm.rank, lm.alpha or 0),
                            sm.a, sm.b, module_scaling(safety.config, sm.rank, sm.alpha or 0),
                            m in chosen, rule)
        new_a[m], new_b[m] = a, b
        ranks[m] = int(a.shape[0])
    return new_a, new_b, unit_scaling_config(adapter.config, ranks)


__all__ = ["SAFETY_ID", "SafetySpec", "check_pair", "check_safety_set", "merged_factors",
           "read_safety"]
