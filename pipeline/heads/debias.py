"""Verbosity debiasing (docs/armorm.md, "Verbosity debiasing").

For each objective i other than the verbosity objective v, r'_i = r_i − λ_i·r_v with λ_i the smallest
grid value for which Spearman(r'_i, r_v) ≤ threshold on a reference set (λ_i = 1 if none does); the
verbosity objective itself is zeroed (λ_v = 1). As a matrix: T = I with T[v, :] −= λ, and r' = r·T.

Corpora without a verbosity rating: the verbosity signal must still be something the heads compute
from the embedding alone, or inference could not apply T (and the result could not be exported in
the released layout). So the training code appends a *length pseudo-objective*: a ridge head
fitted onto `length_target(response_tokens)`, whose predicted rating plays r_v. Debiasing then runs
on that column exactly as for a rated verbosity objective, and training and inference both compute
r·T from embeddings. (Its debiased rating is 0 by construction, like the release's verbosity.)
"""

from __future__ import annotations

import numpy as np

from pipeline.metrics import average_ranks, spearman  # noqa: F401  (spearman is part of this module's API)

# {0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, …, 0.95}
DEFAULT_DEBIAS_GRID = (0.0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15) + tuple(
    round(0.2 + 0.05 * i, 4) for i in range(16)
)
LENGTH_OBJECTIVE = "verbosity.response_length"
LENGTH_CAP_TOKENS = 4096


def length_target(response_tokens, cap: int = LENGTH_CAP_TOKENS) -> np.ndarray:
    """Response length mapped to [0, 1] as log(1+n)/log(1+cap), clipped: the ridge target of the
    length pseudo-objective (log, because rating drift grows sub-linearly with length)."""
    n = np.asarray(response_tokens, dtype=np.float64)
    return np.clip(np.log1p(np.maximum(n, 0.0)) / np.log1p(cap), 0.0, 1.0)


def fit_verbosity_debias(
    ratings, verbosity=None, verbosity_index: int | None = None, grid=DEFAULT_DEBIAS_GRID, threshold: float = 0.03
) -> tuple[np.ndarray, np.ndarray]:
    """Return (T [K×K], lambdas [K]) for ratings [N×K] (regression outputs on a reference set).

    `verbosity_index` names the verbosity column (r_v = ratings[:, v]). `verbosity`, if given as
    well, must be that same column (it is accepted so callers can pass the signal explicitly).
    With no verbosity objective, append the length pseudo-objective first (see module doc):
    an external vector that the heads cannot compute at inference is refused.
    With verbosity_index None and verbosity None, there is nothing to debias: T = I, λ = 0.
    """
    R = np.asarray(ratings, dtype=np.float64)
    if R.ndim != 2:
        raise ValueError("ratings must be N×K")
    K = R.shape[1]
    if verbosity_index is None:
        if verbosity is not None:
            raise ValueError(
                "an external verbosity vector cannot be applied at inference as r·T; append a "
                "length pseudo-objective (ridge onto length_target) and pass its index"
            )
        return np.eye(K), np.zeros(K)
    v = int(verbosity_index)
    r_v = R[:, v]
    if verbosity is not None and not np.allclose(np.asarray(verbosity, dtype=np.float64), r_v):
        raise ValueError("verbosity differs from ratings[:, verbosity_index]")
    grid = sorted(float(g) for g in grid)
    lambdas = np.ones(K)
    for i in range(K):
        if i == v:
            continue  # zeroed: λ_v = 1
        for lam in grid:
            rho = spearman(R[:, i] - lam * r_v, r_v)
            if rho <= threshold:
                lambdas[i] = lam
                break
    T = np.eye(K)
    T[v, :] -= lambdas
    return T, lambdas
