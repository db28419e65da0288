"""Grouping sequences into padded batches under a token budget (pure, no torch).

Sorting by length before batching keeps padding small: a batch padded to its longest row wastes
little when its rows have similar lengths. The budget counts *padded* tokens (rows x longest row),
which is what the forward pass really computes and what bounds its memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def plan_batches(lengths: ArrayLike, token_budget: int, max_rows: int | None = None) -> list[np.ndarray]:
    """Indices of `lengths` grouped into batches, longest rows first.

    Each batch's padded size (rows x its longest row) is <= token_budget, except a single row
    longer than the budget, which goes alone. Longest first: the largest batch (the memory peak)
    runs first, so an out-of-memory shows up at once rather than late in a job.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, not {token_budget}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, not {max_rows}")
    lengths_arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths_arr.size and lengths_arr.min() < 0:
        raise ValueError("lengths must be >= 0")
    # Stable sort on -length: equal lengths keep their input order (deterministic plans).
    order = np.argsort(-lengths_arr, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = order.size
    while start < n:
        longest = max(int(lengths_arr[order[start]]), 1)  # an empty row still occupies a slot
        rows = max(token_budget // longest, 1)
        if max_rows is not None:
            rows = min(rows, max_rows)
        batches.append(order[start : start + rows])
        start += rows
    return batches


def check_permutation(batches: Sequence[np.ndarray], n: int) -> None:
    """Raise if the batches do not hold each of 0..n-1 exactly once (a row lost or duplicated)."""
    flat = (
        np.concatenate([np.asarray(b, dtype=np.int64).reshape(-1) for b in batches])
        if len(batches)
        else np.zeros(0, np.int64)
    )
    outside = (flat < 0) | (flat >= n)
    counts = np.bincount(flat[~outside], minlength=n)
    if flat.size != n or outside.any() or (counts != 1).any():
        lost = np.flatnonzero(counts == 0)[:5].tolist()
        twice = np.flatnonzero(counts > 1)[:5].tolist()
        raise AssertionError(
            f"batches hold {flat.size} rows, not a permutation of 0..{n - 1}: "
            f"lost {lost}, duplicated {twice}, out of range {flat[outside][:5].tolist()}"
        )


def restore_order(batches: Sequence[np.ndarray], outputs: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Stack per-batch outputs (row j of outputs[b] belongs to input row batches[b][j]) back into
    input order, after checking that every row comes back exactly once."""
    check_permutation(batches, n)
    if not outputs:
        raise ValueError("no outputs to restore")
    first = np.asarray(outputs[0])
    result = np.empty((n,) + first.shape[1:], dtype=first.dtype)
    for idx, out in zip(batches, outputs, strict=True):
        out = np.asarray(out)
        if out.shape[0] != len(idx):
            raise AssertionError(f"a batch of {len(idx)} rows returned {out.shape[0]} outputs")
        result[idx] = out
    return result


def plan_packs(lengths: ArrayLike, token_budget: int) -> list[np.ndarray]:
    """Indices grouped into packs for padding-free (varlen) passes: rows longest first, each pack
    holding at most token_budget real tokens (a single longer row goes alone)."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, not {token_budget}")
    lengths_arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    order = np.argsort(-lengths_arr, kind="stable")
    packs: list[np.ndarray] = []
    start, used = 0, 0
    for k, i in enumerate(order):
        size = max(int(lengths_arr[i]), 1)
        if k > start and used + size > token_budget:
            packs.append(order[start:k])
            start, used = k, 0
        used += size
    if start < order.size:
        packs.append(order[start:])
    return packs
