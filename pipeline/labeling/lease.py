"""One live driver per run: a lease object under the run's prefix (`<run_dir>/_lease.json`).

A driver takes the lease before it touches the run (resume cleanup, writes, markers) and keeps
it while it runs: a heartbeat thread renews it every `ttl_s / 4` seconds. Every write of the lease
is a conditional write (`Store.create_exclusive` when there is none, `Store.replace_if` on the
version last seen), so two drivers racing for it cannot both win. A second driver on the run
while the holder renews is refused (`LeaseHeld`, naming the holder and when the lease expires).
A holder that stops renewing (SIGKILLed, its machine gone) blocks the run for at most `ttl_s`:
then the next driver takes the lease over; at once when the holder ran on the same machine and its
process is gone (drivers of `ray job submit` all run on the head, and so do a laptop's). A driver
that ends, well or badly, releases it by marking it expired, so a resubmission starts at once.

The holder checks that it still holds the lease before each commit (`ensure_held`): a driver that
could not renew in time (a long network partition) stops committing rather than racing the
driver that took over. Clocks of the machines involved are assumed to agree to within a few
seconds (NTP); the expiry compares one machine's clock with another's.

Stores without conditional writes (other than S3 and local disks) cannot offer this: the job
refuses them unless the run is configured without a lease (`lease_ttl_s: null`), the documented
weaker mode in which the operator guarantees one driver per run id.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from pipeline import storage

LEASE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another live driver holds the run."""


class LeaseLost(RuntimeError):
    """This driver's lease expired or was taken over: it must stop committing."""


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_identity() -> dict:
    """Who holds a lease: enough for an operator to find the process (and the Ray job), and for a
    driver on the same machine to see that the holder is gone."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "pid_started": _start_time(pid),
        "ray_job_submission_id": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID"),
    }


def holder_is_gone(record: dict) -> bool:
    """True only when the holder ran on this machine (same host, same boot) and its process no
    longer exists: a SIGKILLed driver, as when `ray job submit` drivers (all on the head) are
    resubmitted, or a laptop run is started again. A holder elsewhere is judged by expiry alone."""
    h = record.get("holder") or {}
    me = holder_identity()
    if not h.get("pid") or h.get("host") != me["host"] or not me["boot_id"] or h.get("boot_id") != me["boot_id"]:
        return False
    if h["pid"] == me["pid"]:
        return False
    started = _start_time(int(h["pid"]))
    return started is None or started != h.get("pid_started")


def describe(record: dict, now: float) -> str:
    h = record.get("holder", {})
    job = f", Ray job {h['ray_job_submission_id']}" if h.get("ray_job_submission_id") else ""
    left = record.get("expires_at", 0) - now
    return (
        f"driver pid {h.get('pid')} on {h.get('host')}{job}, holding it since "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(record.get('acquired_at', 0)))}; "
        f"its lease expires in {max(left, 0):.0f}s unless renewed"
    )


@dataclass
class RunLease:
    uri: str
    store: storage.Store
    path: str
    ttl_s: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    record: dict = field(default_factory=dict)
    tag: str | None = None  # version of our last write
    taken_over: dict | None = None  # the expired record we replaced, if any
    renewals: int = 0
    _lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- taking and keeping it ---------------------------------------------------------

    def _new_record(self, now: float, acquired_at: float | None = None) -> dict:
        return {
            "token": self.token,
            "holder": holder_identity(),
            "acquired_at": acquired_at if acquired_at is not None else now,
            "renewed_at": now,
            "expires_at": now + self.ttl_s,
            "ttl_s": self.ttl_s,
            "renewals": self.renewals,
        }

    def _read(self) -> tuple[dict, str] | None:
        got = self.store.read_versioned(self.path)
        if got is None:
            return None
        data, tag = got
        try:
            return json.loads(data), tag
        except ValueError:  # a foreign or damaged object: treat as expired, replace it conditionally
            return {"expires_at": 0}, tag

    def _ours_now(self, record: dict) -> bool:
        """After an ambiguous write: did it land? (Its token is ours and it is the record we wrote.)"""
        got = self._read()
        if got is not None and got[0].get("token") == self.token and got[0].get("renewed_at") == record["renewed_at"]:
            self.tag = got[1]
            return True
        return False

    def acquire(self) -> RunLease:
        for _ in range(10):
            now = time.time()
            current = self._read()
            if current is None:
                record = self._new_record(now)
                tag = self.store.create_exclusive(self.path, json.dumps(record).encode())
                if tag is not None or self._ours_now(record):
                    self.record, self.tag = record, tag or self.tag
                    return self
                continue  # someone created it first: look again
            held, tag = current
            if held.get("expires_at", 0) > now and not holder_is_gone(held):
                raise LeaseHeld(
                    f"run {os.path.dirname(self.uri)} is being labeled by another driver ({describe(held, now)}). "
                    f"A second driver on the same run id would write the same shards twice: wait for it to "
                    f"finish, or stop it (`ray job stop <id>`); a driver that was killed blocks the run for at "
                    f"most lease_ttl_s = {held.get('ttl_s')}s"
                )
            record = self._new_record(now)
            new_tag = self.store.replace_if(self.path, json.dumps(record).encode(), tag)
            if new_tag is not None or self._ours_now(record):
                self.record, self.taken_over, self.tag = record, held, new_tag or self.tag
                return self
        raise LeaseHeld(f"could not take the lease {self.uri}: other drivers keep changing it")

    @property
    def took_over(self) -> dict | None:
        """The record of a driver that stopped renewing the lease, when this driver replaced one;
        None for a fresh lease or one its holder released at the end of its run."""
        if self.taken_over is None or self.taken_over.get("released"):
            return None
        return self.taken_over

    def renew(self) -> None:
        with self._lock:
            if self._lost:
                return
            now = time.time()
            if now > self.record["expires_at"]:
                self._lost = f"not renewed for {now - self.record['renewed_at']:.0f}s (ttl {self.ttl_s}s)"
                return
            self.renewals += 1
            record = self._new_record(now, self.record["acquired_at"])
            assert self.tag is not None
            new_tag = self.store.replace_if(self.path, json.dumps(record).encode(), self.tag)
            if new_tag is not None or self._ours_now(record):
                self.record, self.tag = record, new_tag or self.tag
                return
            got = self._read()
            who = describe(got[0], now) if got else "nobody (it was deleted)"
            self._lost = f"taken over by {who}"

    def start_heartbeat(self) -> RunLease:
        def beat():
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                except Exception:  # noqa: BLE001 - a store hiccup: try again at the next beat
                    if time.time() > self.record["expires_at"]:
                        with self._lock:
                            self._lost = self._lost or "the store could not be reached to renew it"
                if self._lost:
                    return

        self._thread = threading.Thread(target=beat, name="armolabel-lease", daemon=True)
        self._thread.start()
        return self

    def ensure_held(self) -> None:
        """Raise LeaseLost unless this driver still holds the lease (called before each commit)."""
        with self._lock:
            lost = self._lost or (
                f"not renewed for {time.time() - self.record['renewed_at']:.0f}s"
                if time.time() > self.record["expires_at"]
                else None
            )
        if lost:
            raise LeaseLost(f"this driver no longer holds the run's lease ({lost}); it stops without committing more")

    def release(self) -> None:
        """Mark the lease expired (conditionally: never someone else's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self._lost or self.tag is None:
                return
            now = time.time()
            record = {**self.record, "renewed_at": now, "expires_at": now, "released": True}
            try:
                self.store.replace_if(self.path, json.dumps(record).encode(), self.tag)
            except Exception:  # noqa: BLE001 - it expires by itself after ttl_s
                pass


def take(run_dir: str, storage_options: dict | None, ttl_s: float) -> RunLease:
    """Take the run's lease (LeaseHeld when a live driver has it) and start its heartbeat."""
    uri = storage.join(run_dir, LEASE)
    st = storage.store(uri, storage_options)
    if not st.conditional_writes:
        raise storage.UnsupportedStore(
            f"{st.protocol}:// stores have no conditional writes, so a second driver on one run id could not be "
            f"refused: use s3:// or a local path for the output, or set lease_ttl_s: null to run without a lease "
            f"(then never start two drivers on one run id)"
        )
    _, path = storage.filesystem(uri, storage_options)
    if st.protocol == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return RunLease(uri, st, path, ttl_s).acquire().start_heartbeat()
