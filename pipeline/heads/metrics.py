"""Evaluation statistics, pure numpy. Ties are handled explicitly everywhere (average ranks, tau-b,
half credit) because reward scores and human labels both tie in practice."""

from __future__ import annotations

import numpy as np


def _as_1d(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    return a


def average_ranks(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    v = _as_1d(values)
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # boundaries of runs of equal values in sorted order
    starts = np.concatenate(([True], sorted_v[1:] != sorted_v[:-1]))
    run_id = np.cumsum(starts) - 1
    run_start = np.flatnonzero(starts)
    run_end = np.concatenate((run_start[1:], [len(v)]))  # exclusive
    mean_rank = (run_start + 1 + run_end) / 2.0           # mean of ranks start+1 .. end
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def pearson(x, y) -> float:
    """Pearson correlation; NaN when either side is constant."""
    a, b = _as_1d(x), _as_1d(y)
    if len(a) != len(b):
        raise ValueError("pearson: length mismatch")
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman rank correlation with average ranks for ties (Pearson of the ranks)."""
    return pearson(average_ranks(x), average_ranks(y))


def _tie_pairs(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    return float((counts * (counts - 1) / 2).sum())


def kendall_tau_b(x, y, chunk: int = 2048) -> float:
    """Kendall tau-b: (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)).

    O(n^2) sign products, computed in row chunks to bound memory; fine for evaluation-sized sets.
    """
    a, b = _as_1d(x), _as_1d(y)
    n = len(a)
    if n != len(b):
        raise ValueError("kendall_tau_b: length mismatch")
    s = 0.0
    for i0 in range(0, n, chunk):
        da = np.sign(a[i0:i0 + chunk, None] - a[None, :])
        db = np.sign(b[i0:i0 + chunk, None] - b[None, :])
        s += float((da * db).sum())
    s /= 2.0  # every unordered pair was counted twice
    n0 = n * (n - 1) / 2
    denom = np.sqrt((n0 - _tie_pairs(a)) * (n0 - _tie_pairs(b)))
    return float(s / denom) if denom > 0 else float("nan")


def pairwise_accuracy(score_chosen, score_rejected) -> float:
    """Share of pairs where the chosen response scores higher; an exact score tie counts as half."""
    c, r = _as_1d(score_chosen), _as_1d(score_rejected)
    if len(c) != len(r):
        raise ValueError("pairwise_accuracy: length mismatch")
    if len(c) == 0:
        return float("nan")
    return float(((c > r) + 0.5 * (c == r)).mean())


def best_of_n_top1(scores, group_ids, human_rank) -> float:
    """Best-of-N top-1 accuracy: per group, does the highest-scored response have human rank 0?

    Groups whose responses have no rank 0 are skipped. When several responses tie for the top
    score, the group earns the share of them that are human-best (so ties neither win nor lose
    by luck of order). Returns the mean over groups.
    """
    s = _as_1d(scores)
    g = np.asarray(group_ids).reshape(-1)
    rank = np.asarray(human_rank, dtype=np.float64).reshape(-1)
    if not (len(s) == len(g) == len(rank)):
        raise ValueError("best_of_n_top1: length mismatch")
    credits = []
    for group in np.unique(g):
        idx = np.flatnonzero(g == group)
        best = rank[idx] == 0
        if not best.any():
            continue
        top = s[idx] == s[idx].max()
        credits.append((top & best).sum() / top.sum())
    return float(np.mean(credits)) if credits else float("nan")
