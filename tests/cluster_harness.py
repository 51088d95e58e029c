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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ports(self) -> list[str]:
        args = []
        for flag in ("--object-manager-port",
                     "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--runtime-env-agent-port", "--metrics-export-port"):
            args += [flag, str(free_port())]
        return args

    def _spawn(self, name: str, args: Sequence[str], private: Sequence[Path] = ()) -> Node:
        log = self.root / f"{name}.log"
        nm_port = free_port()
        cmd = [RAY, "start", "--block", "--disable-usage-stats", *args, *self._ports(),
               "--node-manager-port", str(nm_port)]
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
                raise RuntimeError(f"node {name} did not start:\n"
                                   + log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        return node

    def start_head(self) -> Node:
        self.port = free_port()
        return self._spawn("head", ["--head", "--node-ip-address", "127.0.0.1", "--port",
                                    str(self.port), "--num-cpus", str(self.head_cpus),
                                    "--include-dashboard", "false",
                                    "--ray-client-server-port", str(free_port()),
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


__all__ = ["LocalCluster", "Node", "can_isolate_disks", "free_port"]
