"""Where workers go, planned on made-up clusters (``placement.py`` is pure: no Ray here)."""

from __future__ import annotations

from collections import Counter

import pytest

from safelora_ray.core.errors import ConfigError
from safelora_ray.execution.placement import (
    GPU_WORKER_CPUS,
    NodeInfo,
    plan_device_workers,
    plan_pipeline,
)


def _nodes(*shape: tuple[float, float]) -> list[NodeInfo]:
    return [NodeInfo(f"n{i}", f"10.0.0.{i}", cpus, gpus) for i, (cpus, gpus) in enumerate(shape)]


def _per_node(specs, role: str) -> Counter:
    return Counter(s.node_id for s in specs if s.role == role)


def test_cpu_cluster_one_holder_per_node_and_an_io_worker_per_cpu() -> None:
    specs = plan_pipeline(_nodes((2, 0), (4, 0), (1, 0)), None, None)
    assert _per_node(specs, "holder+io") == {"n0": 1, "n1": 1, "n2": 1}  # the set once a node
    assert _per_node(specs, "io") == {"n0": 1, "n1": 3}
    for i, s in enumerate(specs):  # every I/O worker sends to the holder of its own node
        if s.role == "io":
            assert specs[s.holder].node_id == s.node_id and specs[s.holder].holds_set
        assert (s.num_cpus, s.num_gpus) == (1.0, 0.0)
        assert s.holder is None or s.holder < i


def test_workers_fewer_than_nodes_use_fewer_nodes() -> None:
    specs = plan_pipeline(_nodes((2, 0), (2, 0), (2, 0)), 1, None)
    assert [s.role for s in specs] == ["holder+io"]
    # GPU nodes too: a node without I/O workers gets no holder (it would serve nobody)
    specs = plan_pipeline(_nodes((16, 2), (16, 2)), 1, None)
    assert len({s.node_id for s in specs}) == 1
    assert Counter(s.role for s in specs) == {"holder": 2, "io": 1}


def test_gpu_cluster_holders_per_gpu_and_io_workers_on_the_rest() -> None:
    specs = plan_pipeline(_nodes((16, 2), (8, 1), (4, 0)), None, None)
    holders = [s for s in specs if s.role == "holder"]
    assert _per_node(holders, "holder") == {"n0": 2, "n1": 1}  # the CPU-only node is unused
    assert all((s.num_cpus, s.num_gpus) == (GPU_WORKER_CPUS, 1.0) for s in holders)
    # one I/O worker per whole CPU left beside the holders
    assert _per_node(specs, "io") == {"n0": 15, "n1": 7}
    served = Counter(s.holder for s in specs if s.role == "io")
    n0_holders = [i for i, s in enumerate(specs) if s.role == "holder" and s.node_id == "n0"]
    assert sorted(served[i] for i in n0_holders) == [7, 8]  # round-robin over the node's GPUs
    k2 = plan_pipeline(_nodes((16, 2)), None, None, workers_per_gpu=2)
    assert [s.num_gpus for s in k2 if s.role == "holder"] == [0.5] * 4


def test_device_workers_one_per_gpu_or_cpu() -> None:
    gpu = plan_device_workers(_nodes((16, 8), (16, 2), (4, 0)), None, None)
    assert Counter(s.node_id for s in gpu) == {"n0": 8, "n1": 2}
    assert all((s.num_cpus, s.num_gpus, s.role) == (GPU_WORKER_CPUS, 1.0, "device") for s in gpu)
    cpu = plan_device_workers(_nodes((16, 8), (2, 0)), None, False)  # --cpu
    assert Counter(s.node_id for s in cpu) == {"n0": 16, "n1": 2}
    assert len(plan_device_workers(_nodes((2, 0), (6, 0)), 4, None)) == 4


def test_plans_refuse_what_cannot_be_planned() -> None:
    with pytest.raises(ConfigError, match="no live node"):
        plan_pipeline([], None, None)
    with pytest.raises(ConfigError, match="workers-per-gpu"):
        plan_pipeline(_nodes((2, 1)), None, None, workers_per_gpu=0)
    with pytest.raises(ConfigError, match="no GPU"):
        plan_device_workers(_nodes((2, 0)), None, True)
