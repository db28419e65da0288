"""Ranking agreement between model scores and human ranks, vectorised over groups (pure numpy).

One definition of each metric, for every place that reports it (curation manifests; evaluation and
the report are to follow). Inputs are flat, equally long arrays: a group key per unit (a prompt),
the model score and the human rank (0 = best; lower is better). A unit with a missing score or
human rank (None / NaN) takes no part.

Best-of-N top-1 agreement, per group (`best_of_n_top1`):
  * a group counts when it has >= 2 units with both a score and a human rank;
  * the human-best units are those with the group's lowest human rank (rank 0 unless that unit is
    missing or unscored);
  * credit = the share of the units tied for the group's top score that are human-best. Without a
    tie at the top this is 1 or 0; with one it is the expected hit of picking among the tied units
    at random, so a tie neither wins nor loses by the luck of row or id order.
  Scores [1, 1, 0] with human ranks [1, 0, 2]: two units tie for the top score, one of them is
  human-best, credit 0.5.

Kendall tau-b, per group (`kendall_tau_b_grouped`): tau_b = (C - D) / sqrt((n0 - t_x) (n0 - t_y))
over the n0 = n (n - 1) / 2 pairs of a group, t_x / t_y the pairs tied in x / y; NaN when the
denominator is 0 (either side constant, or n < 2). For scores against human ranks, correlate the
score with the NEGATED rank (a higher score should mean a lower rank): `rank_agreement` does so.
"""

from __future__ import annotations

import numpy as np

# Groups up to this size are computed as dense (groups, pairs) matrices; larger ones pair by pair
# in row chunks so memory stays bounded (evaluation sets can be one big group).
_DENSE_MAX = 64
_CHUNK = 2048


def group_codes(keys) -> tuple[np.ndarray, int]:
    """Dense integer codes 0..G-1 for group keys (ordered by key), and G."""
    keys = np.asarray(keys)
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    uniques, codes = np.unique(keys, return_inverse=True)
    return codes.reshape(-1).astype(np.int64), len(uniques)


def _as_float(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check(*arrays) -> None:
    if len({len(a) for a in arrays}) > 1:
        raise ValueError("metrics: inputs must have the same length")


def best_of_n_top1(groups, scores, human_rank, n_groups: int | None = None) -> np.ndarray:
    """Top-1 credit per group code (see the module doc); NaN for groups that do not count.

    `groups` are integer codes 0..n_groups-1 (see group_codes)."""
    g = np.asarray(groups, dtype=np.int64).reshape(-1)
    s, r = _as_float(scores), _as_float(human_rank)
    _check(g, s, r)
    n_groups = int(g.max()) + 1 if n_groups is None and g.size else (n_groups or 0)
    ok = ~np.isnan(s) & ~np.isnan(r)
    g, s, r = g[ok], s[ok], r[ok]
    out = np.full(n_groups, np.nan)
    if g.size == 0:
        return out
    size = np.bincount(g, minlength=n_groups)
    top = np.full(n_groups, -np.inf)
    np.maximum.at(top, g, s)
    best = np.full(n_groups, np.inf)
    np.minimum.at(best, g, r)
    at_top = s == top[g]
    hits = np.bincount(g, weights=at_top & (r == best[g]), minlength=n_groups)
    tied = np.bincount(g, weights=at_top, minlength=n_groups)
    counts = size >= 2
    out[counts] = hits[counts] / tied[counts]
    return out


def _pair_signs_dense(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """x, y: (groups, n) matrices -> per group C - D, pairs tied in x, pairs tied in y."""
    i, j = np.triu_indices(x.shape[1], k=1)
    dx = np.sign(x[:, j] - x[:, i])
    dy = np.sign(y[:, j] - y[:, i])
    return (dx * dy).sum(axis=1), (dx == 0).sum(axis=1), (dy == 0).sum(axis=1)


def _pair_signs_one(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """One large group, in row chunks: C - D, pairs tied in x, pairs tied in y."""
    s = tx = ty = 0.0
    for i0 in range(0, len(x), _CHUNK):
        dx = np.sign(x[i0:i0 + _CHUNK, None] - x[None, :])
        dy = np.sign(y[i0:i0 + _CHUNK, None] - y[None, :])
        s += float((dx * dy).sum())
        tx += float((dx == 0).sum())
        ty += float((dy == 0).sum())
    n = len(x)
    # Every unordered pair was seen twice; the diagonal (i == j) added n "ties" to each side.
    return s / 2.0, (tx - n) / 2.0, (ty - n) / 2.0


def kendall_tau_b_grouped(groups, x, y, n_groups: int | None = None) -> np.ndarray:
    """Kendall tau-b per group code; NaN where undefined. Units with a NaN in x or y take no part."""
    g = np.asarray(groups, dtype=np.int64).reshape(-1)
    x, y = _as_float(x), _as_float(y)
    _check(g, x, y)
    n_groups = int(g.max()) + 1 if n_groups is None and g.size else (n_groups or 0)
    ok = ~np.isnan(x) & ~np.isnan(y)
    g, x, y = g[ok], x[ok], y[ok]
    out = np.full(n_groups, np.nan)
    if g.size == 0:
        return out
    order = np.argsort(g, kind="stable")
    g, x, y = g[order], x[order], y[order]
    size = np.bincount(g, minlength=n_groups)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    cd = np.zeros(n_groups)
    tied_x = np.zeros(n_groups)
    tied_y = np.zeros(n_groups)
    # One vectorised pass per distinct group size (best-of-N sets have a handful of sizes).
    for n in np.unique(size[size >= 2]):
        which = np.flatnonzero(size == n)
        if n <= _DENSE_MAX:
            for lo in range(0, len(which), max(1, 200_000 // (n * n))):
                part = which[lo:lo + max(1, 200_000 // (n * n))]
                idx = start[part][:, None] + np.arange(n)[None, :]
                cd[part], tied_x[part], tied_y[part] = _pair_signs_dense(x[idx], y[idx])
        else:
            for k in which:
                sl = slice(start[k], start[k] + n)
                cd[k], tied_x[k], tied_y[k] = _pair_signs_one(x[sl], y[sl])
    n0 = size * (size - 1) / 2.0
    denom = np.sqrt((n0 - tied_x) * (n0 - tied_y))
    defined = denom > 0
    out[defined] = cd[defined] / denom[defined]
    return out


def kendall_tau_b(x, y) -> float:
    """Kendall tau-b of two equally long sequences (one group); NaN when undefined."""
    x, y = _as_float(x), _as_float(y)
    if len(x) != len(y):
        raise ValueError("kendall_tau_b: length mismatch")
    return float(kendall_tau_b_grouped(np.zeros(len(x), dtype=np.int64), x, y, n_groups=1)[0])


def rank_agreement(groups, scores, human_rank, n_groups: int | None = None) -> dict[str, np.ndarray]:
    """Per group: top-1 credit and Kendall tau-b of score vs human order, over the units that have both
    a score and a human rank; groups with fewer than 2 such units have NaN in both."""
    g = np.asarray(groups, dtype=np.int64).reshape(-1)
    s, r = _as_float(scores), _as_float(human_rank)
    n_groups = int(g.max()) + 1 if n_groups is None and g.size else (n_groups or 0)
    return {"top1": best_of_n_top1(g, s, r, n_groups), "tau_b": kendall_tau_b_grouped(g, s, -r, n_groups)}
