"""jobs.schedule: idempotent submission ids, the decision table, and real runs against `ray_head`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from label_fixtures import SHARED as SHARED_DATA

from jobs import schedule as sched
from jobs.schedule import Decision, ExistingJob, decide

REPO = Path(__file__).resolve().parents[1]
CONFIG = textwrap.dedent("""
    # nightly labeling of the demo corpora
    run_id: nightly
    output: runs/labels
    inputs:
      - {path: data/a.jsonl, format: oasst_best_of_n, source: oasst}
    resources: {actors: 1, rows_per_shard: 32}
""")
# Stands in for jobs.label: records its arguments; fails while FAIL_UNTIL_ATTEMPT says so.
FAKE_JOB = textwrap.dedent("""
    import json, os, sys
    log = os.environ["ATTEMPT_LOG"]
    attempts = [json.loads(l) for l in open(log)] if os.path.exists(log) else []
    attempts.append(sys.argv[1:])
    with open(log, "w") as f:
        f.writelines(json.dumps(a) + "\\n" for a in attempts)
    print("fake labeling job", sys.argv[1:])
    sys.exit(1 if len(attempts) < int(os.environ.get("FAIL_UNTIL_ATTEMPT", "0")) else 0)
""")
ENTRYPOINT = "python fake_label.py --config {config} --run-id {run_id}"


# ---- pure: identity ------------------------------------------------------------------------


def test_config_hash_is_sha256_of_canonical_content():
    reordered = textwrap.dedent("""
        resources: {rows_per_shard: 32, actors: 1}   # same content, other order and style
        inputs:
        - format: oasst_best_of_n
          path: data/a.jsonl
          source: oasst
        output: runs/labels
        run_id: nightly
    """)
    canonical = (
        '{"inputs":[{"format":"oasst_best_of_n","path":"data/a.jsonl","source":"oasst"}],'
        '"output":"runs/labels","resources":{"actors":1,"rows_per_shard":32},"run_id":"nightly"}'
    )
    assert sched.canonical_config(CONFIG) == canonical
    assert sched.config_hash(CONFIG) == hashlib.sha256(canonical.encode()).hexdigest()
    assert sched.config_hash(reordered) == sched.config_hash(CONFIG)
    assert sched.config_hash(CONFIG.replace("32", "64")) != sched.config_hash(CONFIG)


def test_submission_id_is_name_date_hash8():
    digest = "0123456789abcdef" * 4
    assert sched.submission_id("nightly", "2026-11-23", digest) == "nightly-2026-11-23-01234567"
    assert sched.submission_id("my job/v2", "2026-11-23", digest) == "my-job-v2-2026-11-23-01234567"
    with pytest.raises(ValueError):
        sched.submission_id("nightly", "23/11/2026", digest)


# ---- pure: what to do given the jobs on the cluster -------------------------------------------

BASE = "nightly-2026-11-23-01234567"


@pytest.mark.parametrize(
    "jobs, resubmit, expected",
    [
        ([], False, Decision("submit", BASE)),
        (
            [ExistingJob("nightly-2026-11-22-01234567", "FAILED"), ExistingJob(BASE + "x", "FAILED")],
            False,
            Decision("submit", BASE),
        ),  # other slots do not count
        ([ExistingJob(BASE, "PENDING")], True, Decision("exists", BASE, "PENDING")),
        ([ExistingJob(BASE, "RUNNING")], True, Decision("exists", BASE, "RUNNING")),
        ([ExistingJob(BASE, "SUCCEEDED")], True, Decision("exists", BASE, "SUCCEEDED")),
        ([ExistingJob(BASE, "FAILED")], False, Decision("previous_failed", BASE, "FAILED")),
        ([ExistingJob(BASE, "STOPPED")], True, Decision("submit", BASE + "-retry1")),
        (
            [ExistingJob(BASE + "-retry1", "FAILED"), ExistingJob(BASE, "FAILED")],
            True,
            Decision("submit", BASE + "-retry2"),
        ),
        (
            [ExistingJob(BASE + "-retry1", "FAILED"), ExistingJob(BASE, "FAILED")],
            False,
            Decision("previous_failed", BASE + "-retry1", "FAILED"),
        ),
        (
            [ExistingJob(BASE, "FAILED"), ExistingJob(BASE + "-retry1", "SUCCEEDED")],
            True,
            Decision("exists", BASE + "-retry1", "SUCCEEDED"),
        ),
    ],
)
def test_decide(jobs, resubmit, expected):
    assert decide(BASE, jobs, resubmit) == expected


def test_auth_headers_from_token_or_token_file(tmp_path):
    (tmp_path / "tok").write_text("abc123\n")
    assert sched.auth_headers({"RAY_AUTH_TOKEN": "xyz"}) == {"Authorization": "Bearer xyz"}
    assert sched.auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == {"Authorization": "Bearer abc123"}
    assert sched.auth_headers({}) == {}


# ---- against a real head ---------------------------------------------------------------------


@pytest.fixture
def job_dir(tmp_path):
    wd = tmp_path / "wd"
    (wd / "jobs" / "configs").mkdir(parents=True)
    (wd / "jobs" / "configs" / "nightly.yaml").write_text(CONFIG)
    (wd / "fake_label.py").write_text(FAKE_JOB)
    # The config's input (--dry-run reads its first rows): two real OASST trees.
    (wd / "data").mkdir()
    with open(SHARED_DATA / "oasst" / "en_100_message.jsonl") as f:
        (wd / "data" / "a.jsonl").write_text(f.readline() + f.readline())
    return wd


def _wait(client, job_id, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id))) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        assert time.monotonic() < deadline, f"{job_id} still {status}"
        time.sleep(0.5)
    return status


def _slot_jobs(client, base_id):
    return sorted(j.submission_id for j in client.list_jobs() if (j.metadata or {}).get(sched.SCHEDULE_KEY) == base_id)


def test_schedule_cli_twice_submits_exactly_one_job(ray_head, job_dir, tmp_path):
    """The real CLI, token from the environment (RAY_AUTH_TOKEN), run twice for the same slot."""
    attempt_log = tmp_path / "attempts.jsonl"
    client = ray_head.job_client()
    base_id = f"nightly-2026-11-23-{sched.config_hash(CONFIG)[:8]}"
    # The fake job learns where to log from the entrypoint's environment on the cluster.
    entrypoint = f"env ATTEMPT_LOG={attempt_log} {ENTRYPOINT}"
    reports = []
    for _ in range(2):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs.schedule",
                "--address",
                ray_head.dashboard_url,
                "--config",
                "jobs/configs/nightly.yaml",
                "--date",
                "2026-11-23",
                "--entrypoint",
                entrypoint,
            ],
            cwd=job_dir,
            env={**ray_head.env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        reports.append(json.loads(out.stdout))
    first, second = reports
    assert (first["action"], first["submission_id"], first["run_id"]) == ("submitted", base_id, base_id)
    assert second["action"] == "exists" and second["submission_id"] == base_id
    assert second["status"] in {"PENDING", "RUNNING", "SUCCEEDED"}
    assert _slot_jobs(client, base_id) == [base_id]
    assert _wait(client, base_id) == "SUCCEEDED"
    # It ran once, with the config path inside the shipped working dir and the slot's run id.
    attempts = [json.loads(line) for line in attempt_log.read_text().splitlines()]
    assert attempts == [["--config", "jobs/configs/nightly.yaml", "--run-id", base_id]]
    # After it finished, a third run still submits nothing.
    third = sched.schedule(
        client, "jobs/configs/nightly.yaml", date="2026-11-23", working_dir=str(job_dir), entrypoint=entrypoint
    )
    assert (third["action"], third["status"]) == ("exists", "SUCCEEDED")


def test_changed_config_gets_a_new_id(ray_head, job_dir, tmp_path):
    client = ray_head.job_client()
    cfg = job_dir / "jobs" / "configs" / "nightly.yaml"
    cfg.write_text(CONFIG.replace("rows_per_shard: 32", "rows_per_shard: 16"))
    kwargs = dict(
        date="2026-11-24", working_dir=str(job_dir), entrypoint=f"env ATTEMPT_LOG={tmp_path / 'a.jsonl'} {ENTRYPOINT}"
    )
    first = sched.schedule(client, "jobs/configs/nightly.yaml", **kwargs)
    cfg.write_text(CONFIG.replace("rows_per_shard: 32", "rows_per_shard: 8"))
    changed = sched.schedule(client, "jobs/configs/nightly.yaml", **kwargs)
    assert first["action"] == changed["action"] == "submitted"
    assert first["submission_id"] != changed["submission_id"]
    assert changed["submission_id"] == f"nightly-2026-11-24-{sched.config_hash(cfg.read_text())[:8]}"
    assert [_wait(client, r["submission_id"]) for r in (first, changed)] == ["SUCCEEDED", "SUCCEEDED"]


def test_failed_slot_needs_explicit_resubmit_and_keeps_the_run_id(ray_head, job_dir, tmp_path):
    client = ray_head.job_client()
    attempt_log = tmp_path / "attempts.jsonl"
    # Fails on the first attempt, succeeds on the second (like a job that resumes after a crash).
    kwargs = dict(
        date="2026-11-25",
        working_dir=str(job_dir),
        entrypoint=f"env ATTEMPT_LOG={attempt_log} FAIL_UNTIL_ATTEMPT=2 {ENTRYPOINT}",
    )
    first = sched.schedule(client, "jobs/configs/nightly.yaml", **kwargs)
    base_id = first["submission_id"]
    assert _wait(client, base_id) == "FAILED"
    again = sched.schedule(client, "jobs/configs/nightly.yaml", **kwargs)
    assert (again["action"], again["submission_id"], again["status"]) == ("previous_failed", base_id, "FAILED")
    retry = sched.schedule(client, "jobs/configs/nightly.yaml", resubmit_failed=True, **kwargs)
    assert (retry["action"], retry["submission_id"]) == ("submitted", base_id + "-retry1")
    assert _wait(client, base_id + "-retry1") == "SUCCEEDED"
    assert _slot_jobs(client, base_id) == [base_id, base_id + "-retry1"]
    runs = [json.loads(line) for line in attempt_log.read_text().splitlines()]
    assert [r[r.index("--run-id") + 1] for r in runs] == [base_id, base_id]


def test_lost_race_reports_the_other_submission(ray_head, job_dir, tmp_path):
    """Two schedulers that both saw no job: Ray's unique submission ids stop the second one."""
    client = ray_head.job_client()

    class StaleView:  # a scheduler that listed jobs just before the other one submitted
        def __getattr__(self, name):
            return getattr(client, name)

        def list_jobs(self):
            return []

    kwargs = dict(
        date="2026-11-26", working_dir=str(job_dir), entrypoint=f"env ATTEMPT_LOG={tmp_path / 'a.jsonl'} {ENTRYPOINT}"
    )
    first = sched.schedule(client, "jobs/configs/nightly.yaml", **kwargs)
    racer = sched.schedule(StaleView(), "jobs/configs/nightly.yaml", **kwargs)
    assert first["action"] == "submitted"
    assert racer["action"] == "exists" and racer["submission_id"] == first["submission_id"]
    assert _slot_jobs(client, first["submission_id"]) == [first["submission_id"]]
    assert _wait(client, first["submission_id"]) == "SUCCEEDED"


def test_dry_run_submits_nothing(ray_head, job_dir):
    client = ray_head.job_client()
    before = {j.submission_id for j in client.list_jobs()}
    report = sched.schedule(
        client, "jobs/configs/nightly.yaml", date="2026-11-27", working_dir=str(job_dir), dry_run=True, incremental=True
    )
    assert report["action"] == "dry_run:submit"
    assert report["entrypoint"] == (
        f"python -m jobs.label --config jobs/configs/nightly.yaml --run-id {report['submission_id']} --incremental"
    )
    assert {j.submission_id for j in client.list_jobs()} == before
    # Without an address the CLI still prints the id it would use.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.schedule",
            "--config",
            "jobs/configs/nightly.yaml",
            "--date",
            "2026-11-27",
            "--dry-run",
        ],
        cwd=job_dir,
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["submission_id"] == report["submission_id"]


def test_cli_without_the_token_is_refused_and_submits_nothing(ray_head, job_dir):
    client = ray_head.job_client()
    before = {j.submission_id for j in client.list_jobs()}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.schedule",
            "--address",
            ray_head.dashboard_url,
            "--config",
            "jobs/configs/nightly.yaml",
            "--date",
            "2026-11-28",
        ],
        cwd=job_dir,
        env={**ray_head.client_env(auth=False), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "Missing authentication token" in out.stderr
    assert {j.submission_id for j in client.list_jobs()} == before
