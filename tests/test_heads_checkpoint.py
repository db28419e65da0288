"""The released ArmoRM layout: export our heads with a (tiny, random) Llama backbone, load it back with
our loader/scorer, and compare with an independent implementation written here in plain torch using
the release's rules (right-padded batch, response at the token before the first pad)."""

import json
import pathlib
import pickle

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from pipeline.heads.checkpoint import (ArmoRMScorer, CheckpointError, export_armorm_checkpoint,
                                       load_armorm_checkpoint, read_objective_names)
from pipeline.heads.gating import GatingNetwork
from pipeline.heads.model import ArmoHeads

PAD = 299
K, H = 5, 64


def tiny_llama_config():
    return LlamaConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, pad_token_id=PAD, max_position_embeddings=128)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return LlamaModel(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def heads():
    rng = np.random.default_rng(0)
    torch.manual_seed(1)
    gating = GatingNetwork(H, K, hidden_dim=48, n_hidden=3)
    with torch.no_grad():
        gating.logit_scale.fill_(1.3)
        for layer in gating.layers:
            layer.weight.mul_(8)  # logits of a size where temperature and the softmax axis matter
    T = np.eye(K)
    T[1, :] -= [0.05, 1.0, 0.2, 0.0, 0.125]
    return ArmoHeads([f"tiny.obj{i}" for i in range(K)], rng.normal(size=(K, H)) * 0.3, T, gating, verbosity_index=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, backbone, heads):
    out = tmp_path_factory.mktemp("ckpt") / "armo"
    export_armorm_checkpoint(heads, backbone, str(out), shard_size=60_000)
    return out


def sequences():
    rng = np.random.default_rng(3)
    lengths = [9, 17, 4, 12, 17, 6]
    seqs = [rng.integers(0, PAD, n).tolist() for n in lengths]
    prompt_end = [max(0, n // 2 - 1) for n in lengths]
    return seqs, prompt_end


def reference_outputs(backbone, heads, seqs, prompt_end):
    """Independent path: original in-memory model and head tensors, the release's position rule,
    the gating MLP written out by hand."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    mask = (ids != PAD).long()
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    # release rule: the token before the first pad, or the last position when there is none
    is_pad = ids == PAD
    resp_pos = torch.where(is_pad.any(1), is_pad.int().argmax(1) - 1, torch.full((len(seqs),), width - 1))
    rows = torch.arange(len(seqs))
    h_resp, h_prompt = hidden[rows, resp_pos], hidden[rows, torch.tensor(prompt_end)]
    W = torch.tensor(heads.regression_weight)
    T = torch.tensor(heads.transform)
    rewards = h_resp @ W.T
    g = {k: v for k, v in heads.gating.state_dict().items()}
    x = h_prompt
    for i in range(3):
        x = torch.relu(x @ g[f"layers.{i}.weight"].T + g[f"layers.{i}.bias"])
    logits = x @ g["layers.3.weight"].T + g["layers.3.bias"]
    gate = torch.softmax(logits / 10.0, dim=1) * g["logit_scale"]
    score = (gate * (rewards @ T)).sum(1)
    return rewards.numpy(), gate.numpy(), score.numpy(), h_resp.numpy(), h_prompt.numpy()


def test_export_writes_the_released_layout(exported, heads):
    config = json.loads((exported / "config.json").read_text())
    assert config["num_objectives"] == K and config["gating_temperature"] == 10.0
    assert config["gating_hidden_dim"] == 48 and config["gating_n_hidden"] == 3 and config["pad_token_id"] == PAD
    assert config["model_type"] == "llama" and config["hidden_size"] == H and config["num_hidden_layers"] == 2
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((exported / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    names = set(index["weight_map"])
    assert {"regression_layer.weight", "reward_transform_matrix", "gating.logit_scale"} <= names
    assert {f"gating.layers.{i}.{p}" for i in range(4) for p in ("weight", "bias")} <= names
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert not any(n.startswith("lm_head") for n in names)
    backbone_names = {n for n in names if n.startswith("model.")}
    assert len(backbone_names) == len(LlamaModel(tiny_llama_config()).state_dict())
    assert sorted(p.name for p in exported.iterdir() if not p.name.startswith("model-")) == \
        ["config.json", "model.safetensors.index.json"]


def test_roundtrip_restores_heads_and_backbone_exactly(exported, heads, backbone):
    config, weights, loaded = load_armorm_checkpoint(str(exported))
    assert loaded.fingerprint == heads.fingerprint
    assert loaded.objectives == heads.objectives and loaded.verbosity_index == 1
    state = weights.load()
    original = backbone.state_dict()
    assert set(state) == set(original)
    for name, value in original.items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_scorer_matches_independent_implementation_on_padded_batches(exported, heads, backbone, batch_size):
    seqs, prompt_end = sequences()
    ref_rewards, ref_gate, ref_score, ref_resp, ref_prompt = reference_outputs(backbone, heads, seqs, prompt_end)
    scorer = ArmoRMScorer(str(exported))
    out = scorer.score(seqs, prompt_end, batch_size=batch_size)
    np.testing.assert_allclose(out.response_embedding, ref_resp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.prompt_embedding, ref_prompt, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.rewards, ref_rewards, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.gating_output, ref_gate, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.score, ref_score, atol=1e-5, rtol=0)
    assert out.gating_output.std(axis=1).min() > 1e-3  # the gate is not uniform, so the axis is tested
    np.testing.assert_array_equal(out.gate, out.gating_output)
    np.testing.assert_allclose(out.debiased, ref_rewards @ heads.transform, atol=1e-5, rtol=0)


def test_objective_names_and_checkpoint_fingerprint(exported, heads, tmp_path):
    assert read_objective_names(str(exported)) == heads.objectives
    fp = ArmoRMScorer(str(exported)).fingerprint
    assert fp == ArmoRMScorer(str(exported)).fingerprint and len(fp) == 64
    changed = ArmoHeads(heads.objectives, heads.regression_weight * 2, heads.transform, heads.gating, 1)
    other = export_armorm_checkpoint(changed, str(exported), str(tmp_path / "other"), shard_size=60_000)
    assert ArmoRMScorer(other).fingerprint != fp


def test_released_config_without_our_keys_still_loads(exported, tmp_path):
    copy = tmp_path / "released_like"
    copy.mkdir()
    for p in exported.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    for key in ("objectives", "verbosity_index", "gating_dropout"):
        config.pop(key)
    (copy / "config.json").write_text(json.dumps(config))
    _, _, loaded = load_armorm_checkpoint(str(copy))
    assert loaded.objectives == [f"objective_{i}" for i in range(K)]
    assert loaded.verbosity_index == 1  # read off T: the only row that differs from the identity


def test_export_from_a_causal_lm_directory_drops_lm_head(tmp_path, heads, backbone, exported):
    torch.manual_seed(0)
    causal = LlamaForCausalLM(tiny_llama_config())
    causal.model.load_state_dict(backbone.state_dict())
    causal.save_pretrained(str(tmp_path / "hf"))
    out = export_armorm_checkpoint(heads, str(tmp_path / "hf"), str(tmp_path / "armo2"))
    _, weights, loaded = load_armorm_checkpoint(out)
    assert loaded.fingerprint == heads.fingerprint
    state = weights.load()
    assert set(state) == set(backbone.state_dict()) and "lm_head.weight" not in state
    assert all(torch.equal(state[n], v) for n, v in backbone.state_dict().items())


class _Trap:
    """Unpickling this creates a file: proof that a pickle was read."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_files_are_never_read(tmp_path, exported):
    marker = tmp_path / "UNPICKLED"
    trap = pickle.dumps(_Trap(str(marker)))
    # (1) only a pickle checkpoint: refused
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text((exported / "config.json").read_text())
    (only_bin / "pytorch_model.bin").write_bytes(trap)
    with pytest.raises(CheckpointError, match="never read"):
        load_armorm_checkpoint(str(only_bin))
    # (2) safetensors next to a pickle: loads, the pickle is untouched
    both = tmp_path / "both"
    both.mkdir()
    for p in exported.iterdir():
        (both / p.name).write_bytes(p.read_bytes())
    (both / "pytorch_model.bin").write_bytes(trap)
    (both / "model.pt").write_bytes(trap)
    load_armorm_checkpoint(str(both))
    # (3) an index pointing at a pickle shard: refused
    index = json.loads((both / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "pytorch_model.bin"
    (both / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="refusing shard"):
        load_armorm_checkpoint(str(both))
    assert not marker.exists()
    # sanity: the trap does fire when unpickled, so the assertion above means something
    pickle.loads(trap)
    assert marker.exists()


def test_unexpected_or_missing_tensors_are_errors(exported, tmp_path):
    from safetensors.torch import load_file, save_file
    copy = tmp_path / "extra"
    copy.mkdir()
    for p in exported.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["regression_layer.weight"]
    tensors = load_file(str(copy / shard))
    tensors["value_head.weight"] = torch.zeros(1, H)
    save_file(tensors, str(copy / shard))
    index["weight_map"]["value_head.weight"] = shard
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_armorm_checkpoint(str(copy))
    # a missing backbone tensor fails the strict backbone load
    del index["weight_map"]["value_head.weight"]
    del index["weight_map"]["model.norm.weight"]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    del tensors["value_head.weight"]
    save_file(tensors, str(copy / shard))
    with pytest.raises(RuntimeError, match="norm.weight"):
        ArmoRMScorer(str(copy))
