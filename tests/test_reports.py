"""The fleet report (issue #14): its content, not its pixels.

Most tests feed ``ReportWriter`` rows shaped as the workers send them (an ``ok`` row with its
module rows, a ``skipped`` row with its ledger figures, an ``error`` row with a message the code
produces) and read back ``summary.json``, ``fleet.parquet``, ``tenants.parquet``, the index and
the HTML. ``test_sanitize_then_incremental_rerun`` runs the real pipeline twice (in process) so
the ledger → skip row → report path is covered end to end.
"""

from __future__ import annotations

import html as html_lib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from safelora_ray.core.errors import AdapterError, ConfigError
from safelora_ray.formats.peft import check_config, read_adapter
from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, SanitizeResult, sanitize
from safelora_ray.pipelines.sanitize.ledger import ledger_path
from safelora_ray.pipelines.sanitize.rows import mark_failed as _fail
from safelora_ray.planning.catalog import validate_id
from safelora_ray.reports import ReportWriter, classify, ledger_figures
from safelora_ray.reports import writer as writer_mod
from safelora_ray.reports.aggregate import ModuleStats, cos_units, tau_units
from safelora_ray.reports.causes import short_message
from safelora_ray.reports.fleet import tenant_of
from safelora_ray.storage import open_storage

TAU = 0.35


@dataclass(frozen=True)
class _Row:
    layer: int
    kind: str


@dataclass
class FakeSet:
    """What ReportWriter reads of an alignment set: 2 layers x q/v."""

    uri: str = "/sets/qv"
    content_id: str = "als-test"
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rows: dict[str, _Row] = field(default_factory=lambda: {
        f"model.layers.{i}.self_attn.{k}": _Row(i, k) for i in range(2)
        for k in ("q_proj", "v_proj")})


MODS = list(FakeSet().rows)


def ok_row(aid: str, cos: list[float], pdst: float = 0.9,
           sel: float = TAU) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    layers = [{"adapter_id": aid, "module": m, "layer": int(m.split(".")[2]),
               "kind": m.rsplit(".", 1)[1], "rank": 4, "cos": c, "cos_rounded": c,
               "projected": c <= sel, "norm_delta": 1.0, "norm_projected": 1.0,
               "dist": 0.0 if c <= sel else 0.5} for m, c in zip(MODS, cos, strict=True)]
    proj = sum(1 for r in layers if r["projected"])
    return base(aid) | {"status": "ok", "modules": len(cos), "projected": proj, "pdst": pdst,
                        "output_digest": f"sha256:{aid}"}, layers


def skip_row(aid: str, cos: list[float] | None, pdst: float | None = 0.9,
             run_id: str = "r1", projected: int | None = None) -> dict[str, Any]:
    prior: dict[str, Any] = {"run_id": run_id, "modules": 4, "pdst": pdst}
    chosen = [m for m, c in zip(MODS, cos or [], strict=False) if c <= TAU]
    prior["projected"] = chosen
    if cos is not None:
        prior["scores"] = dict(zip(MODS, cos, strict=True))
    return base(aid) | {"status": "skipped", "output_digest": f"sha256:{aid}",
                        "projected": len(chosen) if projected is None else projected,
                        "note": "unchanged since the last run (ledger)", "prior": prior}


def err_row(aid: str, message: str) -> dict[str, Any]:
    return base(aid) | {"error": message if message.startswith("adapter id")
                        else f"adapter {aid!r}: {message}"}


def base(aid: str) -> dict[str, Any]:
    return {"adapter_id": aid, "source_uri": f"/cat/{aid}", "status": "error", "error": None,
            "modules": 0, "projected": 0, "pdst": None, "source_digest": None,
            "output_digest": None, "base_model": None, "bytes_in": 0, "bytes_out": 0,
            "read_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "batch_s": 0.0, "untouched": 0,
            "note": None}


@dataclass
class Report:
    dir: Path
    summary: dict[str, Any]
    fleet: dict[str, dict[str, Any]]
    tenants: dict[str, dict[str, Any]]
    html: str


def publish(out: Path, run_id: str, rows: list[tuple[dict[str, Any], list[dict[str, Any]]]],
            selection: dict[str, Any] | None = None, depth: int = 1,
            batch: int = 3) -> Report:
    """One run through ReportWriter (rows in batches, as the driver adds them)."""
    publish_to(str(out), run_id, rows, selection, depth, batch)
    return read_report(out, run_id)


def publish_to(out: str, run_id: str, rows: list[tuple[dict[str, Any], list[dict[str, Any]]]],
               selection: dict[str, Any] | None = None, depth: int = 1,
               batch: int = 3) -> None:
    """:func:`publish` into any output root (a local folder or an s3:// URI)."""
    selection = selection or {"mode": "threshold", "threshold": TAU}
    w = ReportWriter(run_id, FakeSet(), selection, "/cat", tenant_depth=depth)
    res = SanitizeResult(run_id, out, f"{out}/_reports/{run_id}", alignment_id="x")
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        for row, _ in chunk:
            res.total += 1
            setattr(res, row["status"], getattr(res, row["status"]) + 1)
        w.add([r for r, _ in chunk], [x for _, ls in chunk for x in ls])
    res.duration_s = 1.0
    w.finish(open_storage(out), f"_reports/{run_id}", res)


def read_report(out: Path, run_id: str) -> Report:
    d = out / "_reports" / run_id
    return Report(d, json.loads((d / "summary.json").read_text()),
                  {r["adapter_id"]: r for r in pq.read_table(d / "fleet.parquet").to_pylist()},
                  {r["tenant"]: r for r in pq.read_table(d / "tenants.parquet").to_pylist()},
                  (d / "report.html").read_text())


def text(html: str) -> str:
    """The page's visible text (tags dropped, entities decoded, spaces collapsed)."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", html_lib.unescape(re.sub(r"<[^>]+>", " ", body)))


# ---------------------------------------------------------------------------------------------
# Failure causes: real messages of each kind
# ---------------------------------------------------------------------------------------------


def _message(fn: Any) -> str:
    try:
        fn()
    except (AdapterError, ConfigError) as e:
        return str(e)
    raise AssertionError("no error raised")


def _adapter_dir(root: Path, name: str, config: dict[str, Any] | None,
                 tensors: dict[str, torch.Tensor] | None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if config is not None:
        (d / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def test_failure_causes_of_the_messages_the_code_produces(tmp_path: Path) -> None:
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    pfx = "base_model.model.model.layers.0.self_attn.q_proj"
    good = {f"{pfx}.lora_A.weight": torch.ones(2, 8), f"{pfx}.lora_B.weight": torch.ones(8, 2)}
    nan = dict(good)
    nan[f"{pfx}.lora_B.weight"] = torch.full((8, 2), float("nan"))
    st = open_storage(str(tmp_path))

    def read(name: str, config: Any, tensors: Any, raw_config: str | None = None) -> str:
        d = _adapter_dir(tmp_path, name, config, tensors)
        if raw_config is not None:
            (d / "adapter_config.json").write_text(raw_config)
        return _message(lambda: read_adapter(st, name, name))

    pickle_dir = _adapter_dir(tmp_path, "pickle", cfg, None)
    (pickle_dir / "adapter_model.bin").write_bytes(b"\x80\x04not read")
    emb = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(2, 8),
           "base_model.model.model.embed_tokens.lora_embedding_B": torch.ones(8, 2)}
    row = base("x/broken")
    try:  # an unexpected exception, as the worker reports it
        {}["boom"]
    except KeyError as e:
        _fail(row, e)
    assert ".py:" in row["error"]
    cases = {
        "dora": _message(lambda: check_config({**cfg, "use_dora": True})),
        "not_lora": _message(lambda: check_config({"peft_type": "IA3"})),
        "invalid_config": _message(lambda: check_config({**cfg, "r": 0})),
        "pickle": _message(lambda: read_adapter(st, "pickle", "pickle")),
        "missing": read("noweights", cfg, None),
        "unreadable": read("notjson", None, good, raw_config='{"peft_type": "LORA", '),
        "non_finite": read("nan", cfg, nan),
        "variant": read("emb", cfg, emb),
        "invalid_id": _message(lambda: validate_id("bad name")),
        "internal": row["error"],
        # Worded by sanitize.py (driver and FleetSanitizer._check), copied here verbatim.
        "shape": "adapter 'a': module 'model.layers.0.self_attn.q_proj' has A [4, 48] and B "
                 "[48, 4], but the alignment set's weight is 32x32 (an adapter for another "
                 "base model?)",
        "no_alignment_entry": "adapter 'a': 2 module(s) have no entry in alignment set als-1 "
                              "(targets q_proj,v_proj): model.layers.0.self_attn.k_proj",
        "worker_died": "adapter 'a': the worker died while sanitizing it (ActorDiedError); the "
                       "rest of the fleet went on",
        "symlink": "adapter 'a': cannot read adapter_model.safetensors: path 'a/x' resolves to "
                   "/elsewhere/x, outside the storage root /cat",
    }
    got = {k: classify(m).key for k, m in cases.items()}
    assert got == {k: k for k in cases}, {k: (got[k], m) for k, m in cases.items()
                                          if got[k] != k}
    assert classify("something nobody words like this").key == "other"
    assert classify(None).key == "other"
    assert short_message("t/a", "adapter 't/a': DoRA adapter") == "DoRA adapter"


# ---------------------------------------------------------------------------------------------
# Aggregates: exact counts at the band's edges
# ---------------------------------------------------------------------------------------------


def test_near_tau_counts_exactly_at_the_band_edges() -> None:
    assert tau_units(0.35) == 35_000 and cos_units(0.29999) == 29_999
    st = ModuleStats({"mode": "threshold", "threshold": TAU})
    # In the band: 0.30 and 0.35 (at or below τ), 0.35001 and 0.40 (above). Out: the rest.
    cos = [0.29999, 0.30, 0.35, 0.35001, 0.40, 0.40001, None, 0.9]
    fig = st.add_adapter([(0, "q_proj", c, c is not None and c <= TAU) for c in cos])
    assert (fig.near, fig.near_below, fig.near_above) == (4, 2, 2)
    assert (fig.modules, fig.projected, fig.min_cos, fig.tau) == (8, 3, 0.29999, TAU)
    assert st.unscored == 1 and sum(st.fine) == 7
    # Right-closed bins: 0.35 is in the bin left of τ, 0.35001 in the one right of it.
    z = st.near_threshold()["zoom"]["counts"]
    assert z[19] == 1 and z[20] == 1  # (τ-0.005, τ] and (τ, τ+0.005]
    # Number mode: τ is each adapter's k-th smallest cosine.
    st = ModuleStats({"mode": "number", "num_proj_layers": 2})
    fig = st.add_adapter([(0, "q_proj", c, c <= 0.5) for c in (0.1, 0.5, 0.55, 0.549, 0.9)])
    assert fig.tau == 0.5 and (fig.near_below, fig.near_above) == (1, 2)


# ---------------------------------------------------------------------------------------------
# A run, then its incremental rerun
# ---------------------------------------------------------------------------------------------

FIRST = {
    "acme/chat-1": [0.30, 0.36, 0.9, 0.95],      # 1 projected; 2 near τ
    "acme/chat-2": [0.10, 0.2, 0.9, 0.95],       # 2 projected; 0 near
    "globex/sum": [0.349, 0.8, 0.85, 0.99],      # 1 projected; 1 near
    "initech/a": [0.5, 0.6, 0.7, 0.8],           # nothing projected
}
FAIL_1 = {
    "acme/dora": "DoRA adapter (use_dora in adapter_config.json) is not covered by the Safe "
                 "LoRA rule",
    "globex/nan": "tensor 'x.lora_B.weight' has non-finite values (1 NaN, 0 Inf)",
    "globex/other": "module 'm' has A [4, 48] and B [48, 4], but the alignment set's weight "
                    "is 32x32 (an adapter for another base model?)",
}


def _first_rows() -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    rows = [ok_row(a, c, pdst=0.5 + i / 10) for i, (a, c) in enumerate(FIRST.items())]
    rows += [(err_row(a, m), []) for a, m in FAIL_1.items()]
    return rows


def test_first_run_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = publish(out, "r1", _first_rows())
    s = r.summary
    assert s["counts"] == {"total": 7, "ok": 4, "skipped": 0, "error": 3}
    # Failure groups, biggest first, with examples and none new... all new on a first run.
    assert [(g["cause"], g["count"], g["new"]) for g in s["failure_groups"]] == [
        ("dora", 1, 1), ("non_finite", 1, 1), ("shape", 1, 1)]
    # Near τ: chat-1 0.30 and 0.36, globex 0.349 -> 3 (2 at or below, 1 above).
    nt = s["near_threshold"]
    assert (nt["within"], nt["at_or_below"], nt["above"]) == (3, 2, 1)
    assert s["catalog_figures"] == {"adapters": 4, "modules": 16, "projected": 4,
                                    "projected_share": 0.25, "unscored_modules": 0,
                                    "figures_unknown": 0}
    assert sum(s["histograms"]["cos_fine"]["counts"]) == 16 and sum(s["histograms"]["pdst"]) == 4
    # (layer, kind): layer 0 q_proj holds 0.30, 0.10, 0.349, 0.5 -> 3 of 4 projected.
    cell = next(c for c in s["layer_kind"] if (c["layer"], c["kind"]) == (0, "q_proj"))
    assert (cell["modules"], cell["projected"]) == (4, 3)
    # Per tenant.
    assert set(r.tenants) == {"acme", "globex", "initech"}
    acme = r.tenants["acme"]
    assert (acme["adapters"], acme["run_ok"], acme["run_error"], acme["failed"]) == (3, 2, 1, 1)
    assert (acme["modules"], acme["projected"], acme["share"]) == (8, 3, 3 / 8)
    assert acme["min_pdst"] == 0.5 and acme["near_tau"] == 2
    assert r.tenants["globex"]["failed"] == 2 and r.tenants["globex"]["prev_share"] is None
    assert {t["tenant"]: t["failed"] for t in s["tenants"]} == {"globex": 2, "acme": 1,
                                                                 "initech": 0}
    # Fleet state.
    assert r.fleet["acme/dora"]["state"] == "never_sanitized"
    assert r.fleet["acme/chat-1"]["change"] == "new" and r.fleet["acme/chat-1"]["near_tau"] == 2
    assert s["fleet"]["sanitized"] == 4 and s["fleet"]["never_sanitized"] == 3
    # Ties in "most projected" are broken by share, then count, then lower Pdst.
    assert [t["adapter_id"] for t in s["most_projected"]] == [
        "acme/chat-2", "acme/chat-1", "globex/sum", "initech/a"]
    assert s["previous"] is None
    page = text(r.html)
    assert "Failures by cause (3)" in page and "DoRA (not covered)" in page
    assert "No earlier run" in page
    assert "3 of 16 modules lie within ±0.05 of τ = 0.35" in page
    # Links: the Parquet files, each output and its ledger record, the index.
    for href in ("fleet.parquet", "tenants.parquet", "adapters.parquet", "layers.parquet",
                 "summary.json", "../index.html", "../../acme/chat-1/",
                 "../../_ledger/acme/chat-1.json"):
        assert f'href="{href}"' in r.html, href
    assert 'href="../../acme/dora/"' not in r.html  # never sanitized: nothing to link to
    assert "<script src" not in r.html and "http://" not in r.html and "https://" not in r.html
    # Index, latest pointer and redirect.
    root = out / "_reports"
    latest = json.loads((root / "latest.json").read_text())
    assert latest["run_id"] == "r1" and latest["fleet"] == "r1/fleet.parquet"
    assert "r1/report.html" in (root / "latest.html").read_text()
    assert "★ latest" in text((root / "index.html").read_text())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_report_cut_short_leaves_nothing_of_itself(tmp_path: Path, where: str,
                                                     request: pytest.FixtureRequest) -> None:
    # Ctrl-C (or the store gone) while the run's report is published: the files put so far
    # go, so no report without its summary.json stays; the index and latest.json are as
    # before (the run that made them is still the latest).
    from safelora_ray.storage import local as local_mod
    from safelora_ray.storage.base import Storage

    uri = str(tmp_path / "out") if where == "local" else \
        f"s3://{request.getfixturevalue('s3_bucket')}/out"
    publish_to(uri, "r1", _first_rows())
    out = open_storage(uri)
    before = {o.path: out.read(o.path) for o in out.list("_reports")}
    calls: list[str] = []

    def third_cut(path: str) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        if where == "local":  # the third file staged: cut before the tree is renamed in
            fsync = local_mod._fsync_file

            def cut_fsync(path: str, drop_cache: bool = False) -> None:
                third_cut(path)
                fsync(path, drop_cache)

            mp.setattr(local_mod, "_fsync_file", cut_fsync)
        else:  # the third object: two are on the store already
            put_file = type(out).put_file

            def cut_put(self: Storage, path: str, local: str) -> None:
                third_cut(path)
                put_file(self, path, local)

            mp.setattr(type(out), "put_file", cut_put)
        with pytest.raises(KeyboardInterrupt):
            publish_to(uri, "r2", _first_rows())
    assert calls[-1].endswith("fleet.parquet")
    assert not [o.path for o in out.list("_reports/r2")]
    assert {o.path: out.read(o.path) for o in out.list("_reports")} == before
    if where == "local":
        assert not [p.name for p in (tmp_path / "out" / "_reports").iterdir()
                    if p.name.startswith(".")]  # no staging folder left either
        assert not (tmp_path / "out" / "_reports" / "r2").exists()


def test_incremental_rerun_shows_the_fleet_and_the_changes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r1 = publish(out, "r1", _first_rows())
    rows: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
        (skip_row("acme/chat-1", FIRST["acme/chat-1"], pdst=0.5), []),
        (skip_row("acme/chat-2", FIRST["acme/chat-2"], pdst=0.6), []),
        # A new version of globex/sum fails; initech/a is not listed any more.
        (err_row("globex/sum", "adapter_config.json is not valid JSON: Expecting value"), []),
        ok_row("acme/dora", [0.9, 0.9, 0.9, 0.2], pdst=0.95),                # fixed
        (err_row("globex/nan", FAIL_1["globex/nan"]), []),                    # still failing
        (err_row("globex/other", FAIL_1["globex/other"]), []),
        ok_row("newco/x", [0.3, 0.3, 0.3, 0.3], pdst=1.0),                    # new
    ]
    r = publish(out, "r2", rows)
    s, f = r.summary, r.fleet
    assert s["counts"] == {"total": 7, "ok": 2, "skipped": 2, "error": 3}
    # Skipped adapters keep their figures: the incremental run is not empty.
    for aid in ("acme/chat-1", "acme/chat-2"):
        for k in ("modules", "projected", "pdst", "near_tau"):
            assert f[aid][k] == r1.fleet[aid][k], (aid, k)
        assert f[aid]["change"] == "unchanged" and f[aid]["result_run"] == "r1"
    assert s["catalog_figures"]["adapters"] == 4  # 2 skipped + 2 ok
    assert sum(s["histograms"]["cos_fine"]["counts"]) == 16
    # Changes.
    assert f["acme/dora"]["change"] == "fixed" and f["acme/dora"]["prev_state"] == \
        "never_sanitized"
    assert f["globex/sum"]["change"] == "newly failing"
    assert f["globex/sum"]["state"] == "failed"  # its earlier output is still served
    assert f["globex/sum"]["output_digest"] == "sha256:globex/sum"
    assert f["globex/nan"]["change"] == "still failing"
    assert f["initech/a"]["run_status"] == "absent" and f["initech/a"]["state"] == "ok"
    assert f["initech/a"]["modules"] == 4  # its last state, kept
    assert f["newco/x"]["change"] == "new" and f["newco/x"]["first_seen"] == "r2"
    assert f["acme/chat-1"]["first_seen"] == "r1" and f["acme/chat-1"]["last_seen"] == "r2"
    fl = s["fleet"]
    assert (fl["adapters"], fl["sanitized"], fl["failed"], fl["not_listed"]) == (8, 5, 3, 1)
    assert (fl["failed_older_output"], fl["never_sanitized"]) == (1, 2)
    assert fl["changes"] == {"fixed": 1, "new": 1, "newly failing": 1, "not listed": 1,
                             "still failing": 2, "unchanged": 2}
    # Failure groups: the new one marked new, the old ones not.
    groups = {g["cause"]: (g["count"], g["new"]) for g in s["failure_groups"]}
    assert groups == {"unreadable": (1, 1), "non_finite": (1, 0), "shape": (1, 0)}
    assert [x["adapter_id"] for x in s["newly_failing"]] == ["globex/sum"]
    assert [x["adapter_id"] for x in s["newly_fixed"]] == ["acme/dora"]
    # Against the previous run.
    prev = s["previous"]
    assert prev["run_id"] == "r1" and prev["counts"] == r1.summary["counts"]
    assert prev["report"] == "r1/report.html"
    page = text(r.html)
    assert "▼ Newly failing (1)" in page and "▲ Newly fixed (1)" in page
    assert 'href="../r1/report.html"' in r.html
    # Tenants: the drift of the projected share against the previous state.
    acme = r.tenants["acme"]
    assert (acme["run_ok"], acme["run_skipped"], acme["run_error"]) == (1, 2, 0)
    assert acme["share"] == (1 + 2 + 1) / 12 and acme["prev_share"] == 3 / 8
    assert r.tenants["initech"]["not_listed"] == 1
    # The index lists both runs, the latest last, and latest.json points to r2's state.
    index = json.loads((out / "_reports" / "index.json").read_text())["runs"]
    assert [e["run_id"] for e in index] == ["r1", "r2"]
    assert json.loads((out / "_reports" / "latest.json").read_text())["run_id"] == "r2"
    idx = (out / "_reports" / "index.html").read_text()
    assert idx.index("r2/report.html") < idx.index("r1/report.html")  # newest first


def test_old_ledger_records_and_a_lost_state(tmp_path: Path) -> None:
    """A skipped adapter whose ledger record has no figures (written before them) keeps the
    state's; with no state at all, its figures are reported unknown, never invented; a state
    file that vanished does not fail the run."""
    out = tmp_path / "out"
    publish(out, "r1", [ok_row("t/a", [0.3, 0.9, 0.9, 0.9], pdst=0.7)])
    r = publish(out, "r2", [(skip_row("t/a", None, pdst=None, projected=1), [])])
    assert (r.fleet["t/a"]["modules"], r.fleet["t/a"]["pdst"]) == (4, 0.7)
    assert r.summary["catalog_figures"]["figures_unknown"] == 1
    (out / "_reports" / "r2" / "fleet.parquet").unlink()
    r = publish(out, "r3", [(skip_row("t/a", None, pdst=None, projected=1), [])])
    assert r.fleet["t/a"]["state"] == "ok" and r.fleet["t/a"]["pdst"] is None
    assert r.fleet["t/a"]["modules"] == 4  # the ledger's module count
    assert "have no module figures" in text(r.html)


def test_ledger_figures_drop_what_they_cannot_use() -> None:
    good = ledger_figures({"run_id": "r1", "modules": 2, "projected": ["m1"], "pdst": 0.9,
                           "scores": {"m1": 0.3, "m2": 0.8}, "key": {"x": 1}})
    assert good == {"run_id": "r1", "modules": 2, "projected": ["m1"], "pdst": 0.9,
                    "scores": {"m1": 0.3, "m2": 0.8}}
    bad = ledger_figures({"run_id": 3, "modules": "2", "projected": "m1", "pdst": "x",
                          "scores": {"m1": "0.3", "m2": float("nan"), "m3": True}})
    assert bad == {"run_id": None, "modules": None, "projected": [], "pdst": None,
                   "scores": {"m1": None, "m2": None, "m3": None}}
    assert ledger_figures({})["scores"] is None


def test_tenant_depth_and_number_mode(tmp_path: Path) -> None:
    assert tenant_of("org/team/a", 2) == "org/team" and tenant_of("solo", 1) == "(top level)"
    r = publish(tmp_path / "out", "r1",
                [ok_row("org/team/a", [0.1, 0.2, 0.6, 0.9], sel=0.2),
                 ok_row("org/other/b", [0.5, 0.55, 0.6, 0.7], sel=0.55), ok_row("solo",
                 [0.1, 0.5, 0.5, 0.9], sel=0.5)],
                selection={"mode": "number", "num_proj_layers": 2, "strict": False}, depth=2)
    assert set(r.tenants) == {"org/team", "org/other", "(top level)"}
    assert r.summary["tenant_depth"] == 2
    nt = r.summary["near_threshold"]
    assert nt["mode"] == "number" and nt["tau"] is None
    # τ per adapter: 0.2 (0.2 at; 0.1 out), 0.55 (0.5, 0.55 at/below; 0.6 above), 0.5 (both
    # 0.5s; 0.1 and 0.9 out).
    assert (nt["at_or_below"], nt["above"]) == (1 + 2 + 2, 0 + 1 + 0)
    assert r.fleet["org/other/b"]["tau"] == 0.55
    assert "each adapter's own τ" in text(r.html)


def test_hostile_strings_are_escaped(tmp_path: Path) -> None:
    msg = "peft_type '<script>alert(1)</script>' in adapter_config.json is not LoRA"
    r = publish(tmp_path / "out", "r1", [(err_row("t/x", msg), [])])
    assert "<script>alert(1)" not in r.html and "&lt;script&gt;alert(1)" in r.html
    assert r.summary["failure_groups"][0]["cause"] == "not_lora"


def test_the_page_is_bounded_and_points_to_the_rest(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_mod, "PAGE_FAILURES", 5)
    monkeypatch.setattr(writer_mod, "PAGE_TENANTS", 3)
    monkeypatch.setattr(writer_mod, "PAGE_ADAPTERS", 10)
    monkeypatch.setattr(writer_mod, "SUMMARY_TENANTS", 4)
    rows = [(err_row(f"t{i}/x", FAIL_1["acme/dora"]), []) for i in range(12)]
    rows += [ok_row(f"t{i}/ok", [0.3, 0.9, 0.9, 0.9]) for i in range(12)]
    r = publish(tmp_path / "out", "r1", rows)
    page = text(r.html)
    assert r.summary["failure_groups"][0]["count"] == 12
    assert "5 of 12 listed here; all are in adapters.parquet" in page
    assert "of 12; all are in tenants.parquet" in page
    assert len(r.summary["tenants"]) == 4 and r.summary["tenants_total"] == 12
    assert "All adapters" not in page and "Every adapter (24) is in fleet.parquet" in page
    assert len(r.fleet) == 24 and len(r.tenants) == 12


# ---------------------------------------------------------------------------------------------
# End to end: the real pipeline, a run and its incremental rerun
# ---------------------------------------------------------------------------------------------


def test_sanitize_then_incremental_rerun(tmp_path: Path) -> None:
    from safelora_ray.cli.demo import write_demo_inputs
    from safelora_ray.pipelines.build.config import BuildConfig
    from safelora_ray.pipelines.build.driver import build

    paths = write_demo_inputs(tmp_path, tenants=2, per_tenant=2)
    aset = str(tmp_path / "set")
    build(BuildConfig(base=paths["base"], aligned=paths["aligned"], out=aset, workers=0,
                      progress=False))
    out = tmp_path / "out"

    def run(run_id: str) -> Report:
        sanitize(SanitizeConfig(alignment=aset, adapters=paths["catalog"], out=str(out),
                                threshold=TAU, workers=0, run_id=run_id, progress=False))
        return read_report(out, run_id)

    r1, r2 = run("r1"), run("r2")
    assert r1.summary["counts"] == {"total": 5, "ok": 4, "skipped": 0, "error": 1}
    assert r2.summary["counts"] == {"total": 5, "ok": 0, "skipped": 4, "error": 1}
    # The ledger carries the figures a later run reports for a skipped adapter.
    rec = json.loads((out / ledger_path("tenant-1/adapter-01")).read_text())
    assert len(rec["scores"]) == rec["modules"] == 8 and 0 < rec["pdst"] <= 1
    # The rerun reports the same fleet, figure for figure, from the ledger.
    for k in ("modules", "projected", "projected_share", "near_tau", "pdst_median"):
        assert r2.summary["fleet"][k] == r1.summary["fleet"][k], k
    assert r2.summary["histograms"]["cos_fine"] == r1.summary["histograms"]["cos_fine"]
    assert r2.summary["layer_kind"] == r1.summary["layer_kind"]
    assert r2.summary["near_threshold"] == r1.summary["near_threshold"]
    for aid, row in r1.fleet.items():
        for k in ("state", "modules", "projected", "pdst", "near_tau", "min_cos"):
            assert r2.fleet[aid][k] == row[k], (aid, k)
    assert r2.summary["failure_groups"] == [{
        "cause": "dora", "label": "DoRA (not covered)",
        "action": "not covered by Safe LoRA; retrain as plain LoRA", "count": 1, "new": 0,
        "examples": ["tenant-0/dora-adapter"]}]
    assert r2.summary["previous"]["run_id"] == "r1"
    assert r2.tenants["tenant-1"]["run_skipped"] == 2
    assert r2.tenants["tenant-1"]["modules"] == 16


def test_histogram_ticks_are_whole_multiples_of_the_step():
    """Issue 20 (8): a zoom from -0.1 in steps of 0.005 labelled its middle tick -6.94e-18."""
    from safelora_ray.reports.html import hist_svg

    svg = hist_svg([1] * 40, -0.1, 0.005, title="t", xlabel="x", ylabel="y")
    ticks = re.findall(r'text-anchor="middle">([^<]*)</text>', svg)
    assert "0" in ticks and not any("e-" in t for t in ticks), ticks
