"""An adapter that kills its worker (every time) fails alone: its batch is split, the worker
replaced, and the rest of the fleet completes."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from safelora_ray import AlignmentSet, BuildConfig, SanitizeConfig, build, sanitize
from safelora_ray.cli.demo import write_adapter, write_model
from tests.crashy import crashing_worker
from tests.factory import Arch, aligned_from, llama_tensors

actor_mod = importlib.import_module("safelora_ray.execution.actor")  # starts the actors

pytestmark = pytest.mark.usefixtures("ray_local")


def test_poison_adapter_fails_alone(tmp_path, monkeypatch):
    base = llama_tensors(Arch())
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "a", aligned_from(base))
    res = build(BuildConfig(base=str(tmp_path / "b"), aligned=str(tmp_path / "a"),
                            out=str(tmp_path / "set"), progress=False))
    rows = AlignmentSet.open(res.uri).rows
    g = torch.Generator().manual_seed(0)
    names = [f"t{i}/a{i}" for i in range(5)] + ["t9/poison"]
    for name in names:
        lora = {m: (torch.randn(2, r.shape[1], generator=g), torch.randn(r.shape[0], 2,
                                                                         generator=g))
                for m, r in rows.items()}
        write_adapter(tmp_path / "cat" / name, lora, 2)

    # A worker that dies (like a segfault or an OOM kill) on the poison adapter.
    def die_on_poison(fn, args):
        if fn.__name__ == "sanitize_batch" and any(
                r.adapter_id.endswith("poison") for r in args[1]):
            os._exit(1)

    Crashy = crashing_worker(die_on_poison)
    monkeypatch.setattr(actor_mod, "SafeLoraWorker", Crashy)
    run = sanitize(SanitizeConfig(alignment=res.uri, adapters=str(tmp_path / "cat"),
                                  out=str(tmp_path / "out"), threshold=0.35, batch_size=3,
                                  workers=2, progress=False))
    # A task whose reply was lost when its worker died right after it may be retried by Ray;
    # the ledger shows this run already did its adapters: reported ok, done once, never twice.
    assert (run.total, run.ok, run.skipped, run.error) == (6, 5, 0, 1)
    assert run.errors[0][0] == "t9/poison"
    assert "the worker died while sanitizing it" in run.errors[0][1]
    assert not (tmp_path / "out" / "t9").exists()
    for name in names[:-1]:
        assert (tmp_path / "out" / name / "adapter_config.json").exists()
