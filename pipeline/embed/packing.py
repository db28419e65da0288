"""Shared-prompt packing plans (pure, no torch).

Units whose prompt token ids are identical form a *group*: a preference pair, a best-of-N row, or
several input rows on the same instruction (PandaLM). A group is computed as one packed segment
`[prompt | response_1 | ... | response_k]` in which every response attends to the prompt and
causally to itself only, its positions continuing from the prompt's end; the prompt is computed
once. Several groups (and single conversations) share one packed row up to the token budget, with
no padding. A group too big for one row is split into *pieces*, each repeating the prompt.

Exactly what is computed (not what it costs) is decided here; the attention that realises the
layout lives in pipeline/embed/shared_attention.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


def prompt_groups(prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Group id per unit: units with identical prompt token ids share an id (ids in order of first
    appearance). Identity is on the token ids, so the same text under another template or a
    different truncation is a different group."""
    seen: dict[tuple, int] = {}
    return np.fromiter((seen.setdefault(tuple(p), len(seen)) for p in prompts), dtype=np.int64, count=len(prompts))


def _check(groups, prompt_lengths, response_lengths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.asarray(groups, dtype=np.int64).reshape(-1)
    p = np.asarray(prompt_lengths, dtype=np.int64).reshape(-1)
    r = np.asarray(response_lengths, dtype=np.int64).reshape(-1)
    if not (g.size == p.size == r.size):
        raise ValueError(f"{g.size} groups, {p.size} prompt lengths, {r.size} response lengths")
    if g.size and (p.min() < 1 or r.min() < 0 or g.min() < 0):
        raise ValueError("prompt lengths must be >= 1, response lengths >= 0, groups >= 0")
    if g.size:
        first = np.full(int(g.max()) + 1, -1, dtype=np.int64)
        first[g[::-1]] = p[::-1]  # the prompt length of each group's first unit
        if (first[g] != p).any():
            bad = int(np.flatnonzero(first[g] != p)[0])
            raise ValueError(f"unit {bad}: prompt length {int(p[bad])} differs from its group's {int(first[g[bad]])}")
    return g, p, r


def plan_shared_rows(
    groups: ArrayLike,
    prompt_lengths: ArrayLike,
    response_lengths: ArrayLike,
    token_budget: int,
    groups_per_row: int | None = None,
) -> list[list[np.ndarray]]:
    """Packed rows, each a list of pieces (unit indices of one group, sharing one prompt copy).

    A piece holds prompt + its responses within token_budget (a unit longer than the budget goes
    alone); pieces are placed first-fit, largest first, into rows of at most token_budget tokens
    and at most groups_per_row pieces (None: no limit). Deterministic for the same input.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, not {token_budget}")
    if groups_per_row is not None and groups_per_row < 1:
        raise ValueError(f"groups_per_row must be >= 1, not {groups_per_row}")
    g, p, r = _check(groups, prompt_lengths, response_lengths)
    if g.size == 0:
        return []
    # Pieces: within a group, longest responses first (stable), cut greedily at the budget.
    order = np.lexsort((np.arange(g.size), -r, g))
    pieces: list[np.ndarray] = []
    sizes: list[int] = []
    bounds = np.flatnonzero(np.diff(g[order])) + 1
    for members in np.split(order, bounds):
        prompt = int(p[members[0]])
        start, used = 0, prompt
        for k, u in enumerate(members):
            if k > start and used + int(r[u]) > token_budget:
                pieces.append(members[start:k])
                sizes.append(used)
                start, used = k, prompt
            used += int(r[u])
        pieces.append(members[start:])
        sizes.append(used)
    # Rows: first-fit decreasing (stable on ties, so plans are deterministic).
    rows: list[list[np.ndarray]] = []
    room: list[int] = []
    for k in np.argsort(-np.asarray(sizes), kind="stable"):
        size = sizes[k]
        for j, free in enumerate(room):
            if size <= free and (groups_per_row is None or len(rows[j]) < groups_per_row):
                rows[j].append(pieces[k])
                room[j] -= size
                break
        else:
            rows.append([pieces[k]])
            room.append(token_budget - size)
    return rows


@dataclass
class RowLayout:
    """One packed row, as the engine feeds it to the model.

    spans: (unit, begin, end) slices of units' token ids, concatenated in order, give the row's ids.
    positions: position id of every packed token (a response continues from its prompt's end).
    pieces: (start, prompt length, response lengths) per piece, in row order, for the attention.
    units: the row's units; response_at / prompt_at: the packed index of each one's response
    embedding (its last token; the prompt's last token when the response is empty) and of its
    prompt embedding. computed: packed tokens charged to each unit (its response, plus the prompt
    for the first unit of a piece), so they sum to the row length.
    """

    spans: np.ndarray  # [S, 3] int64
    positions: np.ndarray  # [L] int64
    pieces: list[tuple[int, int, np.ndarray]]
    units: np.ndarray
    response_at: np.ndarray
    prompt_at: np.ndarray
    computed: np.ndarray

    @property
    def length(self) -> int:
        return int(self.positions.size)


def layout_row(row: Sequence[np.ndarray], prompt_lengths: ArrayLike, response_lengths: ArrayLike) -> RowLayout:
    p_all = np.asarray(prompt_lengths, dtype=np.int64)
    r_all = np.asarray(response_lengths, dtype=np.int64)
    spans, positions, pieces, units, resp_at, prompt_at, computed = [], [], [], [], [], [], []
    start = 0
    for piece in row:
        piece = np.asarray(piece, dtype=np.int64)
        p = int(p_all[piece[0]])
        r = r_all[piece]
        spans.append((int(piece[0]), 0, p))
        spans.extend((int(u), p, p + int(n)) for u, n in zip(piece, r) if n > 0)
        positions.append(np.arange(p))
        positions.extend(np.arange(p, p + int(n)) for n in r)
        ends = start + p + np.cumsum(r) - 1
        resp_at.append(np.where(r > 0, ends, start + p - 1))
        prompt_at.append(np.full(piece.size, start + p - 1))
        charge = r.copy()
        charge[0] += p
        computed.append(charge)
        pieces.append((start, p, r))
        units.append(piece)
        start += p + int(r.sum())
    return RowLayout(
        spans=np.asarray(spans, dtype=np.int64).reshape(-1, 3),
        positions=np.concatenate(positions),
        pieces=pieces,
        units=np.concatenate(units),
        response_at=np.concatenate(resp_at),
        prompt_at=np.concatenate(prompt_at),
        computed=np.concatenate(computed),
    )


def useful_tokens(groups: ArrayLike, prompt_lengths: ArrayLike, response_lengths: ArrayLike) -> np.ndarray:
    """Tokens that must be computed per unit when each distinct prompt is computed once: its
    response, plus its prompt for the first unit of each group. Their sum is the bound packing
    can reach; computed / useful is the waste (padding, prompts repeated across pieces)."""
    g, p, r = _check(groups, prompt_lengths, response_lengths)
    first = np.zeros(g.size, dtype=bool)
    if g.size:
        first[np.unique(g, return_index=True)[1]] = True
    return r + np.where(first, p, 0)
