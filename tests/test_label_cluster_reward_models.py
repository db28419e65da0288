"""Several reward models in one run on a multi-node Ray cluster (ray.cluster_utils): each model's
actor pool asks for a custom resource that only one worker node offers, so each model is scored
on its own node, while every unit is written once."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
from label_fixtures import SHARED, label_config, read_output
from ray_fixtures import short_temp_dir, start_multinode_cluster
from reward_model_fixtures import tiny_random_classifier

pytestmark = pytest.mark.slow

NODE_RESOURCES = [{"rm_decoders": 1}, {"rm_encoders": 1}]


@pytest.fixture(scope="module")
def model_cluster():
    base = short_temp_dir("raymodels-")
    try:
        with start_multinode_cluster(base, node_resources=NODE_RESOURCES) as cluster:
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_each_reward_model_is_scored_on_the_node_that_offers_its_resource(tmp_path, model_cluster):
    from pipeline.corpus import InputSpec, read_units
    from pipeline.labeling.config import parse_config
    from pipeline.labeling.run import run

    llama = tiny_random_classifier(tmp_path / "llama", "llama")
    bert = tiny_random_classifier(tmp_path / "bert", "bert")
    inputs = [{"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar", "source": "llmbar"}]
    pool = {"actors": 1, "num_cpus_per_actor": 0.5}
    cfg = label_config(
        tmp_path,
        None,
        inputs,
        limit_rows_per_input=24,
        ray_address=model_cluster.address,
        resources={"units_per_call": 8, "rows_per_shard": 4},
        model={
            "reward_models": [
                {
                    "name": "dec",
                    "path": str(llama),
                    "resources": {**pool, "custom_resources_per_actor": NODE_RESOURCES[0]},
                },
                {
                    "name": "enc",
                    "path": str(bert),
                    "resources": {**pool, "custom_resources_per_actor": NODE_RESOURCES[1]},
                },
            ]
        },
    )
    cfg["model"].pop("heads")
    man = run(parse_config(cfg))
    decoders_node, encoders_node = model_cluster.worker_node_ids
    data = read_output(tmp_path / "labels" / "t1")
    ids = data.column("unit_id").to_pylist()
    assert not [u for u, n in Counter(ids).items() if n > 1], "units written twice"
    expected = read_units([InputSpec.from_dict(inputs[0])], limit_rows=24).column("unit_id").to_pylist()
    q = read_output(tmp_path / "labels" / "t1", "quarantine")
    assert Counter(ids + (q.column("unit_id").to_pylist() if q is not None else [])) == Counter(expected)
    assert man["scored_by_stage"] == {f"rm_dec@{decoders_node}": len(ids), f"rm_enc@{encoders_node}": len(ids)}
    assert data.column("rm_dec").null_count == 0 and data.column("rm_enc").null_count == 0
