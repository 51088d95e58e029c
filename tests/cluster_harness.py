"""A multi-node Ray cluster on loopback for tests: a head and worker nodes started with
``ray start`` as separate process groups, each with its own ports; worker nodes may get a
*private disk*: a mount namespace in which a tmpfs hides some directories of this machine, as
a real node does not see the driver's local disk.

Every node is stopped by its own process group id (never ``ray stop``, which would end every
Ray on the machine). Ray's token, temp files and logs stay in the test's own temp dir
(``RAY_TMPDIR`` / ``RAY_AUTH_TOKEN_PATH``, set for the whole test session by conftest).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))

#: Ports for the nodes' components come from below Linux's ephemeral range (32768-60999): the
#: kernel draws bind(0) ports and outgoing connections' ports from that range, so two draws
#: there can repeat (issue 20: one node got 35327 for both dashboard agent ports and died).
PORT_LO, PORT_HI = 20_000, 32_000
#: One node's block: its component ports, then its worker ports. Blocks never overlap.
BLOCK = 200
WORKER_PORTS = 120
#: ``ray start`` flags of every component port (``ray start --help``). The head adds
#: HEAD_PORTS; ``--worker-port-list`` is the alternative to the min/max range.
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port",
              "dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port")
HEAD_PORTS = ("port", "ray-client-server-port", "dashboard-port")
#: What Ray says when a port it was given is taken after all (then the start is retried).
PORT_CLASH = ("is trying to use a port number", "already in use", "Failed to bind",
              "address in use")
START_TRIES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on or holds ``port`` (on every address, as Ray binds some to 0.0.0.0)."""
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


class PortPlan:
    """Distinct ports for every component of every node of one cluster: node ``i`` gets a
    block of :data:`BLOCK` ports of its own, each verified free before it is handed out.
    The first block is drawn at random (other clusters may run on the machine); a block with
    a port in use is skipped."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._blocks = (PORT_HI - PORT_LO) // BLOCK
        self._next = (rng or random.Random()).randrange(self._blocks)
        self._used: set[int] = set()

    def node(self, head: bool) -> dict[str, int]:
        """``{flag: port}`` for one node (``min-worker-port`` / ``max-worker-port`` bound
        its workers' range)."""
        names = (*HEAD_PORTS, *NODE_PORTS) if head else NODE_PORTS
        for _ in range(self._blocks):
            b, self._next = self._next, (self._next + 1) % self._blocks
            if b in self._used:
                continue
            self._used.add(b)
            base = PORT_LO + b * BLOCK
            ports = {n: base + i for i, n in enumerate(names)}
            workers = range(base + BLOCK - WORKER_PORTS, base + BLOCK)
            if all(port_is_free(p) for p in (*ports.values(), *workers)):
                return {**ports, "min-worker-port": workers[0], "max-worker-port": workers[-1]}
        raise RuntimeError(f"no free block of {BLOCK} ports in {PORT_LO}..{PORT_HI}")

    @staticmethod
    def args(ports: dict[str, int]) -> list[str]:
        return [a for flag, port in ports.items() for a in (f"--{flag}", str(port))]


def can_isolate_disks() -> bool:
    """Whether this machine lets us give a node a private disk (root and ``unshare``)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@dataclass
class Node:
    """One ``ray start --block`` process (its own process group)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    private: tuple[str, ...] = ()
    node_manager_port: int = 0

    def node_id(self) -> str | None:
        """Its Ray node id (this process must be connected to the cluster)."""
        import ray

        for n in ray.nodes():
            if n.get("NodeManagerPort") == self.node_manager_port and n.get("Alive"):
                return n["NodeID"]
        return None

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        """Every process of the node: its session (workers get process groups of their own)."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.getsid(int(entry)) == self.pgid:
                        out.append(int(entry))
        return out

    def kill(self) -> None:
        """Kill the node at once, as a lost machine: raylet, object store, workers."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=3)
        self.kill()


class NodeStartError(RuntimeError):
    """A node that died (or hung) before Ray said it started."""

    def __init__(self, message: str, node: Node, port_clash: bool) -> None:
        super().__init__(message)
        self.node, self.port_clash = node, port_clash


@dataclass
class LocalCluster:
    """A head node and worker nodes on 127.0.0.1.

    Args:
        root: A temp dir of the test for the nodes' logs.
        head_cpus: CPUs of the head node.
    """

    root: Path
    head_cpus: int = 1
    nodes: list[Node] = field(default_factory=list)
    port: int = 0
    ports: PortPlan = field(default_factory=PortPlan)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: Sequence[str], private: Sequence[Path] = ()) -> Node:
        """Start a node; a start that dies on a port clash (a port taken between the plan
        and the start) is retried on another block, up to :data:`START_TRIES` times."""
        head = "--head" in args
        for attempt in range(1, START_TRIES + 1):
            ports = self.ports.node(head)
            if head:
                self.port = ports["port"]
            try:
                return self._spawn_once(name, args, ports, private)
            except NodeStartError as e:
                if not e.port_clash or attempt == START_TRIES:
                    raise
                self.nodes.remove(e.node)
                e.node.stop()
        raise AssertionError("unreachable")

    def _spawn_once(self, name: str, args: Sequence[str], ports: dict[str, int],
                    private: Sequence[Path]) -> Node:
        log = self.root / f"{name}.log"
        nm_port = ports["node-manager-port"]
        cmd = [RAY, "start", "--block", "--disable-usage-stats", *args,
               *PortPlan.args(ports)]
        if private:
            mounts = " && ".join(f"mkdir -p '{p}' && mount -t tmpfs tmpfs '{p}'"
                                 for p in private)
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"{mounts} && exec " + " ".join(f"'{c}'" for c in cmd)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = Node(name, proc, log, tuple(str(p) for p in private), nm_port)
        self.nodes.append(node)
        # One node at a time: nodes of one machine pick their socket names by looking at which
        # exist, so two starting together would race for the same one.
        deadline = time.monotonic() + 180
        while b"Ray runtime started" not in log.read_bytes():
            if not node.alive() or time.monotonic() > deadline:
                text = log.read_text(errors="replace")
                raise NodeStartError(f"node {name} did not start:\n{text[-3000:]}", node,
                                     any(c in text for c in PORT_CLASH))
            time.sleep(0.2)
        return node

    def start_head(self) -> Node:
        return self._spawn("head", ["--head", "--node-ip-address", "127.0.0.1",
                                    "--num-cpus", str(self.head_cpus),
                                    "--include-dashboard", "false",
                                    "--object-store-memory", str(100 * 1024**2)])

    def add_node(self, name: str, cpus: int = 1, gpus: int = 0,
                 private: Sequence[Path] = ()) -> Node:
        """A worker node; ``private`` directories are hidden behind an empty tmpfs on it."""
        args = ["--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus",
                str(cpus), "--object-store-memory", str(100 * 1024**2)]
        if gpus:
            args += ["--num-gpus", str(gpus)]
        return self._spawn(name, args, private)

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        """Wait until ``n`` nodes are alive (this process must be connected to the cluster)."""
        import ray

        deadline = time.monotonic() + timeout
        while sum(1 for x in ray.nodes() if x["Alive"]) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {n} live nodes")
            time.sleep(0.5)

    def wait_for_dead(self, n_alive: int, timeout: float = 120) -> None:
        """Wait until the cluster counts at most ``n_alive`` live nodes (a killed node is
        declared dead once the GCS's health checks fail)."""
        import ray

        deadline = time.monotonic() + timeout
        while sum(1 for x in ray.nodes() if x["Alive"]) > n_alive:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster still has more than {n_alive} live nodes")
            time.sleep(0.5)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        # `ray start --head` records its address for drivers given none: a later ray.init()
        # of another test would try to join this cluster, gone now.
        tmp = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


__all__ = ["LocalCluster", "Node", "NodeStartError", "PortPlan", "can_isolate_disks",
           "free_port", "port_is_free"]
