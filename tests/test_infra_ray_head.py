"""The `ray_head` fixture: a real token-authenticated head, jobs sent with the real `ray job submit`."""

from __future__ import annotations

import json
import secrets
import textwrap

import pytest
from ray_fixtures import SubmissionRefused

DRIVER = textwrap.dedent("""
    import json, os, sys
    import ray
    from helper import square        # shipped with the working dir

    ray.init()                       # joins the cluster the job was submitted to
    total = sum(ray.get([ray.remote(square).remote(i) for i in range(10)]))
    with open(os.environ["RESULT_PATH"], "w") as f:
        json.dump({"total": total, "cpus": ray.cluster_resources().get("CPU")}, f)
    print(f"sum of squares: {total}")
""")


def _working_dir(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "driver.py").write_text(DRIVER)
    (wd / "helper.py").write_text("def square(x):\n    return x * x\n")
    return wd


def test_job_submit_runs_driver_on_the_authenticated_cluster(ray_head, tmp_path):
    result_path = tmp_path / "result.json"
    result = ray_head.submit("python driver.py", _working_dir(tmp_path), env_vars={"RESULT_PATH": str(result_path)})
    assert result.status == "SUCCEEDED", result.message + result.logs
    assert "sum of squares: 285" in result.logs
    # The driver ran tasks on the head's 2 CPUs and wrote its result where it was told.
    assert json.loads(result_path.read_text()) == {"total": sum(i * i for i in range(10)), "cpus": 2.0}
    assert ray_head.job_client().get_job_info(result.submission_id).entrypoint == "python driver.py"


def test_failing_entrypoint_reports_failed_with_logs(ray_head, tmp_path):
    result = ray_head.submit(["python", "-c", "import sys; print('about to fail'); sys.exit(7)"])
    assert result.status == "FAILED"
    assert "about to fail" in result.logs
    assert "exit code 7" in result.message


@pytest.mark.parametrize("case", ["no_token", "wrong_token"])
def test_submission_without_the_right_token_is_refused(ray_head, tmp_path, case):
    env = ray_head.client_env(auth=False) if case == "no_token" else ray_head.client_env(token=secrets.token_hex(32))
    job_id = f"unauthorized-{case}"
    with pytest.raises(SubmissionRefused) as refused:
        ray_head.submit("python driver.py", _working_dir(tmp_path), submission_id=job_id, env=env)
    expected = "401" if case == "no_token" else "403"
    reason = {"401": "Missing authentication token", "403": "Invalid authentication token"}[expected]
    assert reason in refused.value.output
    # Nothing reached the cluster under that id.
    assert job_id not in {j.submission_id for j in ray_head.job_client().list_jobs()}


def test_job_api_refuses_unauthenticated_reads(ray_head):
    from ray.job_submission import JobSubmissionClient

    client = ray_head.job_client()
    assert isinstance(client.list_jobs(), list)
    with pytest.raises(Exception, match="Invalid authentication token"):
        JobSubmissionClient(
            ray_head.dashboard_url, headers={"Authorization": f"Bearer {secrets.token_hex(32)}"}
        ).list_jobs()


def test_repo_as_working_dir_ships_source_without_venv(ray_head):
    """What `ray job submit --working-dir .` does with this repo: the job's cwd is a copy of the
    source (.gitignore'd paths such as .venv left out) and the job modules import from it."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    probe = (
        "import os, jobs.label, jobs.schedule; "
        "print('cwd-has', sorted(p for p in ('.venv', 'pyproject.toml', 'pipeline', 'jobs') if os.path.exists(p))); "
        "print('label-from-cwd', jobs.label.__file__.startswith(os.getcwd()))"
    )
    result = ray_head.submit(["python", "-c", probe], repo)
    assert result.status == "SUCCEEDED", result.message + result.logs
    assert "cwd-has ['jobs', 'pipeline', 'pyproject.toml']" in result.logs
    assert "label-from-cwd True" in result.logs


def test_in_process_driver_joins_the_head_with_its_token(ray_head):
    import ray
    from ray_fixtures import token_auth_env

    with token_auth_env(ray_head.token):
        ray.init(address=ray_head.gcs_address)
        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            ran_on = ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id()).remote())
        finally:
            ray.shutdown()
    assert len(nodes) == 1 and nodes[0]["Resources"]["CPU"] == 2.0
    assert ran_on == nodes[0]["NodeID"]
