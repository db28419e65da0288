"""pipeline.metrics: the one definition of best-of-N top-1 agreement and Kendall tau-b."""

import math

import numpy as np
import pytest
from metric_references import brute_tau_b

from pipeline import metrics


def brute_top1(scores, ranks):
    """Share of the units tied for the top score that hold the lowest human rank."""
    pairs = [(s, r) for s, r in zip(scores, ranks) if not (math.isnan(s) or math.isnan(r))]
    if len(pairs) < 2:
        return float("nan")
    top = max(s for s, _ in pairs)
    best = min(r for _, r in pairs)
    tied = [r for s, r in pairs if s == top]
    return sum(r == best for r in tied) / len(tied)


def test_tied_top_scores_share_the_credit():
    # The documented answer (module doc): two units tie for the top score, one is human-best -> 0.5.
    assert metrics.best_of_n_top1([0, 0, 0], [1, 1, 0], [1, 0, 2]).tolist() == [0.5]
    assert metrics.rank_agreement([0, 0, 0], [1, 1, 0], [1, 0, 2])["top1"].tolist() == [0.5]
    # and without ties it is a plain hit or miss, whatever the row order
    assert metrics.best_of_n_top1([0, 0, 0], [0.2, 0.9, 0.1], [1, 0, 2]).tolist() == [1.0]
    assert metrics.best_of_n_top1([0, 0, 0], [0.9, 0.2, 0.1], [1, 0, 2]).tolist() == [0.0]


def test_top1_counts_groups_of_two_or_more_ranked_and_scored_units():
    groups = [0, 0, 1, 1, 2, 2, 2]
    scores = [0.5, np.nan, 0.3, 0.1, 0.2, 0.4, 0.4]
    ranks = [0, 1, np.nan, 0, 2, 1, 1]
    got = metrics.best_of_n_top1(groups, scores, ranks)
    assert math.isnan(got[0]) and math.isnan(got[1])  # one usable unit each
    assert got[2] == 1.0  # both top-tied units share the best rank 1


def test_grouped_metrics_match_brute_force_on_random_groups():
    rng = np.random.default_rng(11)
    sizes = list(rng.integers(1, 9, 300)) + [70, 130]  # two groups take the large-group path
    g = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(g)  # groups need not be contiguous
    s = rng.integers(0, 4, len(g)).astype(float)
    r = rng.integers(0, 3, len(g)).astype(float)
    s[rng.random(len(g)) < 0.05] = np.nan
    r[rng.random(len(g)) < 0.1] = np.nan
    got = metrics.rank_agreement(g, s, r)
    for k in range(len(sizes)):
        m = (g == k) & ~np.isnan(s) & ~np.isnan(r)
        want_tau, want_top1 = brute_tau_b(list(s[m]), list(-r[m])), brute_top1(list(s[g == k]), list(r[g == k]))
        for a, b in ((got["tau_b"][k], want_tau), (got["top1"][k], want_top1)):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def test_kendall_tau_b_of_one_sequence(monkeypatch):
    assert metrics.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert metrics.kendall_tau_b([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) == pytest.approx(-0.47140452079103173)
    assert math.isnan(metrics.kendall_tau_b([1, 1, 1], [1, 2, 3]))
    monkeypatch.setattr(metrics, "_CHUNK", 7)  # the row-chunked path, several chunks
    x = np.random.default_rng(3).integers(0, 5, 300).astype(float)
    y = x + np.random.default_rng(4).integers(0, 2, 300)
    assert metrics.kendall_tau_b(x, y) == pytest.approx(brute_tau_b(list(x), list(y)), abs=1e-12)


def test_group_codes_are_dense_and_ordered_by_key():
    codes, n = metrics.group_codes(np.array(["b", "a", "b", "c"], dtype=object))
    assert codes.tolist() == [1, 0, 1, 2] and n == 3
