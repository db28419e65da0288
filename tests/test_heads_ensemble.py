"""Ensembles of heads (heads.ensemble: K): the weighted sufficient statistics, the prompt bootstrap
and the spread against brute-force references written here; training, saving, loading and the
errors on synthetic units with a known linear truth."""

import json

import numpy as np
import pyarrow as pa
import pytest
from test_heads_train import SMALL_GATING, synthetic_units

from pipeline.heads import ensemble as ens
from pipeline.heads.regression import RidgeStats
from pipeline.heads.train import train_heads

H = 16


def _units(seed=1, **kw) -> pa.Table:
    """synthetic_units with a prompt_id (the units of a row share one) and a backbone fingerprint."""
    t = synthetic_units(seed=seed, **kw)
    rows = t.column("row_id").to_pylist()
    t = t.append_column("prompt_id", pa.array([f"prompt-{r}" for r in rows]))
    return t.append_column("backbone_fingerprint", pa.array(["bb-1"] * t.num_rows))


OPTS = {"gating": {**SMALL_GATING, "steps": 60}, "baseline": False}


@pytest.fixture(scope="module")
def trained():
    return train_heads(_units(n_rated=200, n_pairs=200, n_groups=30), {**OPTS, "ensemble": 3})


def test_weighted_ridge_statistics_equal_the_repeated_rows():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 5))
    Y = rng.normal(size=(40, 3))
    Y[rng.random((40, 3)) < 0.3] = np.nan
    w = rng.integers(0, 4, 40)
    got = RidgeStats(5, 3).add(X, Y, w)
    # brute force: repeat the rows, then per objective the normal equations over its labelled rows
    Xr, Yr = np.repeat(X, w, axis=0), np.repeat(Y, w, axis=0)
    for k in range(3):
        gram = np.zeros((5, 5))
        xty = np.zeros(5)
        yty, n = 0.0, 0
        for i in range(len(Xr)):
            if not np.isnan(Yr[i, k]):
                gram += np.outer(Xr[i], Xr[i])
                xty += Yr[i, k] * Xr[i]
                yty += Yr[i, k] ** 2
                n += 1
        np.testing.assert_allclose(got.gram(k), gram, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.xty[k], xty, rtol=1e-12, atol=1e-12)
        assert got.yty[k] == pytest.approx(yty, rel=1e-12)
        assert got.count[k] == n
    with pytest.raises(ValueError, match="non-negative integers"):
        RidgeStats(5, 3).add(X, Y, w - 5)
    with pytest.raises(ValueError, match="non-negative integers"):
        RidgeStats(5, 3).add(X, Y, w * 0.5)


def test_prompt_bootstrap_draws_whole_prompts_independently_of_row_order():
    prompts = np.array([f"p{i % 7}" for i in range(30)], dtype=object)
    in_fit = np.arange(30) % 10 != 0  # a few validation units
    m = ens.bootstrap_multiplicities(prompts, in_fit, seed=11)
    # every unit of a prompt has its prompt's count; the counts of the distinct prompts sum to their number
    per_prompt = {}
    for p, c, f in zip(prompts, m, in_fit):
        if f:
            assert per_prompt.setdefault(p, c) == c
    assert sum(per_prompt.values()) == len(per_prompt) == 7
    assert (m[~in_fit] == 1).all()
    perm = np.random.default_rng(0).permutation(30)
    m2 = ens.bootstrap_multiplicities(prompts[perm], in_fit[perm], seed=11)
    np.testing.assert_array_equal(m2, m[perm])
    assert not np.array_equal(m, ens.bootstrap_multiplicities(prompts, in_fit, seed=12))


def test_spread_against_loops():
    s = np.random.default_rng(5).normal(size=(9, 4))
    got = ens.spread(s)
    for i in range(9):
        row = list(s[i])
        mean = sum(row) / 4
        assert got.mean[i] == pytest.approx(mean)
        assert got.std[i] == pytest.approx((sum((v - mean) ** 2 for v in row) / 3) ** 0.5)
        assert got.min[i] == min(row)
    with pytest.raises(ValueError, match="K >= 2"):
        ens.spread(s[:, :1])
    # with each member's score of the bare prompt, the std is that of the advantages; mean and min stay
    at_prompt = np.random.default_rng(6).normal(size=(9, 4))
    rel = ens.spread(s, at_prompt)
    for i in range(9):
        adv = [s[i, j] - at_prompt[i, j] for j in range(4)]
        mean = sum(adv) / 4
        assert rel.std[i] == pytest.approx((sum((v - mean) ** 2 for v in adv) / 3) ** 0.5)
    np.testing.assert_array_equal(rel.mean, got.mean)
    np.testing.assert_array_equal(rel.min, got.min)
    with pytest.raises(ValueError, match="do not match"):
        ens.spread(s, at_prompt[:, :3])


def _member(W, seed=0):
    import torch

    from pipeline.heads.gating import GatingNetwork
    from pipeline.heads.model import ArmoHeads

    torch.manual_seed(seed)
    return ArmoHeads([f"o{k}" for k in range(len(W))], W, np.eye(len(W)), GatingNetwork(W.shape[1], len(W), 8))


def test_score_std_ignores_a_prompt_level_the_members_disagree_on():
    """Members that differ only along a direction u on which every response and its prompt agree
    (x·u = p·u) put each prompt at their own level and rank its responses identically: score_std 0,
    though the raw scores differ. Members that differ along the responses' own direction get a spread."""
    rng = np.random.default_rng(7)
    u = np.zeros(H)
    u[0] = 1.0
    P = rng.normal(size=(30, H))
    P[:, 0] = 1.0 + np.abs(P[:, 0])  # every prompt (and so its responses) away from 0 along u
    X = P + rng.normal(size=(30, H)) * np.r_[0.0, np.ones(H - 1)]  # the response moves off the prompt, never along u
    W = rng.normal(size=(3, H))
    shifted = [_member(W + np.outer(rng.normal(size=3), u)) for _ in range(4)]
    e = ens.HeadsEnsemble(shifted, [{}] * 4, "p", None)
    raw = e.member_scores(X, P)
    assert raw.std(axis=1).min() > 0.1  # the levels differ …
    np.testing.assert_allclose(e.score(X, P).std, 0.0, atol=1e-5)  # … the advantages do not
    # a margin within a prompt is the same for every member
    X2 = P + rng.normal(size=(30, H)) * np.r_[0.0, np.ones(H - 1)]
    margins = raw - e.member_scores(X2, P)
    np.testing.assert_allclose(margins.std(axis=1), 0.0, atol=1e-4)
    v = np.r_[0.0, rng.normal(size=H - 1)]
    apart = [_member(W + np.outer(rng.normal(size=3), v)) for _ in range(4)]
    assert (ens.HeadsEnsemble(apart, [{}] * 4, "p", None).score(X, P).std > 1e-3).all()


def test_members_differ_primary_unchanged_and_round_trip(trained, tmp_path):
    e = trained.ensemble
    assert e.size == 3 and e.backbone_fingerprint == "bb-1"
    assert e.primary_fingerprint == trained.heads.fingerprint
    # ensemble 0 gives the same primary heads, bit for bit
    alone = train_heads(_units(n_rated=200, n_pairs=200, n_groups=30), OPTS)
    assert alone.ensemble is None and alone.heads.fingerprint == trained.heads.fingerprint
    fps = {m.fingerprint for m in e.members}
    assert len(fps) == 3 and trained.heads.fingerprint not in fps
    assert len({r["bootstrap_seed"] for r in e.records}) == 3
    assert [r["gating_seed"] for r in e.records] == [1, 2, 3]
    X = np.asarray(_units().column("embedding").to_pylist()[:50], np.float32)
    P = np.asarray(_units().column("prompt_embedding").to_pylist()[:50], np.float32)
    scores = e.member_scores(X, P)
    assert scores.shape == (50, 3) and (scores.std(axis=1) > 0).all()
    e.save(str(tmp_path / "ens"))
    back = ens.HeadsEnsemble.load(str(tmp_path / "ens"))
    assert back.fingerprint == e.fingerprint
    np.testing.assert_array_equal(back.member_scores(X, P), scores)
    # an edited file is refused
    meta = json.loads((tmp_path / "ens" / ens.META_FILE).read_text())
    meta["members"][1]["gating_seed"] = 99
    (tmp_path / "ens" / ens.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ens.EnsembleError, match="ensemble fingerprint mismatch"):
        ens.HeadsEnsemble.load(str(tmp_path / "ens"))


def test_ensemble_checks_heads_and_backbone(trained):
    e = trained.ensemble
    e.check(trained.heads.fingerprint, "bb-1")
    with pytest.raises(ens.EnsembleError, match="backbone"):
        e.check(trained.heads.fingerprint, "bb-2")
    with pytest.raises(ens.EnsembleError, match="beside heads"):
        e.check("f" * 64, "bb-1")


def test_an_ensemble_bound_to_an_export_keeps_its_members_and_says_where_it_came_from(trained, tmp_path):
    e = trained.ensemble
    b = e.bound_to("c" * 64, "ckpt-1", why="jobs.export_armorm")
    assert [m.fingerprint for m in b.members] == [m.fingerprint for m in e.members] and b.records == e.records
    assert b.fingerprint != e.fingerprint
    b.check("c" * 64, "ckpt-1")
    with pytest.raises(ens.EnsembleError, match="beside heads"):
        b.check(trained.heads.fingerprint, "ckpt-1")  # no longer the trained heads' ids
    b.save(str(tmp_path / "bound"))
    back = ens.HeadsEnsemble.load(str(tmp_path / "bound"))
    assert back.fingerprint == b.fingerprint
    assert back.metadata["bound_from"] == {
        "primary_fingerprint": trained.heads.fingerprint,
        "backbone_fingerprint": "bb-1",
        "why": "jobs.export_armorm",
    }


def test_ensemble_errors_are_clear(monkeypatch):
    small = _units(n_rated=4, n_pairs=4, n_groups=0)
    with pytest.raises(ens.EnsembleError, match="need at least 10 distinct training prompts"):
        train_heads(small, {**OPTS, "ensemble": 2})
    with pytest.raises(ValueError, match="heads.ensemble: expected 0"):
        train_heads(small, {**OPTS, "ensemble": 1})
    with pytest.raises(ValueError, match="heads.ensemble: expected 0"):
        train_heads(small, {**OPTS, "ensemble": "3"})
    mixed = _units(n_rated=40, n_pairs=40, n_groups=0)
    bb = ["bb-1"] * (mixed.num_rows - 1) + ["bb-2"]
    mixed = mixed.set_column(mixed.column_names.index("backbone_fingerprint"), "backbone_fingerprint", pa.array(bb))
    with pytest.raises(ens.EnsembleError, match="2 backbones"):
        train_heads(mixed, {**OPTS, "ensemble": 2})
    # a member that fails to train stops the training (never a smaller ensemble)
    import pipeline.heads.train as train_mod

    real_fit = train_mod._fit

    def failing(prep, opts, mult=None, gating_seed=None):
        if mult is not None and gating_seed == 2:
            raise ValueError("boom")
        return real_fit(prep, opts, mult, gating_seed)

    monkeypatch.setattr(train_mod, "_fit", failing)
    with pytest.raises(ens.EnsembleError, match=r"member 1 of 3 .* failed to train: boom"):
        train_heads(_units(n_rated=40, n_pairs=40, n_groups=0), {**OPTS, "ensemble": 3})


def test_a_member_without_rows_for_a_rated_objective_is_an_error():
    # one rated row among many prompts: a resample that misses it cannot fit that objective
    units = _units(n_rated=1, n_pairs=60, n_groups=0, seed=4)
    opts = OPTS
    assert np.isfinite(train_heads(units, opts).summary["objectives"]["sfres.overall"]["lambda"])
    with pytest.raises(
        ens.EnsembleError, match=r"failed to train: its resample has no training rows for \['sfres.overall'\]"
    ):
        train_heads(units, {**opts, "ensemble": 6})
