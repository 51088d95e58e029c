"""GPU scheduling on a Ray with fake GPUs (``num_gpus=2``): workers ask for one GPU and a
fraction of a CPU each (a whole CPU each would starve a 2-CPU node), and compute on the CPU
when torch sees no CUDA device, with unchanged results."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from safelora_ray import AlignmentSet, BuildConfig, SanitizeConfig, build, sanitize
from safelora_ray.cli.demo import write_adapter, write_model
from safelora_ray.execution import resolve_workers
from tests.factory import Arch, aligned_from, llama_tensors
from tests.reference import dense_c


@pytest.fixture(scope="module")
def ray_fake_gpus(s3_server):
    ray.init(address="local", num_cpus=2, num_gpus=2, object_store_memory=150 * 1024**2,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("ray_fake_gpus")
def test_gpu_workers_are_scheduled_and_results_unchanged(tmp_path):
    build_plan = resolve_workers(None, None, None, small=False)
    assert [(s.num_gpus, s.num_cpus) for s in build_plan.specs] == [(1.0, 0.25)] * 2
    assert not resolve_workers(None, False, None, small=False).uses_gpu  # --cpu
    # A sanitize: a holder of the set per GPU (a quarter CPU each), an I/O worker per CPU
    # left over, each sending its products to a holder.
    pipe = resolve_workers(None, None, None, small=False, shape="pipeline")
    assert [(s.role, s.num_gpus, s.num_cpus, s.holder) for s in pipe.specs] == [
        ("holder", 1.0, 0.25, None), ("holder", 1.0, 0.25, None), ("io", 0.0, 1.0, 0)]
    base = llama_tensors(Arch(layers=4))
    aligned = aligned_from(base)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "a", aligned)
    out = build(BuildConfig(base=str(tmp_path / "b"), aligned=str(tmp_path / "a"),
                            out=str(tmp_path / "set"), progress=False))
    assert out.workers == 2
    assert out.device == ("cuda" if torch.cuda.is_available() else "cpu")
    aset = AlignmentSet.open(out.uri)
    for m in aset.rows:
        ref = dense_c(base[m + ".weight"], aligned[m + ".weight"])
        torch.testing.assert_close(aset.load(m).dense().double(), ref, rtol=2e-5, atol=1e-7)

    g = torch.Generator().manual_seed(0)
    for i in range(3):
        lora = {m: (torch.randn(2, 32, generator=g), torch.randn(aset.rows[m].shape[0], 2,
                                                                 generator=g))
                for m in aset.rows}
        write_adapter(tmp_path / "cat" / f"a{i}", lora, 2)
    run = sanitize(SanitizeConfig(alignment=out.uri, adapters=str(tmp_path / "cat"),
                                  out=str(tmp_path / "out"), num_proj_layers=2, batch_size=1,
                                  progress=False))
    assert (run.ok, run.error) == (3, 0)
    # Nothing left holding the fake GPUs (killed actors release them asynchronously).
    _wait_gpus_free()

    # Two holders sharing each GPU: 4 of half a GPU, the same outputs (a column's float32
    # bits do not depend on how many adapters share its product).
    pipe2 = resolve_workers(None, None, None, small=False, shape="pipeline", workers_per_gpu=2)
    assert [(s.role, s.num_gpus) for s in pipe2.specs] == [("holder", 0.5)] * 4 + [("io", 0)]
    run2 = sanitize(SanitizeConfig(alignment=out.uri, adapters=str(tmp_path / "cat"),
                                   out=str(tmp_path / "out2"), num_proj_layers=2,
                                   workers_per_gpu=2, batch_size=1, progress=False))
    assert (run2.ok, run2.error) == (3, 0)
    for i in range(3):
        rel = f"a{i}/adapter_model.safetensors"
        assert (tmp_path / "out" / rel).read_bytes() == (tmp_path / "out2" / rel).read_bytes()
    _wait_gpus_free()


def _wait_gpus_free() -> None:
    deadline = time.time() + 30
    while ray.available_resources().get("GPU", 0) != 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("GPU", 0) == 2
