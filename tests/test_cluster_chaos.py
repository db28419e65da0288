"""Exactly once where the job really runs (tests/cluster_chaos.py): a head and worker nodes of
their own processes, S3 behind a fault proxy, the job submitted through jobs.schedule, three
worker nodes SIGKILLed whole mid-run (each replaced), 5 % of S3 requests failed and a second
driver on the same run id."""

from __future__ import annotations

import shutil

import pytest
from cluster_chaos import ChaosPlan, moto_server, run_chaos, summary, verify
from label_fixtures import SHARED
from ray_fixtures import short_temp_dir, start_ray_head, stop_ray_head

pytestmark = pytest.mark.slow

INPUTS = [{"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar", "source": "llmbar"}]
ROWS = 32  # 64 units in 8 shards, 8 scoring calls: room for kills at 15 %, 45 % and 70 % of the calls


def test_node_kills_s3_faults_and_an_overlapping_driver_leave_every_unit_once(smollm2_heads):
    base = short_temp_dir("chaos-")
    head = start_ray_head(base, num_cpus=2)
    try:
        with moto_server() as moto:
            result = run_chaos(head, moto, base, smollm2_heads, INPUTS, ROWS, ChaosPlan(kills=3, fault_rate=0.05))
    finally:
        stop_ray_head(head)
        shutil.rmtree(base, ignore_errors=True)
    report = summary(result)
    print(report)  # what happened, in the test log (`-s`, or the failure's captured output)
    assert verify(result) == [], report
    # Every unit once, against the pure reader's units (counted with duplicates in verify); the
    # reader is pinned by hand in test_label_job.py. LLMBar: 32 pairs, 64 units.
    assert sum(result.expected["good"].values()) + sum(result.expected["bad"].values()) == 64
    assert report["units_written"] == 64
    # The faults landed: three kills, each on a node running a scoring call (the state API saw the
    # call running there; the actor's process was among those killed), a share of the S3 requests
    # failed in every kind, and the retries are in the markers.
    assert report["kills"] == 3 and report["kills_on_scoring_actor"] == 3, report
    assert [k["at_calls_finished"] >= 1 for k in result.kills] == [True] * 3, result.kills
    kinds = {"slowdown", "internal", "reset", "stall"}
    # The proxy fails exactly floor(5 % of the requests it may fail), the kinds in turn.
    assert report["s3_faults"] == int(report["s3_eligible"] * 0.05) >= 4, report
    assert set(report["faults_by_kind"]) == kinds, report
    assert report["storage_retries_manifest"] > 0
    # The second driver was turned away, saying why.
    assert result.overlap is not None and result.overlap["status"] == "FAILED"
    assert "being labeled by another driver" in result.overlap["logs"]
    # Nodes that joined after a kill took up scoring (the pool is not pinned to the first nodes):
    # the kills go to the two nodes there at submission first, so what was left to score after
    # the second could only be scored on replacements. Every unit written was scored somewhere the
    # markers name.
    assert report["units_scored_on_replacements"] > 0, report
    assert report["units_scored_on_first_nodes"] + report["units_scored_on_replacements"] == 64 - sum(
        result.expected["bad"].values()
    ), report
    assert result.manifest["sources"]["llmbar"]["rows_in"] == ROWS
