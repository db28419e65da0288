"""Every statistic the project reports, defined once (pure numpy): correlations, pairwise accuracy,
and ranking agreement between model scores and human ranks, vectorised over groups.

Used by evaluation (pipeline.evaluation), heads training and debiasing (pipeline.heads), curation
manifests (pipeline.curation.rerank) and the HTML report, so they cannot disagree about a run.
Ties are handled explicitly everywhere (average ranks, tau-b, half or shared credit) because reward
scores and human labels both tie in practice.

Pairwise accuracy (`pairwise_accuracy`): the share of pairs where the chosen response scores
higher; an exact score tie counts as half. Inputs are flat, equally long arrays: a group key per unit (a prompt),
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


def _as_1d(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def average_ranks(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    v = _as_1d(values)
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    starts = np.concatenate(([True], sorted_v[1:] != sorted_v[:-1]))  # runs of equal values
    run_id = np.cumsum(starts) - 1
    run_start = np.flatnonzero(starts)
    run_end = np.concatenate((run_start[1:], [len(v)]))  # exclusive
    mean_rank = (run_start + 1 + run_end) / 2.0  # mean of ranks start+1 .. end
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


def pairwise_accuracy(score_chosen, score_rejected) -> float:
    """Share of pairs where the chosen response scores higher; an exact score tie counts as half."""
    c, r = _as_1d(score_chosen), _as_1d(score_rejected)
    if len(c) != len(r):
        raise ValueError("pairwise_accuracy: length mismatch")
    if len(c) == 0:
        return float("nan")
    return float(((c > r) + 0.5 * (c == r)).mean())


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


def _check(*arrays) -> None:
    if len({len(a) for a in arrays}) > 1:
        raise ValueError("metrics: inputs must have the same length")


def _usable(groups, a, b, n_groups: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Group codes and two value columns with the units missing either value dropped, and the
    number of groups (taken from the codes when not given)."""
    g = np.asarray(groups, dtype=np.int64).reshape(-1)
    a, b = _as_1d(a), _as_1d(b)
    _check(g, a, b)
    n_groups = int(g.max()) + 1 if n_groups is None and g.size else (n_groups or 0)
    ok = ~np.isnan(a) & ~np.isnan(b)
    return g[ok], a[ok], b[ok], n_groups


def _top1_stats(groups, scores, human_rank, n_groups: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per group code: the top-1 credit and its chance level (the share of the group's units that
    hold its lowest human rank), both NaN for groups that do not count (fewer than 2 usable units)."""
    g, s, r, n_groups = _usable(groups, scores, human_rank, n_groups)
    credit, chance = np.full(n_groups, np.nan), np.full(n_groups, np.nan)
    if g.size == 0:
        return credit, chance
    size = np.bincount(g, minlength=n_groups)
    top = np.full(n_groups, -np.inf)
    np.maximum.at(top, g, s)
    best = np.full(n_groups, np.inf)
    np.minimum.at(best, g, r)
    at_top, at_best = s == top[g], r == best[g]
    hits = np.bincount(g, weights=at_top & at_best, minlength=n_groups)
    tied = np.bincount(g, weights=at_top, minlength=n_groups)
    best_units = np.bincount(g, weights=at_best, minlength=n_groups)
    counts = size >= 2
    credit[counts] = hits[counts] / tied[counts]
    chance[counts] = best_units[counts] / size[counts]
    return credit, chance


def best_of_n_top1(groups, scores, human_rank, n_groups: int | None = None) -> np.ndarray:
    """Top-1 credit per group code (see the module doc); NaN for groups that do not count.

    `groups` are integer codes 0..n_groups-1 (see group_codes)."""
    return _top1_stats(groups, scores, human_rank, n_groups)[0]


def top1_chance(groups, scores, human_rank, n_groups: int | None = None) -> np.ndarray:
    """Per group, the top-1 credit of a random pick: the share of its units (with both a score and a
    human rank) that hold the group's lowest rank; NaN for groups that do not count for top-1."""
    return _top1_stats(groups, scores, human_rank, n_groups)[1]


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
        dx = np.sign(x[i0 : i0 + _CHUNK, None] - x[None, :])
        dy = np.sign(y[i0 : i0 + _CHUNK, None] - y[None, :])
        s += float((dx * dy).sum())
        tx += float((dx == 0).sum())
        ty += float((dy == 0).sum())
    n = len(x)
    # Every unordered pair was seen twice; the diagonal (i == j) added n "ties" to each side.
    return s / 2.0, (tx - n) / 2.0, (ty - n) / 2.0


def kendall_tau_b_grouped(groups, x, y, n_groups: int | None = None) -> np.ndarray:
    """Kendall tau-b per group code; NaN where undefined. Units with a NaN in x or y take no part."""
    g, x, y, n_groups = _usable(groups, x, y, n_groups)
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
                part = which[lo : lo + max(1, 200_000 // (n * n))]
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
    x, y = _as_1d(x), _as_1d(y)
    if len(x) != len(y):
        raise ValueError("kendall_tau_b: length mismatch")
    return float(kendall_tau_b_grouped(np.zeros(len(x), dtype=np.int64), x, y, n_groups=1)[0])


def rank_agreement(groups, scores, human_rank, n_groups: int | None = None) -> dict[str, np.ndarray]:
    """Per group: top-1 credit and Kendall tau-b of score vs human order, over the units that have both
    a score and a human rank; groups with fewer than 2 such units have NaN in both."""
    g = np.asarray(groups, dtype=np.int64).reshape(-1)
    s, r = _as_1d(scores), _as_1d(human_rank)
    n_groups = int(g.max()) + 1 if n_groups is None and g.size else (n_groups or 0)
    return {"top1": best_of_n_top1(g, s, r, n_groups), "tau_b": kendall_tau_b_grouped(g, s, -r, n_groups)}


def ranking_summary(groups, scores, human_rank, n_groups: int | None = None) -> dict:
    """Agreement over many groups: `groups` (those counting for top-1), `top1_hits` (their summed
    credit), `top1` (mean credit),
    `top1_chance` (mean chance level), `tau_groups` and `kendall_tau_b` (mean over the groups where
    tau-b is defined), and the per-group `taus`. Means are None when no group counts."""
    per = rank_agreement(groups, scores, human_rank, n_groups)
    top1, tau = per["top1"], per["tau_b"]
    counted = ~np.isnan(top1)
    taus = tau[~np.isnan(tau)]
    chance = top1_chance(groups, scores, human_rank, n_groups)[counted]
    return {
        "groups": int(counted.sum()),
        "top1_hits": float(top1[counted].sum()),
        "top1": float(top1[counted].mean()) if counted.any() else None,
        "top1_chance": float(chance.mean()) if counted.any() else None,
        "tau_groups": int(len(taus)),
        "kendall_tau_b": float(taus.mean()) if len(taus) else None,
        "taus": taus.tolist(),
    }


# --- uncertainty: selective accuracy and calibration ---------------------------------------------
COVERAGES = (25, 50, 75, 100)  # percent of pairs kept, most confident first
ECE_BINS = 10


def pair_uncertainty(std_a, std_b) -> np.ndarray:
    """The combined ensemble spread of a pair's two scores: sqrt(std_a² + std_b²)."""
    a, b = _as_1d(std_a), _as_1d(std_b)
    return np.sqrt(a * a + b * b)


def pair_confidence(margin, uncertainty=None) -> np.ndarray:
    """|margin| / uncertainty (|margin| alone when uncertainty is None). A zero uncertainty gives
    +inf for a non-zero margin and 0 for a zero margin."""
    m = np.abs(_as_1d(margin))
    if uncertainty is None:
        return m
    u = _as_1d(uncertainty)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = m / u
    return np.where(u > 0, c, np.where(m > 0, np.inf, 0.0))


def _selective_order(confidence: np.ndarray) -> np.ndarray:
    """Pairs by confidence, highest first; equal confidences keep their input order."""
    return np.argsort(-confidence, kind="stable")


def selective_accuracy(margin, confidence, coverages=COVERAGES) -> dict[str, float | None]:
    """Pairwise accuracy (a margin > 0 is right, = 0 counts half) of the most confident
    ceil(X/100 · n) pairs, for each coverage X in percent; keys are str(X). None without pairs."""
    m = _as_1d(margin)
    c = _as_1d(confidence)
    if len(m) != len(c):
        raise ValueError("selective_accuracy: length mismatch")
    if len(m) == 0:
        return {str(x): None for x in coverages}
    right = ((m > 0) + 0.5 * (m == 0))[_selective_order(c)]
    cum = np.cumsum(right)
    out: dict[str, float | None] = {}
    for x in coverages:
        k = max(1, int(np.ceil(len(m) * x / 100.0 - 1e-9)))
        out[str(x)] = float(cum[k - 1] / k)
    return out


def selective_auc(margin, confidence) -> float | None:
    """Area under the accuracy-coverage curve: the mean over k = 1..n of the accuracy of the k most
    confident pairs (1 for a perfect ordering of right before wrong, the accuracy for a useless one
    on average). None without pairs."""
    m, c = _as_1d(margin), _as_1d(confidence)
    if len(m) == 0:
        return None
    right = ((m > 0) + 0.5 * (m == 0))[_selective_order(c)]
    return float((np.cumsum(right) / np.arange(1, len(m) + 1)).mean())


def expected_calibration_error(margin, temperature: float = 1.0, bins: int = ECE_BINS) -> float | None:
    """ECE of the Bradley-Terry probability p = sigmoid(margin / T) that the human-chosen response
    wins: each pair predicts the side p favours with confidence max(p, 1 − p) and is right when the
    margin is positive (a zero margin: confidence ½, half right). Pairs are binned by confidence
    in `bins` equal-width bins over [½, 1] (the last one closed); ECE = Σ_b (n_b / n) |acc_b − conf_b|.
    None without pairs."""
    m = _as_1d(margin)
    if len(m) == 0:
        return None
    p = 1.0 / (1.0 + np.exp(-m / float(temperature)))
    conf = np.maximum(p, 1.0 - p)
    right = (m > 0) + 0.5 * (m == 0)
    b = np.minimum(((conf - 0.5) * 2.0 * bins).astype(np.int64), bins - 1)
    n = np.bincount(b, minlength=bins)
    acc = np.bincount(b, weights=right, minlength=bins)
    cf = np.bincount(b, weights=conf, minlength=bins)
    used = n > 0
    return float((np.abs(acc[used] - cf[used])).sum() / len(m))
