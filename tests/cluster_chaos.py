"""The labeling job where it really runs, under the faults a cluster and S3 bring.

A head started with `ray start --head` (token auth on) and worker nodes started with
`ray start --address` (each its own raylet, object store and process group, one `scorer`
resource each standing in for a GPU). Input and output live on moto's S3 server behind the
fault-injecting proxy (tests/s3_faults.py). The job is submitted through `jobs.schedule`, as the
crontab does. While it runs, worker nodes are lost whole (SIGKILL to the node's process group:
raylet, object store, workers and agents at once) and replaced, a second driver is started on
the same run id, and a share of the S3 requests fail. A run that fails is resubmitted with
`jobs.schedule --resubmit-failed`, as an operator would. Then the output is checked against the
pure reader's expected units: none lost, none duplicated, the manifest reconciling.

Used by tests/test_cluster_chaos.py (one slow test) and bench/bench_chaos.py (the figures).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml
from ray_fixtures import RAY_CLI, RayHead
from s3_faults import FaultPlan, FaultProxy

REPO = Path(__file__).resolve().parents[1]
SCORER = "scorer"
ROWS_PER_SHARD = 4
UNITS_PER_CALL = 8


# ---- worker nodes of separate processes ----------------------------------------------------


@dataclass
class WorkerNode:
    sid: int  # `ray start` ran in a session of its own; the node's processes all belong to it
    started_at: float  # (workers get process groups of their own, but stay in the session)
    node_id: str  # as Ray names it (what the markers' scored_on counts units by)

    def processes(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(p.pid) == self.sid:
                    out.append(p)
        return out

    def titles(self) -> list[str]:
        out = []
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                out.append(" ".join(p.cmdline()))
        return out

    def hosts_scoring_actor(self) -> bool:
        return any(_is_scoring_actor(t) for t in self.titles())

    def kill(self) -> list[str]:
        """Lose the node whole: SIGKILL to raylet, object store, workers and agents at once."""
        procs = self.processes()
        titles = self.titles()
        for p in procs:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        return titles


def _is_scoring_actor(title: str) -> bool:
    # Ray titles an actor's process after its class: Ray Data's pool of our stage actors.
    return "MapWorker" in title and ("_StageActor" in title or "EmbedScore" in title)


_NODE_START = threading.Lock()  # one node joins at a time: the node that joined is the one started


def start_worker_node(head: RayHead, num_cpus: int = 1, object_store_mb: int = 128) -> WorkerNode:
    with _NODE_START:
        return _start_worker_node(head, num_cpus, object_store_mb)


def _start_worker_node(head: RayHead, num_cpus: int, object_store_mb: int) -> WorkerNode:
    # A temp dir of its own, as on a machine of its own: the node's sockets, logs, spilled objects
    # and runtime-env files (the job's working_dir unpacked) are not shared with the other nodes
    # on this host (by default a worker node uses the head's).
    temp_dir = Path(tempfile.mkdtemp(prefix="n", dir=head.temp_dir.parent))
    cmd = [
        RAY_CLI,
        "start",
        "--address",
        head.gcs_address,
        "--temp-dir",
        str(temp_dir),
        "--num-cpus",
        str(num_cpus),
        "--resources",
        json.dumps({SCORER: 1}),
        "--object-store-memory",
        str(object_store_mb * 2**20),
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
        "--disable-usage-stats",
    ]
    before = {n["node_id"] for n in alive_nodes(head)}
    proc = subprocess.Popen(
        cmd, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    out, _ = proc.communicate(timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start (worker) failed:\n{out[-3000:]}")
    if not any(temp_dir.glob("session_*")):
        raise RuntimeError(f"the worker node did not use its own temp dir {temp_dir}")
    # Nodes are started one at a time (the lock above), so the node that joined is this one.
    deadline = time.monotonic() + 60
    while not (new := {n["node_id"] for n in alive_nodes(head)} - before):
        if time.monotonic() > deadline:
            raise RuntimeError("the worker node started but never joined the cluster")
        time.sleep(0.5)
    return WorkerNode(sid=proc.pid, started_at=time.time(), node_id=new.pop())


def _state_api(head: RayHead, resource: str, limit: int) -> list[dict]:
    """One listing of the head's state API (`nodes`, `tasks`, ...), the token sent as a bearer header."""
    req = urllib.request.Request(
        f"{head.dashboard_url}/api/v0/{resource}?limit={limit}&detail=true",
        headers={"Authorization": f"Bearer {head.token}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"]["result"]["result"]


def alive_nodes(head: RayHead) -> list[dict]:
    """The cluster's live nodes."""
    return [n for n in _state_api(head, "nodes", 100) if n.get("state") == "ALIVE"]


SCORING_CALL = "MapWorker(MapBatches(_StageActor)).submit"  # Ray Data's task name for a call to our actors


def scoring_calls(head: RayHead) -> list[dict]:
    """Every attempt of every scoring call the cluster knows of (task id, attempt, state, node),
    from the head's state API: what the kills are timed and aimed by."""
    return [t for t in _state_api(head, "tasks", 10000) if t.get("name") == SCORING_CALL]


def calls_finished(calls: list[dict]) -> int:
    return len({t["task_id"] for t in calls if t.get("state") == "FINISHED"})


def nodes_scoring(calls: list[dict]) -> set[str]:
    return {t["node_id"] for t in calls if t.get("state") == "RUNNING" and t.get("node_id")}


# ---- the run -------------------------------------------------------------------------------


@dataclass
class ChaosPlan:
    kills: int = 3  # worker nodes lost (each replaced after replace_after_s)
    # Share of the run's scoring calls finished before each kill. Progress is counted in scoring
    # calls, not committed shards: scoring runs ahead of the writes, and a kill timed by commits
    # can land after the last call, on idle actors, with nothing left for a replacement to score.
    kill_at: tuple[float, ...] = (0.15, 0.45, 0.7)
    replace_after_s: float = 3.0
    fault_rate: float = 0.05  # share of S3 requests failed (slowdown, internal, reset, stall)
    stall_s: float = 6.0  # longer than the read timeout below: a stalled request times out
    overlapping_driver: bool = True
    seed: int = 0


@dataclass
class ChaosResult:
    run_id: str
    wall_s: float  # first submission -> the run complete (resubmissions included)
    attempts: list[dict]  # (submission id, status, message) of each labeling job
    overlap: dict | None  # the second driver: status and what it said
    kills: list[dict]  # what each kill hit
    faults: dict  # the proxy's counts
    manifest: dict
    expected: dict  # unit counts by the pure reader
    found: dict  # unit counts in the output
    markers: list[dict] = field(default_factory=list)
    first_nodes: list[str] = field(default_factory=list)  # node ids of the two nodes at submission


def s3_options(endpoint: str) -> dict:
    """What the job uses: the proxy's endpoint, and a read timeout short enough for stalls to
    time out (the retry policy's other settings are the defaults, pipeline.storage.S3_DEFAULTS)."""
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "config_kwargs": {"read_timeout": 4},
    }


def write_config(work: Path, bucket: str, inputs: list[dict], heads: str, endpoint: str, limit: int | None) -> Path:
    cfg = {
        "output": f"s3://{bucket}/runs",
        "inputs": inputs,
        "model": {
            "backbone": {"path": "smollm2"},
            "heads": heads,
            "template": {"system_prompt": "template_default", "max_tokens": 512, "overflow": "truncate_prompt"},
        },
        "resources": {
            "actors": [1, 2],  # keeps going on one node while the other is replaced
            "num_cpus_per_actor": 1,
            "custom_resources_per_actor": {SCORER: 1},
            "token_budget": 4096,
            "rows_per_shard": ROWS_PER_SHARD,
            "units_per_call": UNITS_PER_CALL,
            "cpus_per_cpu_task": 0.25,
        },
        "storage_options": s3_options(endpoint),
        "limit_rows_per_input": limit,
        "progress_interval_s": 5.0,
        "lease_ttl_s": 60,
        "stall_timeout_s": 420,
    }
    path = work / "chaos.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def schedule(head: RayHead, config: Path, job_name: str, *extra: str) -> dict:
    """`python -m jobs.schedule` as the crontab runs it (the token from the environment)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.schedule",
            "--address",
            head.dashboard_url,
            "--config",
            str(config),
            "--job-name",
            job_name,
            "--working-dir",
            str(REPO),
            *extra,
        ],
        cwd=REPO,
        env=head.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode not in (0, 3):
        raise RuntimeError(f"jobs.schedule failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout)


def wait_job(head: RayHead, submission_id: str, timeout_s: float = 1500, on_tick=None) -> tuple[str, str]:
    client = head.job_client()
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(submission_id)
        if str(info.status) in ("SUCCEEDED", "FAILED", "STOPPED"):
            return str(info.status), (info.message or "")
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            raise TimeoutError(f"{submission_id} still {info.status}:\n{client.get_job_logs(submission_id)[-5000:]}")
        if on_tick is not None:
            on_tick()
        time.sleep(1.0)


def expected_units(inputs: list[dict], direct_options: dict, limit: int | None) -> tuple[Counter, Counter, set[str]]:
    """(good unit ids, quarantined unit ids, shard ids) by the pure reader, straight from S3."""
    from pipeline.corpus import InputSpec, read_units

    good: Counter = Counter()
    bad: Counter = Counter()
    shards: set[str] = set()
    for spec in inputs:
        spec = InputSpec.from_dict({**spec, "storage_options": direct_options})
        t = read_units([spec], rows_per_shard=ROWS_PER_SHARD, limit_rows=limit)
        for uid, reason, sid in zip(
            t.column("unit_id").to_pylist(), t.column("quarantine_reason").to_pylist(), t.column("shard_id").to_pylist()
        ):
            (bad if reason else good)[uid] += 1
            shards.add(sid)
    return good, bad, shards


def read_outcome(run_dir: str, direct_options: dict) -> dict:
    """What a reader of the output sees: committed units (labeled and quarantined, counted with
    duplicates), everything a glob over data/ would read, and the markers."""
    import pyarrow.parquet as pq

    from pipeline import storage

    def units(files: list[str]) -> Counter:
        c: Counter = Counter()
        for uri in files:
            fs, path = storage.filesystem(uri, direct_options)
            with fs.open(path, "rb") as f:
                c.update(pq.read_table(f, columns=["unit_id"]).column("unit_id").to_pylist())
        return c

    data = storage.run_data_files(run_dir, direct_options)
    try:
        quarantine = storage.run_data_files(run_dir, direct_options, sub="quarantine")
    except FileNotFoundError:
        quarantine = []
    markers = [
        storage.read_json(u, direct_options)
        for u in storage.list_files(storage.join(run_dir, storage.SHARDS_DIR), direct_options)
    ]
    return {
        "labeled": units(data),
        "quarantined": units(quarantine),
        "glob_data_files": storage.parquet_files(storage.join(run_dir, "data"), direct_options),
        "committed_data_files": data,
        "markers": markers,
        "manifest": storage.read_json(storage.join(run_dir, "manifest.json"), direct_options),
    }


def run_chaos(
    head: RayHead,
    moto_url: str,
    work: Path,
    heads: str,
    local_inputs: list[dict],
    limit: int | None,
    plan: ChaosPlan,
    job_name: str = "chaos",
    say=print,
) -> ChaosResult:
    """One labeling run through the scheduler under `plan`'s faults; returns what happened."""
    import s3fs

    from pipeline import storage

    direct = s3_options(moto_url)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_url})
    bucket = f"{job_name}-{os.getpid()}-{time.time_ns() % 10**8}".lower()
    fs.mkdir(bucket)
    inputs = []
    for spec in local_inputs:
        key = f"{bucket}/in/{Path(spec['path']).name}"
        fs.put_file(spec["path"], key)
        inputs.append({**spec, "path": f"s3://{key}"})
    good, bad, shards = expected_units(inputs, direct, limit)
    nodes = [start_worker_node(head), start_worker_node(head)]
    first_nodes = [n.node_id for n in nodes]
    proxy = FaultProxy(moto_url, FaultPlan(0.0))
    try:
        config = write_config(work, bucket, inputs, heads, proxy.url, limit)
        proxy.set_plan(FaultPlan(rate=plan.fault_rate, stall_s=plan.stall_s, seed=plan.seed))
        t0 = time.time()
        report = schedule(head, config, job_name)
        run_id = report["run_id"]
        run_dir = f"s3://{bucket}/runs/{run_id}"
        n_units = sum(good.values()) + sum(bad.values())
        say(f"submitted {report['submission_id']} ({len(shards)} shards, {n_units} units expected)")
        kills: list[dict] = []
        pending = list(plan.kill_at[: plan.kills])
        calls_expected = -(-n_units // UNITS_PER_CALL)  # at least this many scoring calls
        calls_before = {t["task_id"] for t in scoring_calls(head)}  # earlier runs' calls on this head
        # Side work runs on threads, so the loop below keeps aiming kills while a second driver
        # is turned away and a replacement node starts: blocked, it let one node score all the rest.
        side = ThreadPoolExecutor(max_workers=4)
        overlap_future: Future | None = None
        joining: list[Future] = []

        def committed() -> int:
            try:
                return len(storage.committed_shards(run_dir, direct))
            except OSError:
                return 0

        def replace_later() -> WorkerNode:
            time.sleep(plan.replace_after_s)
            return start_worker_node(head)

        def take_joined() -> None:
            for f in [f for f in joining if f.done()]:
                joining.remove(f)
                nodes.append(f.result())

        due_since: float | None = None  # when the pending kill fell due

        def victim_of(calls: list[dict], due_for_s: float) -> WorkerNode | None:
            # The kill lands on a scoring call in progress, on the nodes the run started on while
            # one of them still hosts a scoring actor: once both are gone, what is left to score
            # can only be scored on nodes that joined later. (After 20 s due with no first node
            # scoring, any node scoring will do.)
            busy = nodes_scoring(calls)
            hosting = [n for n in nodes if n.hosts_scoring_actor()]
            firsts = [n for n in hosting if n.node_id in first_nodes]
            if due_for_s > 20:
                firsts = []
            return next((n for n in firsts or hosting if n.node_id in busy), None)

        def tick() -> None:
            nonlocal overlap_future, due_since
            take_joined()
            if not pending:
                return
            try:
                calls = [t for t in scoring_calls(head) if t["task_id"] not in calls_before]
            except OSError:
                return
            done = calls_finished(calls)
            if done < pending[0] * calls_expected:
                return
            due_since = due_since or time.time()
            victim = victim_of(calls, time.time() - due_since)
            if victim is None:
                return  # wait until a node is scoring: the kill must land on work in progress
            pending.pop(0)
            due_since = None
            hit = victim.kill()
            nodes.remove(victim)
            kills.append(
                {
                    "at_calls_finished": done,
                    "at_committed": committed(),
                    "victim": "first" if victim.node_id in first_nodes else "replacement",
                    "scoring_actor_killed": any(_is_scoring_actor(t) for t in hit),
                    "processes_killed": len(hit),
                    "at": time.time(),
                }
            )
            say(
                f"killed a {kills[-1]['victim']} worker node ({len(hit)} processes, scoring a call) "
                f"at {done} scoring calls finished, {kills[-1]['at_committed']} shards committed"
            )
            if plan.overlapping_driver and overlap_future is None:
                overlap_future = side.submit(_overlapping_driver, head, config, run_id)
            joining.append(side.submit(replace_later))

        attempts = []
        sub = report["submission_id"]
        try:
            for _ in range(3):
                status, message = wait_job(head, sub, on_tick=tick)
                logs = "" if status == "SUCCEEDED" else head.job_client().get_job_logs(sub)[-6000:]
                attempts.append({"submission_id": sub, "status": status, "message": message[-2000:], "logs": logs})
                said = message.strip().splitlines()[-1:] if status != "SUCCEEDED" else []
                say(f"{sub}: {status}" + (f" ({said[0][:300]})" if said else ""))
                if status == "SUCCEEDED":
                    break
                for f in joining:
                    f.result()
                take_joined()
                while len(nodes) < 2:
                    nodes.append(start_worker_node(head))
                again = schedule(head, config, job_name, "--resubmit-failed")
                sub = again["submission_id"]
            overlap = overlap_future.result() if overlap_future is not None else None
            if overlap is not None:
                say(f"second driver on {run_id}: {overlap['status']}")
        finally:
            side.shutdown(wait=True)  # every node started is in `nodes`, for the kill below
            take_joined()
        wall = time.time() - t0
        faults = proxy.counts()
        proxy.set_plan(FaultPlan(0.0))
        out = read_outcome(run_dir, direct)
        return ChaosResult(
            run_id=run_id,
            wall_s=wall,
            attempts=attempts,
            overlap=overlap,
            kills=kills,
            faults=faults,
            manifest=out["manifest"],
            expected={"good": good, "bad": bad, "shards": len(shards)},
            found=out,
            markers=out["markers"],
            first_nodes=first_nodes,
        )
    finally:
        proxy.close()
        for n in nodes:
            n.kill()


def _overlapping_driver(head: RayHead, config: Path, run_id: str) -> dict:
    """A manual rerun beside the scheduled one: the same config and run id, submitted directly."""
    sid = f"overlap-{run_id}-{time.time_ns() % 10**6}"
    client = head.job_client()
    client.submit_job(
        entrypoint=f"python -m jobs.label --config {config} --run-id {run_id}",
        submission_id=sid,
        runtime_env={"working_dir": str(REPO), "excludes": [".git", ".venv", "runs", "__pycache__"]},
    )
    status, message = wait_job(head, sid, timeout_s=600)
    return {"submission_id": sid, "status": status, "logs": client.get_job_logs(sid)[-3000:], "message": message}


def verify(result: ChaosResult) -> list[str]:
    """Every way the run could have gone wrong, as a list of problems (empty: exactly once)."""
    problems = []
    good, bad = result.expected["good"], result.expected["bad"]
    labeled, quarantined = result.found["labeled"], result.found["quarantined"]
    dup_l = sum(n - 1 for n in labeled.values() if n > 1)
    dup_q = sum(n - 1 for n in quarantined.values() if n > 1)
    if dup_l or dup_q:
        problems.append(f"duplicates: {dup_l} labeled, {dup_q} quarantined")
    written = Counter(labeled) + Counter(quarantined)
    expected = good + bad
    if set(written) != set(expected):
        problems.append(
            f"units lost {len(set(expected) - set(written))}, unexpected {len(set(written) - set(expected))}"
        )
    if not set(bad) <= set(quarantined):
        problems.append("units the reader quarantines are not all in quarantine/")
    if sorted(result.found["glob_data_files"]) != sorted(result.found["committed_data_files"]):
        problems.append("data/ holds files no marker commits (a glob reader would see them)")
    man = result.manifest
    if man.get("status") != "complete":
        problems.append(f"manifest status {man.get('status')}")
    for source, s in man.get("sources", {}).items():
        if s["rows_in"] != s["rows_labeled"] + s["rows_quarantined"]:
            problems.append(f"manifest: {source} rows do not reconcile")
    if sum(s["units_labeled"] for s in man.get("sources", {}).values()) != sum(labeled.values()):
        problems.append("manifest units_labeled differs from the rows in data/")
    if man.get("shards") != result.expected["shards"]:
        problems.append(f"manifest shards {man.get('shards')} != {result.expected['shards']}")
    return problems


def summary(result: ChaosResult) -> dict:
    req = sum(result.faults["requests"].values())
    landed = sum(result.faults["faults"].values())
    retries = sum(int(m.get("storage_retries") or 0) for m in result.markers)
    scored: Counter = sum((Counter(m.get("scored_on", {})) for m in result.markers), Counter())
    first = set(result.first_nodes)
    return {
        "wall_s": round(result.wall_s, 1),
        "attempts": [a["status"] for a in result.attempts],
        "failed_attempts_said": [
            a["message"].strip().splitlines()[-1:] for a in result.attempts if a["status"] != "SUCCEEDED"
        ],
        "kills": len(result.kills),
        "kills_on_scoring_actor": sum(k["scoring_actor_killed"] for k in result.kills),
        "kills_on_first_nodes": sum(k["victim"] == "first" for k in result.kills),
        "overlapping_driver": (result.overlap or {}).get("status"),
        "s3_requests": req,
        "s3_faults": landed,
        "fault_share": round(landed / req, 4) if req else 0.0,
        "s3_eligible": result.faults.get("eligible", 0),  # requests the plan could fail
        "faults_by_kind": _by_kind(result.faults["faults"]),
        "storage_retries_in_markers": retries,  # by read and write tasks
        "storage_retries_manifest": result.manifest.get("storage_retries"),  # tasks and driver
        # units by who scored them: the two nodes there at submission, the nodes started after a kill
        "units_scored_on_first_nodes": sum(n for node, n in scored.items() if node in first),
        "units_scored_on_replacements": sum(n for node, n in scored.items() if node not in first),
        "units_expected": sum(result.expected["good"].values()) + sum(result.expected["bad"].values()),
        "units_written": sum(result.found["labeled"].values()) + sum(result.found["quarantined"].values()),
        "problems": verify(result),
    }


def _by_kind(faults: dict) -> dict:
    out: Counter = Counter()
    for key, n in faults.items():
        out[key.split(":")[0]] += n
    return dict(out)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port, in its own process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
