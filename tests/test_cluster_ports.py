"""The test cluster's port plan (issue 20, 11): every component of every node gets an
explicit port, all distinct across the cluster, outside the kernel's ephemeral range, free
when handed out; a start that dies on a port clash is retried (``tests/test_cluster.py`` runs
the real nodes)."""

from __future__ import annotations

import random
import re
import socket
import subprocess
from pathlib import Path

from tests.cluster_harness import (
    HEAD_PORTS,
    NODE_PORTS,
    PORT_CLASH,
    PORT_HI,
    PORT_LO,
    RAY,
    PortPlan,
)


def _all_ports(ports: dict[str, int]) -> list[int]:
    lo, hi = ports["min-worker-port"], ports["max-worker-port"]
    singles = [p for k, p in ports.items() if not k.endswith("worker-port")]
    return [*singles, *range(lo, hi + 1)]


def test_ports_are_distinct_for_every_component_across_nodes():
    plan = PortPlan(random.Random(0))
    nodes = [plan.node(head=True)] + [plan.node(head=False) for _ in range(4)]
    every = [p for n in nodes for p in _all_ports(n)]
    assert len(every) == len(set(every))  # no port twice, in a node or across nodes
    assert all(PORT_LO <= p < PORT_HI for p in every)
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    assert all(p < int(ephemeral[0]) for p in every)
    assert set(nodes[0]) == {*HEAD_PORTS, *NODE_PORTS, "min-worker-port", "max-worker-port"}
    assert all(set(n) == {*NODE_PORTS, "min-worker-port", "max-worker-port"}
               for n in nodes[1:])
    assert all(n["max-worker-port"] - n["min-worker-port"] >= 100 for n in nodes)


def test_every_port_flag_of_ray_start_is_planned():
    """A component added to ``ray start`` must not draw a random port unnoticed."""
    help_text = subprocess.run([RAY, "start", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    flags = set(re.findall(r"--([a-z-]+-port)(?![a-z-])", help_text))
    planned = {*HEAD_PORTS, *NODE_PORTS, "min-worker-port", "max-worker-port"}
    assert flags - planned <= {"worker-port-list"}, flags - planned
    args = PortPlan.args(PortPlan().node(head=True))
    assert all(f"--{f}" in args for f in planned)


def test_a_taken_port_is_never_handed_out():
    plan = PortPlan(random.Random(1))
    probe = PortPlan(random.Random(1)).node(head=False)
    with socket.socket() as s:  # someone else listens on that block's first port
        s.bind(("127.0.0.1", probe["node-manager-port"]))
        s.listen()
        got = plan.node(head=False)
    assert probe["node-manager-port"] not in _all_ports(got)


def test_port_clash_messages_are_recognised():
    line = ("ValueError: Ray component dashboard_agent_http is trying to use a port number "
            "35327 that is used by other components.")
    assert any(c in line for c in PORT_CLASH)
