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


def test_a_pool_that_finished_is_not_reported_short():
    """Ray Data releases its pool's actors once scoring has no more input while the writes downstream
    still commit; the progress line said "0 of 1 alive" then (seen in `make demo`). A real pipeline:
    the scoring pool finishes early, a slow write stage keeps going, and the watch is read from it.
    (The pipeline is read to its end: a pool left waiting would keep Ray Data's threads alive in
    this process after ray.shutdown, and they start a Ray of their own.)"""
    import ray

    from pipeline.labeling.watch import PoolWatch

    class Scorer:
        def __call__(self, batch):
            return batch

    def slow_write(batch):
        time.sleep(0.5)
        return batch

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        watch = PoolWatch(minimum=1, needs={"CPU": 1})
        ds = ray.data.range(24, override_num_blocks=12).map_batches(Scorer, compute=ray.data.ActorPoolStrategy(size=1))
        seen_during = []
        for _batch in ds.map_batches(slow_write, batch_size=2).iter_batches(batch_size=2):
            seen_during.append((watch.actor_states(), watch.status()))
        states, line = watch.actor_states(), watch.status()
        assert states["RELEASED"] == 1 and not states.get("ALIVE"), states
        assert line is None
        # read while writes were still coming out, after the pool let its actor go: no line then either
        assert sum(s.get("RELEASED") == 1 and ln is None for s, ln in seen_during[:-1]) >= 1, seen_during

    finally:
        ray.shutdown()


def test_released_actors_beside_one_that_cannot_start_still_make_the_pool_short():
    from collections import Counter

    from pipeline.labeling import watch

    w = watch.PoolWatch(minimum=1, needs={"CPU": 1})
    w.actor_states = lambda: Counter({"RELEASED": 1, "PENDING_CREATION": 1})  # type: ignore[method-assign]
    w.resources = lambda: {"CPU": (0.0, 2.0)}  # type: ignore[method-assign]
    assert w.status().startswith("scoring pool short of its minimum: 0 of 1 actor(s) alive, 1 being created")
    w.actor_states = lambda: Counter({"RELEASED": 2})  # type: ignore[method-assign]
    assert w.status() is None and "a write or commit downstream is stuck" in w.diagnose(60)
    w.actor_states = lambda: Counter()  # type: ignore[method-assign]
    assert w.status() == "scoring pool short of its minimum: 0 of 1 actor(s) alive"  # nothing ever started
