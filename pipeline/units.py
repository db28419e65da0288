"""Views of a labeled-units table (the labeling job's output, or an embed-only run's): embeddings,
human labels, preference pairs and ranked best-of-N groups, as index arrays into the table.

Training (pipeline.heads.train) and evaluation (pipeline.evaluation) read human labels through
these functions only, so both see the same pairs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import numpy as np
import pyarrow as pa


class Pairs(NamedTuple):
    better: np.ndarray  # unit positions of the preferred responses
    worse: np.ndarray  # unit positions of the other responses
    tie: np.ndarray  # bool: labelled a tie (better/worse is then arbitrary)
    source: np.ndarray  # source name per pair (object array)
    row_id: np.ndarray  # the input row each pair comes from (object array)

    def __len__(self) -> int:
        return len(self.better)

    def select(self, mask) -> Pairs:
        return Pairs(*(a[mask] for a in self))


def _column(units: pa.Table, name: str) -> list:
    return units.column(name).to_pylist()


def preference_pairs(units: pa.Table, include_ties: bool = False) -> Pairs:
    """chosen vs rejected of each preference row whose two units are both present."""
    kind, pref, tie = _column(units, "kind"), _column(units, "preference"), _column(units, "tie")
    rows, src = _column(units, "row_id"), _column(units, "source")
    by_row: dict[str, dict] = defaultdict(dict)
    for i in range(units.num_rows):
        if kind[i] == "preference" and pref[i] in ("chosen", "rejected") and (include_ties or not tie[i]):
            by_row[rows[i]][pref[i]] = i
    found = [(pos["chosen"], pos["rejected"]) for pos in by_row.values() if len(pos) == 2]
    return _pairs(found, tie, src, rows)


def ranked_groups(units: pa.Table) -> dict[str, list[np.ndarray]]:
    """Positions of each best-of-N row's human-ranked responses (two or more), per source."""
    kind, rank = _column(units, "kind"), _column(units, "human_rank")
    rows, src = _column(units, "row_id"), _column(units, "source")
    groups: dict[str, list[int]] = defaultdict(list)
    for i in range(units.num_rows):
        if kind[i] == "best_of_n" and rank[i] is not None:
            groups[rows[i]].append(i)
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for positions in groups.values():
        if len(positions) >= 2:
            out[src[positions[0]]].append(np.array(positions))
    return out


def ranked_pairs(units: pa.Table) -> Pairs:
    """Every pair of differently ranked responses to one best-of-N prompt (lower rank = better)."""
    rank, tie = _column(units, "human_rank"), [False] * units.num_rows
    found = []
    for groups in ranked_groups(units).values():
        for g in groups:
            for a in g:
                for b in g:
                    if rank[a] < rank[b]:
                        found.append((a, b))
    return _pairs(found, tie, _column(units, "source"), _column(units, "row_id"))


def _pairs(found: list[tuple[int, int]], tie, src, rows) -> Pairs:
    better = np.array([a for a, _ in found], dtype=np.int64)
    worse = np.array([b for _, b in found], dtype=np.int64)
    return Pairs(
        better,
        worse,
        np.array([bool(tie[a]) for a in better], dtype=bool),
        np.array([src[a] for a in better], dtype=object),
        np.array([rows[a] for a in better], dtype=object),
    )


def concat_pairs(*parts: Pairs) -> Pairs:
    return Pairs(*(np.concatenate([p[i] for p in parts]) for i in range(len(Pairs._fields))))


def human_ratings(units: pa.Table) -> dict[str, np.ndarray]:
    """Objective name -> human rating on [0, 1] per unit (NaN where the unit has none)."""
    out: dict[str, np.ndarray] = {}
    for i, ratings in enumerate(_column(units, "ratings")):
        for r in ratings or []:
            if r["name"] not in out:
                out[r["name"]] = np.full(units.num_rows, np.nan)
            out[r["name"]][i] = r["value"]
    return out


def embeddings_of(units: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Response and prompt embeddings [N×H] stored by a run with `embeddings: true`."""

    def stack(col: str) -> np.ndarray:
        arr = units.column(col).combine_chunks()
        width = len(arr[0]) if len(arr) else 0
        return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), width).astype(np.float32)

    return stack("embedding"), stack("prompt_embedding")


def response_tokens(units: pa.Table) -> np.ndarray:
    return units.column("response_tokens").to_numpy(zero_copy_only=False).astype(np.float64)
