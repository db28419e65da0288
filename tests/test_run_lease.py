"""One live driver per run: the lease under the run's prefix, on a local disk and on S3 (moto's
server, directly and behind the fault proxy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from s3_faults import FaultPlan, FaultProxy, fault_total

from pipeline import storage
from pipeline.labeling import lease as run_lease
from pipeline.labeling.lease import LEASE, LeaseHeld, LeaseLost


def _record(path) -> dict:
    return json.loads(open(path).read()) if isinstance(path, (str, os.PathLike)) else path


def test_second_driver_is_refused_with_the_holder_named_then_release_frees_the_run(tmp_path):
    run_dir = str(tmp_path / "run")
    first = run_lease.take(run_dir, None, ttl_s=60)
    try:
        with pytest.raises(LeaseHeld) as e:
            run_lease.take(run_dir, None, ttl_s=60)
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and "expires in" in msg and "lease_ttl_s = 60" in msg
    finally:
        first.release()
    second = run_lease.take(run_dir, None, ttl_s=60)  # released: free at once
    assert second.taken_over is not None and second.taken_over.get("released") is True
    assert second.took_over is None  # released, not abandoned: no takeover to report
    second.release()


def test_racing_drivers_exactly_one_wins(tmp_path):
    run_dir = str(tmp_path / "run")
    won, refused = [], []
    start = threading.Barrier(6)

    def race():
        start.wait()
        try:
            won.append(run_lease.take(run_dir, None, ttl_s=60))
        except LeaseHeld:
            refused.append(1)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    won[0].release()


def test_expired_lease_of_another_machine_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = {
        "token": "old",
        "holder": {"host": "gpu-node-7", "pid": 1234, "boot_id": "x"},
        "acquired_at": time.time() - 500,
        "renewed_at": time.time() - 200,
        "expires_at": time.time() - 80,
        "ttl_s": 120,
    }
    (run_dir / LEASE).write_text(json.dumps(stale))
    lease = run_lease.take(str(run_dir), None, ttl_s=30)
    assert lease.taken_over["holder"]["host"] == "gpu-node-7" and lease.took_over is lease.taken_over
    assert _record(run_dir / LEASE)["token"] == lease.token
    lease.release()
    # Not yet expired, on another machine: refused, whatever its pid.
    (run_dir / LEASE).write_text(json.dumps({**stale, "expires_at": time.time() + 100}))
    with pytest.raises(LeaseHeld, match="gpu-node-7"):
        run_lease.take(str(run_dir), None, ttl_s=30)


def test_lease_of_a_killed_driver_on_this_machine_is_taken_over_at_once(tmp_path):
    """A SIGKILLed driver never releases its lease; on the same machine its death is visible, so
    the next driver does not wait out the ttl."""
    run_dir = str(tmp_path / "run")
    script = (
        "import sys, time; from pipeline.labeling import lease; "
        f"lease.take({run_dir!r}, None, ttl_s=3600); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):  # alive: refused
            run_lease.take(run_dir, None, ttl_s=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lease = run_lease.take(run_dir, None, ttl_s=60)
    assert lease.taken_over["holder"]["pid"] == proc.pid and lease.taken_over["expires_at"] > time.time() + 3000
    lease.release()


def test_heartbeat_renews_and_a_taken_over_lease_stops_its_old_holder(tmp_path):
    run_dir = str(tmp_path / "run")
    lease = run_lease.take(run_dir, None, ttl_s=0.8)  # renewed every 0.2 s
    path = os.path.join(run_dir, LEASE)
    first = _record(path)["expires_at"]
    time.sleep(1.2)  # longer than the ttl: only renewals keep it
    assert _record(path)["expires_at"] > first and lease.renewals >= 2
    lease.ensure_held()
    # Another driver replaces the record (as a takeover after a partition would).
    st = storage.store(path)
    data, tag = st.read_versioned(path)
    other = {**json.loads(data), "token": "intruder", "expires_at": time.time() + 60}
    assert st.replace_if(path, json.dumps(other).encode(), tag)
    time.sleep(0.5)
    with pytest.raises(LeaseLost, match="taken over"):
        lease.ensure_held()
    lease.release()  # never touches the intruder's record
    assert _record(path)["token"] == "intruder"


def test_store_without_conditional_writes_is_refused_unless_the_lease_is_off():
    with pytest.raises(storage.UnsupportedStore, match="lease_ttl_s: null"):
        run_lease.take("memory://runs/r1", None, ttl_s=60)


def test_lease_on_s3_refuses_a_second_driver_and_survives_faults(s3_server):
    bucket = s3_server.make_bucket("lease")
    so = s3_server.storage_options
    run_dir = f"{bucket}/runs/r1"
    first = run_lease.take(run_dir, so, ttl_s=60)
    with pytest.raises(LeaseHeld, match="another driver"):
        run_lease.take(run_dir, so, ttl_s=60)
    first.release()
    # Behind a proxy that resets connections after the server applied the write, so a retried
    # conditional write is refused by the server: the lease must still be recognised as ours.
    with FaultProxy(s3_server.endpoint_url, FaultPlan(rate=0.5, kinds=("reset",), classes=("write",), seed=3)) as p:
        faulty = {**so, "endpoint_url": p.url}
        taken = []
        for i in range(6):
            lease = run_lease.take(f"{bucket}/runs/f{i}", faulty, ttl_s=60)
            lease.renew()
            lease.ensure_held()
            taken.append(lease)
            with pytest.raises(LeaseHeld):
                run_lease.take(f"{bucket}/runs/f{i}", faulty, ttl_s=60)
        for lease in taken:
            lease.release()
        assert fault_total(p.counts(), "reset", "write") >= 3  # the faults landed
