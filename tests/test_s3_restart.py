"""The S3 server restarted in the middle of a sanitize over S3 (issue 23, part 3).

A private SeaweedFS (not the session's: the restart would disturb every other test) is
killed and started again on the same ports and data while a sanitize s3:// -> s3:// runs in
this process. Every request in flight or made while it is down must be retried until the
server is back, or fail its adapter alone with a clear error; nothing partial is visible at
the output, the ledger records exactly the adapters whose outputs are there, and running the
same command again completes every adapter with outputs equal to a clean run's.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from safelora_ray.pipelines.sanitize import worker as sanitize_worker
from safelora_ray.pipelines.sanitize.driver import SanitizeResult
from safelora_ray.storage import s3_outage
from tests.s3_fault_proxy import wait_for
from tests.seaweedfs import SeaweedFS
from tests.test_faults import _catalog, _objects, _upload
from tests.test_reliability import make_world, run_sanitize

N = 96
_OUT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    with SeaweedFS(tmp_path / "seaweedfs") as srv:
        for k, v in srv.env().items():
            monkeypatch.setenv(k, v)
        yield srv


def _ledger_keys(objects: dict[str, bytes]) -> set[str]:
    return {k for k in objects if k.startswith("_ledger/")}


def _adapter_outputs(objects: dict[str, bytes], ids: list[str]) -> dict[str, dict[str, bytes]]:
    return {i: {n: objects[f"{i}/{n}"] for n in _OUT_FILES if f"{i}/{n}" in objects}
            for i in ids}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ride_out", [True, False], ids=["ride-out", "outage-longer-than-window"])
def test_s3_server_restarted_mid_sanitize(tmp_path: Path, server: SeaweedFS, ride_out: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``ride-out``: the restart (2 s down, then SeaweedFS's own start) is inside the outage
    window, so every request is retried and every adapter is ok. ``botocore-only``: the
    window is off and the server stays down 8 s, longer than botocore's retries last: the
    adapters whose requests ran out of retries fail alone, cleanly, and the rerun does them."""
    if not ride_out:  # a window shorter than the outage: requests that meet it early fail
        monkeypatch.setattr(s3_outage, "OUTAGE_S", 3.0)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    # Small adapters are read and written on the 8 I/O threads too: 8 requests at a time share
    # the client (and botocore's retry quota), as a fleet of bigger adapters does.
    monkeypatch.setattr(sanitize_worker, "IO_THREADS_MIN_BYTES", 0)
    s3 = server.client()
    bucket = "restart-mid-run"
    s3.create_bucket(Bucket=bucket)
    world = make_world(tmp_path / "world", workers=0)
    ids = _catalog(tmp_path / "catalog", world, N)
    _upload(s3, bucket, "set", Path(world.alignment))
    _upload(s3, bucket, "tenants", tmp_path / "catalog")
    b = f"s3://{bucket}"
    kw: dict[str, Any] = {"workers": 0, "batch_size": 8}

    clean = run_sanitize(f"{b}/set", f"{b}/tenants", f"{b}/out-clean",  # type: ignore[arg-type]
                         run_id="clean", **kw)
    assert (clean.ok, clean.error) == (N, 0), clean.errors
    want = _adapter_outputs(_objects(s3, bucket, "out-clean"), ids)

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["res"] = run_sanitize(f"{b}/set", f"{b}/tenants",
                                      f"{b}/out", run_id="restart", **kw)  # type: ignore[arg-type]
        except BaseException as exc:  # reported by the assert below
            box["exc"] = exc

    def done_count() -> int:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/_ledger/")
        return sum(len(p.get("Contents", ())) for p in pages)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    assert wait_for(lambda: done_count() >= N // 8 or not th.is_alive(), timeout=120)
    restarted_at = done_count()
    t0 = time.monotonic()
    server.stop()
    running_at_kill = th.is_alive()
    time.sleep(2.0)
    server.start()
    down_s = time.monotonic() - t0
    th.join(timeout=200)
    assert not th.is_alive(), "the sanitize did not finish after the S3 server came back"
    assert "exc" not in box, repr(box.get("exc"))
    res: SanitizeResult = box["res"]
    # The restart landed mid-run: adapters were done before it and after it.
    assert running_at_kill and 0 < restarted_at < N, restarted_at
    assert res.ok + res.error == N
    assert (res.error == 0) if ride_out else (res.error > 0), res.errors
    for adapter_id, message in res.errors:  # an adapter that failed did so alone, clearly
        assert adapter_id in ids and "\n" not in message and "Traceback" not in message
    got = _objects(s3, bucket, "out")
    outs = _adapter_outputs(got, ids)
    ledger = _ledger_keys(got)
    failed = {a for a, _ in res.errors}
    for adapter_id in ids:
        if adapter_id in failed:
            # An object store has no rename: the marker (adapter_config.json) is put last, so
            # a failed adapter is either not a visible adapter (its weights may be there) or,
            # when only its ledger record failed, whole and right. It has no ledger record
            # either way: the rerun writes it again.
            if "adapter_config.json" in outs[adapter_id]:
                assert outs[adapter_id] == want[adapter_id], adapter_id
            assert f"_ledger/{adapter_id}.json" not in ledger, adapter_id
        else:
            assert outs[adapter_id] == want[adapter_id], adapter_id
    assert ledger == {f"_ledger/{a}.json" for a in ids if a not in failed}
    assert not [k for k in got if ".tmp" in k or "/_tmp" in k]

    rerun = run_sanitize(f"{b}/set", f"{b}/tenants", f"{b}/out",  # type: ignore[arg-type]
                         run_id="rerun", **kw)
    assert (rerun.ok + rerun.skipped, rerun.error) == (N, 0), rerun.errors
    assert rerun.ok == res.error
    assert _adapter_outputs(_objects(s3, bucket, "out"), ids) == want
    print(f"restart after {restarted_at}/{N} adapters, server down {down_s:.1f} s; "
          f"run: {res.ok} ok, {res.error} failed in {res.duration_s:.1f} s; "
          f"rerun: {rerun.ok} ok, {rerun.skipped} skipped; errors: {res.errors[:2]}")


def test_outage_handler_rides_out_only_an_endpoint_that_answered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler's decisions, without a server: a never-answered endpoint (a typo) is left
    to botocore's ordinary retries; one that answered is retried until the window closes."""
    import botocore.exceptions

    class _Endpoint:
        host = "http://127.0.0.1:1"

    class _Http:
        def __init__(self, status: int) -> None:
            self.status_code = status

    monkeypatch.setattr(s3_outage, "_answered", set())
    monkeypatch.setattr(s3_outage, "OUTAGE_S", 30.0)
    refused = botocore.exceptions.EndpointConnectionError(endpoint_url=_Endpoint.host)
    req: dict[str, Any] = {"context": {}}
    call = s3_outage._needs_retry
    assert call(endpoint=_Endpoint(), caught_exception=refused, request_dict=req) is None
    assert call(response=(_Http(404), {}), endpoint=_Endpoint(), request_dict={}) is None
    for attempt in range(1, 20):  # now it has answered: retried, each wait at most 2 s
        delay = call(endpoint=_Endpoint(), attempts=attempt, caught_exception=refused,
                     request_dict=req)
        assert delay is not None and 0 < delay <= 2.0
    assert call(response=(_Http(503), {}), endpoint=_Endpoint(), request_dict={}) is not None
    assert call(response=(_Http(403), {}), endpoint=_Endpoint(), request_dict={}) is None
    req["context"]["safelora_first_failure"] -= 31.0  # the window has closed for this request
    assert call(endpoint=_Endpoint(), caught_exception=refused, request_dict=req) is None


@pytest.mark.timeout(120)
def test_restart_keeps_ports_and_data(server: SeaweedFS) -> None:
    """The launcher's restart(): same endpoint, every object back at once (no client retry),
    writes and new buckets accepted: the master's volume layout is there when start() returns."""
    s3 = server.client()
    s3.create_bucket(Bucket="before-restart")
    body = {f"k{i}": bytes([i]) * (1000 * i + 1) for i in range(20)}
    for k, v in body.items():
        s3.put_object(Bucket="before-restart", Key=k, Body=v)
    endpoint, pid = server.endpoint, server.pid
    server.restart(down_s=0.5)
    assert server.endpoint == endpoint and server.pid != pid
    once = server.client(retries={"mode": "standard", "max_attempts": 0})
    for k, v in body.items():
        assert once.get_object(Bucket="before-restart", Key=k)["Body"].read() == v
    once.put_object(Bucket="before-restart", Key="after", Body=b"x")
    once.create_bucket(Bucket="after-restart")
    once.put_object(Bucket="after-restart", Key="a", Body=b"y")


def test_the_usual_aws_retry_settings_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` apply (a client's own config would override
    them); unset: standard mode, 10 retries; a bad value is one clear error."""
    from safelora_ray.core.errors import SafeLoraError
    from safelora_ray.storage import s3

    for var in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert s3._retries() == {"mode": "standard", "max_attempts": 10}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert s3._retries() == {"mode": "adaptive", "total_max_attempts": 3}
    assert s3.S3Storage("some-bucket").client.meta.config.retries["total_max_attempts"] == 3
    for var, bad in (("AWS_MAX_ATTEMPTS", "many"), ("AWS_MAX_ATTEMPTS", "0"),
                     ("AWS_RETRY_MODE", "eager")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(SafeLoraError, match=var):
            s3._retries()
        monkeypatch.setenv(var, "3" if var == "AWS_MAX_ATTEMPTS" else "standard")
