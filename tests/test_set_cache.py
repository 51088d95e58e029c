"""A node's copy of an alignment set kept on S3 (``formats/set_cache.py``), on the real S3
server: made once and checked, mapped by an in-process run, equal outputs, and every way it
can go wrong (a corrupt origin, a damaged copy, no room, a killed fill) ending in a correct
run or a one-line error."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from safelora_ray import SanitizeConfig, sanitize
from safelora_ray.core.errors import AlignmentSetError
from safelora_ray.formats import set_cache
from safelora_ray.formats.alignment_set import AlignmentSet
from tests.test_guardrails import _catalog, _digest_tree, tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    w = tiny_world(tmp_path_factory.mktemp("set-cache"))
    w["cat"] = _catalog(w, w["root"] / "cat", ["a1", "a2", "a3"])
    return w


@pytest.fixture
def s3_set(world: dict[str, Any], s3_bucket: str, s3_admin_client: Any) -> str:
    local = Path(world["set"])
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        s3_admin_client.upload_file(str(f), s3_bucket, f"set/{f.relative_to(local).as_posix()}")
    return f"s3://{s3_bucket}/set"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "set-cache"
    monkeypatch.setenv(set_cache.CACHE_ENV, str(root))
    return root


def _run(world: dict[str, Any], aset: str, out: Path) -> Any:
    r = sanitize(SanitizeConfig(alignment=aset, adapters=str(world["cat"]), out=str(out),
                                threshold=0.35, workers=0, progress=False))
    assert (r.ok, r.error) == (3, 0), r.errors
    return r


def _outputs(out: Path) -> dict[str, str]:
    return {k: v for k, v in _digest_tree(out).items() if not k.startswith(("_", "."))}


def test_copy_made_once_checked_and_mapped(world: dict[str, Any], s3_set: str, cache: Path,
                                           tmp_path: Path) -> None:
    origin = AlignmentSet.open(s3_set)
    copy = set_cache.local_copy(origin)
    assert copy.content_id == origin.content_id and copy.local_shards() is not None
    entry = cache / origin.content_id
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [origin.content_id, f".{origin.content_id}.lock"])
    assert copy.verify()  # whole shards, against alignment.json's SHA-256s
    # A second call reads nothing from S3 but the set's metadata.
    before = origin.storage.bytes_read
    assert set_cache.local_copy(origin).local_shards() == copy.local_shards()
    assert origin.storage.bytes_read == before
    # An in-process run with the S3 set maps the copy: the outputs are the local set's.
    _run(world, world["set"], tmp_path / "ref")
    _run(world, s3_set, tmp_path / "via-copy")
    assert _outputs(tmp_path / "via-copy") == _outputs(tmp_path / "ref")
    assert entry.is_dir()


def test_cache_off_and_local_sets_are_used_as_they_are(world: dict[str, Any], s3_set: str,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    local = AlignmentSet.open(world["set"])
    assert set_cache.local_copy(local) is local
    for off in ("off", "0", ""):
        monkeypatch.setenv(set_cache.CACHE_ENV, off)
        origin = AlignmentSet.open(s3_set)
        assert set_cache.cache_root() is None and set_cache.local_copy(origin) is origin
    _run(world, s3_set, tmp_path / "out")  # no copy: read from S3 into memory, as before
    monkeypatch.delenv(set_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert set_cache.cache_root() == tmp_path / "xdg" / "safelora" / "sets"


def test_damaged_copy_is_removed_and_the_run_reads_s3(world: dict[str, Any], s3_set: str,
                                                      cache: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    origin = AlignmentSet.open(s3_set)
    shard = next(iter(set_cache.local_copy(origin).local_shards().values()))
    data = bytearray(Path(shard).read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in a tensor's bytes
    Path(shard).write_bytes(data)
    _run(world, world["set"], tmp_path / "ref")
    with caplog.at_level(logging.WARNING):
        _run(world, s3_set, tmp_path / "out")
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "ref")
    assert any("removed" in r.getMessage() and "corrupt" in r.getMessage()
               for r in caplog.records), caplog.text
    # The run went on with a fresh copy (its products read it, module by module), whole.
    assert AlignmentSet.open(str(cache / origin.content_id)).verify()
    _run(world, s3_set, tmp_path / "again")
    assert _outputs(tmp_path / "again") == _outputs(tmp_path / "ref")


def _corrupt_origin(s3_set: str, bucket: str, client: Any) -> str:
    """A flipped bit in the last byte (a tensor's) of the set's first shard on S3; its key."""
    origin = AlignmentSet.open(s3_set)
    key = f"set/{sorted({r.shard for r in origin.rows.values()})[0]}"
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    return key


def test_corrupt_origin_is_a_one_line_error_and_leaves_no_copy(
        world: dict[str, Any], s3_set: str, s3_bucket: str, s3_admin_client: Any,
        cache: Path) -> None:
    key = _corrupt_origin(s3_set, s3_bucket, s3_admin_client)
    with pytest.raises(AlignmentSetError, match=r"tensor .* is corrupt") as e:
        set_cache.local_copy(AlignmentSet.open(s3_set))
    assert key in str(e.value) and "\n" not in str(e.value)
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_a_copy_in_many_windows_is_the_set_byte_for_byte(
        world: dict[str, Any], s3_set: str, s3_bucket: str, s3_admin_client: Any, cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard copied in many windows (each fetched while the one before is hashed and
    written) is its object on S3 byte for byte, an unaligned tail included; damage in its
    last window is still found, and nothing of that copy is left."""
    origin = AlignmentSet.open(s3_set)
    shards = origin.metadata["integrity"]["shards"]
    monkeypatch.setattr(set_cache, "WINDOW_BYTES", 4096)
    assert max(int(r["bytes"]) for r in shards.values()) > 3 * 4096
    assert any(int(r["bytes"]) % 4096 for r in shards.values())  # a tail past O_DIRECT's blocks
    write = set_cache._DestFile.write

    def slow_disk(self: Any, data: memoryview) -> None:  # the next window lands meanwhile
        time.sleep(0.05)
        write(self, data)

    monkeypatch.setattr(set_cache._DestFile, "write", slow_disk)
    copy = set_cache.local_copy(origin)
    paths = copy.local_shards()
    assert paths is not None and sorted(paths) == sorted(shards)
    for shard, path in paths.items():
        body = s3_admin_client.get_object(Bucket=s3_bucket, Key=f"set/{shard}")["Body"].read()
        assert Path(path).read_bytes() == body
    shutil.rmtree(cache)
    _corrupt_origin(s3_set, s3_bucket, s3_admin_client)
    with pytest.raises(AlignmentSetError, match=r"tensor .* is corrupt"):
        set_cache.local_copy(AlignmentSet.open(s3_set))
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_no_room_or_a_killed_fill(world: dict[str, Any], s3_set: str, cache: Path,
                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    origin = AlignmentSet.open(s3_set)
    monkeypatch.setattr(set_cache, "KEEP_FREE_FRACTION", 1.0)  # no disk has that much room
    monkeypatch.setattr(set_cache, "KEEP_FREE_MAX_BYTES", 2**62)
    with caplog.at_level(logging.WARNING):
        assert set_cache.local_copy(origin) is origin
    assert "no copy on this node's disk" in caplog.text and "needed" in caplog.text
    _run(world, s3_set, tmp_path / "out")
    # A cache folder that cannot be made (a read-only home, a mistyped path): the same.
    caplog.clear()
    monkeypatch.setenv(set_cache.CACHE_ENV, "/proc/safelora-set-cache")
    with caplog.at_level(logging.WARNING):
        assert set_cache.local_copy(origin) is origin
    assert "no copy on this node's disk" in caplog.text and "/proc/safelora" in caplog.text
    monkeypatch.setenv(set_cache.CACHE_ENV, str(cache))
    monkeypatch.setattr(set_cache, "KEEP_FREE_FRACTION", 0.0)
    monkeypatch.setattr(set_cache, "KEEP_FREE_MAX_BYTES", 0)
    stale = cache / f".tmp-{origin.content_id}-deadbeef"  # a fill killed half-way
    (stale / "shards").mkdir(parents=True)
    assert set_cache.local_copy(origin).local_shards() is not None
    assert not stale.exists()


def test_shard_files_written_around_the_page_cache_keep_every_byte(tmp_path: Path) -> None:
    """Whole blocks go through O_DIRECT (where the filesystem has it), a shard's unaligned
    tail through the page cache: the file is the bytes, in order."""
    import mmap
    import os

    data = os.urandom(5 * 4096 + 123)
    window = mmap.mmap(-1, 3 * 4096)
    dest = tmp_path / "shard.safetensors"
    with set_cache._DestFile(dest) as out:
        for off in range(0, len(data), len(window)):
            part = data[off:off + len(window)]
            window[:len(part)] = part
            out.write(memoryview(window)[:len(part)])
    assert dest.read_bytes() == data


def test_in_process_run_maps_the_set_as_it_starts_and_batches_wait_for_it(
        world: dict[str, Any], s3_set: str, cache: Path) -> None:
    """An in-process run begins the node's copy with :func:`map_set` as it starts; a batch's
    projector maps the set only when its products need it (after its adapters are read), and
    finds the mapping ``map_set`` made; on a GPU neither maps anything."""
    from safelora_ray.execution import WorkerContext
    from safelora_ray.pipelines.sanitize.projection import SetKey
    from safelora_ray.pipelines.sanitize.shared_set import (
        SHARED_SLOT,
        local_projector,
        map_set,
    )

    origin = AlignmentSet.open(s3_set)
    key = SetKey(origin.uri, origin.content_id)
    ctx = WorkerContext("cpu")

    def fallback() -> Any:
        raise AssertionError("the set could be mapped: the fallback is not used")

    project = local_projector(ctx, key, origin, fallback)
    assert project is not None and ctx.peek(SHARED_SLOT) is None
    assert not (cache / origin.content_id).exists()  # nothing copied before products
    assert map_set(ctx, key)
    mapped = ctx.peek(SHARED_SLOT)
    assert mapped is not None and mapped[1] is not None and (cache / origin.content_id).is_dir()
    before = origin.storage.bytes_read
    module = next(iter(origin.rows))
    rank, d_out = 2, origin.rows[module].stored_shape[0]
    b = torch.randn(1, d_out, rank)
    out = project({(module, "float32", rank): (b, torch.eye(rank).expand(1, rank, rank))})
    cb, _ = out[(module, "float32", rank)]
    assert ctx.peek(SHARED_SLOT)[1] is mapped[1]  # the one map_set made, nothing read again
    assert origin.storage.bytes_read == before
    # C B against the set's own matrix (read from S3), in float64
    c = origin.load(module).dense().double()
    assert torch.allclose(cb.double(), c @ b[0].double(), rtol=1e-5, atol=1e-6)
    assert local_projector(WorkerContext("cuda"), key, origin, fallback) is None
    assert not map_set(WorkerContext("cuda"), key)


def test_in_process_run_with_a_corrupt_origin_fails_in_one_line(
        world: dict[str, Any], s3_set: str, s3_bucket: str, s3_admin_client: Any,
        cache: Path, tmp_path: Path) -> None:
    """The copy begun as the run starts finds the corruption; the batch that needs the set
    reports it, in one line naming the S3 shard (not swallowed by the early start)."""
    key = _corrupt_origin(s3_set, s3_bucket, s3_admin_client)
    with pytest.raises(AlignmentSetError, match=r"tensor .* is corrupt") as e:
        sanitize(SanitizeConfig(alignment=s3_set, adapters=str(world["cat"]),
                                out=str(tmp_path / "out"), threshold=0.35, workers=0,
                                progress=False))
    assert key in str(e.value) and "\n" not in str(e.value)
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


@pytest.mark.parametrize("out_kind", ["local", "s3"])
def test_a_rerun_with_nothing_to_do_copies_no_set(world: dict[str, Any], s3_set: str,
                                                 s3_bucket: str, cache: Path, tmp_path: Path,
                                                 out_kind: str) -> None:
    """The early start is for runs that need products: a rerun whose adapters all have their
    ledger records (on a node that has no copy) skips them without copying the set; one
    with an adapter more copies it."""
    out = str(tmp_path / "out") if out_kind == "local" else f"s3://{s3_bucket}/out-rerun"

    def run(catalog: Path) -> Any:
        return sanitize(SanitizeConfig(alignment=s3_set, adapters=str(catalog), out=out,
                                       threshold=0.35, workers=0, progress=False))

    catalog = tmp_path / "cat"
    shutil.copytree(world["cat"], catalog)
    assert run(catalog).ok == 3
    origin = AlignmentSet.open(s3_set)
    entry = cache / origin.content_id
    assert entry.is_dir()
    set_cache.evict(entry, "a test: another node")
    r = run(catalog)
    assert (r.ok, r.skipped, r.error) == (0, 3, 0)
    assert not entry.exists()
    _catalog(world, catalog, ["a4"], seed=4)
    r = run(catalog)
    assert (r.ok, r.skipped, r.error) == (1, 3, 0), r.errors
    assert entry.is_dir()


def test_old_copies_make_room_least_recently_used_first(
        world: dict[str, Any], s3_set: str, cache: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Where the disk lacks room for a new set's copy, other sets' copies are removed for it,
    the least recently used first (each use touches its copy); the copy in use is never
    removed for another, and where removing every other is not enough, the set is read from
    S3 with a warning."""
    import os
    import time

    origin = AlignmentSet.open(s3_set)
    entry = set_cache.local_copy(origin).local_shards()
    size = sum(p.stat().st_size for p in (cache / origin.content_id).rglob("*") if p.is_file())
    assert entry is not None and size > 0
    # Two older sets' copies (the same bytes under other ids): one used long ago, one lately.
    old_id, recent_id = "als-" + "0" * 32, "als-" + "1" * 32
    for name, age in ((old_id, 3600.0), (recent_id, 60.0)):
        shutil.copytree(cache / origin.content_id, cache / name)
        os.utime(cache / name, (time.time() - age, time.time() - age))
    # Not sets' copies (the cache folder may be shared): never removed, however old.
    for name in ("als-notes", "als-" + "2" * 32):
        (cache / name).mkdir()
        (cache / name / "data.bin").write_bytes(bytes(size))
        os.utime(cache / name, (0, 0))
    set_cache.evict(cache / origin.content_id, "a test: as if never copied", damaged=False)
    # A disk that holds 2.5 copies beside what it must keep free (nothing kept free here).
    monkeypatch.setattr(set_cache, "KEEP_FREE_FRACTION", 0.0)

    def disk(copies: float) -> Any:
        def usage(root: Path) -> tuple[int, int]:
            used = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            return int((copies + 2) * size) - used, 20 * size  # (+ the two strangers)
        return usage

    monkeypatch.setattr(set_cache, "_disk", disk(2.5))
    with caplog.at_level(logging.INFO, logger=set_cache.__name__):
        copy = set_cache.local_copy(origin)
    assert copy.local_shards() is not None and copy.verify()
    assert not (cache / old_id).exists() and (cache / recent_id).is_dir()
    assert f"{old_id} removed: the least recently used" in caplog.text
    # A later use touches its copy.
    before = (cache / origin.content_id).stat().st_mtime
    os.utime(cache / origin.content_id, (before - 10, before - 10))
    set_cache.local_copy(origin)
    assert (cache / origin.content_id).stat().st_mtime > before - 10
    # Too little room even with every other copy gone: none is removed, the set is read.
    set_cache.evict(cache / origin.content_id, "a test: as if never copied", damaged=False)
    monkeypatch.setattr(set_cache, "_disk", disk(0.0))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert set_cache.local_copy(origin) is origin
    assert "no copy on this node's disk" in caplog.text and "too small" in caplog.text
    assert (cache / recent_id).is_dir() and not (cache / origin.content_id).exists()
    assert (cache / "als-notes" / "data.bin").is_file()
    assert (cache / ("als-" + "2" * 32) / "data.bin").is_file()


def test_a_holder_reads_its_matrices_from_the_node_copy(
        world: dict[str, Any], s3_set: str, cache: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A set loaded module by module onto a device (a GPU holder's, here on the CPU) is read
    from the node's copy, made by its first read: the next holder reads nothing of the set
    from S3 but its metadata; a damaged copy is removed and the set itself read, with the
    same matrices."""
    from safelora_ray.pipelines.sanitize.projection import MatrixCache, SetKey

    origin = AlignmentSet.open(s3_set)
    key = SetKey(origin.uri, origin.content_id)
    want = {m: origin.load(m).tensor for m in origin.rows}
    first = MatrixCache.open(key, "cpu")
    first.load_all()
    assert (cache / origin.content_id).is_dir()
    again = MatrixCache.open(key, "cpu")
    before = again.aset.storage.bytes_read
    again.load_all()
    assert again.aset.storage.bytes_read == before  # all from the node's disk
    for cached in (first, again):
        assert all(torch.equal(cached.get(m).tensor, t) for m, t in want.items())
    # A flipped bit in the copy's shard: found by the digests, the copy removed, S3 read.
    shard = next(iter(set_cache.local_copy(origin).local_shards().values()))
    data = bytearray(Path(shard).read_bytes())
    data[-1] ^= 0xFF
    Path(shard).write_bytes(data)
    damaged = MatrixCache.open(key, "cpu")
    with caplog.at_level(logging.WARNING):
        damaged.load_all()
    assert "removed" in caplog.text and "corrupt" in caplog.text
    assert all(torch.equal(damaged.get(m).tensor, t) for m, t in want.items())
    assert not (cache / origin.content_id).exists()


def test_a_stopped_run_gives_up_the_copy(world: dict[str, Any], s3_set: str, cache: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C or SIGTERM while a node's copy is made (minutes for a 70B set): the copy stops
    at its next window and nothing of it is left; the run's early start and a batch's
    projector both give it up once their run is cancelled, and the next run copies it."""
    from safelora_ray.execution import WorkerContext
    from safelora_ray.pipelines.sanitize.projection import SetKey
    from safelora_ray.pipelines.sanitize.shared_set import local_projector, map_set

    origin = AlignmentSet.open(s3_set)
    sizes = [int(r["bytes"]) for r in origin.metadata["integrity"]["shards"].values()]
    monkeypatch.setattr(set_cache, "WINDOW_BYTES", 4096)
    assert max(sizes) > 3 * 4096  # several windows: stopped half-way
    polls = []

    def stop_at_third() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(set_cache.CopyCancelled, match="given up: its run was stopped"):
        set_cache.local_copy(origin, cancelled=stop_at_third)
    assert len(polls) == 3
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]
    key = SetKey(origin.uri, origin.content_id)
    ctx = WorkerContext("cpu")
    ctx.cancel("run-1")
    assert not map_set(ctx, key, "run-1")
    project = local_projector(ctx, key, origin, lambda: pytest.fail("not mapped: fallback"),
                              cancelled=lambda: ctx.cancelled("run-1"))
    assert project is not None
    with pytest.raises(set_cache.CopyCancelled):
        project({})
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert map_set(ctx, key, "run-2") and (cache / origin.content_id).is_dir()
