"""Stage 1: per-objective ridge regression without intercept, from sufficient statistics.

A row may label only some objectives (NaN = missing). Each objective's normal equations use only
the rows that label it, so XᵀX differs per objective. Rather than keep K full H×H matrices, the
statistics keep one XᵀX per *label pattern* (the set of objectives a row labels): rated corpora
label a fixed set of objectives each, so there are about as many patterns as rated sources, and
objective k's XᵀX is the sum over the patterns that contain k. Everything sums, so shards
accumulate in parallel and `merge`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

DEFAULT_LAMBDA_GRID = tuple(10.0**e for e in range(-4, 5))  # 1e-4 .. 1e4


@dataclass
class RidgeStats:
    hidden_size: int
    num_objectives: int
    # label pattern (tuple of K bools) -> XᵀX over rows with exactly that pattern
    gram_by_pattern: dict[tuple[bool, ...], np.ndarray] = field(default_factory=dict)
    # Running sums, zero at the start; add() and merge() accumulate them.
    xty: np.ndarray = field(init=False)  # K×H: Σ y_k x over rows labelling k
    yty: np.ndarray = field(init=False)  # K:   Σ y_k² over rows labelling k
    count: np.ndarray = field(init=False)  # K:   rows labelling k

    def __post_init__(self):
        k, h = self.num_objectives, self.hidden_size
        self.xty = np.zeros((k, h), dtype=np.float64)
        self.yty = np.zeros(k, dtype=np.float64)
        self.count = np.zeros(k, dtype=np.int64)

    def add(self, X, Y, weight=None) -> RidgeStats:
        """Accumulate rows: X [N×H] embeddings, Y [N×K] targets with NaN for missing labels.

        `weight` [N] (non-negative integers): how many times each row counts, e.g. a bootstrap
        resample's multiplicities. The statistics then equal those of the rows repeated that many
        times (a weight of 0 drops the row), without materialising the repeated rows."""
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64).reshape(len(X), -1)
        if X.ndim != 2 or X.shape[1] != self.hidden_size or Y.shape[1] != self.num_objectives:
            raise ValueError(
                f"RidgeStats.add: expected X [N×{self.hidden_size}], Y [N×{self.num_objectives}], "
                f"got {X.shape}, {Y.shape}"
            )
        labelled = ~np.isnan(Y)
        Y0 = np.where(labelled, Y, 0.0)
        if weight is None:
            w = None
            Xw = X
        else:
            w = np.asarray(weight)
            if w.shape != (len(X),) or not np.issubdtype(w.dtype, np.integer) or (w < 0).any():
                raise ValueError(f"RidgeStats.add: weight must be {len(X)} non-negative integers")
            Xw = X * w[:, None]
        self.xty += Y0.T @ Xw
        self.yty += ((Y0 * Y0) * (1 if w is None else w[:, None])).sum(axis=0)
        self.count += (labelled * (1 if w is None else w[:, None])).sum(axis=0).astype(np.int64)
        patterns, inverse = np.unique(labelled, axis=0, return_inverse=True)
        for p_idx, pattern in enumerate(patterns):
            if not pattern.any():
                continue  # a row with no labels teaches nothing
            sel = inverse.reshape(-1) == p_idx
            rows = X[sel]
            key = tuple(bool(b) for b in pattern)
            gram = rows.T @ rows if w is None else rows.T @ Xw[sel]
            if key in self.gram_by_pattern:
                self.gram_by_pattern[key] += gram
            else:
                self.gram_by_pattern[key] = gram
        return self

    def merge(self, other: RidgeStats) -> RidgeStats:
        """Sum another shard's statistics into this one (returns self)."""
        if (other.hidden_size, other.num_objectives) != (self.hidden_size, self.num_objectives):
            raise ValueError("RidgeStats.merge: shape mismatch")
        self.xty += other.xty
        self.yty += other.yty
        self.count += other.count
        for key, gram in other.gram_by_pattern.items():
            if key in self.gram_by_pattern:
                self.gram_by_pattern[key] = self.gram_by_pattern[key] + gram
            else:
                self.gram_by_pattern[key] = gram.copy()
        return self

    def gram(self, k: int) -> np.ndarray:
        """XᵀX over the rows that label objective k."""
        out = np.zeros((self.hidden_size, self.hidden_size), dtype=np.float64)
        for key, gram in self.gram_by_pattern.items():
            if key[k]:
                out += gram
        return out

    def solve(self, lam) -> np.ndarray:
        """W [K×H] minimising Σ_rows (y_k − w_k·x)² + λ_k |w_k|² per objective (λ scalar or per objective).
        An objective with no labelled rows gets a zero row."""
        lams = np.broadcast_to(np.asarray(lam, dtype=np.float64), (self.num_objectives,))
        W = np.zeros((self.num_objectives, self.hidden_size), dtype=np.float64)
        eye = np.eye(self.hidden_size)
        for k in range(self.num_objectives):
            if self.count[k] == 0:
                continue
            W[k] = np.linalg.solve(self.gram(k) + lams[k] * eye, self.xty[k])
        return W

    def mse(self, W) -> np.ndarray:
        """Per-objective mean squared error of predictions X·w_k on these rows, from the statistics:
        (yᵀy − 2 wᵀXᵀy + wᵀXᵀXw) / n. NaN where an objective has no rows."""
        W = np.asarray(W, dtype=np.float64)
        out = np.full(self.num_objectives, np.nan)
        for k in range(self.num_objectives):
            if self.count[k]:
                w = W[k]
                sse = self.yty[k] - 2.0 * w @ self.xty[k] + w @ self.gram(k) @ w
                out[k] = max(sse, 0.0) / self.count[k]
        return out


class RidgeFit(NamedTuple):
    weight: np.ndarray  # K×H
    lambdas: np.ndarray  # K, chosen per objective (NaN: objective had no training rows)
    val_mse: np.ndarray  # K, validation MSE at the chosen λ (NaN: no validation rows)


def fit_ridge(train_stats: RidgeStats, val_stats: RidgeStats, grid=DEFAULT_LAMBDA_GRID) -> RidgeFit:
    """Choose λ per objective from `grid` by validation MSE, then return the train-set solution.

    One eigendecomposition of each objective's XᵀX serves every λ: w(λ) = Q (Λ+λ)⁻¹ Qᵀ Xᵀy.
    An objective without validation rows gets the middle grid value and NaN validation MSE, since
    nothing can rank the candidates; one without training rows gets a zero row and NaN λ.
    """
    grid = np.asarray(sorted(grid), dtype=np.float64)
    K, H = train_stats.num_objectives, train_stats.hidden_size
    W = np.zeros((K, H))
    lambdas = np.full(K, np.nan)
    mse_grid = np.full((K, len(grid)), np.nan)
    for k in range(K):
        if train_stats.count[k] == 0:
            continue
        evals, evecs = np.linalg.eigh(train_stats.gram(k))
        evals = np.clip(evals, 0.0, None)  # XᵀX is PSD; clip rounding noise
        proj = evecs.T @ train_stats.xty[k]
        candidates = [evecs @ (proj / (evals + lam)) for lam in grid]
        if val_stats.count[k] > 0:
            val_gram = val_stats.gram(k)
            for j, w in enumerate(candidates):
                sse = val_stats.yty[k] - 2.0 * w @ val_stats.xty[k] + w @ val_gram @ w
                mse_grid[k, j] = max(sse, 0.0) / val_stats.count[k]
            best = int(np.argmin(mse_grid[k]))  # first minimum: smallest λ among exact ties
        else:
            best = len(grid) // 2
        lambdas[k] = grid[best]
        # re-solve directly at the chosen λ (the eigen path is for ranking; solve is the accurate answer)
        W[k] = np.linalg.solve(train_stats.gram(k) + grid[best] * np.eye(H), train_stats.xty[k])
    return RidgeFit(weight=W, lambdas=lambdas, val_mse=val_stats.mse(W))
