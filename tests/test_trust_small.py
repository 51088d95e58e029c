"""Issue #20, items 3 and 7: an unreadable tenant is a failed entry, never a silent skip; and
the smaller cases (an existing --run-id, manifest ids, ``inspect`` of manifests and of
LoRA-less adapters, a closed pipe, the threshold hint, the nightly's config and catalog
entries, ``-q`` and Ray's start-up chatter, absolute URIs in the summaries).

Runs are small and run in this process, except where the case is about the process itself
(permissions, a closed pipe, Ray's output): those run the CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from safelora_ray import AlignmentSet, BuildConfig, build
from safelora_ray.cli import main as cli_main
from safelora_ray.demo import write_adapter, write_model
from tests.factory import Arch, aligned_from, llama_tensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("small")
    base = llama_tensors(Arch())
    write_model(root / "base", base)
    write_model(root / "aligned", aligned_from(base))
    res = build(BuildConfig(base=str(root / "base"), aligned=str(root / "aligned"),
                            out=str(root / "set"), workers=0, progress=False))
    return {"root": root, "set": res.uri, "rows": AlignmentSet.open(res.uri).rows}


def _catalog(world: dict[str, Any], root: Path, names: list[str], seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    for name in names:
        lora = {m: (torch.randn(2, r.shape[1], generator=g), torch.randn(r.shape[0], 2,
                                                                         generator=g))
                for m, r in world["rows"].items()}
        write_adapter(root / name, lora, 2)
    return root


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _san(world: dict[str, Any], adapters: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["sanitize", "--alignment", world["set"], "--adapters", str(adapters),
            "--out", str(out), "--no-progress", "--threshold", "0.35", *extra]


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 180,
         prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "safelora_ray", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


# ----------------------------------------------------------------------------------------------
# 3. An unreadable tenant is a failed entry with its cause, exit 3
# ----------------------------------------------------------------------------------------------


def _without_dac_override() -> list[str]:
    """A command prefix that runs without the capabilities that bypass file permissions (as
    root, like CI, a ``chmod 000`` folder is readable otherwise); nothing for another user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if shutil.which("capsh"):  # pragma: no cover - where util-linux's setpriv is missing
        return ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--"]
    pytest.skip("neither setpriv nor capsh: cannot drop CAP_DAC_OVERRIDE as root")


def _check_denied(prefix: list[str], path: Path) -> None:
    probe = subprocess.run([*prefix, "ls", str(path)], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode == 0:  # pragma: no cover - a container that keeps the capability
        pytest.skip("permissions are not enforced for this process here")


@pytest.mark.parametrize("mode", [0o000, 0o400], ids=["chmod-000", "read-not-search"])
def test_unreadable_tenant_is_a_failed_entry(world, tmp_path, mode):
    cat = _catalog(world, tmp_path / "cat", ["acme/chat-0", "globex/chat-0", "initech/chat-0",
                                             "umbrella/chat-0"])
    prefix = _without_dac_override()
    (cat / "globex").chmod(mode)
    try:
        _check_denied(prefix, cat / "globex" / "chat-0")
        proc = _cli(_san(world, cat, tmp_path / "out", "--json", "-v"), prefix=prefix)
        code = proc.returncode
        summary = json.loads(proc.stdout) if proc.stdout.strip() else {}
        insp = _cli(["inspect", str(cat), "--json"], prefix=prefix)
    finally:
        (cat / "globex").chmod(0o755)
    assert code == 3, proc.stderr[-3000:]
    assert summary["counts"] == {"total": 4, "ok": 3, "skipped": 0, "error": 1}
    [err] = summary["errors"]
    assert err["adapter_id"] in ("globex", "globex/chat-0")
    assert "permission denied" in err["error"] and "globex" in err["error"]
    assert "permission denied" in proc.stderr  # said, not only in the report
    [table] = (tmp_path / "out" / "_reports").glob("*/adapters.parquet")
    rows = pq.read_table(table).to_pylist()
    assert any(r["status"] == "error" and "permission denied" in (r["error"] or "")
               for r in rows), rows
    # inspect says so too, instead of counting the readable adapters as the catalog.
    assert insp.returncode == 0, insp.stderr
    d = json.loads(insp.stdout)
    assert d["kind"] == "catalog" and d["adapters"] == "3"
    assert [u["entry"] for u in d["unreadable"]] in (["globex"], ["globex/chat-0"])


def test_access_denied_tenant_on_s3_is_a_failed_entry(world, tmp_path, capsys, s3_server,
                                                      s3_bucket, s3_admin_client, monkeypatch):
    from tests.s3_fault_proxy import FaultSchedule, S3FaultProxy

    cat = _catalog(world, tmp_path / "cat", ["acme/chat-0", "globex/chat-0", "initech/chat-0"])
    for f in sorted(cat.rglob("*")):
        if f.is_file():
            s3_admin_client.upload_file(str(f), s3_bucket, f"tenants/{f.relative_to(cat)}")
    # A bucket policy that denies globex's keys (objects and listings of its prefix).
    schedule = FaultSchedule(max_faults=0, deny_prefixes=(f"{s3_bucket}/tenants/globex/",))
    with S3FaultProxy(s3_server, schedule, lifetime_s=300) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        code, out, err = _run(_san(world, f"s3://{s3_bucket}/tenants", tmp_path / "out",
                                   "--json"), capsys)
        code_i, _, err_i = _run(["inspect", f"s3://{s3_bucket}/tenants/globex/chat-0"],
                                    capsys)
    assert proxy.stats.denied > 0
    assert code == 3, err
    summary = json.loads(out)
    assert summary["counts"]["ok"] == 2 and summary["counts"]["error"] == 1
    [e] = summary["errors"]
    assert e["adapter_id"] == "globex/chat-0" and "access denied" in e["error"]
    assert code_i == 1 and "access denied" in err_i and "Traceback" not in err_i
