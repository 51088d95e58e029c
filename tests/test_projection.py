"""Where a sanitize's products are computed, and that every place gives the same bits.

- GPU nodes (fake GPUs here): I/O workers send their groups to the GPU's holder in bounded
  parts (what is in flight through Ray's object store is bounded whatever the batch and
  adapter sizes), and the parts' answers are the bits of the whole.
- CPU-only nodes: the set is shared once on the node (a local set's files mapped, a set on
  S3 put in the node's object store), every I/O worker maps those pages (no copy of its own)
  and computes its own products.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from safelora_ray import AlignmentSet, BuildConfig, SanitizeConfig, build, sanitize
from safelora_ray.cli.demo import write_adapter, write_model
from safelora_ray.execution import worker_session
from safelora_ray.pipelines.sanitize.projection import (
    MatrixCache,
    ProjectionEngine,
    ProjectionService,
    SetKey,
    dtype_name,
    pack,
    split_groups,
    unpack,
)
from tests.factory import Arch, aligned_from, llama_tensors


def _group(n: int, d: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, d, r, dtype=torch.bfloat16), torch.zeros(n, r, 32, dtype=torch.float32)


def test_split_groups_bounds_every_part() -> None:
    groups = {(f"m{i}", "bfloat16", "float32", 8): _group(4, 64 * (1 + i % 3), 8)
              for i in range(20)}
    sizes = {k: b.numel() * 2 + a.numel() * 4 for k, (b, a) in groups.items()}
    limit = 3 * max(sizes.values())
    parts = split_groups(groups, limit)
    assert len(parts) > 1
    assert [k for p in parts for k in p] == list(groups)  # every group once, in order
    for p in parts:
        assert sum(sizes[k] for k in p) <= limit
    # a group larger than the limit is a part of its own; no limit: one part
    assert [len(p) for p in split_groups(groups, 1)] == [1] * 20
    assert len(split_groups(groups, 10**12)) == 1
    assert split_groups({}, 100) == []


@pytest.fixture(scope="module")
def tiny_requests() -> Iterator[None]:
    """Every group in a request of its own: set before this module's Ray starts, so that its
    workers inherit it."""
    old = os.environ.get("SAFELORA_REQUEST_MAX_BYTES")
    os.environ["SAFELORA_REQUEST_MAX_BYTES"] = "1"
    yield
    if old is None:
        os.environ.pop("SAFELORA_REQUEST_MAX_BYTES", None)
    else:
        os.environ["SAFELORA_REQUEST_MAX_BYTES"] = old


@pytest.fixture(scope="module")
def ray_one_fake_gpu(tiny_requests: None, s3_server: str,
                     ray_isolation: Path) -> Iterator[None]:
    """A local Ray with 2 CPUs and one fake GPU: ``use_gpu=True`` plans a GPU holder (computing
    on the CPU: torch sees no CUDA device) and an I/O worker; ``use_gpu=False`` a CPU node."""
    from safelora_ray.execution.ray_utils import ensure_ray

    ensure_ray(num_cpus=2, num_gpus=1, object_store_memory=150 * 1024**2,
               include_dashboard=False, log_to_driver=False, configure_logging=False,
               _temp_dir=tempfile.mkdtemp(prefix="m-", dir=ray_isolation))
    try:
        yield
    finally:
        ray.shutdown()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("adapter_model.safetensors"))}


def _build_set(root: Path, arch: Arch) -> str:
    """A base/aligned pair of ``arch`` under ``root``, and its alignment set's URI."""
    base = llama_tensors(arch)
    write_model(root / "base", base)
    write_model(root / "aligned", aligned_from(base))
    return build(BuildConfig(base=str(root / "base"), aligned=str(root / "aligned"),
                             out=str(root / "set"), workers=0, progress=False)).uri


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict[str, str]]:
    """A set, a catalog of 8 adapters, and the digests of their in-process sanitize. Their
    factors' dtypes differ (A float32 with B bfloat16, both float16, ...): a request's groups
    carry both factors, each in its own dtype, to wherever G = A Aᵀ and C B are formed."""
    root = tmp_path_factory.mktemp("fleet")
    aset = _build_set(root, Arch(layers=2, hidden=64, heads=4, kv_heads=4, intermediate=96))
    g = torch.Generator().manual_seed(3)
    dtypes = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
              (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]
    for k in range(8):
        da, db = dtypes[k % len(dtypes)]
        lora = {f"model.layers.{i}.self_attn.{t}": (torch.randn(4, 64, generator=g).to(da),
                                                    torch.randn(64, 4, generator=g).to(db))
                for i in range(2) for t in ("q_proj", "v_proj")}
        write_adapter(root / "cat" / f"a{k}", lora, 4)
    res = sanitize(SanitizeConfig(alignment=aset, adapters=str(root / "cat"),
                                  out=str(root / "in-process"), threshold=0.35, workers=0,
                                  progress=False))
    assert res.ok == 8 and res.error == 0, res.errors
    digests = _digests(root / "in-process")
    assert len(digests) == 8
    return aset, root, digests


def test_engine_forms_g_from_a_beside_the_products(fleet: Any) -> None:
    """An engine gets each group's A, in its own dtype, and forms G = A Aᵀ itself: its scores
    are the naive float64 ones of SPEC §2, and a request shipped to a holder (packed and
    unpacked) or coalesced with another by its service gives the same bits."""
    aset = AlignmentSet.open(fleet[0])
    engine = ProjectionEngine(MatrixCache.open(SetKey(aset.uri, aset.content_id), "cpu"))
    gen = torch.Generator().manual_seed(5)
    modules = sorted(aset.rows)[:2]
    groups = {}
    for m in modules:
        d_out, d_in = aset.rows[m].shape
        for da, db in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)):
            a = torch.randn(3, 4, d_in, generator=gen).to(da)
            b = torch.randn(3, d_out, 4, generator=gen).to(db)
            groups[(m, dtype_name(db), dtype_name(da), 4)] = (b, a)
    out = engine.run(groups)
    for key, (b, a) in groups.items():
        cb, sums = out[key]
        assert cb.dtype == b.dtype and sums.dtype == torch.float64
        c = aset.load(key[0]).dense().double()
        for i in range(b.shape[0]):
            dw = b[i].double() @ a[i].double()
            # the scores use the float32 product C B (SPEC §2), in float64 from there on
            pw = (c.float() @ b[i].float()).double() @ a[i].double()
            inner, nb2, nw2 = (dw * pw).sum(), (dw * dw).sum(), (pw * pw).sum()
            torch.testing.assert_close(sums[i, :3], torch.stack([inner, nb2, nw2]),
                                       rtol=1e-4, atol=1e-6)
    shipped = engine.run(unpack(pack(groups)))
    service = ProjectionService(engine, linger_s=0.5)
    try:
        halves = [dict(list(groups.items())[:2]), dict(list(groups.items())[2:])]
        with cf.ThreadPoolExecutor(2) as pool:
            coalesced = [f.result(timeout=60) for f in [pool.submit(service.submit, h)
                                                        for h in halves]]
    finally:
        service.close()
    assert service.batches == 1  # the two requests ran as one
    for got in (shipped, {k: v for h in coalesced for k, v in h.items()}):
        assert got.keys() == out.keys()
        for key, (cb, sums) in out.items():
            assert torch.equal(got[key][0], cb) and torch.equal(got[key][1], sums), key


def _run(fleet: tuple[str, Path, dict[str, str]], name: str, use_gpu: bool,
         tmp_path: Path) -> dict[str, str]:
    aset, root, _ = fleet
    res = sanitize(SanitizeConfig(alignment=aset, adapters=str(root / "cat"),
                                  out=str(tmp_path / name), threshold=0.35, batch_size=2,
                                  workers=2 if not use_gpu else 1, use_gpu=use_gpu,
                                  progress=False))
    assert res.ok == 8 and res.error == 0, res.errors
    return _digests(tmp_path / name)


def test_parts_give_the_bytes_of_the_whole(ray_one_fake_gpu: None, fleet: Any,
                                           tmp_path: Path) -> None:
    # A GPU holder answering requests of one group each: the bits of the in-process run.
    assert _run(fleet, "gpu-holder", True, tmp_path) == fleet[2]


def _what_i_hold(ctx: Any) -> dict[str, Any]:
    """Runs on a worker: per slot, the object's type, and for the matrices it computes with,
    whether every one lies in the node's object store (Ray's plasma mapping)."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, parts[5] if len(parts) > 5 else ""))

    def where(t: torch.Tensor) -> str:
        addr = t.data_ptr()
        return next((path for lo, hi, path in maps if lo <= addr < hi), "")

    out: dict[str, Any] = {}
    for slot in ctx.slots():
        obj = ctx.peek(slot)[1]
        engine = getattr(obj, "engine", None)
        rec: dict[str, Any] = {"type": type(obj).__name__,
                               "nbytes": getattr(obj, "nbytes", None),
                               "own_engine": getattr(obj, "_own_engine", None) is not None}
        if engine is not None:
            ms = [engine.matrices.get(m).tensor for m in engine.matrices.aset.rows]
            rec["mapped"] = engine.matrices.mapped
            rec["where"] = sorted({where(t) for t in ms})
        out[slot] = rec
    return out


def _set_on_s3(fleet: Any, client: Any, bucket: str) -> str:
    for f in Path(fleet[0]).rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"set/{f.relative_to(fleet[0]).as_posix()}")
    return f"s3://{bucket}/set"


def _shared_states(fleet: Any, aset: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Sanitize with ``aset`` on two CPU workers until both computed a batch (a run may end
    before its second worker is ready: 8 tiny adapters), each run giving the in-process bytes;
    then what each worker holds."""
    with worker_session() as sess:
        for attempt in range(6):
            got = _run((aset, fleet[1], fleet[2]), f"cpu-node-{attempt}", False, tmp_path)
            assert got == fleet[2]
            states = [ray.get(a.call.options(concurrency_group="control").remote(
                _what_i_hold), timeout=60).result for _, a in sess._actors]
            if all("shared-set" in s for s in states):
                break
    assert len(states) == 2, states
    # ... and no sanitizer loaded the set on the side.
    assert [s["sanitizer"]["own_engine"] for s in states] == [False, False]
    return [s["shared-set"] for s in states]


def test_cpu_node_maps_a_local_sets_files(ray_one_fake_gpu: None, fleet: Any,
                                          tmp_path: Path) -> None:
    shared = _shared_states(fleet, fleet[0], tmp_path)
    # The first I/O worker checked and mapped the set's shard files; the other maps the same
    # files; both compute with the page cache's pages, neither keeps a copy of its own.
    assert sorted(s["type"] for s in shared) == ["MappedSet", "SharedSet"]
    assert next(s for s in shared if s["type"] == "SharedSet")["nbytes"] > 0
    shards = sorted(str(p.resolve()) for p in Path(fleet[0], "shards").iterdir())
    for s in shared:
        assert s["mapped"] and s["where"] and set(s["where"]) <= set(shards), s


def _node_copy(uri: str) -> str:
    """Where this machine's copy of the set at ``uri`` lies (the tests' ``SAFELORA_SET_CACHE``,
    which the Ray workers inherit)."""
    from safelora_ray.formats.alignment_set import AlignmentSet

    return str(Path(os.environ["SAFELORA_SET_CACHE"], AlignmentSet.open(uri).content_id)
               .resolve())


def test_cpu_node_maps_its_copy_of_a_set_on_s3(ray_one_fake_gpu: None, fleet: Any,
                                               s3_admin_client: Any, s3_bucket: str,
                                               tmp_path: Path) -> None:
    on_s3 = _set_on_s3(fleet, s3_admin_client, s3_bucket)
    shared = _shared_states(fleet, on_s3, tmp_path)
    assert sorted(s["type"] for s in shared) == ["MappedSet", "SharedSet"]
    assert next(s for s in shared if s["type"] == "SharedSet")["nbytes"] > 0
    for s in shared:  # the node's copy's files, mapped by both: no object store, no download
        assert s["mapped"] and s["where"] and all(
            w.startswith(_node_copy(on_s3)) for w in s["where"]), s


def test_a_set_on_s3_goes_into_the_object_store_without_a_copy(
        ray_one_fake_gpu: None, fleet: Any, s3_admin_client: Any, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.sanitize import shared_set

    monkeypatch.setenv("SAFELORA_SET_CACHE", "off")  # (or no room for a copy on the disk)
    on_s3 = _set_on_s3(fleet, s3_admin_client, s3_bucket)
    aset = AlignmentSet.open(on_s3)
    shared = shared_set.SharedSet.put(shared_set.SetKey(on_s3, aset.content_id))
    assert shared.handles.kind == "store" and shared.nbytes > 0
    local = AlignmentSet.open(fleet[0])
    for module in aset.rows:
        assert torch.equal(shared.engine.matrices.get(module).tensor, local.load(module).tensor)


def test_a_set_file_replaced_after_it_was_checked_is_not_mapped(tmp_path: Path) -> None:
    from safelora_ray.core.errors import StorageError
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.sanitize import shared_set

    # A set of its own (this test replaces one of its files).
    uri = _build_set(tmp_path, Arch(layers=1, hidden=32, heads=2, kv_heads=2, intermediate=48))
    aset = AlignmentSet.open(uri)
    shared = shared_set.SharedSet.put(shared_set.SetKey(uri, aset.content_id))
    h = shared.handles
    assert h.kind == "file" and shared.nbytes == sum(n for _, _, n in h.refs.values())
    for module in aset.rows:  # the mapped matrices are the loaded ones
        assert torch.equal(shared.engine.matrices.get(module).tensor, aset.load(module).tensor)
    # Another worker maps the files the holder checked ...
    got = shared_set._open_files(aset, h)
    assert set(got._matrices) == set(aset.rows)
    # ... but not a file replaced since (a rebuild renamed over it): its products would be
    # computed with bytes nobody checked.
    path, _ = next(iter(h.files.values()))
    data = Path(path).read_bytes()
    Path(path + ".new").write_bytes(data)
    os.replace(path + ".new", path)
    with pytest.raises(StorageError, match="changed since the worker holding alignment set"):
        shared_set._open_files(aset, h)
    # A shard gone, or emptied, is one line naming it.
    from safelora_ray.storage.localfs import map_readonly
    with pytest.raises(StorageError, match=r"cannot open .*nope.* to map it"):
        map_readonly(str(tmp_path / "nope"))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(StorageError, match=r"cannot map .*empty: not a regular, non-empty"):
        map_readonly(str(tmp_path / "empty"))
    # A corrupt tensor is caught when the holder maps the files.
    raw = bytearray(data)
    raw[-1] ^= 0xFF
    Path(path).write_bytes(bytes(raw))
    from safelora_ray.core.errors import AlignmentSetError
    with pytest.raises(AlignmentSetError, match="is corrupt"):
        shared_set.SharedSet.put(shared_set.SetKey(uri, aset.content_id))


def test_files_that_cannot_be_mapped_go_into_the_object_store(
        ray_one_fake_gpu: None, fleet: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from safelora_ray.core.errors import StorageError
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.sanitize import shared_set

    def refuse(path: str) -> Any:
        raise StorageError(f"cannot map {path}: this filesystem does not map files")

    monkeypatch.setattr(shared_set, "map_readonly", refuse)
    aset = AlignmentSet.open(fleet[0])
    shared = shared_set.SharedSet.put(shared_set.SetKey(fleet[0], aset.content_id))
    assert shared.handles.kind == "store" and shared.nbytes > 0
    for module in aset.rows:
        assert torch.equal(shared.engine.matrices.get(module).tensor, aset.load(module).tensor)


def test_a_set_too_large_for_a_cpu_nodes_object_store_is_refused(
        ray_one_fake_gpu: None, fleet: Any, tmp_path: Path, s3_admin_client: Any,
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from safelora_ray.core.errors import ConfigError
    from safelora_ray.execution.placement import NodeInfo
    from safelora_ray.formats import set_cache
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.sanitize import shared_set as projection

    on_s3 = _set_on_s3(fleet, s3_admin_client, s3_bucket)
    aset = AlignmentSet.open(on_s3)
    need = sum(4 * int(torch.tensor(r.stored_shape).prod()) for r in aset.rows.values())
    roomy = NodeInfo("n1", "10.0.0.1", 8, 0, store_bytes=need / projection.STORE_SHARE + 1)
    tight = NodeInfo("n2", "10.0.0.2", 8, 0, store_bytes=need / projection.STORE_SHARE - 1)
    projection.check_store_room(aset, [roomy, NodeInfo("n3", "10.0.0.3", 8, 0)])  # 0: unknown
    # With the set cache on, the nodes map their copy on disk: a warning, not a refusal.
    with caplog.at_level(logging.WARNING):
        projection.check_store_room(aset, [roomy, tight])
    assert "node 10.0.0.2" in caplog.text and "copy of the set on its disk" in caplog.text
    # Off, a CPU node puts the set in its store: refused.
    cache_on = os.environ.get(set_cache.CACHE_ENV)
    assert set_cache.cache_root() is not None
    monkeypatch.setenv(set_cache.CACHE_ENV, "off")
    with pytest.raises(ConfigError, match=r"node 10\.0\.0\.2 .*--object-store-memory"):
        projection.check_store_room(aset, [roomy, tight])
    # A local set is mapped from its files, not put in the store: no room needed there.
    projection.check_store_room(AlignmentSet.open(fleet[0]), [tight])
    # A real run on this Ray (150 MB store) with a share too small for this set: refused
    # before any worker computes, nothing written; the same set from local files runs.
    monkeypatch.setattr(projection, "STORE_SHARE", need / (150 * 1024**2) / 2)
    with pytest.raises(ConfigError, match="does not fit the Ray object store of node"):
        sanitize(SanitizeConfig(alignment=on_s3, adapters=str(fleet[1] / "cat"),
                                out=str(tmp_path / "out"), threshold=0.35, workers=2,
                                use_gpu=False, progress=False))
    assert not (tmp_path / "out").exists()
    assert _run(fleet, "local-set", False, tmp_path) == fleet[2]
    # The cache on again (as the workers have it): the same S3 set runs, each node mapping
    # its copy, the bits of the in-process run.
    if cache_on is None:
        monkeypatch.delenv(set_cache.CACHE_ENV)
    else:
        monkeypatch.setenv(set_cache.CACHE_ENV, cache_on)
    assert _run((on_s3, fleet[1], fleet[2]), "s3-set-mapped", False, tmp_path) == fleet[2]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cpu_node_goes_on_when_its_holder_dies(ray_one_fake_gpu: None, fleet: Any,
                                               tmp_path: Path, where: str,
                                               request: pytest.FixtureRequest) -> None:
    """The holder (the node's first I/O worker, owner of the files' check: a local set's, or
    the node's copy of a set on S3) killed between two runs: the other I/O worker keeps
    computing with the pages it mapped, the restarted holder shares the set again, and every
    output is still the in-process run's bytes."""
    if where == "s3":
        fleet = (_set_on_s3(fleet, request.getfixturevalue("s3_admin_client"),
                            request.getfixturevalue("s3_bucket")), fleet[1], fleet[2])
    with worker_session() as sess:
        handles = [a for _, a in sess._actors]
        # Runs until both workers have computed (a run of 8 tiny adapters may end before
        # its second worker is ready).
        for attempt in range(6):
            assert _run(fleet, f"warm-{attempt}", False, tmp_path) == fleet[2]
            handles = [a for _, a in sess._actors]
            states = [ray.get(a.call.options(concurrency_group="control").remote(
                _what_i_hold), timeout=60).result for a in handles]
            kinds = [s.get("shared-set", {}).get("type") for s in states]
            if all(kinds):
                break
        assert sorted(k for k in kinds if k) == ["MappedSet", "SharedSet"], states
        holder = handles[kinds.index("SharedSet")]
        ray.kill(holder, no_restart=False)  # Ray restarts it; its objects' owner is gone
        deadline = time.monotonic() + 120
        while True:  # wait until the restarted holder answers
            try:
                ray.get(holder.ready.remote(), timeout=10)
                break
            except ray.exceptions.RayActorError:
                assert time.monotonic() < deadline, "the holder did not come back"
                time.sleep(0.5)
        # Churn the store, so that freed space would be reused if the mapped pages were freed.
        churn = [ray.put(torch.full((4096, 64), 7.0).numpy()) for _ in range(8)]
        assert _run(fleet, "after-holder-death", False, tmp_path) == fleet[2]
        del churn
        mapper = handles[kinds.index("MappedSet")]
        after = ray.get(mapper.call.options(concurrency_group="control").remote(_what_i_hold),
                        timeout=60).result
        mapped = after["shared-set"]
        assert mapped["type"] == "MappedSet" and mapped["where"], mapped
        if where == "s3":  # the node's copy of the set
            assert all(w.startswith(_node_copy(fleet[0])) for w in mapped["where"]), mapped
        else:
            assert all(w.startswith(str(Path(fleet[0]).resolve())) for w in mapped["where"])
