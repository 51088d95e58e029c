"""Tests of the streaming safetensors reader and writer against the safetensors library."""

from __future__ import annotations

import json
import os
import struct
import sys
import tracemalloc
from collections.abc import Iterator

import pytest
import safetensors
import safetensors.torch as st
import torch

from safelora_ray.core.errors import (
    CheckpointError,
    NotFoundError,
    SafeLoraError,
    SafetensorsFormatError,
    StorageError,
)
from safelora_ray.formats import safetensors as sio
from safelora_ray.formats.safetensors import (
    DTYPES,
    SafetensorsWriter,
    library_layout,
    read_header,
    read_tensor,
    read_tensor_bytes,
    save_tensors,
    serialize,
)
from safelora_ray.storage import open_storage
from safelora_ray.storage.base import ObjectInfo, Storage

# -- helpers ---------------------------------------------------------------------------------


class BytesStorage(Storage):
    """In-memory storage that records every ranged read."""

    def __init__(self, files: dict[str, bytes], uri: str = "mem://bucket") -> None:
        self.uri = uri
        self.files = dict(files)
        self.reads: list[tuple[str, int, int]] = []
        self.size_calls = 0

    @property
    def bytes_read(self) -> int:
        return sum(length for _, _, length in self.reads)

    def size(self, path: str) -> int:
        self.size_calls += 1
        if path not in self.files:
            raise NotFoundError(self.describe(path))
        return len(self.files[path])

    def read_range(self, path: str, start: int, length: int) -> bytes:
        data = self.files[path]
        if start < 0 or length < 0 or start + length > len(data):
            raise StorageError(f"bad range [{start}, {start + length}) of {len(data)}")
        self.reads.append((path, start, length))
        return data[start : start + length]

    def exists(self, path: str) -> bool:
        return path in self.files

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for p in sorted(self.files):
            if p.startswith(prefix):
                yield ObjectInfo(p, len(self.files[p]), str(len(self.files[p])))

    def version(self, path: str) -> str:
        return str(len(self.files[path]))


NAME = "model-00001.safetensors"
URI = f"mem://bucket/{NAME}"


def mk(header: object, data: bytes = b"", *, n: int | None = None) -> bytes:
    """A file from a header (JSON-encoded unless already bytes), with an optional fake length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def entry(dtype: str = "F32", shape: object = (1,), offsets: object = (0, 4), **extra: object):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (works for float8/uint/complex and NaNs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.contiguous().reshape(-1).view(torch.uint8)) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8)
    )


def library_accepts(data: bytes, tmp_path) -> bool:
    """Whether safetensors' own reader opens the file and loads every tensor."""
    p = tmp_path / "lib-probe.safetensors"
    p.write_bytes(data)
    try:
        with safetensors.safe_open(str(p), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                f.get_tensor(k)
            f.metadata()
        return True
    except Exception:
        return False
    finally:
        p.unlink()


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(7, 2, generator=g).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**14), 2**14, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (4, 1), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(3.5),
        "scalar_i64": torch.tensor(-7),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        'nön-äscii "quoted"\n': torch.ones(2),
    }
    for name, dt in [("u16", "uint16"), ("u32", "uint32"), ("u64", "uint64")]:
        if hasattr(torch, dt):
            t[name] = torch.randint(0, 2**15, (3,), generator=g).to(getattr(torch, dt))
    # One-byte float types: random bit patterns (NaNs included; compared bytewise).
    for name in ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"):
        dt = DTYPES[name][0]
        if dt is not None:
            t[name.lower()] = torch.randint(0, 256, (2, 3), generator=g, dtype=torch.uint8).view(dt)
    return t


# -- dtype table ------------------------------------------------------------------------------


def test_dtype_table_covers_library() -> None:
    assert set(DTYPES) == set(sio._DTYPE_ORDER)
    assert len(DTYPES) == 22  # the Rust crate's Dtype enum has 22 variants
    bits = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64, "BF16": 16, "U64": 64}
    for name, b in bits.items():
        assert DTYPES[name][1] == b
    # Every dtype the library's torch binding maps must map to the same torch dtype here.
    for name, tdt in st._TYPES.items():
        if tdt is not None:
            assert DTYPES[name][0] == tdt, name
    assert DTYPES["F8_E8M0"][0] == getattr(torch, "float8_e8m0fnu", None)
    assert DTYPES["F6_E2M3"][0] is None


# -- round trips -----------------------------------------------------------------------------


def test_reads_library_written_file(tmp_path) -> None:
    tensors = sample_tensors()
    md = {"format": "pt", "note": "ünïcode", "empty": ""}
    st.save_file(tensors, str(tmp_path / "m.safetensors"), metadata=md)
    storage = open_storage(str(tmp_path))
    header = read_header(storage, "m.safetensors")
    assert header.metadata == md
    assert header.path == "m.safetensors"
    assert header.uri == storage.describe("m.safetensors")
    assert header.file_size == os.path.getsize(tmp_path / "m.safetensors")
    assert header.data_start == 8 + header.header_len
    assert header.data_start % 8 == 0
    assert set(header.tensors) == set(tensors)
    starts = [i.start for i in header.tensors.values()]
    assert starts == sorted(starts)  # offset order
    for name, expected in tensors.items():
        info = header.tensors[name]
        assert info.numel == expected.numel()
        assert info.nbytes == expected.numel() * expected.element_size()
        got = read_tensor(storage, header, name)
        assert same(got, expected), name
        assert bytes(read_tensor_bytes(storage, header, name)) == bytes(
            expected.contiguous().reshape(-1).view(torch.uint8)
        )
    assert read_tensor(storage, header, "scalar").shape == ()


def test_no_metadata_and_empty_file(tmp_path) -> None:
    st.save_file({"a": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    st.save_file({}, str(tmp_path / "e.safetensors"))
    storage = open_storage(str(tmp_path))
    assert read_header(storage, "a.safetensors").metadata is None
    empty = read_header(storage, "e.safetensors")
    assert empty.tensors == {}
    assert empty.metadata is None


def test_f4_and_f6(tmp_path) -> None:
    storage = BytesStorage({})
    if DTYPES["F4"][0] is not None:
        packed = torch.randint(0, 256, (3, 2), dtype=torch.uint8).view(DTYPES["F4"][0])
        data = st.save({"w": packed})
        storage.files["f4"] = data
        h = read_header(storage, "f4")
        assert h.tensors["w"].shape == (3, 4)  # the file counts 4-bit values
        assert same(read_tensor(storage, h, "w"), packed)
        assert serialize({"w": packed}) == data
    # F6 parses (the library knows it) but torch has no such dtype.
    storage.files["f6"] = mk({"w": entry("F6_E2M3", (4,), (0, 3))}, b"abc")
    h = read_header(storage, "f6")
    assert bytes(read_tensor_bytes(storage, h, "w")) == b"abc"
    with pytest.raises(SafetensorsFormatError, match=r"mem://bucket/f6: tensor 'w'.*F6_E2M3"):
        read_tensor(storage, h, "w")


def test_streaming_writer_loads_with_library(tmp_path) -> None:
    tensors = sample_tensors()
    # Deliberately not the library's order: the writer follows the caller's layout.
    layout = [(n, *sio._dtype_and_shape(n, t)) for n, t in reversed(tensors.items())]
    md = {"format": "pt", "k": "v"}
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, layout, md) as w:
        assert not path.exists()  # only appears once complete
        for name, _, _ in layout:
            w.write(name, tensors[name])
    assert path.stat().st_size == w.file_size
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temporary left behind

    loaded = st.load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert same(loaded[name], t), name
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == md
        for name, t in tensors.items():
            assert same(f.get_tensor(name), t)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0 and raw[8 : 8 + n].rstrip(b" ").endswith(b"}")

    storage = open_storage(str(tmp_path))
    h = read_header(storage, "w.safetensors")
    # Offset order; empty tensors sharing an offset come by name, as the library sorts them.
    by_offset = sorted(w.tensors.values(), key=lambda i: (i.start, i.end, i.name))
    assert list(h.tensors) == [i.name for i in by_offset]
    assert h.tensors == w.tensors
    assert all(same(read_tensor(storage, h, n), t) for n, t in tensors.items())


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {}])
def test_serialize_matches_library_bytes(metadata) -> None:
    tensors = sample_tensors()
    assert serialize(tensors, metadata) == st.save(tensors, metadata=metadata)


def test_save_tensors_handles_views_and_sharing(tmp_path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "base": base,
        "t": base.t(),  # non-contiguous, shares storage (save_file refuses this)
        "slice": base[1:3, 2:],
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "neg": torch.randn(3, dtype=torch.complex64).conj().imag,
        "grad": torch.ones(2, requires_grad=True) * 2,
    }
    path = tmp_path / "s.safetensors"
    save_tensors(path, tensors, {"a": "b"})
    loaded = st.load_file(str(path))
    for name, t in tensors.items():
        assert same(loaded[name], t.detach().resolve_conj().resolve_neg()), name


def test_writer_rejects_misuse_and_cleans_up(tmp_path) -> None:
    layout = [("a", "F32", (2,)), ("b", "I64", (1,))]
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, layout) as w:
        with pytest.raises(SafetensorsFormatError, match="expected tensor 'a' next"):
            w.write("b", torch.zeros(1, dtype=torch.int64))
        with pytest.raises(SafetensorsFormatError, match=r"'a' is F64 \[2\].*says F32 \[2\]"):
            w.write("a", torch.zeros(2, dtype=torch.float64))
        with pytest.raises(SafetensorsFormatError, match=r"'a' is F32 \[3\]"):
            w.write("a", torch.zeros(3))
        w.write("a", torch.zeros(2))
        # Closing early removes the partial file.
        with pytest.raises(SafetensorsFormatError, match=r"closed after 1 of 2 tensors.*'b'"):
            w.close()
    assert os.listdir(tmp_path) == []

    with pytest.raises(RuntimeError, match="boom"), SafetensorsWriter(path, layout) as w:
        w.write("a", torch.zeros(2))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []

    w = SafetensorsWriter(path, layout)
    w.write("a", torch.zeros(2))
    w.write("b", torch.zeros(1, dtype=torch.int64))
    with pytest.raises(SafetensorsFormatError, match="after all 2 planned"):
        w.write("c", torch.zeros(1))
    w.close()
    assert os.listdir(tmp_path) == ["x.safetensors"]

    for bad_layout, msg in [
        ([("a", "F32", (1,)), ("a", "F32", (1,))], "duplicate tensor name 'a'"),
        ([("__metadata__", "F32", (1,))], "invalid or duplicate tensor name"),
        ([("a", "F128", (1,))], "unknown dtype 'F128'"),
        ([("a", "F32", (-1,))], "invalid shape"),
        ([("a", "F6_E2M3", (3,))], "not a whole number of bytes"),
    ]:
        with pytest.raises(SafetensorsFormatError, match=msg):
            SafetensorsWriter(tmp_path / "y.safetensors", bad_layout)
    with pytest.raises(SafetensorsFormatError, match="metadata must map strings"):
        SafetensorsWriter(tmp_path / "y.safetensors", [], {"a": 1})  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_write_run_equals_tensor_writes_and_checks_its_size(tmp_path) -> None:
    """A run of tensors written from another file's bytes gives the file, the SHA-256 and
    the per-tensor digests that writing them one by one gives; misuse is refused."""
    from safelora_ray.formats.integrity import FileHasher

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.arange(4, dtype=torch.bfloat16), "c": torch.ones(3, dtype=torch.int64)}
    layout = [(n, *sio._dtype_and_shape(n, t)) for n, t in tensors.items()]
    one, many = FileHasher(), FileHasher()
    with SafetensorsWriter(tmp_path / "one.safetensors", layout, hasher=one) as w:
        for n, t in tensors.items():
            w.write(n, t)
    raw = (tmp_path / "one.safetensors").read_bytes()
    infos = w.tensors
    with SafetensorsWriter(tmp_path / "run.safetensors", layout, hasher=many) as w:
        w.write_run(2, memoryview(raw)[infos["a"].start:infos["b"].end])
        w.write("c", tensors["c"])
    assert (tmp_path / "run.safetensors").read_bytes() == raw
    assert many.file_digest() == one.file_digest() and many.tensors == one.tensors

    w = SafetensorsWriter(tmp_path / "bad.safetensors", layout)
    with pytest.raises(SafetensorsFormatError, match="holds 32 bytes, got 24"):
        w.write_run(2, memoryview(raw)[infos["a"].start:infos["a"].end])
    with pytest.raises(SafetensorsFormatError, match="run of 4 tensors asked for, 3 left"):
        w.write_run(4, memoryview(raw))
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["one.safetensors", "run.safetensors"]


def test_plans_and_headers_reused_only_when_equal(tmp_path) -> None:
    """The plan and header caches give each caller its own maps, its own path in the result,
    and never turn an invalid layout or header into a cached valid one."""
    layout = [("a", "F32", (2, 2)), ("b", "BF16", (3,))]
    first = SafetensorsWriter(tmp_path / "1.safetensors", layout, {"k": "v"})
    first.abort()
    with pytest.raises(SafetensorsFormatError, match="invalid shape"):
        SafetensorsWriter(tmp_path / "2.safetensors", [("a", "F32", (2.0, 2)), layout[1]])
    with pytest.raises(SafetensorsFormatError, match="metadata must map strings"):
        SafetensorsWriter(tmp_path / "2.safetensors", layout, {"k": 1})  # type: ignore[dict-item]
    second = SafetensorsWriter(tmp_path / "3.safetensors", layout, {"k": "v"})
    second.tensors.clear()  # a caller's own map
    third = SafetensorsWriter(tmp_path / "4.safetensors", layout, {"k": "v"})
    assert list(third.tensors) == ["a", "b"]
    second.abort()
    third.abort()

    raw = serialize({"x": torch.zeros(2)}, {"m": "1"})
    n = int.from_bytes(raw[:8], "little")
    hdr = raw[8:8 + n]
    h1 = sio.parse_header(hdr, file_size=len(raw), path="p1", uri="u1")
    h1.tensors.clear()
    h1.metadata["m"] = "changed"  # type: ignore[index]
    h2 = sio.parse_header(hdr, file_size=len(raw), path="p2", uri="u2")
    assert (h2.path, h2.uri, list(h2.tensors), h2.metadata) == ("p2", "u2", ["x"], {"m": "1"})
    # The same header over a file of another size is checked again, in that file's name.
    with pytest.raises(SafetensorsFormatError, match=r"^u3: 4 bytes of trailing data"):
        sio.parse_header(hdr, file_size=len(raw) + 4, path="p3", uri="u3")


def test_library_layout_order() -> None:
    tensors = {"z": torch.zeros(1, dtype=torch.bool), "b": torch.zeros(1), "a": torch.zeros(1)}
    tensors["w"] = torch.zeros(1, dtype=torch.float64)
    assert [n for n, _, _ in library_layout(tensors)] == ["w", "a", "b", "z"]


# -- ranged reads ----------------------------------------------------------------------------


def test_reads_only_header_and_one_tensor() -> None:
    tensors = {f"t{i}": torch.full((64, 256), float(i)) for i in range(8)}  # 64 KiB each
    data = st.save(tensors)
    storage = BytesStorage({NAME: data})
    header = read_header(storage, NAME, file_size=len(data))
    assert storage.size_calls == 0  # file_size given
    assert storage.reads == [(NAME, 0, sio.SPECULATIVE_READ_BYTES)]  # one speculative read
    storage.reads.clear()
    t = read_tensor(storage, header, "t5")
    assert torch.equal(t, tensors["t5"])
    info = header.tensors["t5"]
    assert storage.reads == [(NAME, info.start, info.nbytes)]
    assert storage.bytes_read == 64 * 256 * 4


def test_large_header_takes_exactly_two_reads() -> None:
    tensors = {f"layer.{i}.some.rather.long.tensor.name": torch.zeros(1) for i in range(2000)}
    data = st.save(tensors)
    n = int.from_bytes(data[:8], "little")
    assert n > sio.SPECULATIVE_READ_BYTES
    storage = BytesStorage({NAME: data})
    header = read_header(storage, NAME)
    chunk = sio.SPECULATIVE_READ_BYTES
    assert storage.reads == [(NAME, 0, chunk), (NAME, chunk, 8 + n - chunk)]
    assert storage.bytes_read == header.data_start  # the header, nothing more
    assert len(header.tensors) == 2000


def test_small_file_read_once() -> None:
    data = st.save({"a": torch.ones(3)})
    storage = BytesStorage({NAME: data})
    read_header(storage, NAME)
    assert storage.reads == [(NAME, 0, len(data))]


def test_hostile_length_allocates_nothing() -> None:
    storage = BytesStorage({NAME: mk(b"{}", n=2**62)})
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsFormatError, match="exceeds the limit"):
            read_header(storage, NAME)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_max_header_bytes_is_configurable() -> None:
    data = st.save({"a": torch.ones(1)})
    n = int.from_bytes(data[:8], "little")
    storage = BytesStorage({NAME: data})
    read_header(storage, NAME, max_header_bytes=n)  # the cap itself is allowed
    with pytest.raises(SafetensorsFormatError, match=f"header length {n} exceeds the limit"):
        read_header(storage, NAME, max_header_bytes=n - 1)


def test_missing_tensor_and_endianness_guard(monkeypatch) -> None:
    storage = BytesStorage({NAME: st.save({"a": torch.ones(1)})})
    header = read_header(storage, NAME)
    with pytest.raises(CheckpointError, match=f"{URI}: no tensor named 'b'"):
        read_tensor(storage, header, "b")
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(SafeLoraError, match="little-endian"):
        read_tensor(storage, header, "a")


# -- malformed files -------------------------------------------------------------------------

F4x4 = b"\0" * 4
Q = "model.layers.0.self_attn.q_proj.weight"

# (id, file bytes, message pattern, whether safetensors' own reader accepts the file).
# Where the library accepts, we are deliberately stricter; we never accept what it rejects.
MALFORMED = [
    ("too_short", b"\x05\0\0", r"file is 3 bytes, too short", False),
    ("empty_file", b"", r"file is 0 bytes", False),
    ("len_zero", mk(b""), r"header length is 0", False),
    ("len_past_end", mk(b"{}", n=100), r"header length 100 runs past the end .*10 bytes", False),
    ("len_2_62", mk(b"{}", n=2**62), r"header length 4611686018427387904 exceeds the limit", False),
    ("len_u64_max", mk(b"{}", n=2**64 - 1), r"exceeds the limit of 100000000", False),
    ("len_over_cap", mk(b"{}", n=100_000_001), r"header length 100000001 exceeds", False),
    ("truncated", mk({"a": entry()}, b"\0\0"), r"truncated: tensors need 4 .* only 2", False),
    ("truncated_hdr", mk({"a": entry()}, F4x4)[:20], r"runs past the end", False),
    ("non_utf8", mk(b'{"\xff\xfe":1}'), r"not valid UTF-8 \(bad byte at header offset 2\)", False),
    ("non_json", mk(b'{"a": '), r"not valid JSON", False),
    ("nul_padding", mk(b"{}\0\0"), r"not valid JSON", False),  # only whitespace may pad
    ("utf8_bom", mk(b"\xef\xbb\xbf{}"), r"not valid JSON", False),
    ("nan", mk(b'{"__metadata__":{"k":NaN}}'), r"__metadata__\['k'\] must be a string", False),
    ("deep_nesting", mk(b"[" * 100_000 + b"]" * 100_000), r"not valid JSON", False),
    (
        "huge_int",
        mk(b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', F4x4),
        r"not valid JSON",
        False,
    ),
    ("json_array", mk([1, 2]), r"header is a JSON array, not an object", False),
    ("json_string", mk("x"), r"header is a JSON string", False),
    # The library keeps the last of duplicate keys (serde HashMap): ambiguous, we reject.
    (
        "dup_tensor",
        mk(
            b'{"a":'
            + json.dumps(entry()).encode()
            + b',"a":'
            + json.dumps(entry()).encode()
            + b"}",
            F4x4,
        ),
        r"duplicate JSON key 'a'",
        True,
    ),
    (
        "dup_field",
        mk(b'{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}', F4x4),
        r"duplicate JSON key 'dtype'",
        False,
    ),
    ("dup_metadata", mk(b'{"__metadata__":{"k":"1","k":"2"}}'), r"duplicate JSON key 'k'", True),
    ("unknown_dtype", mk({"a": entry("F128")}, F4x4), r"tensor 'a': unknown dtype 'F128'", False),
    ("dtype_int", mk({"a": entry(17)}, F4x4), r"unknown dtype 17", False),
    # serde reads an enum from {"F32": null} too; not a real file, so we reject it.
    ("dtype_map", mk({"a": entry({"F32": None})}, F4x4), r"unknown dtype \{'F32': None\}", True),
    ("dtype_lowercase", mk({"a": entry("f32")}, F4x4), r"unknown dtype 'f32'", False),
    ("shape_negative", mk({"a": entry(shape=[-1])}, F4x4), r"'a': shape must be a list", False),
    ("shape_float", mk({"a": entry(shape=[1.0])}, F4x4), r"shape must be a list .* \[1.0\]", False),
    ("shape_bool", mk({"a": entry(shape=[True])}, F4x4), r"shape must be a list", False),
    ("shape_not_list", mk({"a": {**entry(), "shape": 1}}, F4x4), r"shape must be a list", False),
    (
        "offsets_overlap",
        mk(
            {"a": entry(shape=[2], offsets=[0, 8]), "b": entry(shape=[2], offsets=[4, 12])},
            b"\0" * 12,
        ),
        r"'b': data_offsets \[4, 12\] leave an overlap "
        r"with tensor 'a' \[0, 8\]",
        False,
    ),
    (
        "offsets_gap",
        mk({"a": entry(), "b": entry(offsets=[8, 12])}, b"\0" * 12),
        r"'b': data_offsets \[8, 12\] leave a gap after tensor 'a' \[0, 4\]",
        False,
    ),
    (
        "offsets_not_at_0",
        mk({"a": entry(offsets=[4, 8])}, b"\0" * 8),
        r"'a': data_offsets \[4, 8\] do not start at 0",
        False,
    ),
    (
        "offsets_reversed",
        mk({"a": entry(shape=[0], offsets=[4, 0])}, F4x4),
        r"data_offsets \[4, 0\] end before begin",
        False,
    ),
    (
        "offsets_three",
        mk({"a": entry(offsets=[0, 4, 4])}, F4x4),
        r"data_offsets must be two",
        False,
    ),
    (
        "offsets_negative",
        mk({"a": entry(offsets=[-4, 0])}, F4x4),
        r"data_offsets must be two",
        False,
    ),
    ("trailing_garbage", mk({"a": entry()}, b"\0" * 5), r"1 bytes of trailing data", False),
    ("garbage_no_tensors", mk({}, b"junk"), r"4 bytes of trailing data", False),
    (
        "size_mismatch",
        mk({Q: entry("F16", [4, 4], [0, 10])}, b"\0" * 10),
        rf"{URI}: tensor '{Q}': data_offsets \[0, 10\] hold 10 bytes but shape \[4, 4\] of F16 "
        r"needs 32$",
        False,
    ),
    (
        "numel_overflow",
        mk({"a": entry(shape=[2**32, 2**32, 2])}, F4x4),
        r"'a': shape \[4294967296, 4294967296, 2\] overflows \(more than 2\*\*63 - 1 elements\)",
        False,
    ),
    ("bits_overflow", mk({"a": entry("F32", [2**62])}, F4x4), r"overflows .*bits", False),
    # The library reads [0, 2**63] as empty (then torch fails); we reject the dimension.
    (
        "dim_too_large",
        mk({"a": entry(shape=[0, 2**63], offsets=[0, 0])}),
        r"shape must be a list",
        False,
    ),
    (
        "sub_byte",
        mk({"a": entry("F6_E3M2", [3], [0, 2])}, b"\0\0"),
        r"F6_E3M2 is 18 bits, not a whole number of bytes",
        False,
    ),
    (
        "metadata_int",
        mk({"__metadata__": {"k": 1}}),
        r"__metadata__\['k'\] must be a string, "
        r"not a JSON number",
        False,
    ),
    ("metadata_list", mk({"__metadata__": ["x"]}), r"__metadata__ must be an object", False),
    ("metadata_nested", mk({"__metadata__": {"k": {}}}), r"must be a string", False),
    (
        "missing_field",
        mk({"a": {"dtype": "F32", "shape": [1]}}, F4x4),
        r"tensor 'a': missing field\(s\) data_offsets",
        False,
    ),
    # serde ignores unknown fields; a typo'd or extra field is more likely a broken writer.
    (
        "extra_field",
        mk({"a": entry(offset=3)}, F4x4),
        r"tensor 'a': unexpected field\(s\) "
        r"'offset'",
        True,
    ),
    # serde also reads a struct from a JSON array in field order; we require an object.
    (
        "entry_array",
        mk({"a": ["F32", [1], [0, 4]]}, F4x4),
        r"'a': entry must be an object .* "
        r"not a JSON array",
        True,
    ),
    ("entry_null", mk({"a": None}), r"'a': entry must be an object", False),
    (
        "lone_surrogate",
        mk(b'{"a\\ud800":' + json.dumps(entry()).encode() + b"}", F4x4),
        r"lone UTF-16 surrogate",
        False,
    ),
]


@pytest.mark.parametrize(
    ("data", "pattern", "lib_accepts"),
    [pytest.param(d, p, a, id=i) for i, d, p, a in MALFORMED],
)
def test_malformed(data: bytes, pattern: str, lib_accepts: bool, tmp_path) -> None:
    storage = BytesStorage({NAME: data})
    with pytest.raises(SafetensorsFormatError, match=pattern) as err:
        read_header(storage, NAME)
    assert str(err.value).startswith(f"{URI}: ")
    assert library_accepts(data, tmp_path) == lib_accepts


def test_malformed_corpus_size() -> None:
    assert len(MALFORMED) >= 20
    assert len({m[0] for m in MALFORMED}) == len(MALFORMED)


VALID_EDGE_CASES = [
    ("empty_object", mk({})),
    ("space_padding", mk(b"{}      ")),
    ("whitespace_around", mk(b" \n{}\t\r ")),
    ("metadata_null", mk({"__metadata__": None, "a": entry()}, F4x4)),
    ("metadata_empty", mk({"__metadata__": {}})),
    ("empty_name", mk({"": entry()}, F4x4)),
    # Empty tensors may share an offset with their neighbours (the library sorts by offsets).
    (
        "zero_size_shared",
        mk(
            {
                "b": entry(),
                "a": entry(shape=[0], offsets=[0, 0]),
                "c": entry(shape=[3, 0], offsets=[4, 4]),
            },
            F4x4,
        ),
    ),
    ("scalar", mk({"a": entry(shape=[])}, F4x4)),
    ("unicode_escape_name", mk(b'{"\\u00e9":' + json.dumps(entry()).encode() + b"}", F4x4)),
]


@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d in VALID_EDGE_CASES])
def test_valid_edge_cases(data: bytes, tmp_path) -> None:
    assert library_accepts(data, tmp_path)
    storage = BytesStorage({NAME: data})
    header = read_header(storage, NAME)
    for name in header.tensors:
        read_tensor(storage, header, name)


def test_zero_size_shared_offsets_order() -> None:
    data = mk({"b": entry(), "a": entry(shape=[0], offsets=[0, 0])}, F4x4)
    header = read_header(BytesStorage({NAME: data}), NAME)
    assert list(header.tensors) == ["a", "b"]
    assert header.tensors["a"].nbytes == 0
    assert header.metadata is None
