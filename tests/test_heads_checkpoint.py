"""The released ArmoRM layout's pure parts (pipeline/heads/checkpoint.py): heads from their tensors,
the export's config.json, shard packing, the grown embedding. Files, backbones and tokenizers are
tested in test_embed_checkpoint.py."""

import ast
import pathlib

import numpy as np
import pytest
import torch

from pipeline.heads.checkpoint import (
    ARMORM_ARCHITECTURE,
    RELEASE_OBJECTIVES,
    CheckpointError,
    armorm_config,
    check_shard_names,
    config_objective_names,
    grow_embedding,
    heads_from_checkpoint,
    infer_verbosity_index,
    llama_config_dict,
    pack_shards,
    shard_file_name,
)
from pipeline.heads.gating import GatingNetwork
from pipeline.heads.model import ArmoHeads

K, H = 5, 16


@pytest.fixture(scope="module")
def heads():
    torch.manual_seed(1)
    T = np.eye(K)
    T[1, :] -= [0.05, 1.0, 0.2, 0.0, 0.125]
    rng = np.random.default_rng(0)
    return ArmoHeads(
        [f"o{i}" for i in range(K)],
        rng.normal(size=(K, H)),
        T,
        GatingNetwork(H, K, hidden_dim=8, n_hidden=3),
        verbosity_index=1,
    )


def llama(**over):
    return {
        "model_type": "llama",
        "hidden_size": H,
        "vocab_size": 100,
        "pad_token_id": 2,
        "eos_token_id": 2,
        "auto_map": {"AutoModel": "x.Y"},
        "_name_or_path": "/somewhere",
        **over,
    }


def test_export_config_holds_the_released_keys_and_the_dedicated_pad(heads):
    config = armorm_config(llama(), heads, pad_token_id=100, vocab_size=101)
    assert config["architectures"] == [ARMORM_ARCHITECTURE]
    assert config["pad_token_id"] == 100 and config["vocab_size"] == 101 and config["eos_token_id"] == 2
    assert (
        config["num_objectives"],
        config["gating_temperature"],
        config["gating_hidden_dim"],
        config["gating_n_hidden"],
    ) == (K, 10.0, 8, 3)
    assert config["objectives"] == heads.objectives and config["verbosity_index"] == 1
    assert "auto_map" not in config and "_name_or_path" not in config  # no remote code, no local paths
    plain = llama_config_dict(config)
    assert "num_objectives" not in plain and "architectures" not in plain and plain["vocab_size"] == 101


def test_export_config_refusals(heads):
    with pytest.raises(CheckpointError, match="Llama"):
        armorm_config(llama(model_type="bert"), heads, 100, 101)
    with pytest.raises(CheckpointError, match="hidden_size 32"):
        armorm_config(llama(hidden_size=32), heads, 100, 101)
    with pytest.raises(CheckpointError, match="outside the vocabulary"):
        armorm_config(llama(), heads, 101, 101)


def test_heads_round_trip_through_their_tensors(heads):
    config = armorm_config(llama(), heads, 100, 101)
    loaded = heads_from_checkpoint(config, heads.tensors(), "ckpt")
    assert loaded.fingerprint == heads.fingerprint and loaded.verbosity_index == 1
    # the release's config has none of our keys: names by count, verbosity index read off T
    for key in ("objectives", "verbosity_index", "gating_dropout"):
        config.pop(key)
    bare = heads_from_checkpoint(config, heads.tensors(), "ckpt")
    assert bare.objectives == [f"objective_{i}" for i in range(K)] and bare.verbosity_index == 1
    np.testing.assert_array_equal(bare.regression_weight, heads.regression_weight)


def test_heads_refusals(heads):
    config = armorm_config(llama(), heads, 100, 101)
    tensors = heads.tensors()
    with pytest.raises(CheckpointError, match="reward_transform_matrix missing"):
        heads_from_checkpoint(config, {k: v for k, v in tensors.items() if k != "reward_transform_matrix"}, "c")
    with pytest.raises(CheckpointError, match="config says 4"):
        heads_from_checkpoint({**config, "num_objectives": 4, "objectives": None}, tensors, "c")
    with pytest.raises(CheckpointError, match="4 gating layers, config implies 3"):
        heads_from_checkpoint({**config, "gating_n_hidden": 2}, tensors, "c")
    with pytest.raises(CheckpointError, match="not an ArmoRM config"):
        heads_from_checkpoint({"model_type": "llama"}, tensors, "c")


def test_objective_names_and_verbosity_index():
    assert config_objective_names({"num_objectives": 19}, "c") == list(RELEASE_OBJECTIVES)
    assert config_objective_names({"num_objectives": 2, "objectives": ["a", "b"]}, "c") == ["a", "b"]
    with pytest.raises(CheckpointError, match="3 objective names for 2"):
        config_objective_names({"num_objectives": 2, "objectives": ["a", "b", "c"]}, "c")
    T = np.eye(4)
    assert infer_verbosity_index(T) is None
    T[2, 0] = -0.3
    assert infer_verbosity_index(T) == 2
    T[0, 1] = 0.1
    assert infer_verbosity_index(T) is None  # two rows differ: not a verbosity matrix


def test_shard_packing_is_greedy_and_keeps_big_tensors_alone():
    assert pack_shards([4, 4, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert pack_shards([3], 1) == [[0]]
    assert shard_file_name(2, 13) == "model-00002-of-00013.safetensors"


def test_shard_names_outside_plain_safetensors_are_refused():
    check_shard_names({"a": "model-00001-of-00002.safetensors"}, "idx")
    for bad in ("pytorch_model.bin", "../model.safetensors", "sub/model.safetensors"):
        with pytest.raises(CheckpointError, match="refusing shard"):
            check_shard_names({"a": bad}, "idx")


def test_grown_embedding_keeps_every_row_and_adds_their_mean():
    w = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    grown = grow_embedding(w, 5)
    assert grown.shape == (5, 3) and torch.equal(grown[:4], w)
    torch.testing.assert_close(grown[4], w.mean(0))
    assert grow_embedding(w, 4) is w


def test_heads_package_imports_no_backbone_code():
    """heads/ is math and naming: it never imports the embedding package, Ray or transformers."""
    for path in sorted((pathlib.Path(__file__).parents[1] / "pipeline" / "heads").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert not name.startswith(("pipeline.embed", "ray", "transformers")), f"{path.name} imports {name}"
                if isinstance(node, ast.ImportFrom) and node.level:
                    assert not (node.module or "").startswith("embed"), f"{path.name} imports ..{node.module}"
