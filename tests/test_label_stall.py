"""Never hang in silence: a run whose scoring pool can never start fails after stall_timeout_s,
naming what it waits for; its progress lines say the pool is short of its minimum meanwhile."""

from __future__ import annotations

import subprocess
import sys
import time

from label_fixtures import REPO, label_config, small_inputs, write_yaml

from pipeline.labeling.run import Progress


def test_progress_line_says_what_the_run_waits_for():
    p = Progress(None, 10.0, status=lambda: "scoring pool short of its minimum: 0 of 2 actor(s) alive")
    p.add(5, 100)
    assert p.line().endswith("; scoring pool short of its minimum: 0 of 2 actor(s) alive")
    assert "short" not in Progress(None, 10.0, status=lambda: None).line()


def test_run_that_cannot_start_its_pool_fails_with_the_missing_resource(tmp_path):
    cfg = label_config(
        tmp_path,
        None,  # embed-only: no heads needed, the pool never starts anyway
        inputs=small_inputs()[:1],
        limit_rows_per_input=4,
        stall_timeout_s=12,
        resources={"custom_resources_per_actor": {"h200": 1}},  # no node has one
    )
    path = write_yaml(tmp_path / "job.yaml", cfg)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no unit committed for" in proc.stderr and "waits for its minimum of 1" in proc.stderr, proc.stderr
    assert "'h200': 1" in proc.stderr and "h200 0 free of 0" in proc.stderr, proc.stderr
    assert "scoring pool short of its minimum: 0 of 1 actor(s) alive" in proc.stdout
    assert time.monotonic() - t0 < 300
    assert not (tmp_path / "labels" / "t1" / "manifest.json").exists()
