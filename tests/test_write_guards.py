"""Every flag that writes follows one rule (issue 20, items 2 and 4).

Never equal to, inside or around an input; never over an existing file unless ``--force``;
and writable, which is checked before any work: a read-only output answers in one line at
once, not with a traceback after the whole fleet was processed. No ``OSError`` or botocore
error reaches the user as a traceback.

Runs that must be refused run in this process; the read-only cases run the command line in a
subprocess without ``CAP_DAC_OVERRIDE`` (the tests run as root, whom ``chmod`` does not stop).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from safelora_ray import BuildConfig, ConfigError, FinetuneConfig, SanitizeConfig, build
from safelora_ray.cli.main import main as cli_main
from safelora_ray.pipelines.salora.export import export_cs, exported_from
from safelora_ray.pipelines.salora.modules import SaloraConfig, salora_modules
from tests.adapters import make_adapter
from tests.s3_fault_proxy import FaultSchedule, S3FaultProxy
from tests.salora_models import save_model, token_samples, write_token_calibration

REPO = Path(__file__).resolve().parents[1]
RANK = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every input a writing command reads: a model trio, an alignment set, a catalog, a
    calibration set and a SaLoRA safety-module set (all tiny)."""
    root = tmp_path_factory.mktemp("inputs")
    w = {"base": save_model(root / "base", "llama", seed=0),
         "aligned": save_model(root / "aligned", "llama", seed=1),
         "ft": save_model(root / "ft", "llama", seed=2),
         "cal": write_token_calibration(root / "cal.jsonl", token_samples(7))}
    w["set"] = Path(build(BuildConfig(base=str(w["base"]), aligned=str(w["aligned"]),
                                      out=str(root / "set"), workers=0, progress=False)).uri)
    for k in range(2):
        make_adapter(root / "cat" / f"t{k}" / "a", gqa=True, adapter_seed=10 + k)
    w["cat"] = root / "cat"
    w["sset"] = Path(salora_modules(SaloraConfig(
        model=str(w["aligned"]), calibration=str(w["cal"]), out=str(root / "sset"),
        safety_rank=RANK, workers=0, progress=False)).uri)
    w["root"] = root
    return w


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _first(folder: Path, pattern: str) -> Path:
    return sorted(folder.rglob(pattern))[0]


def _nightly_yaml(w: dict[str, Path], tmp: Path, output_root: str, alignment_root: str) -> str:
    path = tmp / "nightly.yaml"
    path.write_text(yaml.safe_dump({
        "output_root": output_root, "alignment_root": alignment_root,
        "catalogs": [{"name": "c", "uri": str(w["cat"])}],
        "pairs": [{"name": "p", "base": str(w["base"]), "aligned": str(w["aligned"]),
                   "base_model_ids": ["x"]}],
        "selection": {"threshold": 0.35}, "sanitize": {"workers": 0},
        "build": {"workers": 0}}))
    return str(path)


def _argv(w: dict[str, Path], tmp: Path, command: str, flag: str, value: str) -> list[str]:
    """The command line of ``command`` with ``flag`` set to ``value`` (its other outputs in
    fresh places under ``tmp``)."""
    if command == "build":
        return ["build", "--base", str(w["base"]), "--aligned", str(w["aligned"]), "--out",
                value, "--workers", "0"]
    if command == "sanitize":
        return ["sanitize", "--alignment", str(w["set"]), "--adapters", str(w["cat"]),
                "--out", value, "--threshold", "0.35", "--workers", "0"]
    if command == "project-model":
        outs = {"--out": str(tmp / "pm"), "--reports": str(tmp / "pm-reports"), flag: value}
        return ["project-model", "--alignment", str(w["set"]), "--aligned", str(w["aligned"]),
                "--finetuned", str(w["ft"]), "--threshold", "0.35", "--workers", "0",
                *(x for f, v in outs.items() for x in (f, v))]
    if command == "salora-modules":
        outs = {"--out": str(tmp / "sm"), "--export-cs": str(tmp / "sm-cs.safetensors"),
                flag: value}
        return ["salora-modules", "--model", str(w["aligned"]), "--calibration", str(w["cal"]),
                "--safety-rank", str(RANK), "--workers", "0",
                *(x for f, v in outs.items() for x in (f, v))]
    if command == "salora-export":
        return ["salora-export", "--alignment", str(w["sset"]), "--out", value]
    if command == "nightly":
        roots = {"output_root": str(tmp / "n-out"), "alignment_root": str(tmp / "n-sets"),
                 flag: value}
        return ["nightly", "--config", _nightly_yaml(w, tmp, **roots)]
    assert command == "demo"
    return ["demo", "--dir", value, "--workers", "0"]


#: Every command × every flag that writes; whether it writes one file (else a folder).
FLAGS = [("build", "--out", False), ("sanitize", "--out", False),
         ("project-model", "--out", False), ("project-model", "--reports", False),
         ("salora-modules", "--out", False), ("salora-modules", "--export-cs", True),
         ("salora-export", "--out", True), ("nightly", "output_root", False),
         ("nightly", "alignment_root", False), ("demo", "--dir", False)]


def _places(w: dict[str, Path], command: str, flag: str) -> dict[str, Path]:
    """For each case, where the flag points: a file of an input, a new place inside one."""
    files = {"build": _first(w["aligned"], "model*.safetensors"),
             "sanitize": _first(w["cat"], "adapter_model.safetensors"),
             "project-model": _first(w["ft"] if flag == "--out" else w["set"], "*.safetensors"),
             "salora-modules": (_first(w["aligned"], "model*.safetensors")
                                if flag == "--export-cs" else w["cal"]),
             "salora-export": _first(w["sset"], "*.safetensors"),
             "nightly": (_first(w["cat"], "adapter_model.safetensors") if flag == "output_root"
                         else _first(w["base"], "config.json"))}
    inside = {"build": w["base"] / "set", "sanitize": w["set"] / "out",
              "project-model": (w["aligned"] / "proj" if flag == "--out" else w["ft"] / "rep"),
              "salora-modules": (w["aligned"] / "cs.safetensors" if flag == "--export-cs"
                                 else w["aligned"] / "sset"),
              "salora-export": w["sset"] / "cs.safetensors",
              "nightly": w["cat"] / "t0" / ("out" if flag == "output_root" else "sets")}
    return ({"an input file": files[command], "inside an input": inside[command]}
            if command in files else {})


CASES = [(c, f, is_file, case) for c, f, is_file in FLAGS
         for case in ("an input file", "inside an input", "an existing file")
         if c != "demo" or case == "an existing file"]


_CASE_IDS = {"an input file": "input-file", "inside an input": "inside-input",
             "an existing file": "existing-file"}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


@pytest.mark.parametrize(("command", "flag", "is_file", "case"), CASES,
                         ids=[f"{c}-{f.lstrip('-')}-{_CASE_IDS[k]}" for c, f, _, k in CASES])
def test_every_writing_flag_is_refused_over_an_input_or_a_file(world, tmp_path, capsys,
                                                               command, flag, is_file, case):
    existing = tmp_path / ("existing.safetensors" if is_file else "existing")
    existing.write_bytes(b"not written by safelora-ray")
    where = existing if case == "an existing file" else _places(world, command, flag)[case]
    before = _digest(world["root"])
    code = cli_main([*_argv(world, tmp_path, command, flag, str(where)), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1 and flag in lines[0], err
    assert "Traceback" not in err
    assert _digest(world["root"]) == before  # no input changed
    assert existing.read_bytes() == b"not written by safelora-ray"
    assert not (case == "inside an input" and where.exists())  # nothing created in an input


def test_force_replaces_an_existing_file_that_is_no_input(world, tmp_path, capsys):
    before = _digest(world["root"])
    for command, flag in (("salora-export", "--out"), ("salora-modules", "--export-cs")):
        existing = tmp_path / f"{command}.safetensors"
        existing.write_bytes(b"not written by safelora-ray")
        argv = [*_argv(world, tmp_path, command, flag, str(existing)), "--no-progress"]
        assert cli_main(argv) == 2
        assert "--force" in capsys.readouterr().err
        assert cli_main([*argv, "--force"]) == 0, capsys.readouterr().err
        assert exported_from(str(existing)) is not None  # now the export
        # Its own export of the same set is replaced on a rerun without --force.
        assert cli_main(argv) == 0, capsys.readouterr().err
    # --force never lets a flag write over an input, nor a folder over a file.
    (tmp_path / "file").write_text("x")
    for command, flag in (("sanitize", "--out"), ("salora-export", "--out"),
                          ("salora-modules", "--export-cs")):
        places = [*_places(world, command, flag).values(), tmp_path / "file"]
        for where in places[:2 if flag == "--export-cs" or command == "salora-export" else 3]:
            argv = _argv(world, tmp_path, command, flag, str(where))
            assert cli_main([*argv, "--no-progress", "--force"]) == 2, where
            capsys.readouterr()
    assert _digest(world["root"]) == before


def test_the_python_api_applies_the_same_rule(world, tmp_path):
    shard = _first(world["sset"], "*.safetensors")
    before = _digest(world["root"])
    with pytest.raises(ConfigError, match=r"--out .* lies inside --alignment"):
        export_cs(str(world["sset"]), str(shard))
    with pytest.raises(ConfigError, match=r"--export-cs .* lies inside --model"):
        SaloraConfig(model=str(world["aligned"]), calibration=str(world["cal"]),
                     out=str(tmp_path / "s"),
                     export_cs=str(_first(world["aligned"], "model*.safetensors")))
    with pytest.raises(ConfigError, match=r"--export-cs .* lies inside --out"):
        SaloraConfig(model=str(world["aligned"]), calibration=str(world["cal"]),
                     out=str(tmp_path / "s"), export_cs=str(tmp_path / "s" / "cs.safetensors"))
    with pytest.raises(ConfigError, match=r"--reports .* lies inside --finetuned"):
        FinetuneConfig(alignment=str(world["set"]), aligned=str(world["aligned"]),
                       finetuned=str(world["ft"]), out=str(tmp_path / "o"),
                       reports=str(world["ft"] / "r"), threshold=0.35)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--out .* is an existing file"):
        SanitizeConfig(alignment=str(world["set"]), adapters=str(world["cat"]),
                       out=str(tmp_path / "f"), threshold=0.35)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        BuildConfig(base=str(world["base"]), aligned=str(world["aligned"]),
                    out=str(tmp_path / "f" / "set"))
    assert _digest(world["root"]) == before


# ---------------------------------------------------------------------------------------------
# An unwritable output is found before any work
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _unprivileged() -> list[str]:
    """A prefix that runs a command without the capabilities that let root ignore file
    modes (nothing needed when the tests do not run as root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder unwritable")
    return _DROP


def _cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*_unprivileged(), sys.executable, "-m", "safelora_ray", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


#: The commands whose --out is made read-only; the folder given is the read-only one itself
#: (exists) or a new folder in it (its parent is read-only).
READ_ONLY = [("sanitize", "--out", ""), ("build", "--out", "set"),
             ("project-model", "--out", ""), ("project-model", "--reports", "rep"),
             ("salora-modules", "--out", "sm"), ("salora-modules", "--export-cs",
                                                 "cs.safetensors"),
             ("salora-export", "--out", "cs.safetensors"), ("nightly", "output_root", ""),
             ("demo", "--dir", "demo")]


@pytest.mark.parametrize(("command", "flag", "sub"), READ_ONLY,
                         ids=[f"{c}-{f.lstrip('-')}" for c, f, _ in READ_ONLY])
def test_a_read_only_output_is_refused_before_any_work(world, tmp_path, command, flag, sub):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    where = ro / sub if sub else ro
    argv = [*_argv(world, tmp_path, command, flag, str(where)), "--no-progress"]
    if command not in ("salora-export", "nightly", "demo"):
        # Were the check made after the workers were resolved, this address would fail it.
        argv = [a if a != "0" or argv[i - 1] != "--workers" else "1"
                for i, a in enumerate(argv)] + ["--ray-address", f"127.0.0.1:{_free_port()}"]
    try:
        t0 = time.monotonic()
        proc = _cli(argv)
        elapsed = time.monotonic() - t0
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert flag in lines[0] and "is not writable" in lines[0] and str(ro) in lines[0]
    assert "Traceback" not in proc.stderr
    assert list(ro.iterdir()) == []  # nothing written
    assert elapsed < 60


def test_an_unreadable_folder_is_said_in_one_line(world, tmp_path):
    folder = tmp_path / "locked"
    shutil.copytree(world["cat"], folder)
    folder.chmod(0)
    try:
        proc = _cli(["inspect", str(folder)])
    finally:
        folder.chmod(stat.S_IRWXU)
    assert proc.returncode == 1, proc.stderr
    assert _error_lines(proc.stderr) == [f"safelora-ray inspect: error: cannot read {folder}: "
                                         "Permission denied"]


@pytest.fixture
def read_only_prefix(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Writes under ``s3://<bucket>/ro`` are answered 403 AccessDenied."""
    schedule = FaultSchedule(max_faults=0, deny_prefixes=(f"{s3_bucket}/ro",),
                             deny_methods=frozenset({"PUT", "POST", "DELETE"}))
    with S3FaultProxy(s3_server, schedule) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield proxy


@pytest.mark.parametrize(("command", "flag", "sub"), READ_ONLY[:-1],
                         ids=[f"{c}-{f.lstrip('-')}" for c, f, _ in READ_ONLY[:-1]])
def test_an_s3_output_denied_is_refused_before_any_work(world, tmp_path, capsys, s3_bucket,
                                                        s3_admin_client, read_only_prefix,
                                                        command, flag, sub):
    where = f"s3://{s3_bucket}/ro" + (f"/{sub}" if sub else "")
    argv = [*_argv(world, tmp_path, command, flag, where), "--no-progress"]
    if command not in ("salora-export", "nightly"):
        argv = [a if a != "0" or argv[i - 1] != "--workers" else "1"
                for i, a in enumerate(argv)] + ["--ray-address", f"127.0.0.1:{_free_port()}"]
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = _error_lines(err)
    assert len(lines) == 1 and flag in lines[0] and "is not writable" in lines[0], err
    assert "access denied" in lines[0] and "Traceback" not in err
    assert read_only_prefix.stats.denied >= 1
    listed = s3_admin_client.list_objects_v2(Bucket=s3_bucket, Prefix="ro/")
    assert listed.get("KeyCount", 0) == 0  # nothing written


# ---------------------------------------------------------------------------------------------
# No OSError or S3 error reaches the user as a traceback
# ---------------------------------------------------------------------------------------------


def test_os_and_s3_errors_are_one_line_and_programming_errors_are_not_hidden(monkeypatch,
                                                                             capsys):
    import botocore.exceptions

    import safelora_ray.cli.inspection as inspection

    raised: list[BaseException] = [
        PermissionError(13, "Permission denied", "/data/out/_reports"),
        botocore.exceptions.ClientError(
            {"Error": {"Code": "AccessDenied", "Message": "Access Denied",
                       "BucketName": "fleet"}}, "PutObject"),
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")]
    expected = ["Permission denied: /data/out/_reports",
                "S3 PutObject failed on bucket fleet: AccessDenied Access Denied",
                "S3 request failed: EndpointConnectionError"]

    def fail(uri: str, **kw: Any) -> Any:
        raise raised.pop(0)

    monkeypatch.setattr(inspection, "describe", fail)
    for want in expected:
        assert cli_main(["inspect", "/data/out"]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and want in err, err
    monkeypatch.setattr(inspection, "describe", lambda uri, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as a storage error
        cli_main(["inspect", "/data/out"])
