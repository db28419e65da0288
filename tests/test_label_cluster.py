"""The labeling job on real Ray clusters: several nodes (ray.cluster_utils.Cluster, a custom
resource standing in for GPUs) and a real `ray job submit` against a token-authenticated head."""

from __future__ import annotations

from pathlib import Path

import pytest
from label_fixtures import REPO, label_config, manifest, read_output, small_inputs, write_yaml

pytestmark = pytest.mark.slow


def test_job_spreads_scoring_over_worker_nodes(tmp_path, smollm2_heads, multinode_cluster):
    from pipeline.labeling.config import parse_config
    from pipeline.labeling.run import run

    resource = multinode_cluster.worker_resource
    cfg = label_config(
        tmp_path,
        smollm2_heads,
        inputs=small_inputs()[:1],
        limit_rows_per_input=24,
        ray_address=multinode_cluster.address,
        resources={
            "actors": 2,
            "num_cpus_per_actor": 0.5,
            "custom_resources_per_actor": {resource: 1},
            "units_per_call": 4,
            "rows_per_shard": 4,
        },
    )
    man = run(parse_config(cfg))
    nodes = man["scored_on"]
    # Only worker nodes hold the resource, and both scored part of the data.
    assert set(nodes) == set(multinode_cluster.worker_node_ids), nodes
    data = read_output(tmp_path / "labels" / "t1")
    ids = data.column("unit_id").to_pylist()
    assert len(ids) == len(set(ids)) == sum(nodes.values()) - man["sources"]["llmbar"]["units_quarantined"]
    assert man["sources"]["llmbar"]["rows_in"] == 24


def test_ray_job_submit_runs_the_job_with_token_auth(tmp_path, smollm2_heads, ray_head):
    cfg = label_config(tmp_path, smollm2_heads, inputs=small_inputs()[:1], limit_rows_per_input=6)
    path = write_yaml(tmp_path / "job.yaml", cfg)
    result = ray_head.submit(f"python -m jobs.label --config {path}", working_dir=REPO, timeout_s=900)
    assert result.status == "SUCCEEDED", result.logs[-5000:] + result.message
    run_dir = tmp_path / "labels" / "t1"
    man = manifest(run_dir)
    assert man["sources"]["llmbar"]["rows_in"] == 6
    assert read_output(run_dir).num_rows == man["sources"]["llmbar"]["units_labeled"]
    # The driver joined the head's cluster (it did not start its own Ray).
    assert "run t1:" in result.logs and Path(man["output"]["data"]).is_dir()
