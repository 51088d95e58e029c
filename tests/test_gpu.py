"""On a real GPU: the build and the sanitize pipeline (a holder of the set on the GPU, I/O
workers beside it) against the dense float64 reference of SPEC §1–2.

These run where torch sees a CUDA device (the lent H100: ``benchmarks/gpu_issue11.sh check``),
and in CI with ``SAFELORA_GPU_TESTS_ON_CPU=1`` (``.ci/run``): then Ray has one fake GPU, the
GPU actors compute on the CPU, and every step of the GPU node's path (the holder, the set
shared with the I/O workers, their products) runs as on a GPU node, so it cannot rot between
GPU sessions. Without either they are skipped.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from safetensors.torch import load_file

from safelora_ray import AlignmentSet, BuildConfig, SanitizeConfig, build, sanitize
from safelora_ray.cli.demo import write_adapter, write_model
from safelora_ray.execution import worker_session
from safelora_ray.pipelines.sanitize.projection import SERVICE_SLOT
from tests.factory import Arch, aligned_from, llama_tensors
from tests.reference import dense_c, dense_exact, sanitize_dense

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not ON_GPU and os.environ.get("SAFELORA_GPU_TESTS_ON_CPU") != "1",
    reason="needs a CUDA device (or SAFELORA_GPU_TESTS_ON_CPU=1)")

ARCH = Arch(layers=3, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PFX = "base_model.model."


@pytest.fixture(scope="module")
def ray_gpu() -> Any:
    ray.init(address="local", num_cpus=4, num_gpus=1,  # a fake one without CUDA
             object_store_memory=150 * 1024**2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gpu-pair")
    base = llama_tensors(ARCH)
    aligned = aligned_from(base)
    write_model(root / "base", base)
    write_model(root / "aligned", aligned)
    return {"root": root, "base": base, "aligned": aligned}


def _dense(pair: dict[str, Any], module: str) -> torch.Tensor:
    w = module + ".weight"
    return dense_c(pair["base"][w], pair["aligned"][w])


@pytest.fixture(scope="module")
def gpu_set(pair: dict[str, Any], ray_gpu: None) -> str:
    res = build(BuildConfig(base=str(pair["root"] / "base"), aligned=str(pair["root"] / "aligned"),
                            out=str(pair["root"] / "set"), targets=list(TARGETS), workers=1,
                            use_gpu=True, progress=False))
    assert res.device == ("cuda" if ON_GPU else "cpu")
    assert res.num_modules == ARCH.layers * len(TARGETS)
    return res.uri


def test_gpu_build_matches_dense(pair: dict[str, Any], gpu_set: str) -> None:
    aset = AlignmentSet.open(gpu_set)
    for m in aset.rows:
        torch.testing.assert_close(aset.load(m).dense().double(), _dense(pair, m),
                                   rtol=2e-5, atol=1e-7)


def test_gpu_exact_build_matches_dense(pair: dict[str, Any], ray_gpu: None) -> None:
    res = build(BuildConfig(base=str(pair["root"] / "base"), aligned=str(pair["root"] / "aligned"),
                            out=str(pair["root"] / "exact"), targets=["q_proj"], workers=1,
                            use_gpu=True, progress=False, projection="exact", rank=3))
    aset = AlignmentSet.open(res.uri)
    for m in aset.rows:
        w = m + ".weight"
        ref, k = dense_exact(pair["base"][w], pair["aligned"][w], rank=3)
        assert k == 3
        torch.testing.assert_close(aset.load(m).dense().double(), ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def catalog(pair: dict[str, Any]) -> dict[str, Any]:
    """12 adapters: bf16 and float32, ranks 4 and 8; every third module's B leans on the
    column space of its V (a high cosine), the others are random (low): a real selection."""
    root = pair["root"] / "catalog"
    g = torch.Generator().manual_seed(7)
    adapters = {}
    for k in range(12):
        rank, dtype = (4, torch.bfloat16) if k % 2 else (8, torch.float32)
        lora = {}
        for layer in range(ARCH.layers):
            for t in TARGETS:
                m = f"model.layers.{layer}.self_attn.{t}"
                d_out, d_in = pair["base"][m + ".weight"].shape
                a = torch.randn(rank, d_in, generator=g) * 0.05
                b = torch.randn(d_out, rank, generator=g) * 0.05
                if (layer + k + len(lora)) % 3 == 0:
                    v = pair["aligned"][m + ".weight"] - pair["base"][m + ".weight"]
                    b = v @ torch.randn(d_in, rank, generator=g)
                lora[m] = (a.to(dtype), b.to(dtype))
        adapters[f"tenant-{k % 3}/a{k:02d}"] = lora
        write_adapter(root / f"tenant-{k % 3}" / f"a{k:02d}", lora, rank)
    return {"root": root, "adapters": adapters}


def _check_b(got: torch.Tensor, ref64: torch.Tensor) -> None:
    want = ref64.to(got.dtype).to(torch.float64)
    rtol = 1e-5 if got.dtype == torch.float32 else torch.finfo(got.dtype).eps
    torch.testing.assert_close(got.to(torch.float64), want, rtol=rtol,
                               atol=1e-6 * float(ref64.abs().max()))


@pytest.mark.parametrize("workers", [None, 0], ids=["pipeline", "in-process"])
@pytest.mark.parametrize("mode", [{"threshold": 0.35}, {"num_proj_layers": 3}],
                         ids=["threshold", "number"])
def test_gpu_sanitize_matches_dense(pair: dict[str, Any], gpu_set: str,
                                    catalog: dict[str, Any], tmp_path: Path,
                                    mode: dict[str, Any], workers: int | None) -> None:
    out = tmp_path / "out"
    res = sanitize(SanitizeConfig(alignment=gpu_set, adapters=str(catalog["root"]),
                                  out=str(out), workers=workers,
                                  use_gpu=ON_GPU if workers == 0 else True, batch_size=4,
                                  progress=False, **mode))
    assert res.error == 0, res.errors
    assert res.ok == len(catalog["adapters"])
    projected = total = 0
    for adapter_id, lora in catalog["adapters"].items():
        cs = {m: _dense(pair, m) for m in lora}
        k = mode.get("num_proj_layers")
        new_b, _cos, selected, _pdst = sanitize_dense(
            cs, lora, threshold=mode.get("threshold"),
            num_proj_layers=None if k is None else min(k, len(lora)))
        got = load_file(str(out / adapter_id / "adapter_model.safetensors"))
        for m, (_a, b) in lora.items():
            key = f"{PFX}{m}.lora_B.weight"
            if m in selected:
                _check_b(got[key], new_b[m])
            else:  # untouched: the input's bytes
                assert torch.equal(got[key], b), f"{adapter_id}: {m} changed"
        projected += len(selected)
        total += len(lora)
    assert 0 < projected < total  # the selection is not trivial
    assert res.projected == projected and not math.isnan(res.duration_s)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("adapter_model.safetensors"))}


def _holder_adapters(ctx: Any) -> int | None:
    """Runs on a worker: the batches its projection service ran (None: it has none)."""
    held = ctx.peek(SERVICE_SLOT)
    return None if held is None else held[1].batches


@pytest.mark.parametrize("products", ["workers", "holder"])
def test_gpu_node_paths_give_the_bits_of_the_in_process_run(
        gpu_set: str, catalog: dict[str, Any], tmp_path: Path, products: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU node's pipeline (a holder of the set on the GPU, two I/O workers) writes the
    bytes of the in-process run, whether the I/O workers compute on the holder's GPU memory
    (``workers``: CUDA IPC; on a fake GPU the set shared as on a CPU node) or send B to the
    holder."""
    from safelora_ray.pipelines.sanitize import shared_set

    def run(name: str, workers: int) -> dict[str, str]:
        res = sanitize(SanitizeConfig(alignment=gpu_set, adapters=str(catalog["root"]),
                                      out=str(tmp_path / name), threshold=0.35, batch_size=3,
                                      workers=workers,
                                      use_gpu=ON_GPU if workers == 0 else True,
                                      progress=False))
        assert res.error == 0 and res.ok == len(catalog["adapters"]), res.errors
        return _digests(tmp_path / name)

    ref = run("in-process", 0)
    monkeypatch.setattr(shared_set, "GPU_PRODUCTS", products)
    with worker_session() as sess:
        got = run("pipeline", 2)
        served = [ray.get(a.call.options(concurrency_group="control").remote(_holder_adapters),
                          timeout=60).result for _, a in sess._actors]
    assert got == ref
    served = [n for n in served if n is not None]
    if products == "holder":  # the batches' B went through the holder
        assert sum(served) > 0, served
    else:  # none did: the I/O workers computed their own products
        assert sum(served) == 0, served
