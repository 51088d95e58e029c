"""Whether the nodes that host workers see the same directory at a local path as this one.

An output written on another node's own disk is lost to this one (and to any rerun), and an
input only here is "not found" there: a run on several nodes refuses such paths up front
(:meth:`~safelora_ray.execution.ray_executor.RayExecutor.check_shared`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import Mapping, Sequence

import ray

from safelora_ray.core.errors import ClusterError, ConfigError
from safelora_ray.execution.actor import START_TIMEOUT_S, _pinned

logger = logging.getLogger(__name__)


def check_shared(nodes: Sequence[str], names: Mapping[str, str],
                 paths: Sequence[tuple[str, str, bool]]) -> None:
    """Refuse local paths that ``nodes`` do not share with this one.

    Inputs are compared by a fingerprint of their top-level entries; outputs by a marker this
    process writes and each node reads back.

    Args:
        nodes: The other nodes hosting workers (Ray node ids).
        names: Their addresses, for messages.
        paths: ``(flag, local path, is_output)``; URIs other than ``file://`` are skipped.

    Raises:
        ConfigError: naming the path, the flag and the node that does not share it.
        ClusterError: a node could not be asked.
    """
    local = [(f, p, out) for f, p, out in paths if "://" not in p or p.startswith("file://")]
    if not nodes or not local:
        return
    marker = f".safelora-shared-{uuid.uuid4().hex}"
    expected: dict[str, str] = {}
    written: list[str] = []
    try:
        for _, p, is_out in local:
            path = _local(p)
            if is_out:
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, marker), "w") as f:
                    f.write(marker)
                written.append(os.path.join(path, marker))
            expected[path] = _fingerprint(path, marker if is_out else None)
        probe = ray.remote(num_cpus=0)(_probe_paths)
        refs = {nid: probe.options(**_pinned(nid)).remote(
            sorted(expected), marker) for nid in nodes}
        for nid, ref in refs.items():
            try:
                seen = ray.get(ref, timeout=START_TIMEOUT_S)
            except Exception as e:
                raise ClusterError(f"could not check the local paths on node "
                                   f"{names.get(nid, nid)}: {e}") from e
            for flag, p, is_out in local:
                path = _local(p)
                if seen.get(path) != expected[path]:
                    what = "writes to" if is_out else "reads"
                    raise ConfigError(
                        f"{flag} {p} is a local path that node {names.get(nid, nid)} "
                        f"({nid[:12]}) does not share with this one: the run {what} it on "
                        "every node, so its files would scatter over the nodes' own "
                        "disks. Use s3:// (or a filesystem every node mounts at the same "
                        "path).")
    finally:
        for w in written:
            with contextlib.suppress(OSError):
                os.unlink(w)


def _local(uri: str) -> str:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _fingerprint(path: str, marker: str | None) -> str:
    """What a node sees at ``path``: the marker's content for an output, else the names and
    sizes of the top-level entries (a missing path reads as ``missing``)."""
    if marker is not None:
        try:
            with open(os.path.join(path, marker)) as f:
                return "marker:" + f.read()
        except OSError:
            return "missing"
    if not os.path.exists(path):
        return "missing"
    if os.path.isfile(path):
        st = os.stat(path)
        return f"file:{st.st_size}"
    h = hashlib.sha256()
    try:
        for name in sorted(os.listdir(path))[:1000]:
            if name.startswith(".safelora-shared-"):
                continue
            full = os.path.join(path, name)
            size = os.path.getsize(full) if os.path.isfile(full) else -1
            h.update(f"{name}\0{size}\n".encode())
    except OSError:
        return "missing"
    return "dir:" + h.hexdigest()


def _probe_paths(paths: Sequence[str], marker: str) -> dict[str, str]:
    """Run on a node: its view of each path (see :func:`_fingerprint`); an output directory
    without the driver's marker is another directory than the driver's."""
    return {p: _fingerprint(p, marker if os.path.exists(os.path.join(p, marker)) else None)
            for p in paths}


__all__ = ["check_shared"]
