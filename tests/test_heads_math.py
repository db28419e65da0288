"""Pure math of the heads: metrics, ridge from sufficient statistics, verbosity debiasing, Bradley-Terry.
Each is checked against a reference computed another way (lstsq, brute-force loops, optimality)."""

import itertools
import math

import numpy as np
import pytest

from pipeline import metrics
from pipeline.heads.bradley_terry import BradleyTerryHead, bt_loss, fit_bradley_terry, fit_bradley_terry_cv
from pipeline.heads.debias import DEFAULT_DEBIAS_GRID, fit_verbosity_debias, length_target, spearman
from pipeline.heads.regression import DEFAULT_LAMBDA_GRID, RidgeStats, fit_ridge


# --- brute-force references -------------------------------------------------------------------
def brute_ranks(x):
    # rank = 1 + (number strictly smaller) + (number of other equal values) / 2
    return [1 + sum(b < a for b in x) + (sum(b == a for b in x) - 1) / 2 for a in x]


def brute_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def brute_tau_b(x, y):
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            tx += 1
            ty += 1
        elif dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif dx * dy > 0:
            conc += 1
        else:
            disc += 1
    n0 = len(x) * (len(x) - 1) / 2
    return (conc - disc) / math.sqrt((n0 - tx) * (n0 - ty))


# --- metrics ------------------------------------------------------------------------------------
def test_average_ranks_with_ties_match_brute_force():
    x = [3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.5]
    assert metrics.average_ranks(x).tolist() == brute_ranks(x) == [5.0, 1.5, 5.0, 3.0, 5.0, 1.5, 7.0]


def test_pearson_spearman_kendall_against_references():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 60).astype(float)  # many ties
    y = x + rng.integers(-2, 3, 60).astype(float)
    assert metrics.pearson(x, y) == pytest.approx(brute_pearson(list(x), list(y)), abs=1e-12)
    assert metrics.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert spearman(x, y) == pytest.approx(brute_pearson(brute_ranks(list(x)), brute_ranks(list(y))), abs=1e-12)
    assert metrics.kendall_tau_b(x, y) == pytest.approx(brute_tau_b(list(x), list(y)), abs=1e-12)
    # the same pairs as one big group (chunked pair pass) and as one of two groups (dense pass)
    big = np.concatenate([x] * 2), np.concatenate([y] * 2)
    assert metrics.kendall_tau_b(*big) == pytest.approx(brute_tau_b(list(big[0]), list(big[1])), abs=1e-12)
    assert metrics.kendall_tau_b_grouped([0] * 30 + [1] * 30, x[:60], y[:60])[0] == pytest.approx(
        brute_tau_b(list(x[:30]), list(y[:30])), abs=1e-12
    )
    # monotone transforms leave rank statistics unchanged; reversal flips the sign
    assert spearman(np.exp(x), y) == pytest.approx(spearman(x, y), abs=1e-12)
    assert metrics.kendall_tau_b(-x, y) == pytest.approx(-metrics.kendall_tau_b(x, y), abs=1e-12)
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))


def test_pairwise_accuracy_counts_ties_as_half():
    assert metrics.pairwise_accuracy([2, 1, 3, 5], [1, 1, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_best_of_n_top1():
    scores = [0.9, 0.1, 0.5, 0.2, 0.8, 0.7, 0.7, 0.1, 0.3, 0.4]
    groups = ["a", "a", "a", "b", "b", "c", "c", "c", "d", "d"]
    rank = [0, 1, 2, 0, 1, 1, 0, 2, 1, 2]
    # a: top is rank 0 → 1; b: top is rank 1 → 0; c: two-way tie at top, one best → 0.5;
    # d: its best present rank is 1 and the top score has rank 2 → 0 (pipeline.metrics' one rule)
    codes, n = metrics.group_codes(groups)
    assert metrics.best_of_n_top1(codes, scores, rank, n).tolist() == [1, 0, 0.5, 0]
    assert metrics.ranking_summary(codes, scores, rank, n)["top1"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)


# --- ridge --------------------------------------------------------------------------------------
def _ridge_data(seed=1, n=240, h=7, k=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, h))
    W_true = rng.normal(size=(k, h))
    Y = X @ W_true.T + 0.3 * rng.normal(size=(n, k))
    # label patterns as rated corpora give them: source A labels {0,1}, source B labels {2}, a few label all
    pattern = rng.integers(0, 3, n)
    Y[pattern == 0, 2] = np.nan
    Y[pattern == 1, :2] = np.nan
    return X, Y


def _lstsq_ridge(X, y, lam):
    """Ridge as plain least squares on the augmented system [X; √λ I] w ≈ [y; 0]."""
    h = X.shape[1]
    A = np.vstack([X, math.sqrt(lam) * np.eye(h)])
    b = np.concatenate([y, np.zeros(h)])
    return np.linalg.lstsq(A, b, rcond=None)[0]


def test_ridge_solve_matches_lstsq_per_objective_with_missing_labels():
    X, Y = _ridge_data()
    stats = RidgeStats(hidden_size=7, num_objectives=3).add(X, Y)
    assert stats.count.tolist() == (~np.isnan(Y)).sum(axis=0).tolist()
    for lam in (1e-4, 0.5, 100.0):
        W = stats.solve(lam)
        for k in range(3):
            rows = ~np.isnan(Y[:, k])
            np.testing.assert_allclose(W[k], _lstsq_ridge(X[rows], Y[rows, k], lam), atol=1e-8, rtol=0)


def test_ridge_stats_merge_equals_single_pass():
    X, Y = _ridge_data(seed=2)
    whole = RidgeStats(7, 3).add(X, Y)
    parts = [RidgeStats(7, 3).add(X[i : i + 50], Y[i : i + 50]) for i in range(0, len(X), 50)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    np.testing.assert_allclose(merged.solve(0.1), whole.solve(0.1), atol=1e-10)
    assert merged.count.tolist() == whole.count.tolist()
    for k in range(3):
        np.testing.assert_allclose(merged.gram(k), whole.gram(k), atol=1e-9)


def test_fit_ridge_chooses_lambda_by_validation_mse_like_brute_force():
    X, Y = _ridge_data(seed=3, n=300, h=12)
    # few training rows for a wide model, so λ matters
    train, val = slice(0, 40), slice(40, 300)
    fit = fit_ridge(RidgeStats(12, 3).add(X[train], Y[train]), RidgeStats(12, 3).add(X[val], Y[val]))
    for k in range(3):
        tr = ~np.isnan(Y[train, k])
        va = ~np.isnan(Y[val, k])
        mses = []
        for lam in DEFAULT_LAMBDA_GRID:
            w = _lstsq_ridge(X[train][tr], Y[train][tr, k], lam)
            mses.append(np.mean((X[val][va] @ w - Y[val][va, k]) ** 2))
        best = int(np.argmin(mses))
        assert fit.lambdas[k] == DEFAULT_LAMBDA_GRID[best]
        assert fit.val_mse[k] == pytest.approx(mses[best], abs=1e-8)
        np.testing.assert_allclose(
            fit.weight[k], _lstsq_ridge(X[train][tr], Y[train][tr, k], fit.lambdas[k]), atol=1e-8, rtol=0
        )
    W, lambdas, val_mse = fit  # unpacks as (W, lambdas, val MSE)
    assert W.shape == (3, 12)


def test_ridge_objective_without_rows_gets_zero_weights():
    X, Y = _ridge_data(seed=4)
    Y = np.hstack([Y, np.full((len(Y), 1), np.nan)])
    fit = fit_ridge(RidgeStats(7, 4).add(X[:150], Y[:150]), RidgeStats(7, 4).add(X[150:], Y[150:]))
    assert np.all(fit.weight[3] == 0) and math.isnan(fit.lambdas[3]) and math.isnan(fit.val_mse[3])


# --- verbosity debiasing ------------------------------------------------------------------------
def test_debias_grid_is_the_spec_grid():
    expected = [0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15] + [0.2 + 0.05 * i for i in range(16)]
    np.testing.assert_allclose(DEFAULT_DEBIAS_GRID, expected, atol=1e-12)
    assert DEFAULT_DEBIAS_GRID[-1] == pytest.approx(0.95)


def test_fit_verbosity_debias_picks_smallest_lambda_and_builds_T():
    rng = np.random.default_rng(5)
    n = 400
    r_v = rng.uniform(size=n)
    ratings = np.column_stack(
        [
            0.6 * r_v + rng.normal(scale=0.3, size=n),  # verbosity-driven
            -0.2 * r_v + rng.normal(scale=0.2, size=n),  # shorter is better here: λ = 0
            0.3 * r_v + rng.normal(scale=0.1, size=n),  # strongly driven
            r_v,  # the verbosity objective (index 3)
            3.0 * r_v,  # never drops to 0.03 within the grid: λ = 1
        ]
    )
    T, lambdas = fit_verbosity_debias(ratings, verbosity_index=3)
    assert lambdas[3] == 1.0 and lambdas[4] == 1.0
    grid = list(DEFAULT_DEBIAS_GRID)
    for i in (0, 1, 2):
        # brute force: first grid value whose brute-force Spearman is ≤ 0.03
        def rho(lam, i=i):
            return brute_pearson(brute_ranks(list(ratings[:, i] - lam * r_v)), brute_ranks(list(r_v)))

        expected = next(lam for lam in grid if rho(lam) <= 0.03)
        assert lambdas[i] == expected
    assert lambdas[1] == 0.0 and lambdas[0] > 0 and lambdas[2] > 0
    expected_T = np.eye(5)
    expected_T[3, :] -= lambdas
    np.testing.assert_array_equal(T, expected_T)
    debiased = ratings @ T
    for i in (0, 1, 2, 4):
        np.testing.assert_allclose(debiased[:, i], ratings[:, i] - lambdas[i] * r_v, atol=1e-12)
    np.testing.assert_allclose(debiased[:, 3], 0.0, atol=1e-12)


def test_debias_without_verbosity_objective():
    R = np.random.default_rng(0).normal(size=(20, 3))
    T, lambdas = fit_verbosity_debias(R)
    assert np.array_equal(T, np.eye(3)) and np.array_equal(lambdas, np.zeros(3))
    with pytest.raises(ValueError, match="pseudo-objective"):
        fit_verbosity_debias(R, verbosity=np.arange(20.0))
    assert length_target([0, 4096, 10**6]).tolist() == [0.0, 1.0, 1.0]
    assert 0 < length_target([63])[0] == pytest.approx(math.log(64) / math.log(4097))


# --- Bradley-Terry ------------------------------------------------------------------------------
def _pairs(seed=6, n=300, h=6):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=h)
    a, b = rng.normal(size=(n, h)), rng.normal(size=(n, h))
    a_wins = rng.uniform(size=n) < 1 / (1 + np.exp(-(a - b) @ w_true))
    chosen = np.where(a_wins[:, None], a, b)
    rejected = np.where(a_wins[:, None], b, a)
    return chosen, rejected, w_true


def test_bradley_terry_reaches_the_regularised_optimum():
    chosen, rejected, w_true = _pairs()
    tie = np.zeros(len(chosen), bool)
    tie[:30] = True
    l2 = 1e-2
    w = fit_bradley_terry(chosen, rejected, tie=tie, l2=l2)
    # first-order optimality, written out in numpy: mean((σ(z) − t) d) + l2 w = 0
    d = chosen - rejected
    t = np.where(tie, 0.5, 1.0)
    grad = ((1 / (1 + np.exp(-(d @ w))) - t)[:, None] * d).mean(axis=0) + l2 * w
    assert np.abs(grad).max() < 1e-7
    # a worse point has higher loss, and the fit recovers the true direction
    assert bt_loss(w, d, tie, l2) < bt_loss(w * 1.1, d, tie, l2)
    assert np.dot(w, w_true) / np.linalg.norm(w) / np.linalg.norm(w_true) > 0.9
    np.testing.assert_array_equal(w, fit_bradley_terry(chosen, rejected, tie=tie, l2=l2))  # deterministic


def test_bradley_terry_all_ties_give_zero_weights():
    chosen, rejected, _ = _pairs(n=50)
    w = fit_bradley_terry(chosen, rejected, tie=np.ones(50, bool), l2=1e-3)
    assert np.abs(w).max() < 1e-8


def test_bradley_terry_cv_and_single_score_head_roundtrip(tmp_path):
    chosen, rejected, _ = _pairs(n=400)
    w, l2, val_loss = fit_bradley_terry_cv(chosen[:300], rejected[:300], chosen[300:], rejected[300:])
    losses = {
        g: bt_loss(fit_bradley_terry(chosen[:300], rejected[:300], l2=g), chosen[300:] - rejected[300:])
        for g in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    }
    assert l2 == min(losses, key=losses.get) and val_loss == pytest.approx(losses[l2])
    head = BradleyTerryHead(weight=w, name="baseline")
    head.save(str(tmp_path))
    loaded = BradleyTerryHead.load(str(tmp_path))
    np.testing.assert_allclose(loaded.score(chosen), chosen @ w, atol=1e-5)
    assert loaded.fingerprint == head.fingerprint
    acc = metrics.pairwise_accuracy(loaded.score(chosen[300:]), loaded.score(rejected[300:]))
    assert acc > 0.7
