"""Tests of the storage backends: local files, S3 (SeaweedFS) and the HF Hub cache."""

from __future__ import annotations

import array
import inspect
import logging
import os
import pathlib
import pickle
import random
import shutil
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator

import pytest

from safelora_ray.core.errors import ConfigError, NotFoundError, StorageError
from safelora_ray.storage import Storage, open_storage
from safelora_ray.storage import hf as hf_mod
from safelora_ray.storage.hf import HfStorage
from safelora_ray.storage.local import LocalStorage
from safelora_ray.storage.s3 import S3Storage
from tests.hub_cache import blob_id, write_hub_repo

logger = logging.getLogger(__name__)

BACKENDS = ["local", "s3", "hf"]

#: Paths chosen so that per-directory sorting differs from full-path sorting
#: ("-" < "." < "/"), plus upper case and nesting.
TREE: dict[str, bytes] = {
    "Z.txt": b"zed",
    "a-c.txt": b"a dash c",
    "a.txt": b"0123456789",
    "a/b.txt": b"bee",
    "a/c/d.bin": bytes(range(256)) * 4,
    "b/x.safetensors": b"\x00\x01" * 100,
}
SORTED = sorted(TREE)

StoreFactory = Callable[[dict[str, bytes]], Storage]


def _pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes, so a misplaced or repeated part is detected."""
    return random.Random(seed).randbytes(n)


@pytest.fixture
def make_store(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Callable[[str, dict[str, bytes]], Storage]:
    """Factory: a storage of the given kind holding ``files``."""

    def make(kind: str, files: dict[str, bytes]) -> Storage:
        if kind == "local":
            store: Storage = LocalStorage(str(tmp_path / "root"))
        elif kind == "s3":
            bucket = request.getfixturevalue("s3_bucket")
            store = open_storage(f"s3://{bucket}/root/dir")
        elif kind == "hf":
            cache = request.getfixturevalue("hf_cache")
            write_hub_repo(cache, "org/model", files)
            return open_storage("hf://org/model")
        else:  # pragma: no cover
            raise AssertionError(kind)
        for path, data in files.items():
            store.put_bytes(path, data)
        return store

    return make


@pytest.fixture(params=BACKENDS)
def tree_store(request: pytest.FixtureRequest, make_store) -> Storage:
    """Each backend, holding :data:`TREE`."""
    return make_store(request.param, TREE)


# -- generic read behaviour, all backends ------------------------------------------------------
def test_size_and_read(tree_store: Storage) -> None:
    for path, data in TREE.items():
        assert tree_store.size(path) == len(data)
        assert tree_store.read(path) == data
        assert tree_store.exists(path)
    with pytest.raises(StorageError, match="more than the 3 allowed"):
        tree_store.read("a.txt", max_bytes=3)


def test_read_range_edges(tree_store: Storage) -> None:
    s = tree_store
    assert s.read_range("a.txt", 0, 10) == b"0123456789"
    assert s.read_range("a.txt", 3, 4) == b"3456"
    assert s.read_range("a.txt", 9, 1) == b"9"  # last byte
    assert s.read_range("a.txt", 0, 0) == b""
    assert s.read_range("a.txt", 10, 0) == b""  # empty read at the very end is fine
    for start, length in [(9, 2), (10, 1), (11, 0), (100, 5), (0, 11)]:
        with pytest.raises(StorageError) as ei:
            s.read_range("a.txt", start, length)
        assert type(ei.value) is StorageError, (start, length)
        assert "a.txt" in str(ei.value)
    with pytest.raises(StorageError, match="invalid byte range"):
        s.read_range("a.txt", -1, 2)
    with pytest.raises(StorageError, match="invalid byte range"):
        s.read_range("a.txt", 0, -2)


def test_read_into(tree_store: Storage) -> None:
    data = TREE["a/c/d.bin"]
    buf = bytearray(300)
    tree_store.read_into("a/c/d.bin", 500, memoryview(buf))
    assert bytes(buf) == data[500:800]
    # A non-byte format buffer is filled byte-for-byte.
    words = array.array("I", [0] * 8)
    tree_store.read_into("a/c/d.bin", 4, memoryview(words))
    assert words.tobytes() == data[4:36]
    tree_store.read_into("a/c/d.bin", len(data), memoryview(bytearray(0)))
    with pytest.raises(StorageError):
        tree_store.read_into("a/c/d.bin", len(data) - 10, memoryview(bytearray(11)))
    with pytest.raises(StorageError, match="writable"):
        tree_store.read_into("a/c/d.bin", 0, memoryview(b"xx"))


def test_list_sorted_nested_prefix(tree_store: Storage) -> None:
    infos = list(tree_store.list())
    assert [i.path for i in infos] == SORTED
    assert {i.path: i.size for i in infos} == {p: len(d) for p, d in TREE.items()}
    assert all(i.version == tree_store.version(i.path) for i in infos)
    assert [i.path for i in tree_store.list("a")] == ["a/b.txt", "a/c/d.bin"]
    assert [i.path for i in tree_store.list("a/")] == ["a/b.txt", "a/c/d.bin"]
    assert [i.path for i in tree_store.list("a/c")] == ["a/c/d.bin"]
    # Prefixes are directories, not string prefixes: "a" does not match "a-c.txt"/"a.txt".
    assert list(tree_store.list("nope")) == []
    assert list(tree_store.list("a.txt")) == []


def test_list_is_lazy(tree_store: Storage) -> None:
    it = tree_store.list()
    assert inspect.isgenerator(it)
    assert next(it).path == SORTED[0]


def test_missing_names_uri(tree_store: Storage) -> None:
    for op in (
        lambda: tree_store.size("no/such.bin"),
        lambda: tree_store.read_range("no/such.bin", 0, 1),
        lambda: tree_store.read_into("no/such.bin", 0, memoryview(bytearray(1))),
        lambda: tree_store.version("no/such.bin"),
        lambda: tree_store.read("no/such.bin"),
    ):
        with pytest.raises(NotFoundError) as ei:
            op()
        assert tree_store.describe("no/such.bin") in str(ei.value)
    assert not tree_store.exists("no/such.bin")
    assert not tree_store.exists("a")  # a directory is not an object
    with pytest.raises(NotFoundError):
        tree_store.read_range("a", 0, 1)
    with pytest.raises(NotFoundError):
        tree_store.size("a/c")


@pytest.mark.parametrize("bad", ["..", "../x", "a/../../x", "/etc/passwd", "a//b", "a/./../.."])
def test_path_traversal_refused(tree_store: Storage, bad: str) -> None:
    for op in (
        lambda: tree_store.size(bad),
        lambda: tree_store.read_range(bad, 0, 1),
        lambda: tree_store.exists(bad),
        lambda: list(tree_store.list(bad)),
    ):
        with pytest.raises(StorageError) as ei:
            op()
        assert type(ei.value) is StorageError
        assert repr(bad) in str(ei.value)


def test_pickle_roundtrip(tree_store: Storage) -> None:
    clone = pickle.loads(pickle.dumps(tree_store))
    assert type(clone) is type(tree_store)
    assert clone.uri == tree_store.uri
    assert clone.read_range("a.txt", 2, 3) == b"234"
    assert [i.path for i in clone.list()] == SORTED


# -- writes, local + S3 ------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def rw_store(request: pytest.FixtureRequest, make_store) -> Storage:
    return make_store(request.param, {})


def test_put_overwrite_version_delete(rw_store: Storage, tmp_path: pathlib.Path) -> None:
    s = rw_store
    s.put_bytes("d/e/f.bin", b"one")
    v1 = s.version("d/e/f.bin")
    s.put_bytes("d/e/f.bin", b"second")
    v2 = s.version("d/e/f.bin")
    assert v1 != v2
    assert s.read("d/e/f.bin") == b"second"
    src = tmp_path / "src.bin"
    src.write_bytes(_pattern(5000))
    s.put_file("d/e/f.bin", str(src))
    assert s.read("d/e/f.bin") == _pattern(5000)
    assert s.version("d/e/f.bin") not in (v1, v2)
    assert [i.path for i in s.list()] == ["d/e/f.bin"]
    s.delete("d/e/f.bin")
    assert not s.exists("d/e/f.bin")
    s.delete("d/e/f.bin")  # deleting a missing object is a no-op
    with pytest.raises(NotFoundError, match="src-missing"):
        s.put_file("x", str(tmp_path / "src-missing"))
    for bad in ("../x", "/abs", ""):
        with pytest.raises(StorageError):
            s.put_bytes(bad, b"x")


def test_put_tree_default_and_local(rw_store: Storage, tmp_path: pathlib.Path) -> None:
    files = []
    for name in ("w.safetensors", "sub/t.txt", "adapter_config.json"):
        p = tmp_path / name.replace("/", "_")
        p.write_bytes(name.encode())
        files.append((name, str(p)))
    rw_store.put_tree("out/ad1", files)
    got = {i.path: rw_store.read(i.path) for i in rw_store.list("out")}
    assert got == {f"out/ad1/{n}": n.encode() for n, _ in files}


def test_writing_file_publishes_only_on_success(rw_store: Storage) -> None:
    with rw_store.writing_file("sets/x/part-0.bin") as local:
        with open(local, "wb") as f:
            f.write(_pattern(3000))
        assert not rw_store.exists("sets/x/part-0.bin")  # not visible before the block ends
    assert rw_store.read("sets/x/part-0.bin") == _pattern(3000)
    with (pytest.raises(RuntimeError, match="compute failed"),
          rw_store.writing_file("sets/x/part-1.bin") as local):
        with open(local, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("compute failed")
    # nothing published, no temp file left beside the target
    assert [i.path for i in rw_store.list("sets")] == ["sets/x/part-0.bin"]
    root = rw_store.local_path("sets/x/part-0.bin")
    if root is not None:
        assert sorted(os.listdir(os.path.dirname(root))) == ["part-0.bin"]


# -- local ---------------------------------------------------------------------------------------
def test_local_uri_and_open(tmp_path: pathlib.Path) -> None:
    s = open_storage(f"file://{tmp_path}/r")
    assert isinstance(s, LocalStorage)
    assert s.uri == str(tmp_path / "r")
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    with pytest.raises(StorageError, match="absolute"):
        LocalStorage("relative/dir")
    s.put_bytes("x/y.bin", b"hi")
    assert s.local_path("x/y.bin") == os.path.realpath(tmp_path / "r" / "x" / "y.bin")
    with pytest.raises(NotFoundError, match=str(tmp_path / "r" / "x" / "nope")):
        s.size("x/nope")


def test_local_read_into_large(tmp_path: pathlib.Path) -> None:
    s = LocalStorage(str(tmp_path))
    data = _pattern(5 * 1024 * 1024 + 17)
    s.put_bytes("big.bin", data)
    buf = bytearray(len(data) - 1001)
    s.read_into("big.bin", 1001, memoryview(buf))
    assert buf == data[1001:]


def test_local_list_laziness_and_hidden(tmp_path: pathlib.Path) -> None:
    s = LocalStorage(str(tmp_path))
    s.put_bytes("a/1", b"1")
    s.put_bytes("b/1", b"1")
    # In-flight write artifacts are never listed.
    (tmp_path / "a" / ".tmp-123").write_bytes(b"partial")
    (tmp_path / ".staging-abc").mkdir()
    (tmp_path / ".staging-abc" / "f").write_bytes(b"x")
    (tmp_path / ".trash-abc").mkdir()
    (tmp_path / ".trash-abc" / "f").write_bytes(b"x")
    it = s.list()
    assert next(it).path == "a/1"
    s.put_bytes("b/2", b"2")  # "b" has not been scanned yet: a lazy walk sees this
    assert [i.path for i in it] == ["b/1", "b/2"]


def test_local_version_format(tmp_path: pathlib.Path) -> None:
    s = LocalStorage(str(tmp_path))
    s.put_bytes("f", b"abc")
    st = os.stat(tmp_path / "f")
    assert s.version("f") == f"{st.st_mtime_ns}-3"


def test_local_symlink_escape_refused(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    s = LocalStorage(str(root))
    s.put_bytes("in/ok.txt", b"ok")
    os.symlink(outside, root / "link")
    os.symlink(outside / "secret", root / "in" / "secret-link")
    os.symlink(root / "in" / "ok.txt", root / "in" / "inside-link")
    for bad in ("link/secret", "in/secret-link"):
        with pytest.raises(StorageError, match="outside the storage root") as ei:
            s.read_range(bad, 0, 1)
        assert bad in str(ei.value)
        with pytest.raises(StorageError, match="outside the storage root"):
            s.put_bytes(bad, b"overwrite")
        with pytest.raises(StorageError, match="outside the storage root"):
            s.exists(bad)
    with pytest.raises(StorageError, match="outside the storage root"):
        list(s.list("link"))
    assert (outside / "secret").read_bytes() == b"secret"
    # Links that stay inside the root are fine; escaping ones are not listed.
    assert s.read("in/inside-link") == b"ok"
    assert [i.path for i in s.list()] == ["in/inside-link", "in/ok.txt"]


def test_local_root_through_a_symlink(tmp_path: pathlib.Path) -> None:
    """A root given as a symlink works, made before or after the storage is opened; re-pointed
    while in use, its paths resolve outside the root it had and are refused (fail closed)."""
    for a in ("a", "b"):
        (tmp_path / a).mkdir()
        (tmp_path / a / "f").write_bytes(a.encode())
    link = tmp_path / "current"
    s = LocalStorage(str(link))  # the link does not exist yet
    with pytest.raises(StorageError):
        s.read("f")
    os.symlink(tmp_path / "a", link)
    assert s.read("f") == b"a"
    s.put_bytes("g", b"new")
    assert (tmp_path / "a" / "g").read_bytes() == b"new"
    link.unlink()
    os.symlink(tmp_path / "b", link)
    with pytest.raises(StorageError, match="outside the storage root"):
        s.read("f")
    assert LocalStorage(str(link)).read("f") == b"b"  # a storage opened now follows it


def test_local_atomic_put_concurrent_reader(tmp_path: pathlib.Path) -> None:
    s = LocalStorage(str(tmp_path / "root"))
    n = 256 * 1024
    versions = [bytes([c]) * n for c in b"abcd"]
    s.put_bytes("f.bin", versions[0])
    src = tmp_path / "src"
    src.mkdir()
    srcs = []
    for i, v in enumerate(versions):
        (src / f"{i}").write_bytes(v)
        srcs.append(str(src / f"{i}"))
    stop = threading.Event()
    bad: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            data = s.read_range("f.bin", 0, n)
            if data not in versions:
                bad.append(f"torn read: {sorted(set(data))[:5]} len={len(data)}")
            for info in s.list():
                if info.path != "f.bin":
                    bad.append(f"listed {info.path}")
            reads += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1.0
    i = 0
    while time.monotonic() < deadline:
        if i % 2:
            s.put_bytes("f.bin", versions[i % 4])
        else:
            s.put_file("f.bin", srcs[i % 4])
        i += 1
    stop.set()
    for t in threads:
        t.join()
    assert not bad, bad[:3]
    assert reads > 10 and i > 10
    assert os.listdir(tmp_path / "root") == ["f.bin"]  # no temp files left behind


def test_local_put_tree_replaces_atomically(tmp_path: pathlib.Path) -> None:
    s = LocalStorage(str(tmp_path / "root"))
    srcdir = tmp_path / "src"
    srcdir.mkdir()
    layouts = [
        ["w.bin", "extra/x.txt", "cfg.json"],
        ["w.bin", "extra/y.txt", "more/z.txt", "cfg.json"],
    ]

    def tree(gen: int) -> list[tuple[str, str]]:
        # Every file of generation `gen` is 100 + gen bytes, so a listing tells generations apart.
        out = []
        for name in layouts[gen % 2]:
            p = srcdir / f"{gen}-{name.replace('/', '_')}"
            p.write_bytes(bytes([gen]) * (100 + gen))
            out.append((name, str(p)))
        return out

    def expected(gen: int) -> set[str]:
        return {f"adapters/one/{n}" for n in layouts[gen % 2]}

    s.put_bytes("sibling.txt", b"keep")
    s.put_tree("adapters/one", tree(1))
    assert {i.path for i in s.list("adapters")} == expected(1)
    assert s.read("adapters/one/extra/y.txt") == bytes([1]) * 101

    started = 1  # generation of the latest put_tree that has begun
    stop = threading.Event()
    bad: list[str] = []
    listings = 0

    def reader() -> None:
        nonlocal listings
        while not stop.is_set():
            infos = list(s.list("adapters"))
            latest = started
            listings += 1
            gens = {i.size - 100 for i in infos}
            names = {i.path for i in infos}
            if len(gens) > 1:
                bad.append(f"mixed generations {sorted(gens)}: {sorted(names)}")
            elif gens:
                (gen,) = gens
                # A listing may be cut short only for a tree already being replaced (its old
                # inode is removed after the swap); the current tree is always complete.
                if not names <= expected(gen) or (names != expected(gen) and gen >= latest):
                    bad.append(f"partial generation {gen} (latest {latest}): {sorted(names)}")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for gen in range(2, 60):
        started = gen
        s.put_tree("adapters/one", tree(gen))
    stop.set()
    for t in threads:
        t.join()
    assert not bad, bad[:3]
    assert listings > 10
    assert {i.path for i in s.list()} == expected(59) | {"sibling.txt"}
    assert s.read("adapters/one/cfg.json") == bytes([59]) * 159
    # Nothing staged or trashed is left next to the tree.
    assert sorted(os.listdir(tmp_path / "root" / "adapters")) == ["one"]

    # A failing publish leaves the current tree untouched and cleans its staging dir.
    with pytest.raises(NotFoundError, match="missing-file"):
        s.put_tree("adapters/one", [("a", str(srcdir / "missing-file")), *tree(60)])
    with pytest.raises(StorageError, match="invalid relative path"):
        s.put_tree("adapters/one", [("../escape", str(srcdir / "1-w.bin"))])
    assert {i.path for i in s.list("adapters")} == expected(59)
    assert sorted(os.listdir(tmp_path / "root" / "adapters")) == ["one"]
    with pytest.raises(StorageError, match="a file is in the way"):
        s.put_tree("sibling.txt", tree(61))


def test_local_put_tree_moves_scratch_files(tmp_path: pathlib.Path) -> None:
    """Files written in the root's scratch dir are moved into place (written once); files on
    another filesystem are copied; without ``move`` the caller's files stay; the published
    bytes are the same every way."""
    s = LocalStorage(str(tmp_path / "root"))
    scratch = tempfile.mkdtemp(prefix=".staging-", dir=s.scratch_dir())
    assert os.path.dirname(scratch) == s.root
    for name, data in (("w.bin", b"w" * 5000), ("cfg.json", b"{}")):
        pathlib.Path(scratch, name).write_bytes(data)
    inode = os.stat(os.path.join(scratch, "w.bin")).st_ino
    files = [(n, os.path.join(scratch, n)) for n in ("w.bin", "cfg.json")]
    s.put_tree("a/one", files, move=True)
    assert os.listdir(scratch) == []  # moved, not copied
    assert os.stat(tmp_path / "root" / "a" / "one" / "w.bin").st_ino == inode
    assert s.read("a/one/w.bin") == b"w" * 5000 and s.read("a/one/cfg.json") == b"{}"
    # Without move the caller's file stays where it was.
    src = tmp_path / "keep.bin"
    src.write_bytes(b"k" * 300)
    s.put_tree("a/two", [("w.bin", str(src))])
    assert src.read_bytes() == b"k" * 300 and s.read("a/two/w.bin") == b"k" * 300
    # On another filesystem (tmpfs) a moved file is copied instead (rename cannot cross).
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(s.root).st_dev:
        other = tempfile.mkdtemp(dir="/dev/shm")
        try:
            far = os.path.join(other, "w.bin")
            pathlib.Path(far).write_bytes(b"v" * 300)
            s.put_tree("a/three", [("w.bin", far)], move=True)
            assert s.read("a/three/w.bin") == b"v" * 300
        finally:
            shutil.rmtree(other, ignore_errors=True)
    assert not [n for n in os.listdir(tmp_path / "root" / "a") if n.startswith(".")]


def _resident_pages(path: str) -> int:
    """How many of the file's pages are in the page cache (``mincore`` over a mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            pytest.skip(f"mmap failed: errno {ctypes.get_errno()}")
        try:
            if libc.mincore(addr, size, vec) != 0:
                pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_local_put_tree_uncached_leaves_no_pages(tmp_path: pathlib.Path) -> None:
    """``cache=False`` (a fleet's outputs): the published files are durable and in place, and
    none of their pages stays in the page cache; the default keeps them (read soon)."""
    s = LocalStorage(str(tmp_path / "root"))
    data = os.urandom(4 << 20)
    for name, cache in (("kept", True), ("dropped", False)):
        scratch = tempfile.mkdtemp(prefix=".staging-", dir=s.scratch_dir())
        pathlib.Path(scratch, "w.bin").write_bytes(data)
        s.put_tree(name, [("w.bin", os.path.join(scratch, "w.bin")), ("cfg.json", b"{}")],
                   move=True, cache=cache)
    kept = _resident_pages(str(tmp_path / "root" / "kept" / "w.bin"))
    if kept == 0:
        pytest.skip("this filesystem keeps no written pages in the page cache")
    assert _resident_pages(str(tmp_path / "root" / "dropped" / "w.bin")) == 0
    assert s.read("dropped/w.bin") == data and s.read("dropped/cfg.json") == b"{}"

def test_local_delete_directory_refused(tmp_path: pathlib.Path) -> None:
    s = LocalStorage(str(tmp_path))
    s.put_bytes("d/f", b"x")
    with pytest.raises(StorageError, match="directory"):
        s.delete("d")
    with pytest.raises(NotFoundError):
        s.size("d")


# -- S3 ------------------------------------------------------------------------------------------
@pytest.fixture
def s3(s3_bucket: str) -> S3Storage:
    s = open_storage(f"s3://{s3_bucket}/pre")
    assert isinstance(s, S3Storage)
    return s


def _count_calls(store: S3Storage, op: str) -> dict[str, int]:
    """Count requests of operation ``op`` (and the most in flight at once)."""
    stats = {"calls": 0, "inflight": 0, "max_inflight": 0}
    lock = threading.Lock()

    def before(**_: object) -> None:
        with lock:
            stats["calls"] += 1
            stats["inflight"] += 1
            stats["max_inflight"] = max(stats["max_inflight"], stats["inflight"])

    def after(**_: object) -> None:
        with lock:
            stats["inflight"] -= 1

    store.client.meta.events.register(f"before-call.s3.{op}", before)
    store.client.meta.events.register(f"after-call.s3.{op}", after)
    return stats


def test_s3_uri_endpoint_and_client(s3: S3Storage, s3_server: str, s3_bucket: str) -> None:
    assert s3.uri == f"s3://{s3_bucket}/pre"
    assert open_storage(f"s3://{s3_bucket}/").uri == f"s3://{s3_bucket}"
    assert open_storage(f"s3://{s3_bucket}/a/b/").uri == f"s3://{s3_bucket}/a/b"
    with pytest.raises(ConfigError, match="bucket"):
        open_storage("s3://")
    clients: list[object] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        clients.append(s3.client)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in clients}) == 1
    assert s3.client.meta.endpoint_url == s3_server


def test_s3_read_into_parallel_parts(s3: S3Storage) -> None:
    data = _pattern(1_000_003, seed=5)
    s3.put_bytes("big.bin", data)
    s3.part_size = 64 * 1024
    stats = _count_calls(s3, "GetObject")
    before = s3.bytes_read
    buf = bytearray(len(data) - 3)
    s3.read_into("big.bin", 3, memoryview(buf))
    assert buf == data[3:]
    assert s3.bytes_read - before == len(buf)
    assert stats["calls"] == -(-len(buf) // s3.part_size)
    assert 1 <= stats["max_inflight"] <= s3.max_concurrency
    # read_range goes through the same path.
    assert s3.read_range("big.bin", 100_000, 200_000) == data[100_000:300_000]
    assert s3.bytes_read - before == len(buf) + 200_000
    # A range past the end fails even when split in parts.
    with pytest.raises(StorageError, match=r"big\.bin"):
        s3.read_into("big.bin", 10, memoryview(bytearray(len(data))))


def test_s3_bytes_read_counts_ranges(s3: S3Storage) -> None:
    s3.put_bytes("f", _pattern(1000))
    assert s3.bytes_read == 0
    s3.size("f")
    s3.read_range("f", 0, 0)
    assert s3.bytes_read == 0
    s3.read_range("f", 10, 100)
    s3.read_range("f", 999, 1)
    assert s3.bytes_read == 101
    s3.read_into("f", 0, memoryview(bytearray(1000)))
    assert s3.bytes_read == 1101
    clone = pickle.loads(pickle.dumps(s3))
    assert clone.bytes_read == 0 and clone.read_range("f", 0, 3) == _pattern(1000)[:3]


def test_s3_list_paged_and_sorted(s3: S3Storage, s3_bucket: str) -> None:
    names = [f"k/{i:02d}" for i in range(7)]
    for n in names:
        s3.put_bytes(n, n.encode())
    # Objects outside the root prefix, including a sibling that shares its string prefix.
    other = open_storage(f"s3://{s3_bucket}")
    other.put_bytes("prefix-sibling/x", b"x")
    other.put_bytes("pre-x", b"x")
    # A console-style "folder" marker, which is not an object of the tree.
    s3.client.put_object(Bucket=s3_bucket, Key="pre/k/", Body=b"")
    s3.list_page_size = 2
    stats = _count_calls(s3, "ListObjectsV2")
    it = s3.list("k")
    assert stats["calls"] == 0  # nothing fetched before iteration
    first = next(it)
    assert first.path == "k/00" and first.size == 4
    # every page is fetched before the first item: not every server sorts keys (SeaweedFS
    # lists "a/b" before "a-c"), so S3Storage sorts them itself
    assert stats["calls"] == 4
    rest = [i.path for i in it]
    assert [first.path, *rest] == names
    assert stats["calls"] == 4
    assert [i.path for i in s3.list()] == names
    info = next(s3.list())
    assert info.version == s3.version("k/00") and '"' not in info.version


def test_s3_missing_bucket_and_keys(s3_server: str) -> None:
    s = open_storage("s3://no-such-bucket-xyz/p")
    with pytest.raises(NotFoundError, match=r"s3://no-such-bucket-xyz/p/f"):
        s.read_range("f", 0, 1)
    with pytest.raises(NotFoundError, match=r"s3://no-such-bucket-xyz/p/f"):
        s.size("f")
    assert not s.exists("f")
    with pytest.raises(NotFoundError, match="bucket 'no-such-bucket-xyz' does not exist"):
        list(s.list())


def test_s3_access_denied_message(s3: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.exceptions

    def denied(**_: object) -> None:
        raise botocore.exceptions.ClientError(
            {
                "Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                "ResponseMetadata": {"HTTPStatusCode": 403},
            },
            "GetObject",
        )

    monkeypatch.setattr(s3.client, "get_object", denied)
    monkeypatch.setattr(s3.client, "head_object", denied)
    with pytest.raises(StorageError, match="access denied") as ei:
        s3.read_range("secret.bin", 0, 10)
    assert type(ei.value) is StorageError
    msg = str(ei.value)
    assert s3.describe("secret.bin") in msg and "403" in msg
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in msg
    assert "Signature" not in msg and "X-Amz" not in msg
    with pytest.raises(StorageError, match="access denied"):
        s3.exists("secret.bin")  # denied is not "missing"


def test_s3_put_tree_marker_last(s3: S3Storage, tmp_path: pathlib.Path) -> None:
    keys: list[str] = []
    s3.client.meta.events.register(
        "provide-client-params.s3.PutObject", lambda params, **_: keys.append(params["Key"])
    )
    files = []
    for name in ("b.safetensors", "a/x.txt", "adapter_config.json"):
        p = tmp_path / name.replace("/", "_")
        p.write_bytes(name.encode())
        files.append((name, str(p)))
    s3.put_tree("ad", files)
    assert keys == ["pre/ad/b.safetensors", "pre/ad/a/x.txt", "pre/ad/adapter_config.json"]


# -- HF ------------------------------------------------------------------------------------------
HF_FILES: dict[str, bytes] = {
    "config.json": b'{"a": 1}',
    "model.safetensors": _pattern(4096),
    "sub/dir/tok.txt": b"tokens",
}


def test_hub_cache_layout_matches_huggingface_hub(hf_cache: pathlib.Path) -> None:
    from huggingface_hub import try_to_load_from_cache

    sha = write_hub_repo(hf_cache, "org/model", HF_FILES)
    sha_dev = write_hub_repo(hf_cache, "org/model", {"config.json": b"dev"}, revision="dev")
    for rev in ("main", sha, None):
        for path, data in HF_FILES.items():
            got = try_to_load_from_cache("org/model", path, cache_dir=hf_cache, revision=rev)
            assert isinstance(got, str), (rev, path)
            assert pathlib.Path(got).read_bytes() == data
            assert os.path.islink(got)
            assert not os.path.isabs(os.readlink(got))  # relative links, like the Hub client
            assert os.path.basename(os.readlink(got)) == blob_id(path, data)
    got = try_to_load_from_cache("org/model", "config.json", cache_dir=hf_cache, revision="dev")
    assert isinstance(got, str) and pathlib.Path(got).read_bytes() == b"dev"
    missing = try_to_load_from_cache(
        "org/model", "sub/dir/tok.txt", cache_dir=hf_cache, revision=sha_dev
    )
    assert missing is None
    repo = hf_cache / "models--org--model"
    assert (repo / "refs" / "main").read_text() == sha
    assert (repo / "blobs" / blob_id("model.safetensors", HF_FILES["model.safetensors"])).exists()
    # Explicit commit sha: used as is, no ref written.
    pinned = "ab" * 20
    assert write_hub_repo(hf_cache, "org/other", {"f": b"x"}, revision=pinned) == pinned
    assert not (hf_cache / "models--org--other" / "refs").exists()


def test_hf_offline_resolution(hf_cache: pathlib.Path) -> None:
    sha = write_hub_repo(hf_cache, "org/model", HF_FILES)
    s = open_storage("hf://org/model")
    assert isinstance(s, HfStorage)
    assert s.uri == "hf://org/model@main" and s.commit == sha
    s2 = open_storage("hf://org/model@main/sub")
    assert s2.uri == "hf://org/model@main/sub" and s2.commit == sha
    assert s2.read("dir/tok.txt") == b"tokens"
    assert [i.path for i in s2.list()] == ["dir/tok.txt"]
    s3 = open_storage(f"hf://org/model@{sha}")
    assert s3.uri == f"hf://org/model@{sha}" and s3.commit == sha
    assert s3.read("config.json") == HF_FILES["config.json"]
    assert s3.local_path("config.json") == str(
        hf_cache / "models--org--model" / "snapshots" / sha / "config.json"
    )
    pr = write_hub_repo(hf_cache, "org/model", {"config.json": b"pr"}, revision="refs/pr/1")
    s4 = open_storage("hf://org/model@refs%2Fpr%2F1")
    assert s4.commit == pr and s4.revision == "refs/pr/1"
    assert s4.uri == "hf://org/model@refs%2Fpr%2F1" and s4.read("config.json") == b"pr"
    for bad in ("hf://justname", "hf://org/", "hf://org/name@"):
        with pytest.raises(StorageError):
            open_storage(bad)


def test_hf_versions_are_blob_ids(hf_cache: pathlib.Path) -> None:
    write_hub_repo(hf_cache, "org/model", HF_FILES)
    s = open_storage("hf://org/model")
    for path, data in HF_FILES.items():
        assert s.version(path) == blob_id(path, data)
    sha2 = write_hub_repo(
        hf_cache, "org/model", {**HF_FILES, "config.json": b'{"a": 2}'}, revision="v2"
    )
    s2 = open_storage("hf://org/model@v2")
    assert s2.commit == sha2 != s.commit
    assert s2.version("config.json") != s.version("config.json")
    assert s2.version("model.safetensors") == s.version("model.safetensors")


def test_hf_offline_missing(hf_cache: pathlib.Path) -> None:
    with pytest.raises(NotFoundError, match="HF_HUB_OFFLINE"):
        open_storage("hf://org/absent")
    write_hub_repo(hf_cache, "org/model", HF_FILES)
    s = open_storage("hf://org/model")
    with pytest.raises(NotFoundError) as ei:
        s.read_range("weights/missing.safetensors", 0, 8)
    msg = str(ei.value)
    assert "hf://org/model@main/weights/missing.safetensors" in msg
    assert "HF_HUB_OFFLINE" in msg and "cache" in msg
    with pytest.raises(NotFoundError, match="HF_HUB_OFFLINE"):
        s.size("weights/missing.safetensors")
    # A pinned commit the cache does not have cannot be listed offline.
    with pytest.raises(NotFoundError, match="HF_HUB_OFFLINE"):
        list(open_storage(f"hf://org/model@{'cd' * 20}").list())


def test_hf_read_only(hf_cache: pathlib.Path, tmp_path: pathlib.Path) -> None:
    write_hub_repo(hf_cache, "org/model", HF_FILES)
    s = open_storage("hf://org/model")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for op in (
        lambda: s.put_bytes("x", b"x"),
        lambda: s.put_file("x", str(src)),
        lambda: s.put_tree("t", [("x", str(src))]),
        lambda: s.delete("config.json"),
    ):
        with pytest.raises(StorageError, match="hf:// is read-only"):
            op()
    assert s.read("config.json") == HF_FILES["config.json"]


def test_hf_pickle_keeps_commit(hf_cache: pathlib.Path) -> None:
    old = write_hub_repo(hf_cache, "org/model", HF_FILES)
    s = open_storage("hf://org/model")
    blob = pickle.dumps(s)
    new = write_hub_repo(hf_cache, "org/model", {"config.json": b"moved"})  # main moves on
    assert new != old
    clone = pickle.loads(blob)
    assert clone.commit == old and clone.uri == "hf://org/model@main"
    assert clone.read("config.json") == HF_FILES["config.json"]
    assert open_storage("hf://org/model").read("config.json") == b"moved"


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_hf_offline_env_truthy(
    hf_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hf_mod.hf_offline()


def test_hf_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_mod.hf_cache_dir() == str(tmp_path / "home" / "hub")
    sha = write_hub_repo(tmp_path / "home" / "hub", "org/model", HF_FILES)
    assert open_storage("hf://org/model").commit == sha
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    assert hf_mod.hf_cache_dir() == str(tmp_path / "explicit")


class _FakeHub:
    """Stands in for HfApi/HfFileSystem so the online code path runs without a network."""

    def __init__(self, commit: str, files: dict[str, bytes]) -> None:
        self.commit = commit
        self.files = files
        self.calls: list[tuple] = []

    # HfApi
    def model_info(self, repo_id: str, revision: str | None = None, **_: object):
        self.calls.append(("model_info", repo_id, revision))
        from huggingface_hub.errors import RevisionNotFoundError

        if revision == "nope":
            response = types.SimpleNamespace(status_code=404, headers={}, request=None)
            raise RevisionNotFoundError("no such revision", response=response)
        return type("Info", (), {"sha": self.commit})()

    def list_repo_tree(self, repo_id: str, path_in_repo=None, recursive=False, revision=None):
        from huggingface_hub.hf_api import RepoFile, RepoFolder

        self.calls.append(("list_repo_tree", repo_id, path_in_repo, recursive, revision))
        assert revision == self.commit
        out: list[object] = [RepoFolder(path="sub", oid="t" * 40)]
        for path in sorted(self.files, reverse=True):  # the Hub gives no order guarantee
            if path_in_repo and not path.startswith(path_in_repo + "/"):
                continue
            data = self.files[path]
            lfs = None
            if path.endswith(".safetensors"):
                lfs = {"size": len(data), "oid": blob_id(path, data), "pointerSize": 130}
            out.append(RepoFile(path=path, size=len(data), oid=blob_id("x.txt", data), lfs=lfs))
        return iter(out)

    # HfFileSystem
    def _split(self, path: str) -> str:
        repo, _, rel = path.partition("org/model/")
        assert repo == ""
        return rel

    def info(self, path: str, revision: str | None = None, **_: object) -> dict:
        self.calls.append(("info", path, revision))
        assert revision == self.commit
        rel = self._split(path)
        if rel not in self.files:
            raise FileNotFoundError(path)
        return {"name": path, "type": "file", "size": len(self.files[rel]), "blob_id": "b" * 40}

    def cat_file(self, path: str, revision=None, start=None, end=None, **_: object) -> bytes:
        self.calls.append(("cat_file", path, revision, start, end))
        assert revision == self.commit
        return self.files[self._split(path)][start:end]


@pytest.fixture
def fake_hub(hf_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeHub]:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake = _FakeHub("f" * 40, dict(HF_FILES))
    monkeypatch.setattr(hf_mod, "HfApi", lambda: fake)
    monkeypatch.setattr(hf_mod, "HfFileSystem", lambda: fake)
    yield fake


def test_hf_online_with_fake_hub(fake_hub: _FakeHub, hf_cache: pathlib.Path) -> None:
    s = open_storage("hf://org/model@main")
    assert s.commit == fake_hub.commit
    assert fake_hub.calls == [("model_info", "org/model", "main")]
    data = HF_FILES["model.safetensors"]
    assert s.size("model.safetensors") == len(data)
    assert s.read_range("model.safetensors", 100, 50) == data[100:150]
    assert ("cat_file", "org/model/model.safetensors", fake_hub.commit, 100, 150) in fake_hub.calls
    buf = bytearray(10)
    s.read_into("sub/dir/tok.txt", 0, memoryview(buf)[:6])
    assert bytes(buf[:6]) == b"tokens"
    with pytest.raises(StorageError, match="past the end"):
        s.read_range("config.json", 5, 100)
    with pytest.raises(NotFoundError, match=r"hf://org/model@main/nope\.bin"):
        s.read_range("nope.bin", 0, 1)
    assert not s.exists("nope.bin") and s.exists("config.json")
    assert s.version("config.json") == "b" * 40
    infos = list(s.list())
    assert [i.path for i in infos] == sorted(HF_FILES)
    assert {i.path: i.version for i in infos} == {
        p: blob_id(p if p.endswith(".safetensors") else "x.txt", d) for p, d in HF_FILES.items()
    }
    assert [i.path for i in open_storage("hf://org/model/sub").list("dir")] == ["dir/tok.txt"]
    with pytest.raises(NotFoundError, match="RevisionNotFoundError"):
        open_storage("hf://org/model@nope")

    # Once the commit is in the cache, reads come from disk and the Hub is not asked.
    write_hub_repo(hf_cache, "org/model", HF_FILES, revision=fake_hub.commit)
    fake_hub.calls.clear()
    pinned = open_storage(f"hf://org/model@{fake_hub.commit}")
    assert pinned.read_range("model.safetensors", 1, 3) == data[1:4]
    assert pinned.size("config.json") == len(HF_FILES["config.json"])
    assert pinned.local_path("config.json") is not None
    assert fake_hub.calls == []  # a sha revision needs no resolution either


def test_local_put_tree_uncached_where_advice_is_refused(tmp_path: pathlib.Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses the page-cache advice (some FUSE mounts answer EINVAL) still
    gets the tree published: the advice never fails a durable write."""
    def refuse(fd: int, offset: int, length: int, advice: int) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse, raising=False)
    s = LocalStorage(str(tmp_path / "root"))
    s.put_tree("t", [("w.bin", b"w" * 9000), ("cfg.json", b"{}")], cache=False)
    assert s.read("t/w.bin") == b"w" * 9000 and s.read("t/cfg.json") == b"{}"
