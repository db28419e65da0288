"""Gating network (released shape and names, softmax over objectives), its training on pairs, and
ArmoHeads scoring / persistence."""

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.heads.gating import GatingNetwork, train_gating
from pipeline.heads.model import ArmoHeads


def manual_gate(net: GatingNetwork, p: np.ndarray) -> np.ndarray:
    """The released forward written out with the raw tensors (eval mode: no dropout)."""
    sd = {k: v.double().numpy() for k, v in net.state_dict().items()}
    x = p.astype(np.float64)
    n_linear = len([k for k in sd if k.endswith(".weight")])
    for i in range(n_linear):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
        if i < n_linear - 1:
            x = np.maximum(x, 0)
    z = x / net.temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True) * sd["logit_scale"][0]


def test_gating_defaults_and_parameter_names_match_the_release():
    net = GatingNetwork(in_features=16, num_objectives=19)
    names = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert names == {
        "layers.0.weight": (1024, 16),
        "layers.0.bias": (1024,),
        "layers.1.weight": (1024, 1024),
        "layers.1.bias": (1024,),
        "layers.2.weight": (1024, 1024),
        "layers.2.bias": (1024,),
        "layers.3.weight": (19, 1024),
        "layers.3.bias": (19,),
        "logit_scale": (1,),
    }
    assert net.temperature == 10.0 and net.dropout == 0.2 and float(net.logit_scale.detach()) == 1.0


def test_gating_forward_is_softmax_over_objectives_times_beta():
    torch.manual_seed(0)
    net = GatingNetwork(8, 5, hidden_dim=32, n_hidden=2)
    with torch.no_grad():
        net.logit_scale.fill_(2.5)
        for layer in net.layers:
            layer.weight.mul_(20)  # make logits large enough that the temperature matters
    p = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    net.eval()
    gate = net(torch.from_numpy(p)).detach().numpy()
    np.testing.assert_allclose(gate, manual_gate(net, p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gate.sum(axis=1), 2.5, rtol=1e-6)  # sums to β over the objectives
    assert gate.std(axis=1).min() > 0.01  # not a softmax over the wrong axis
    # dropout acts in training mode only
    net.train()
    torch.manual_seed(1)
    assert not np.allclose(net(torch.from_numpy(p)).detach().numpy(), gate)
    net.eval()
    np.testing.assert_array_equal(net(torch.from_numpy(p)).detach().numpy(), gate)


def _conflicting_pairs(n, seed):
    """Prompt cluster A prefers objective 0, cluster B objective 1; the two objectives disagree, so no
    fixed weighting scores well but a prompt-dependent gate does."""
    rng = np.random.default_rng(seed)
    h = 12
    cluster = rng.integers(0, 2, n)
    centers = rng.normal(size=(2, h)) * 2
    prompt = centers[cluster] + 0.3 * rng.normal(size=(n, h))
    chosen = rng.uniform(size=(n, 3))
    rejected = rng.uniform(size=(n, 3))
    deciding = np.where(cluster == 0, 0, 1)
    other = 1 - deciding
    rows = np.arange(n)
    # chosen wins on the deciding objective, loses on the other one
    hi = np.maximum(chosen[rows, deciding], rejected[rows, deciding]) + 0.2
    lo = np.minimum(chosen[rows, deciding], rejected[rows, deciding])
    chosen[rows, deciding], rejected[rows, deciding] = hi, lo
    hi2 = np.maximum(chosen[rows, other], rejected[rows, other]) + 0.2
    lo2 = np.minimum(chosen[rows, other], rejected[rows, other])
    chosen[rows, other], rejected[rows, other] = lo2, hi2
    return prompt.astype(np.float32), chosen.astype(np.float32), rejected.astype(np.float32)


def test_train_gating_learns_prompt_dependent_weights_and_matches_inference():
    P, C, R = _conflicting_pairs(600, seed=0)
    VP, VC, VR = _conflicting_pairs(200, seed=1)
    kwargs = dict(
        val_prompt_emb=VP,
        val_debiased_chosen=VC,
        val_debiased_rejected=VR,
        steps=400,
        batch_size=128,
        hidden_dim=64,
        n_hidden=2,
        seed=3,
        eval_every=25,
        threads=1,
    )
    result = train_gating(P, C, R, **kwargs)
    # fixed weightings cannot beat chance-ish levels on this data; the gate must
    for w in ([1, 0, 0], [0, 1, 0], [1, 1, 1]):
        assert metrics.pairwise_accuracy(VC @ w, VR @ w) <= 0.6
    assert result.best_val_accuracy >= 0.93
    assert [h["step"] for h in result.history] == list(range(25, 401, 25))
    assert result.best_val_accuracy == max(h["val_accuracy"] for h in result.history)
    # the network kept is the best one, and inference reproduces its validation accuracy exactly
    net = result.network
    with torch.no_grad():
        gate = net(torch.from_numpy(VP)).numpy()
    acc = metrics.pairwise_accuracy((gate * VC).sum(1), (gate * VR).sum(1))
    assert acc == pytest.approx(result.best_val_accuracy, abs=1e-12)
    # seeded: a second run is bit-identical
    again = train_gating(P, C, R, **kwargs)
    for (k, a), (_, b) in zip(result.network.state_dict().items(), again.network.state_dict().items()):
        assert torch.equal(a, b), k


def _random_heads(h=10, k=4, seed=0, verbosity_index=2):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gating = GatingNetwork(h, k, hidden_dim=16, n_hidden=3)
    with torch.no_grad():
        gating.logit_scale.fill_(1.7)
    T = np.eye(k)
    T[verbosity_index, :] -= rng.uniform(0, 0.3, k)
    T[verbosity_index, verbosity_index] = 0.0
    return ArmoHeads(
        objectives=[f"src.obj{i}" for i in range(k)],
        regression_weight=rng.normal(size=(k, h)),
        transform=T,
        gating=gating,
        verbosity_index=verbosity_index,
        metadata={"lambdas": [0.1, 0.2]},
    )


def test_armo_heads_score_is_the_spec_formula():
    heads = _random_heads()
    rng = np.random.default_rng(9)
    x, p = rng.normal(size=(7, 10)), rng.normal(size=(7, 10))
    out = heads.score(x, p)
    W, T = heads.regression_weight.astype(np.float64), heads.transform.astype(np.float64)
    r = x @ W.T
    g = manual_gate(heads.gating, p.astype(np.float32))
    np.testing.assert_allclose(out.rewards, r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.debiased, r @ T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.gate, g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.score, (g * (r @ T)).sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.debiased[:, 2], 0.0, atol=1e-6)  # verbosity zeroed
    assert all(a.dtype == np.float32 for a in (out.rewards, out.debiased, out.gate, out.score))
    np.testing.assert_allclose(heads.debias(out.rewards), out.debiased, atol=1e-6)


def test_armo_heads_save_load_roundtrip_and_fingerprint(tmp_path):
    heads = _random_heads()
    fp = heads.save(str(tmp_path / "h"))
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["heads.json", "heads.safetensors"]
    loaded = ArmoHeads.load(str(tmp_path / "h"))
    assert loaded.fingerprint == fp == heads.fingerprint and len(fp) == 64
    assert loaded.objectives == heads.objectives and loaded.verbosity_index == 2
    assert loaded.metadata == {"lambdas": [0.1, 0.2]}
    x = np.random.default_rng(1).normal(size=(5, 10))
    a, b = heads.score(x, x), loaded.score(x, x)
    for field in ("rewards", "debiased", "gate", "score"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # any change to a tensor or a name changes the fingerprint
    other = _random_heads()
    other.regression_weight[0, 0] += 1e-3
    assert other.fingerprint != fp
    renamed = _random_heads()
    renamed.objectives[0] = "src.renamed"
    assert renamed.fingerprint != fp
    # a tampered tensor file is refused
    other.save(str(tmp_path / "o"))
    (tmp_path / "h" / "heads.safetensors").write_bytes((tmp_path / "o" / "heads.safetensors").read_bytes())
    with pytest.raises(ValueError, match="fingerprint"):
        ArmoHeads.load(str(tmp_path / "h"))
