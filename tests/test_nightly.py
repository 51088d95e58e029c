"""The nightly workflow in-process (grouping, unmatched adapters, lock, config errors) and the
lease it relies on, on local storage and S3."""

from __future__ import annotations

import html as html_lib
import json
import re
import time
from pathlib import Path

import pytest
import yaml

from safelora_ray.cli.demo import write_adapter, write_model
from safelora_ray.cli.nightly import NightlyConfig, main
from safelora_ray.core.errors import ConfigError
from safelora_ray.storage import open_storage
from safelora_ray.storage.lease import Lease, LeaseHeldError
from tests.factory import Arch, aligned_from, llama_tensors


def test_lease_excludes_a_second_holder_and_expires(storage):
    first = Lease(storage, "_nightly/lock.json", owner="run-1", ttl_s=60)
    first.acquire()
    with pytest.raises(LeaseHeldError, match="held by run 'run-1'"):
        Lease(storage, "_nightly/lock.json", owner="run-2", ttl_s=60).acquire()
    first.release()
    assert not storage.exists("_nightly/lock.json")
    # A run that died: its lease expires and is taken over.
    dead = Lease(storage, "_nightly/lock.json", owner="dead", ttl_s=1)
    dead.acquire()
    dead._stop.set()  # simulate the process dying: no more renewals
    time.sleep(1.2)
    with Lease(storage, "_nightly/lock.json", owner="run-3", ttl_s=60):
        rec = json.loads(storage.read("_nightly/lock.json"))
        assert rec["owner"] == "run-3"
    dead.release()  # not its lease any more: leaves nothing behind, removes nothing
    assert not storage.exists("_nightly/lock.json")


def test_conditional_put_semantics(storage):
    assert storage.put_bytes_if("x", b"1", if_version=None)
    assert not storage.put_bytes_if("x", b"2", if_version=None)
    v = storage.version("x")
    assert storage.put_bytes_if("x", b"three", if_version=v)
    assert not storage.put_bytes_if("x", b"4", if_version=v)
    assert storage.read("x") == b"three"


def _setup(tmp_path):
    base = llama_tensors(Arch())
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "aligned", aligned_from(base))
    mods = sorted(k[:-7] for k in base if k.endswith(("q_proj.weight", "v_proj.weight")))
    import torch

    g = torch.Generator().manual_seed(0)
    for i, model_id in enumerate(["acme/chat", "acme/chat", "other/model"]):
        lora = {m: (torch.randn(4, base[m + ".weight"].shape[1], generator=g),
                    torch.randn(base[m + ".weight"].shape[0], 4, generator=g)) for m in mods}
        path = tmp_path / "cat" / f"a{i}"
        write_adapter(path, lora, 4)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = model_id
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    config = {
        "output_root": str(tmp_path / "out"), "alignment_root": str(tmp_path / "sets"),
        "catalogs": [{"name": "main", "uri": str(tmp_path / "cat")}],
        "pairs": [{"name": "p", "base": str(tmp_path / "base"),
                   "aligned": str(tmp_path / "aligned"), "base_model_ids": ["acme/chat"]}],
        "selection": {"num_proj_layers": 1},
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


@pytest.mark.usefixtures("ray_local")
def test_nightly_reports_unmatched_and_respects_the_lock(tmp_path, capsys):
    path, _ = _setup(tmp_path)
    assert main(["--config", str(path), "--dry-run", "--no-progress"]) == 0
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    # The unmatched adapter makes the run partial: exit 3, named in the record and output.
    assert main(["--config", str(path), "--run-id", "r1", "--no-progress"]) == 3
    out = capsys.readouterr().out
    assert "unmatched: main/a2 (base model 'other/model')" in out
    rec = json.loads((tmp_path / "out" / "_nightly" / "runs" / "r1.json").read_text())
    assert rec["status"] == "partial"
    assert rec["counts"] == {"adapters": 3, "ok": 2, "skipped": 0, "error": 0, "unmatched": 1}
    assert rec["unmatched"] == [{"catalog": "main", "adapter_id": "a2",
                                 "base_model": "other/model"}]
    assert (tmp_path / "out" / "main" / "a0" / "adapter_config.json").exists()
    assert not (tmp_path / "out" / "main" / "a2").exists()
    assert (tmp_path / "sets" / "p" / "alignment.json").exists()  # built when missing
    # The run record links each group's report page.
    page = Path(rec["groups"][0]["report_html"])
    assert page.is_file() and "Fleet state" in page.read_text()
    # A live lease: a second run refuses with exit 4.
    out_storage = open_storage(str(tmp_path / "out"))
    with Lease(out_storage, "_nightly/lock.json", owner="other-run", ttl_s=600):
        assert main(["--config", str(path), "--no-progress"]) == 4
    assert "another run is in progress" in capsys.readouterr().err


@pytest.mark.usefixtures("ray_local")
def test_nightly_page_lists_unmatched_adapters_and_unlisted_catalogs(tmp_path, capsys):
    """Issue 20 (9): what never reached a catalog report (an adapter of no model pair, a
    catalog that is missing) is on the run's page, linked from the nightly's index."""
    path, config = _setup(tmp_path)
    config["catalogs"].append({"name": "ghost", "uri": str(tmp_path / "no-such-catalog")})
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "--run-id", "r1", "--no-progress"]) == 1
    capsys.readouterr()
    nightly = tmp_path / "out" / "_nightly"
    page = html_lib.unescape((nightly / "runs" / "r1.html").read_text())
    assert "Adapters matching no model pair (1)" in page
    assert "<td class='id'>main</td><td class='id'>a2</td><td class='id'>other/model</td>" \
        in page
    assert "Catalogs not listed (1)" in page and "catalog 'ghost'" in page
    assert "no-such-catalog" in page
    # The group's report is linked relative to the page, and resolves.
    link = re.search(r"href='(\.\./\.\./main/_reports/[^']+/report\.html)'", page)
    assert link and (nightly / "runs" / link.group(1)).resolve().is_file()
    index = (nightly / "index.html").read_text()
    assert "href='runs/r1.html'" in index and "✗ failed" in index
    assert json.loads((nightly / "index.json").read_text())["runs"][0]["catalog_errors"] == 1


def test_nightly_config_errors(tmp_path):
    _, config = _setup(tmp_path)
    NightlyConfig.from_dict(config)
    bad = [
        ({**config, "surprise": 1}, "unknown keys"),
        ({**config, "selection": {}}, "exactly one of"),
        ({**config, "selection": {"threshold": 0.3, "num_proj_layers": 2}}, "exactly one of"),
        ({**config, "catalogs": []}, "at least one catalog"),
        ({**config, "pairs": [config["pairs"][0], config["pairs"][0]]}, "unique"),
        ({**config, "pairs": [{"name": "x"}]}, "missing or malformed"),
        ({**config, "sanitize": {"bogus": 1}}, "unknown sanitize keys"),
    ]
    for cfg, match in bad:
        with pytest.raises(ConfigError, match=match):
            NightlyConfig.from_dict(cfg)
    (tmp_path / "broken.yaml").write_text("output_root: [unclosed")
    assert main(["--config", str(tmp_path / "broken.yaml")]) == 2


def test_nightly_projects_model_catalogs(tmp_path, capsys):
    """A ``models:`` catalog of full fine-tunes: each projected into
    <output_root>/<catalog>/<id>/; a bad one is reported and the others go on; the next run
    reuses the complete outputs."""
    import torch

    base = llama_tensors(Arch())
    aligned = aligned_from(base)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "aligned", aligned)
    g = torch.Generator().manual_seed(1)
    for model_id in ("m1", "team/m2"):
        write_model(tmp_path / "finetunes" / model_id,
                    {n: w + torch.randn(w.shape, generator=g) * 0.01 for n, w in aligned.items()},
                    shards=1 if model_id == "m1" else 2)
    other = llama_tensors(Arch(hidden=16, heads=2, kv_heads=2))  # another model's shapes
    write_model(tmp_path / "finetunes" / "wrong", other)
    config = {
        "output_root": str(tmp_path / "out"), "alignment_root": str(tmp_path / "sets"),
        "pairs": [{"name": "p", "base": str(tmp_path / "base"),
                   "aligned": str(tmp_path / "aligned")}],
        "models": [{"name": "finetunes", "uri": str(tmp_path / "finetunes"), "pair": "p"}],
        "selection": {"num_proj_layers": 2},
        "build": {"workers": 0}, "project": {"workers": 0},
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "--dry-run", "--no-progress"]) == 0
    assert main(["--config", str(path), "--run-id", "r1", "--no-progress"]) == 3
    assert "full fine-tunes: 3: 2 projected, 0 reused, 1 failed" in capsys.readouterr().out
    rec = json.loads((tmp_path / "out" / "_nightly" / "runs" / "r1.json").read_text())
    assert rec["status"] == "partial"
    items = {i["model_id"]: i for i in rec["models"]["items"]}
    assert items["m1"]["status"] == items["team/m2"]["status"] == "ok"
    assert items["m1"]["selected"] == 2 and "shape" in items["wrong"]["error"]
    assert (tmp_path / "out" / "finetunes" / "team" / "m2" / "model.safetensors.index.json"
            ).exists()
    assert (tmp_path / "out" / "finetunes" / "m1" / "model-00001-of-00001.safetensors").exists()
    assert not (tmp_path / "out" / "finetunes" / "wrong").exists()
    assert main(["--config", str(path), "--run-id", "r2", "--no-progress"]) == 3
    rec = json.loads((tmp_path / "out" / "_nightly" / "runs" / "r2.json").read_text())
    assert (rec["models"]["reused"], rec["models"]["error"]) == (2, 1)
    bad = {**config, "models": [{"name": "x", "uri": "y", "pair": "nope"}]}
    with pytest.raises(ConfigError, match="pair 'nope' is not one of"):
        NightlyConfig.from_dict(bad)


def test_nightly_a_mistyped_model_catalog_fails_the_run(tmp_path, capsys):
    """A models: catalog that does not exist is an error naming it (not an empty catalog
    and a green run), and so is an empty one unless it says ``allow_empty: true``, as for
    adapter catalogs; the other catalogs still run."""
    (tmp_path / "finetunes").mkdir()
    (tmp_path / "none-yet").mkdir()
    config = {
        "output_root": str(tmp_path / "out"), "alignment_root": str(tmp_path / "sets"),
        "pairs": [{"name": "p", "base": str(tmp_path / "base"),
                   "aligned": str(tmp_path / "aligned")}],
        "models": [{"name": "finetunes", "uri": str(tmp_path / "finetunes"), "pair": "p",
                    "allow_empty": True},
                   {"name": "typo", "uri": str(tmp_path / "finetunez"), "pair": "p"},
                   {"name": "none-yet", "uri": str(tmp_path / "none-yet"), "pair": "p"}],
        "selection": {"threshold": 0.35},
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "--run-id", "r1", "--dry-run", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "model catalog 'typo'" in out and "finetunez does not exist" in out
    assert "model catalog 'none-yet'" in out and "allow_empty: true" in out
    assert "'finetunes'" not in out  # empty, and allowed to be


def test_nightly_config_safety_adapter_errors(tmp_path):
    _, config = _setup(tmp_path)
    pair = config["pairs"][0]
    ok = NightlyConfig.from_dict({**config, "pairs": [{**pair, "safety_adapter": "s3://b/s",
                                                       "weights": [0.7, 0.3],
                                                       "combination": "cat"}]})
    assert ok.pairs[0].method_kwargs() == {"method": "safemerge", "safety_adapter": "s3://b/s",
                                           "weights": (0.7, 0.3), "combination": "cat"}
    bad = [
        ({**pair, "weights": "0.8,0.2"}, r"pairs\[p\]\.weights is only used with"),
        ({**pair, "combination": "cat"}, r"pairs\[p\]\.combination is only used with"),
        ({**pair, "safety_adapter": "/s", "weights": "0.8"}, "weights must be two positive"),
        ({**pair, "safety_adapter": "/s", "combination": "sum"}, "combination must be one of"),
        ({**pair, "safety_adapter": str(tmp_path / "out" / "s")}, "safety_adapter"),
    ]
    for p, match in bad:
        with pytest.raises(ConfigError, match=match):
            NightlyConfig.from_dict({**config, "pairs": [p]})


@pytest.mark.usefixtures("ray_local")
def test_nightly_pair_with_safety_adapter_runs_safemerge(tmp_path, capsys):
    """Issue 24: a pair's safety_adapter: sanitizes its adapters with SafeMERGE."""
    import torch

    path, config = _setup(tmp_path)
    base = llama_tensors(Arch())
    mods = sorted(k[:-7] for k in base if k.endswith(("q_proj.weight", "v_proj.weight")))
    g = torch.Generator().manual_seed(9)
    lora = {m: (torch.randn(4, base[m + ".weight"].shape[1], generator=g),
                torch.randn(base[m + ".weight"].shape[0], 4, generator=g)) for m in mods}
    write_adapter(tmp_path / "safety", lora, 4)
    cfg = json.loads((tmp_path / "safety" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/chat"
    (tmp_path / "safety" / "adapter_config.json").write_text(json.dumps(cfg))
    config["pairs"][0].update(safety_adapter=str(tmp_path / "safety"), combination="cat")
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "--run-id", "r1", "--no-progress"]) == 3  # unmatched
    capsys.readouterr()
    rec = json.loads((tmp_path / "out" / "_nightly" / "runs" / "r1.json").read_text())
    assert rec["counts"]["ok"] == 2, rec["errors"]
    report = Path(rec["groups"][0]["report"])
    summary = json.loads((report / "summary.json").read_text())
    assert summary["selection"]["method"] == "safemerge"
    assert summary["selection"]["merge"]["combination"] == "cat"
    out_cfg = json.loads((tmp_path / "out" / "main" / "a0" / "adapter_config.json").read_text())
    assert out_cfg["lora_alpha"] == out_cfg["r"] and out_cfg["rank_pattern"]  # 1 merged: 8
