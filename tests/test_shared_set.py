"""The GPU node's shared set, without a GPU: how an I/O worker opens a holder's CUDA IPC handles
(on the device with the holder's UUID), falls back to asking the holder when it cannot, and
computes a batch again when the holder's process changed under it. The CUDA calls are faked;
the real thing runs in ``tests/test_gpu.py`` on the lent GPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from safelora_ray import BuildConfig, build
from safelora_ray.cli.demo import write_model
from safelora_ray.execution import WorkerContext
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.pipelines.sanitize import shared_set
from safelora_ray.pipelines.sanitize.projection import HolderLost, MatrixCache, SetKey
from safelora_ray.pipelines.sanitize.shared_set import MappedSet, SetHandles, shared_projector
from tests.factory import Arch, aligned_from, llama_tensors


@pytest.fixture(scope="module")
def aset(tmp_path_factory: pytest.TempPathFactory) -> AlignmentSet:
    root = tmp_path_factory.mktemp("shared-set")
    base = llama_tensors(Arch(layers=1, hidden=32, heads=2, kv_heads=2, intermediate=48))
    write_model(root / "base", base)
    write_model(root / "aligned", aligned_from(base))
    res = build(BuildConfig(base=str(root / "base"), aligned=str(root / "aligned"),
                            out=str(root / "set"), targets=["q_proj", "v_proj"], workers=0,
                            progress=False))
    return AlignmentSet.open(res.uri)


def _rebuild(tensor_cls: type, storage_device: int, payload: torch.Tensor) -> torch.Tensor:
    """Stands for ``torch.multiprocessing.reductions.rebuild_cuda_tensor``: records where it
    was asked to open the memory."""
    opened.append(storage_device)
    return payload


opened: list[int] = []


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, uuids: list[str]) -> list[int]:
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(uuid=uuids[i]))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def _ipc_handles(aset: AlignmentSet, pid: int = 4242, node: str | None = None,
                 uuid: str = "GPU-b") -> SetHandles:
    refs = {m: (_rebuild, (torch.Tensor, 0, aset.load(m).tensor)) for m in aset.rows}
    return SetHandles("cuda-ipc", refs, node, pid, uuid)


def test_ipc_handles_open_on_the_holders_gpu(aset: AlignmentSet,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The holder's index is 0 in its own view (Ray gave it one GPU); this I/O worker sees
    # both GPUs of the node, the holder's second: the handles open on index 1.
    chosen = _fake_gpus(monkeypatch, ["GPU-a", "GPU-b"])
    opened.clear()
    cache = shared_set._open_cuda(aset, _ipc_handles(aset))
    assert chosen == [1] and opened == [1] * len(aset.rows)
    assert cache.device == "cuda:1" and cache.mapped
    for m, row in aset.rows.items():
        got = cache.get(m)
        assert (got.form, got.norm) == (row.form, row.norm)
        assert torch.equal(got.tensor, aset.load(m).tensor)
    with pytest.raises(RuntimeError, match="GPU GPU-z is not visible"):
        shared_set._open_cuda(aset, _ipc_handles(aset, uuid="GPU-z"))


def _groups(aset: AlignmentSet) -> dict[Any, Any]:
    m = next(iter(aset.rows))
    d_out = aset.rows[m].shape[0]
    b = torch.randn(3, d_out, 2, dtype=torch.float32)
    return {(m, "float32", 2): (b, torch.eye(2, dtype=torch.float64).expand(3, 2, 2))}


def test_a_holder_elsewhere_or_unshareable_computes_for_the_io_worker(
        aset: AlignmentSet, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Any] = []
    monkeypatch.setattr(shared_set, "_node_id", lambda: "here")
    monkeypatch.setattr(shared_set, "remote_projector",
                        lambda holder, key, t: lambda g: asked.append(g) or {"by": holder})
    key = SetKey(aset.uri, aset.content_id)
    for handles in (_ipc_handles(aset, node="elsewhere"),
                    SetHandles("none", node_id="here", why="MIG: no CUDA IPC")):
        monkeypatch.setattr(shared_set, "ask_holder", lambda *a, h=handles: h)
        mapped = MappedSet(key, aset, "the-holder", 5.0)
        assert mapped.engine is None
        assert mapped.run(_groups(aset)) == {"by": "the-holder"}
    assert len(asked) == 2


def test_a_batch_is_computed_again_when_the_holder_restarted(
        aset: AlignmentSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder's pid changed while a batch used its GPU memory: the products may be
    garbage, so the I/O worker maps the new holder's set and computes the batch again."""
    monkeypatch.setattr(shared_set, "_node_id", lambda: "here")
    monkeypatch.setattr(shared_set, "_open_cuda",
                        lambda a, h: MatrixCache(a, "cpu", {m: a.load(m) for m in a.rows}))
    holder = {"pid": 1}
    mapped: list[int] = []

    def ask(_holder: Any, timeout: float, fn: Any, *args: Any) -> Any:
        if fn is shared_set.share_set:
            mapped.append(holder["pid"])
            return _ipc_handles(aset, pid=holder["pid"], node="here")
        return holder["pid"]

    monkeypatch.setattr(shared_set, "ask_holder", ask)
    ctx = WorkerContext("cpu")
    project = shared_projector(ctx, "holder", SetKey(aset.uri, aset.content_id), aset, 5.0)
    groups = _groups(aset)
    first = project(groups)
    assert mapped == [1]
    holder["pid"] = 2  # restarted by Ray after the mapping, before the next batch's check
    again = project(groups)
    assert mapped == [1, 2]  # mapped again from the new holder, the batch computed again
    for k in groups:
        assert torch.equal(again[k][0], first[k][0])


def test_two_restarts_in_a_row_are_a_lost_holder(
        aset: AlignmentSet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_set, "_node_id", lambda: "here")
    monkeypatch.setattr(shared_set, "_open_cuda",
                        lambda a, h: MatrixCache(a, "cpu", {m: a.load(m) for m in a.rows}))
    pid = iter(range(100, 200))

    def ask(holder: Any, timeout: float, fn: Any, *args: Any) -> Any:
        if fn is shared_set.share_set:
            return _ipc_handles(aset, pid=next(pid), node="here")
        return -1  # never the pid the handles were taken from

    monkeypatch.setattr(shared_set, "ask_holder", ask)
    ctx = WorkerContext("cpu")
    project = shared_projector(ctx, "holder", SetKey(aset.uri, aset.content_id), aset, 5.0)
    with pytest.raises(HolderLost, match="restarted"):
        project(_groups(aset))
    assert ctx.peek(shared_set.SHARED_SLOT) is None


def test_unknown_gpu_products_setting_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    from safelora_ray.core.errors import ConfigError

    monkeypatch.setattr(shared_set, "GPU_PRODUCTS", "hodler")
    with pytest.raises(ConfigError, match="SAFELORA_GPU_PRODUCTS='hodler'"):
        shared_set.check_gpu_products()
