"""Real Ray clusters for tests, with token authentication on.

- `ray_head`: a head started with the real `ray start --head` CLI on this machine, its own temp dir
  and free ports, so it never meets another Ray instance here; jobs go to it with the real
  `ray job submit` CLI. Teardown stops only this head's processes: `ray stop` would stop every
  Ray instance on the machine, including other people's.
- `multinode_cluster`: a head plus two worker nodes (`ray.cluster_utils.Cluster`), each worker
  with a custom resource standing in for a GPU, for placement tests.

tests/conftest.py imports both (`from ray_fixtures import ...`; tests/ is on sys.path there).
Import helpers under that same name (`from ray_fixtures import SubmissionRefused`): under another
name (tests.ray_fixtures) the module loads twice and its exception classes would not match.

Jobs run with the head's interpreter (`python` resolves to it) and the working dir as cwd: give
them absolute paths for data outside the working dir.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

RAY_CLI = str(Path(sys.executable).with_name("ray"))
TERMINAL_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}
AUTH_ENV_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def short_temp_dir(prefix: str) -> Path:
    """A fresh directory under /tmp: Ray's unix sockets live below it, and their paths may not
    exceed 107 bytes, which pytest's own tmp paths can."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free right now (held open together so they are distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def generate_token(home: Path) -> str:
    """A fresh cluster token from the real `ray get-auth-token --generate`.

    HOME points at a private directory so that the user's own ~/.ray/auth_token is neither read
    nor overwritten (the CLI saves the token to $HOME/.ray/auth_token).
    """
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV_VARS}
    env["HOME"] = str(home)
    out = subprocess.run(
        [RAY_CLI, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, text=True, timeout=120
    )
    token = out.stdout.strip()
    assert token == (home / ".ray" / "auth_token").read_text().strip(), "token not saved where expected"
    return token


@contextlib.contextmanager
def token_auth_env(token: str) -> Iterator[None]:
    """Token auth for Ray clients created in THIS process (ray.init, cluster_utils), then restore.

    Keep the block around the whole connection, e.g. to drive `ray_head` in-process:
    `with token_auth_env(head.token): ray.init(address=head.gcs_address); ...; ray.shutdown()`.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    saved = {k: os.environ.get(k) for k in AUTH_ENV_VARS}
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    # Ray caches the auth mode and the token in C++; both must be reloaded after env changes.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _processes_of(pgid: int, marker: str) -> list[psutil.Process]:
    """Processes of one Ray instance: its process group, anything naming its temp dir, and all
    their descendants (job drivers run in sessions of their own)."""
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            if os.getpgid(p.pid) == pgid or any(marker in a for a in (p.info["cmdline"] or [])):
                roots.append(p)
        except (psutil.Error, ProcessLookupError):
            continue
    found = {p.pid: p for p in roots}
    for p in roots:
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_ray_instance(pgid: int, marker: str, grace_s: float = 5.0) -> None:
    """Like `ray stop` (SIGTERM, then SIGKILL after a grace period), for one instance only."""
    procs = _processes_of(pgid, marker)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


@dataclass
class JobResult:
    submission_id: str
    status: str  # SUCCEEDED / FAILED / STOPPED
    logs: str  # the driver's stdout and stderr
    message: str = ""  # Ray's status message (the failure reason)
    cli_output: str = ""  # what `ray job submit` printed


@dataclass
class RayHead:
    """A running head. `env` is the environment a client needs (the token included)."""

    dashboard_url: str  # http://127.0.0.1:<port>, for `ray job submit --address`
    gcs_address: str  # <ip>:<port>, for `ray start --address` or ray.init(address=...)
    temp_dir: Path
    token: str
    env: dict[str, str] = field(repr=False)
    pgid: int = 0
    _submissions: int = 0

    def client_env(self, token: str | None = None, auth: bool = True) -> dict[str, str]:
        """Client environment; `auth=False` sends no token at all, `token=` sends another one."""
        env = dict(self.env)
        if not auth:
            for k in AUTH_ENV_VARS:
                env.pop(k, None)
            # Without a token of its own the client must not pick up the user's default one.
            env["HOME"] = str(self.temp_dir / "home-without-token")
            Path(env["HOME"]).mkdir(exist_ok=True)
        elif token is not None:
            env["RAY_AUTH_TOKEN"] = token
        return env

    def job_client(self, token: str | None = None):
        """A JobSubmissionClient for this process; the token goes as an explicit header, so the
        process-wide auth settings of Ray are left alone."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {token or self.token}"})

    def submit(
        self,
        entrypoint: str | Sequence[str],
        working_dir: str | os.PathLike | None = None,
        *,
        submission_id: str | None = None,
        env_vars: dict[str, str] | None = None,
        runtime_env: dict | None = None,
        metadata: dict[str, str] | None = None,
        timeout_s: float = 600,
        env: dict[str, str] | None = None,
    ) -> JobResult:
        """Run the real `ray job submit` CLI, wait for a terminal status, return status and logs.

        `env` replaces the client environment (e.g. `client_env(auth=False)`); a submission the
        cluster refuses raises `SubmissionRefused` with the CLI's output.
        """
        import json

        self._submissions += 1
        submission_id = submission_id or f"test-{os.getpid()}-{self._submissions}-{time.time_ns() % 10**9}"
        if not isinstance(entrypoint, str):
            entrypoint = shlex.join(entrypoint)
        cmd = [RAY_CLI, "job", "submit", "--address", self.dashboard_url, "--no-wait", "--submission-id", submission_id]
        if working_dir is not None:
            cmd += ["--working-dir", str(working_dir)]
        renv = dict(runtime_env or {})
        if env_vars:
            renv["env_vars"] = {**renv.get("env_vars", {}), **env_vars}
        if renv:
            cmd += ["--runtime-env-json", json.dumps(renv)]
        if metadata:
            cmd += ["--metadata-json", json.dumps(metadata)]
        cmd += ["--", *shlex.split(entrypoint)]
        out = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=300)
        cli_output = out.stdout + out.stderr
        if out.returncode != 0:
            raise SubmissionRefused(out.returncode, cli_output)
        client = self.job_client()
        deadline = time.monotonic() + timeout_s
        while True:
            info = client.get_job_info(submission_id)
            if str(info.status) in TERMINAL_STATUSES:
                break
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                raise TimeoutError(
                    f"job {submission_id} still {info.status} after {timeout_s}s:\n{client.get_job_logs(submission_id)}"
                )
            time.sleep(0.5)
        return JobResult(
            submission_id, str(info.status), client.get_job_logs(submission_id), info.message or "", cli_output
        )


class SubmissionRefused(RuntimeError):
    def __init__(self, returncode: int, output: str):
        super().__init__(f"`ray job submit` exited {returncode}:\n{output[-4000:]}")
        self.returncode = returncode
        self.output = output


def start_ray_head(
    base: Path, num_cpus: int = 2, object_store_mb: int = 256, extra_env: dict[str, str] | None = None
) -> RayHead:
    """Start a token-authenticated head with `ray start --head`; the caller must `stop_ray_head`."""
    base.mkdir(parents=True, exist_ok=True)
    # The session dir holds unix sockets, whose paths must stay short (~107 bytes).
    temp_dir = base / "ray"
    token = generate_token(base / "home")
    (gcs_port, dash_port, client_port, agent_http, agent_grpc, env_agent, metrics, node_mgr, obj_mgr) = free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV_VARS and k != "RAY_ADDRESS"}
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # ray.init(address="auto") and the address file stay inside this head's temp dir.
            "RAY_TMPDIR": str(base),
            # Entrypoints say `python ...`: that must be this interpreter, as on a real cluster node.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(extra_env or {}),
        }
    )
    cmd = [
        RAY_CLI,
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs_port),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash_port),
        "--ray-client-server-port",
        str(client_port),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(env_agent),
        "--metrics-export-port",
        str(metrics),
        "--node-manager-port",
        str(node_mgr),
        "--object-manager-port",
        str(obj_mgr),
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
        "--num-cpus",
        str(num_cpus),
        "--object-store-memory",
        str(object_store_mb * 2**20),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    # A session of its own: every process of this head shares one process group, which is how
    # teardown finds them without touching any other Ray on the machine.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        stop_ray_instance(proc.pid, str(temp_dir))
        raise
    if proc.returncode != 0:
        stop_ray_instance(proc.pid, str(temp_dir))
        raise RuntimeError(f"ray start --head failed ({proc.returncode}):\n{out[-4000:]}")
    gcs_address = (temp_dir / "ray_current_cluster").read_text().strip()
    head = RayHead(
        dashboard_url=f"http://127.0.0.1:{dash_port}",
        gcs_address=gcs_address,
        temp_dir=temp_dir,
        token=token,
        env=env,
        pgid=proc.pid,
    )
    _wait_for_job_api(head)
    return head


def _wait_for_job_api(head: RayHead, timeout_s: float = 120) -> None:
    """The dashboard's job API comes up a little after `ray start` returns."""
    client_error = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            head.job_client().list_jobs()
            return
        except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
            client_error = e
            time.sleep(1)
    stop_ray_head(head)
    raise RuntimeError(f"job API of {head.dashboard_url} not ready: {client_error}")


def stop_ray_head(head: RayHead) -> None:
    stop_ray_instance(head.pgid, str(head.temp_dir))


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    base = short_temp_dir("rayhead-")
    head = start_ray_head(base)
    try:
        yield head
    finally:
        stop_ray_head(head)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class MultiNodeCluster:
    address: str  # GCS address: ray.init(address=...)
    cluster: object  # the ray.cluster_utils.Cluster
    head_node_id: str
    worker_node_ids: list[str]
    worker_resource: str  # custom resource each worker node has one of
    token: str


@contextlib.contextmanager
def start_multinode_cluster(
    base: Path,
    num_workers: int = 2,
    worker_resource: str = "scorer",
    cpus_per_worker: int = 1,
    node_resources: list[dict[str, float]] | None = None,
) -> Iterator[MultiNodeCluster]:
    """A head (1 CPU, no dashboard) plus worker nodes, each with one `worker_resource`, and
    `node_resources[i]` on worker i when given (resources that only some nodes offer).

    Token auth stays on for the lifetime of the cluster in this process (see token_auth_env).
    """
    import ray
    from ray.cluster_utils import Cluster

    base.mkdir(parents=True, exist_ok=True)
    token = generate_token(base / "home")
    if ray.is_initialized():  # a connection left over by an earlier test would block ray.init
        ray.shutdown()
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    # Cluster writes the "current cluster" address file under the default temp dir: keep it ours.
    os.environ["RAY_TMPDIR"] = str(base)
    try:
        with token_auth_env(token):
            cluster = Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": str(base / "ray")},
            )
            try:
                own = node_resources or [{}] * num_workers
                workers = [
                    cluster.add_node(num_cpus=cpus_per_worker, resources={worker_resource: 1, **own[i]})
                    for i in range(num_workers)
                ]
                cluster.wait_for_nodes()
                yield MultiNodeCluster(
                    address=cluster.address,
                    cluster=cluster,
                    head_node_id=cluster.head_node.node_id,
                    worker_node_ids=[w.node_id for w in workers],
                    worker_resource=worker_resource,
                    token=token,
                )
            finally:
                if ray.is_initialized():
                    ray.shutdown()
                cluster.shutdown()
    finally:
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir


@pytest.fixture(scope="module")
def multinode_cluster() -> Iterator[MultiNodeCluster]:
    """Module-scoped: three idle raylets cost CPU on a small machine, and the process-wide auth
    settings it installs are restored as soon as the module is done."""
    base = short_temp_dir("raymulti-")
    try:
        with start_multinode_cluster(base) as cluster:
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)
