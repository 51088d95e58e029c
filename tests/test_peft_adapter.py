"""Tests of safelora_ray.formats.peft against real PEFT adapters (tiny Llama, offline)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch

from safelora_ray.core.errors import AdapterError
from safelora_ray.formats.peft import (
    Adapter,
    OutputDigest,
    digest_scheme,
    get_pattern_key,
    output_digest,
    read_adapter,
    resolve_rank_alpha,
    write_adapter,
)
from safelora_ray.storage import open_storage
from tests.adapters import (
    edit_config,
    load_base_model,
    make_adapter,
    make_ia3_adapter,
    read_weights,
    rewrite_weights,
    save_base_model,
    tree_bytes,
)

logger = logging.getLogger(__name__)

peft = pytest.importorskip("peft")

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
PFX = "base_model.model."


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base model, saved once per module."""
    return save_base_model(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def gqa_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GQA base model (2 KV heads), saved once per module."""
    return save_base_model(tmp_path_factory.mktemp("base-gqa") / "llama", gqa=True)


@pytest.fixture(scope="module")
def qv_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A plain q/v LoRA adapter (r=4), built once; copy it before modifying."""
    return make_adapter(tmp_path_factory.mktemp("qv") / "adapter")


@pytest.fixture
def qv_copy(tmp_path: Path, qv_adapter: tuple[Path, dict]) -> Path:
    """A private copy of :func:`qv_adapter` under ``tmp_path/adapters/qv``."""
    dst = tmp_path / "adapters" / "qv"
    shutil.copytree(qv_adapter[0], dst)
    return dst


def _read(path: Path, adapter_id: str = "ad", **kw: Any) -> Adapter:
    """Read the adapter at ``path`` through a storage rooted at its parent."""
    return read_adapter(open_storage(str(path.parent)), path.name, adapter_id, **kw)


def _peft_lora_weights(peft_model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[name.removeprefix(PFX)] = (
                module.lora_A["default"].weight.detach(),
                module.lora_B["default"].weight.detach(),
            )
    return out


def _load_peft(base_dir: Path, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_model(base_dir), str(adapter_dir))


# -- reading and round trip ----------------------------------------------------------------


def test_read_qv_adapter(qv_adapter: tuple[Path, dict]) -> None:
    path, weights = qv_adapter
    ad = _read(path)
    assert list(ad.modules) == list(weights)  # file order == sorted module names here
    assert set(ad.modules) == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")
    }
    for name, (a, b) in weights.items():
        m = ad.modules[name]
        assert m.a_key == f"{PFX}{name}.lora_A.weight"
        assert m.b_key == f"{PFX}{name}.lora_B.weight"
        assert m.rank == 4 and m.alpha == 8.0
        assert torch.equal(m.a, a) and torch.equal(m.b, b)
    assert ad.untouched == [] and ad.modules_to_save == []
    assert ad.extra_files == [("README.md", (path / "README.md").stat().st_size)]
    assert ad.skipped_files == []
    assert ad.metadata == {"format": "pt"}
    assert ad.config["peft_type"] == "LORA"
    assert ad.config_bytes == (path / "adapter_config.json").read_bytes()
    assert ad.nbytes == (path / "adapter_model.safetensors").stat().st_size
    assert ad.uri.endswith("/adapter") and ad.adapter_id == "ad"
    assert list(ad.tensors) == list(ad.tensor_infos)


def test_tensors_are_views_of_one_buffer(qv_adapter: tuple[Path, dict]) -> None:
    ad = _read(qv_adapter[0])
    # All views into the single file buffer: address minus file offset is one constant.
    bases = {t.data_ptr() - ad.tensor_infos[k].start for k, t in ad.tensors.items()}
    assert len(bases) == 1
    next(iter(ad.tensors.values()))[0, 0] = 0.0  # writable (a bytearray, not bytes)


def test_round_trip(tmp_path: Path, qv_copy: Path, base_dir: Path) -> None:
    before = tree_bytes(qv_copy)
    storage = open_storage(str(qv_copy.parent))
    ad = read_adapter(storage, "qv", "qv")
    out = tmp_path / "out"
    digest = OutputDigest()
    files = write_adapter(ad, {}, str(out), storage, "qv", digest)
    # hashed as written = hashed from the files = the digest of the adapter read back
    assert digest.value() == output_digest(files) == read_adapter(
        open_storage(str(out.parent)), out.name, "out").digest

    assert [rel for rel, _ in files] == [
        "adapter_model.safetensors",
        "README.md",
        "adapter_config.json",
    ]
    assert all(Path(local).parent == out for _, local in files)
    assert tree_bytes(qv_copy) == before  # inputs untouched
    assert (out / "adapter_config.json").read_bytes() == before["adapter_config.json"]
    assert (out / "README.md").read_bytes() == before["README.md"]
    # The library wrote the input; our writer keeps its layout, so the file is identical.
    assert (out / "adapter_model.safetensors").read_bytes() == before["adapter_model.safetensors"]
    assert output_digest(files) == ad.digest

    got, meta = read_weights(out)
    exp, meta_in = read_weights(qv_copy)
    assert meta == meta_in and list(got) == list(exp)
    for k in exp:
        assert got[k].dtype == exp[k].dtype and torch.equal(got[k], exp[k])

    loaded = _peft_lora_weights(_load_peft(base_dir, out))
    assert set(loaded) == set(ad.modules)
    for name, (a, b) in loaded.items():
        assert torch.equal(a, ad.modules[name].a) and torch.equal(b, ad.modules[name].b)


@pytest.mark.parametrize("in_memory", [False, True])
def test_kept_tensors_written_as_runs_of_the_input(tmp_path: Path, in_memory: bool) -> None:
    """The tensors kept as they are go out whole from the input's bytes: the same file, and
    the same digest, as writing every tensor by itself; a B replaced in the middle of the
    file splits the run, and the library reads the result as the tensors it should hold."""
    import dataclasses

    import safetensors.torch as st

    path, _ = make_adapter(tmp_path / "in" / "ad", dtype=torch.bfloat16)
    storage = open_storage(str(path.parent))
    ad = read_adapter(storage, "ad", "ad")
    assert ad.weights is not None and len(ad.weights) == ad.nbytes
    new = {V1: torch.full(ad.modules[V1].b.shape, 0.5)}

    def write(adapter: Adapter, name: str) -> tuple[bytes, str]:
        d = OutputDigest()
        files = dict(write_adapter(adapter, new, None if in_memory else str(tmp_path / name),
                                   None, "ad", d))
        data = files["adapter_model.safetensors"]
        return (bytes(data) if in_memory else Path(data).read_bytes()), d.value()

    runs, runs_digest = write(ad, "runs")
    alone, alone_digest = write(dataclasses.replace(ad, weights=None), "alone")
    assert runs == alone and runs_digest == alone_digest
    expected = {k: t.clone() for k, t in ad.tensors.items()}
    expected[ad.modules[V1].b_key] = new[V1].to(torch.bfloat16)
    got = st.load(runs)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    assert (path / "adapter_model.safetensors").read_bytes() != runs  # the input untouched
    assert read_adapter(storage, "ad", "ad").digest == ad.digest


def test_output_digest_hashed_unless_the_bytes_are_the_inputs(tmp_path: Path) -> None:
    """Written back unchanged, an adapter's output digest is the one taken when it was read
    (its bytes are the input's); an input whose header another writer formatted differently
    comes out with this writer's header: other bytes, hashed as written."""
    path, _ = make_adapter(tmp_path / "in" / "ad", dtype=torch.bfloat16)
    storage = open_storage(str(path.parent))
    ad = read_adapter(storage, "ad", "ad")
    d = OutputDigest()
    files = write_adapter(ad, {}, str(tmp_path / "same"), None, "ad", d)
    assert d.value() == ad.digest == output_digest(files)

    raw = (path / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    spaced = json.dumps(json.loads(raw[8:8 + n]), indent=1).encode()  # another writer's JSON
    spaced += b" " * (-len(spaced) % 8)
    (path / "adapter_model.safetensors").write_bytes(
        len(spaced).to_bytes(8, "little") + spaced + raw[8 + n:])
    ad2 = read_adapter(storage, "ad", "ad")
    assert ad2.digest != ad.digest
    d2 = OutputDigest()
    files2 = write_adapter(ad2, {}, str(tmp_path / "reformatted"), None, "ad", d2)
    assert (tmp_path / "reformatted" / "adapter_model.safetensors").read_bytes() == raw
    assert d2.value() == output_digest(files2) == ad.digest != ad2.digest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_replace_b_loads_in_peft(tmp_path: Path, base_dir: Path, dtype: torch.dtype) -> None:
    path, weights = make_adapter(tmp_path / "in" / "ad", dtype=dtype)
    before = tree_bytes(path)
    storage = open_storage(str(path.parent))
    ad = read_adapter(storage, "ad", "ad")
    assert ad.modules[Q0].b.dtype == dtype
    g = torch.Generator().manual_seed(7)
    new = torch.randn(ad.modules[Q0].b.shape, generator=g, dtype=torch.float64)
    files = write_adapter(ad, {Q0: new}, str(tmp_path / "out"), storage, "ad")
    assert tree_bytes(path) == before
    assert output_digest(files) != ad.digest

    out = _read(tmp_path / "out")
    assert torch.equal(out.modules[Q0].b, new.to(dtype))
    for name, (a, b) in weights.items():
        assert torch.equal(out.modules[name].a, a)
        if name != Q0:
            assert torch.equal(out.modules[name].b, b)
    assert out.metadata == ad.metadata and out.config_bytes == ad.config_bytes

    loaded = _peft_lora_weights(_load_peft(base_dir, tmp_path / "out"))
    # PeftModel.from_pretrained upcasts half-precision adapters to float32: exact values.
    a0, b0 = loaded[Q0]
    assert torch.equal(b0, new.to(dtype).to(b0.dtype))
    assert torch.equal(a0, weights[Q0][0].to(a0.dtype))
    assert torch.equal(loaded[V1][1], weights[V1][1].to(a0.dtype))


def test_gqa_all_linear(tmp_path: Path, gqa_base_dir: Path) -> None:
    path, weights = make_adapter(tmp_path / "ad", gqa=True, target_modules="all-linear", r=2)
    ad = _read(path)
    assert set(ad.modules) == set(weights) and len(ad.modules) == 2 * 7
    assert ad.modules["model.layers.0.self_attn.v_proj"].b.shape == (16, 2)
    assert ad.modules["model.layers.0.mlp.down_proj"].a.shape == (2, 48)
    new = {m: torch.zeros_like(mod.b) for m, mod in ad.modules.items()}
    write_adapter(ad, new, str(tmp_path / "out"), None, "")
    assert not (tmp_path / "out" / "README.md").exists()  # no storage given: no extras
    loaded = _peft_lora_weights(_load_peft(gqa_base_dir, tmp_path / "out"))
    assert all(not b.any() for _, b in loaded.values())


def test_lora_bias_and_modules_to_save(tmp_path: Path, base_dir: Path) -> None:
    path, _ = make_adapter(tmp_path / "ad", lora_bias=True, modules_to_save=["lm_head"])
    ad = _read(path)
    assert ad.modules_to_save == ["lm_head"]
    assert f"{PFX}lm_head.weight" in ad.untouched
    biases = [k for k in ad.untouched if k.endswith(".lora_B.bias")]
    assert len(biases) == 4 and len(ad.untouched) == 5
    new = {Q0: torch.ones_like(ad.modules[Q0].b)}
    write_adapter(ad, new, str(tmp_path / "out"), open_storage(str(tmp_path)), "ad")
    got, _ = read_weights(tmp_path / "out")
    for k in ad.untouched:
        assert torch.equal(got[k], ad.tensors[k])
    model = _load_peft(base_dir, tmp_path / "out")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.lora_B["default"].weight, torch.ones_like(ad.modules[Q0].b))
    assert torch.equal(q.lora_B["default"].bias, ad.tensors[f"{PFX}{Q0}.lora_B.bias"])
    lm = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(lm, ad.tensors[f"{PFX}lm_head.weight"])


def test_extra_files_and_subfolders(qv_copy: Path, tmp_path: Path) -> None:
    (qv_copy / "tokenizer.json").write_text("{}")
    (qv_copy / "checkpoint-10").mkdir()
    (qv_copy / "checkpoint-10" / "trainer_state.json").write_text('{"step": 10}')
    (qv_copy / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"junk")
    (qv_copy / "optimizer.PT").write_bytes(b"junk")
    # A sibling whose name shares the prefix must not be listed.
    (qv_copy.parent / "qv2").mkdir()
    (qv_copy.parent / "qv2" / "x.txt").write_text("x")
    storage = open_storage(str(qv_copy.parent))
    ad = read_adapter(storage, "qv", "qv")
    assert [rel for rel, _ in ad.extra_files] == [
        "README.md",
        "checkpoint-10/trainer_state.json",
        "tokenizer.json",
    ]
    assert ad.skipped_files == ["checkpoint-10/adapter_model.safetensors", "optimizer.PT"]
    files = write_adapter(ad, {}, str(tmp_path / "out"), storage, "qv")
    assert [rel for rel, _ in files] == [
        "adapter_model.safetensors",
        "README.md",
        "checkpoint-10/trainer_state.json",
        "tokenizer.json",
        "adapter_config.json",
    ]
    assert (tmp_path / "out" / "checkpoint-10" / "trainer_state.json").read_text() == (
        '{"step": 10}'
    )
    assert not (tmp_path / "out" / "optimizer.PT").exists()
    # In memory (for an object store): the same files, the same bytes, the same digest; no
    # local file written anywhere.
    new = {m: mod.b * 0.5 for m, mod in ad.modules.items()}
    on_disk, in_mem = OutputDigest(), OutputDigest()
    disk = write_adapter(ad, new, str(tmp_path / "out2"), storage, "qv", on_disk)
    before = sorted(p for p in tmp_path.rglob("*"))
    mem = write_adapter(ad, new, None, storage, "qv", in_mem)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert [rel for rel, _ in mem] == [rel for rel, _ in disk]
    assert all(isinstance(data, (bytes, bytearray)) and data == Path(path).read_bytes()  # type: ignore[arg-type]
               for (_, data), (_, path) in zip(mem, disk, strict=True))
    assert in_mem.value() == on_disk.value() == output_digest(mem) == output_digest(disk)


def test_prefix_empty_and_trailing_slash(qv_adapter: tuple[Path, dict]) -> None:
    path = qv_adapter[0]
    a = read_adapter(open_storage(str(path)), "", "root")
    b = read_adapter(open_storage(str(path.parent)), "adapter/", "slash")
    assert a.digest == b.digest and set(a.modules) == set(b.modules)
    assert [rel for rel, _ in a.extra_files] == ["README.md"]


# -- rank_pattern / alpha_pattern ----------------------------------------------------------

PATTERN_TABLE: list[tuple[list[str], str]] = [
    (["q_proj"], "model.layers.0.self_attn.q_proj"),
    (["q_proj"], "model.layers.0.self_attn.qq_proj"),
    (["proj"], "model.layers.0.self_attn.q_proj"),
    (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
    (["layers.0.self_attn.q_proj"], "model.layers.10.self_attn.q_proj"),
    (["^model.layers.1.mlp.up_proj"], "model.layers.1.mlp.up_proj"),
    (["^layers.1.mlp.up_proj"], "model.layers.1.mlp.up_proj"),
    ([r"layers\.[01]\..*q_proj"], "model.layers.1.self_attn.q_proj"),
    ([r".*\.v_proj"], "model.layers.1.self_attn.v_proj"),
    (["v_proj", "model.layers.1.self_attn.v_proj"], "model.layers.1.self_attn.v_proj"),
    (["model.layers.1.self_attn.v_proj", "v_proj"], "model.layers.1.self_attn.v_proj"),
    (["q_proj|v_proj"], "model.layers.0.self_attn.v_proj"),
    (["o_proj"], "model.layers.0.self_attn.q_proj"),
    (["self_attn"], "model.layers.0.self_attn.q_proj"),
    (["model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
    (["layers.0.self_attn.q"], "model.layers.0.self_attn.q_proj"),
    ([], "model.layers.0.self_attn.q_proj"),
]


@pytest.mark.parametrize(("keys", "name"), PATTERN_TABLE)
def test_pattern_key_agrees_with_peft(keys: list[str], name: str) -> None:
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    assert get_pattern_key(keys, name) == peft_get_pattern_key(keys, name)


def test_rank_and_alpha_pattern_match_peft(tmp_path: Path, base_dir: Path) -> None:
    path, weights = make_adapter(
        tmp_path / "ad",
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"q_proj": 2, "^model.layers.1.mlp.up_proj": 6, r"layers\.1\..*down_proj": 3},
        alpha_pattern={"v_proj": 3, "layers.0.mlp.up_proj": 5.5},
        layers_to_transform=[1, 0],
    )
    ad = _read(path)
    model = _load_peft(base_dir, path)
    from peft.tuners.lora import LoraLayer

    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            mod = name.removeprefix(PFX)
            seen.add(mod)
            assert ad.modules[mod].rank == module.r["default"], mod
            assert ad.modules[mod].alpha == module.lora_alpha["default"], mod
            assert resolve_rank_alpha(ad.config, mod) == (
                module.r["default"],
                module.lora_alpha["default"],
            )
    assert seen == set(ad.modules) == set(weights)
    assert ad.modules["model.layers.1.mlp.up_proj"].rank == 6
    assert ad.modules["model.layers.0.mlp.up_proj"].rank == 4
    assert ad.modules["model.layers.1.mlp.down_proj"].rank == 3
    assert ad.modules[Q0].rank == 2 and ad.modules[V1].alpha == 3.0

    # A config whose rank_pattern disagrees with the tensors is refused, naming the key.
    edit_config(path, lambda c: c["rank_pattern"].update({"q_proj": 5}))
    with pytest.raises(AdapterError, match=r"rank mismatch.*r=2.*r=5.*rank_pattern\['q_proj'\]"):
        _read(path)


# -- refusals ------------------------------------------------------------------------------


def _drop(key: str):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _set(key: str, value: torch.Tensor):
    return lambda t: {**t, key: value}


def _poke(key: str, value: float):
    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = t[key].clone()
        x.view(-1)[3] = value
        return {**t, key: x}

    return edit


A0 = f"{PFX}{Q0}.lora_A.weight"
B0 = f"{PFX}{Q0}.lora_B.weight"

WEIGHT_EDITS = {
    "lone_a": (_drop(B0), rf"module '{Q0}' has lora_A .* but no lora_B"),
    "lone_b": (_drop(A0), rf"module '{Q0}' has lora_B .* but no lora_A"),
    "rank_ab": (_set(B0, torch.zeros(32, 3)), r"rank mismatch: lora_A is \[4, 32\].*\[32, 3\]"),
    "rank_config": (
        lambda t: {**t, A0: torch.zeros(6, 32), B0: torch.zeros(32, 6)},
        rf"module '{Q0}': rank mismatch: the tensors have r=6 but .* r=4 \(from r\)",
    ),
    "conv": (
        lambda t: {**t, A0: torch.zeros(4, 32, 1, 1), B0: torch.zeros(32, 4, 1, 1)},
        r"\(conv LoRA\); only Linear LoRA",
    ),
    "a_1d": (_set(A0, torch.zeros(128)), r"only Linear LoRA \(2-D factors\)"),
    "int_dtype": (_set(A0, torch.zeros(4, 32, dtype=torch.int32)), r"dtype I32; LoRA factors"),
    "nan_a": (_poke(A0, float("nan")), rf"tensor '{A0}' has non-finite values \(1 NaN, 0 Inf\)"),
    "inf_b": (_poke(B0, float("-inf")), rf"tensor '{B0}' has non-finite values \(0 NaN, 1 Inf\)"),
    "embedding": (
        lambda t: {
            **t,
            f"{PFX}model.embed_tokens.lora_embedding_A": torch.zeros(4, 64),
            f"{PFX}model.embed_tokens.lora_embedding_B": torch.zeros(32, 4),
        },
        r"embedding LoRA \(lora_embedding_A/B\) is not covered",
    ),
    "dora_key": (
        _set(f"{PFX}{Q0}.lora_magnitude_vector", torch.ones(32)),
        r"DoRA magnitude vector; DoRA is not covered",
    ),
    "named_adapter": (
        lambda t: {f"{PFX}{Q0}.lora_A.default.weight": t.pop(A0), **t},
        r"lora_A.default.weight' is not a lora_A/lora_B weight",
    ),
    "no_modules": (
        lambda t: {f"{PFX}lm_head.weight": torch.zeros(64, 32)},
        r"has no LoRA modules",
    ),
    "no_prefix": (
        lambda t: {**{k: v for k, v in t.items() if k != A0}, A0[len(PFX) :]: t[A0]},
        r"does not start with 'base_model.model.'",
    ),
}


@pytest.mark.parametrize("case", list(WEIGHT_EDITS))
def test_refuses_bad_weights(qv_copy: Path, case: str) -> None:
    edit, pattern = WEIGHT_EDITS[case]
    rewrite_weights(qv_copy, edit)
    with pytest.raises(AdapterError, match=r"^adapter 'bad': ") as info:
        _read(qv_copy, "bad")
    assert info.match(pattern)


def _write_raw(path: Path, tensors: list[tuple[str, torch.Tensor]], pad: int) -> None:
    """A safetensors file in exactly this tensor order, its header padded by ``pad`` spaces
    (an odd total leaves every tensor at an odd offset: valid, if unusual)."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header, blobs, off = {}, [], 0
    for name, t in tensors:
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header).encode() + b" " * pad
    (path / "adapter_model.safetensors").write_bytes(
        len(head).to_bytes(8, "little") + head + b"".join(blobs))


@pytest.mark.parametrize("where", ["none", "first", "last", "after_gap", "other_dtype"])
@pytest.mark.parametrize("pad", [0, 1])
def test_non_finite_found_in_any_layout(qv_copy: Path, where: str, pad: int) -> None:
    """The finite check reads runs of same-dtype tensors in place: a bad value is found (and
    its tensor named) wherever it lies: first or last of a run, past an untouched tensor that
    breaks the run, among tensors of another dtype, at odd offsets."""
    tensors = {k: t.clone() for k, t in read_weights(qv_copy)[0].items()}  # not the mmap
    lora = sorted(k for k in tensors if ".lora_" in k)
    # Every A in float32 back to back, then the B in bf16, an untouched tensor (holding a
    # NaN: not a LoRA factor, not checked) between the first B and the others.
    a_keys = [k for k in lora if ".lora_A." in k]
    b_keys = [k for k in lora if ".lora_B." in k]
    order = ([(k, tensors[k].to(torch.float32)) for k in a_keys]
             + [(b_keys[0], tensors[b_keys[0]].to(torch.bfloat16))]
             + [(f"{PFX}model.norm.weight", torch.full((32,), float("nan")))]
             + [(k, tensors[k].to(torch.bfloat16)) for k in b_keys[1:]])
    bad = {"none": None, "first": a_keys[0], "last": b_keys[-1], "after_gap": b_keys[1],
           "other_dtype": b_keys[0]}[where]
    value = {"first": float("nan"), "last": float("inf"), "after_gap": float("-inf"),
             "other_dtype": float("nan")}.get(where)
    order = [(k, t.clone().view(-1).index_fill_(0, torch.tensor([t.numel() - 1]), value)
              .view(t.shape) if k == bad else t) for k, t in order]
    _write_raw(qv_copy, order, pad)
    if bad is None:  # the untouched tensor's NaN is not a LoRA factor's: not refused
        ad = _read(qv_copy, "ok")
        for k, t in order:
            if ".lora_" in k:
                assert torch.equal(ad.tensors[k], t)
        return
    with pytest.raises(AdapterError, match=rf"^adapter 'bad': tensor '{bad}' has non-finite"):
        _read(qv_copy, "bad")


CONFIG_EDITS = {
    "dora": (lambda c: c.update(use_dora=True), r"DoRA adapter \(use_dora"),
    "peft_type": (lambda c: c.update(peft_type="LOHA"), r"peft_type 'LOHA' .* is not LoRA"),
    "no_peft_type": (lambda c: c.pop("peft_type") and None, r"has no peft_type"),
    "target_parameters": (
        lambda c: c.update(target_parameters=["experts.gate_up_proj"]),
        r"LoRA on nn.Parameter .* not covered",
    ),
    "qalora": (lambda c: c.update(use_qalora=True), r"QA-LoRA .* is not covered"),
    "bad_r": (lambda c: c.update(r="4"), r"r must be a positive integer, got '4'"),
    "bad_regex": (
        lambda c: c.update(rank_pattern={"q_proj(": 2}),
        r"rank_pattern key 'q_proj\(' is not a valid regular expression",
    ),
    "bad_pattern_value": (
        lambda c: c.update(rank_pattern={"q_proj": 2.5}),
        r"rank_pattern\['q_proj'\] must be positive integers",
    ),
    "bad_modules_to_save": (
        lambda c: c.update(modules_to_save="lm_head"),
        r"modules_to_save must be a list of strings",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_refuses_bad_config_fields(qv_copy: Path, case: str) -> None:
    edit, pattern = CONFIG_EDITS[case]
    edit_config(qv_copy, edit)
    with pytest.raises(AdapterError, match=r"^adapter 'bad': ") as info:
        _read(qv_copy, "bad")
    assert info.match(pattern)


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (b"{not json", r"adapter_config.json is not valid JSON"),
        (b"\xff\xfe\x00", r"adapter_config.json is not valid JSON"),
        (b"[1, 2]", r"adapter_config.json is a JSON array, not an object"),
        (b"null", r"adapter_config.json is a JSON null, not an object"),
    ],
)
def test_refuses_config_not_json_object(qv_copy: Path, raw: bytes, pattern: str) -> None:
    (qv_copy / "adapter_config.json").write_bytes(raw)
    with pytest.raises(AdapterError, match=r"^adapter 'bad': " + pattern):
        _read(qv_copy, "bad")


def test_refuses_config_missing(qv_copy: Path) -> None:
    (qv_copy / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"^adapter 'bad': adapter_config.json is missing in"):
        _read(qv_copy, "bad")
    with pytest.raises(AdapterError, match=r"adapter_config.json is missing"):
        read_adapter(open_storage(str(qv_copy.parent)), "nonexistent", "bad")


def test_refuses_huge_config(qv_copy: Path) -> None:
    (qv_copy / "adapter_config.json").write_bytes(b" " * (1024**2 + 1) + b"{}")
    with pytest.raises(AdapterError, match=r"cannot read adapter_config.json: .*allowed"):
        _read(qv_copy, "bad")


def test_refuses_weights_missing(qv_copy: Path) -> None:
    (qv_copy / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors is missing"):
        _read(qv_copy, "bad")


def test_refuses_weights_too_big(qv_copy: Path) -> None:
    with pytest.raises(AdapterError, match=r"more than the 100 allowed"):
        _read(qv_copy, "bad", max_bytes=100)


@pytest.mark.parametrize(
    ("mangle", "pattern"),
    [
        (lambda b: b[:-1], r"file is truncated"),
        (lambda b: b + b"\0", r"trailing data"),
        (lambda b: b[:5], r"too short"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], r"header length .* exceeds"),
        (lambda b: b[:8] + b"[" + b[9:], r"header is not valid JSON"),
    ],
)
def test_refuses_malformed_safetensors(qv_copy: Path, mangle: Any, pattern: str) -> None:
    f = qv_copy / "adapter_model.safetensors"
    f.write_bytes(mangle(f.read_bytes()))
    with pytest.raises(
        AdapterError, match=r"^adapter 'bad': adapter_model.safetensors is not a valid safetensors"
    ) as info:
        _read(qv_copy, "bad")
    assert info.match(pattern)


def test_refuses_ia3_written_by_peft(tmp_path: Path) -> None:
    path = make_ia3_adapter(tmp_path / "ia3")
    with pytest.raises(AdapterError, match=r"^adapter 'ia3': peft_type 'IA3' .* is not LoRA"):
        _read(path, "ia3")


def test_refuses_dora_written_by_peft(tmp_path: Path) -> None:
    path, _ = make_adapter(tmp_path / "dora", use_dora=True)
    with pytest.raises(AdapterError, match=r"^adapter 'dora': DoRA adapter"):
        _read(path, "dora")
    # Even with the flag removed, the magnitude vectors in the file give it away.
    edit_config(path, lambda c: c.update(use_dora=False))
    with pytest.raises(AdapterError, match=r"lora_magnitude_vector'.*DoRA is not covered"):
        _read(path, "dora")


def test_refuses_embedding_lora_written_by_peft(tmp_path: Path) -> None:
    path, _ = make_adapter(tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterError, match=r"embed_tokens.lora_embedding_A.*not covered"):
        _read(path, "emb")


class _Marker:
    """Unpickling this creates ``path``: the proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every unpickling entry point fail loudly during the test."""

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)


def test_pickle_only_refused_and_never_opened(
    qv_copy: Path, tmp_path: Path, no_unpickling: None
) -> None:
    marker = tmp_path / "UNPICKLED"
    (qv_copy / "adapter_model.safetensors").unlink()
    (qv_copy / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(AdapterError, match=r"pickle-only adapter.*never unpickled.*safetensors"):
        _read(qv_copy, "bad")
    assert not marker.exists()


def test_skipped_weight_files_never_opened(
    qv_copy: Path, tmp_path: Path, no_unpickling: None
) -> None:
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Marker(str(marker)))
    for name in ("adapter_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth"):
        (qv_copy / name).write_bytes(payload)
    before = tree_bytes(qv_copy)
    storage = open_storage(str(qv_copy.parent))
    ad = read_adapter(storage, "qv", "qv")
    assert ad.skipped_files == [
        "adapter_model.bin",
        "optimizer.pt",
        "rng_state.pth",
        "training_args.bin",
    ]
    files = write_adapter(ad, {}, str(tmp_path / "out"), storage, "qv")
    assert {rel for rel, _ in files} == {
        "adapter_model.safetensors",
        "README.md",
        "adapter_config.json",
    }
    assert not marker.exists()
    assert tree_bytes(qv_copy) == before
    assert sorted(os.listdir(tmp_path / "out")) == sorted(rel for rel, _ in files)


# -- digests -------------------------------------------------------------------------------


def test_digest_stable_and_sensitive(qv_copy: Path) -> None:
    d1 = _read(qv_copy).digest
    assert d1 == _read(qv_copy).digest
    cfg = (qv_copy / "adapter_config.json").read_bytes()
    w = (qv_copy / "adapter_model.safetensors").read_bytes()
    framed = b"adapter_config.json\0" + cfg + b"\0adapter_model.safetensors\0" + w
    assert d1 == "blake3:" + blake3.blake3(framed).hexdigest()
    # The scheme records were keyed in before, taken beside it when asked for.
    both = _read(qv_copy, schemes=("blake3", "sha256"))
    assert both.digest == d1
    assert both.digests == {"blake3": d1, "sha256": "sha256:" + hashlib.sha256(framed).hexdigest()}
    assert digest_scheme(d1) == "blake3" and digest_scheme(both.digests["sha256"]) == "sha256"
    assert digest_scheme("md5:00") is None and digest_scheme(None) is None

    # One flipped bit in the data section (a B value) changes the digest.
    (qv_copy / "adapter_model.safetensors").write_bytes(w[:-1] + bytes([w[-1] ^ 1]))
    d2 = _read(qv_copy).digest
    assert d2 != d1
    (qv_copy / "adapter_model.safetensors").write_bytes(w)
    assert _read(qv_copy).digest == d1

    # So does a config change that leaves its meaning the same.
    (qv_copy / "adapter_config.json").write_bytes(cfg + b"\n")
    assert _read(qv_copy).digest not in (d1, d2)
    # Extra files are not part of the digest.
    (qv_copy / "adapter_config.json").write_bytes(cfg)
    (qv_copy / "README.md").write_text("changed")
    assert _read(qv_copy).digest == d1


def test_output_digest_requires_both_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"lack adapter_config\.json"):
        output_digest([("adapter_model.safetensors", str(tmp_path / "x"))])


# -- write_adapter errors ------------------------------------------------------------------


def test_write_refuses_bad_new_b(qv_adapter: tuple[Path, dict], tmp_path: Path) -> None:
    ad = _read(qv_adapter[0], "w")
    out = str(tmp_path / "out")
    with pytest.raises(AdapterError, match=r"^adapter 'w': no LoRA module 'nope'"):
        write_adapter(ad, {"nope": torch.zeros(1)}, out, None, "")
    with pytest.raises(AdapterError, match=r"new lora_B has shape \[4, 32\], expected \[32, 4\]"):
        write_adapter(ad, {Q0: torch.zeros(4, 32)}, out, None, "")
    with pytest.raises(AdapterError, match=r"non-finite"):
        write_adapter(ad, {Q0: torch.full((32, 4), float("nan"))}, out, None, "")


def test_write_refuses_overflow_in_half_precision(tmp_path: Path) -> None:
    path, _ = make_adapter(tmp_path / "ad", dtype=torch.float16)
    ad = _read(path, "h")
    with pytest.raises(AdapterError, match=r"non-finite values in torch.float16"):
        write_adapter(ad, {Q0: torch.full((32, 4), 1e6)}, str(tmp_path / "out"), None, "")


def test_metadata_none_preserved(qv_copy: Path, tmp_path: Path) -> None:
    tensors, _ = read_weights(qv_copy)
    from safetensors.torch import save_file

    save_file(tensors, str(qv_copy / "adapter_model.safetensors"))  # no metadata
    ad = _read(qv_copy)
    assert ad.metadata is None
    write_adapter(ad, {}, str(tmp_path / "out"), None, "")
    assert _read(tmp_path / "out").metadata is None
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4


def test_read_and_copy_extras_from_s3(qv_copy: Path, tmp_path: Path, s3_bucket: str) -> None:
    (qv_copy / "sub").mkdir()
    (qv_copy / "sub" / "notes.txt").write_text("hello")
    (qv_copy / "adapter_model.bin").write_bytes(b"not even a pickle")
    storage = open_storage(f"s3://{s3_bucket}/fleet")
    for p in sorted(qv_copy.rglob("*")):
        if p.is_file():
            storage.put_file(f"adapters/qv/{p.relative_to(qv_copy).as_posix()}", str(p))
    storage.put_bytes("adapters/qv2/adapter_config.json", b"{}")  # a sibling, not listed

    ad = read_adapter(storage, "adapters/qv", "s3-qv")
    local = _read(qv_copy)
    assert ad.digest == local.digest
    assert ad.uri == f"s3://{s3_bucket}/fleet/adapters/qv"
    assert [rel for rel, _ in ad.extra_files] == ["README.md", "sub/notes.txt"]
    assert ad.skipped_files == ["adapter_model.bin"]
    files = write_adapter(ad, {}, str(tmp_path / "out"), storage, "adapters/qv")
    assert (tmp_path / "out" / "sub" / "notes.txt").read_text() == "hello"
    assert output_digest(files) == ad.digest


def test_huge_finite_values_are_not_taken_for_non_finite(qv_copy: Path) -> None:
    """Finite values at the edge of their dtype's range (whose sum would overflow) are read,
    bit for bit: the check reads exponent bits, it does not add values up."""
    big = {A0: torch.full((4, 32), 3.0e38), B0: torch.full((32, 4), 1e300, dtype=torch.float64)}
    rewrite_weights(qv_copy, lambda t: {**t, **big})
    ad = _read(qv_copy, "big")
    assert torch.equal(ad.tensors[A0], big[A0]) and torch.equal(ad.tensors[B0], big[B0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_finite_check_of_every_float_dtype(dtype: torch.dtype) -> None:
    from safelora_ray.formats.peft.pairing import _first_non_finite

    fin = torch.finfo(dtype)
    edge = torch.tensor([fin.max, -fin.max, fin.tiny, fin.tiny / 4, -0.0, 1.0], dtype=dtype)
    assert _first_non_finite({"a": edge, "b": edge.clone()}) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.zeros(7, dtype=dtype)
        x[3] = bad
        assert _first_non_finite({"a": edge, "b": x, "c": edge}) == "b", bad
    # Above 1 MiB of a dtype the tensors are checked one by one in place: the same answers.
    n = (1 << 20) // torch.empty((), dtype=dtype).element_size()
    big = edge.repeat(n // len(edge) + 1)
    assert _first_non_finite({"a": big, "b": big.clone()}) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = big.clone()
        x[-5] = bad
        assert _first_non_finite({"a": big, "b": x, "c": edge}) == "b", bad
