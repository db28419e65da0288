"""Best-of-N reranking and its agreement with human ranks, as pure functions over one prompt's units.

Model rank 0 is the highest score; equal scores are ordered by unit_id, so a rerun (or another
row order) gives the same ranks. Agreement with human ranks (0 = best) uses the units that have a
human rank: top-1 agreement asks whether the model's best ranked unit is a human-best one; Kendall's
tau-b compares the score order with the human order (higher score vs lower human rank), with the
tie correction of tau-b for tied scores or tied human ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def rank_units(units: pd.DataFrame, top_k: int | None = None) -> pd.DataFrame:
    """The units of one prompt ordered best first, with `rank` (0 = best) and, if top_k, cut to k."""
    neg = -pd.to_numeric(units["score"], errors="coerce").to_numpy(dtype=np.float64)
    scored = units.assign(_neg=neg)[~np.isnan(neg)]
    ordered = scored.sort_values(["_neg", "unit_id"], kind="mergesort").drop(columns="_neg")
    ordered = ordered.assign(rank=np.arange(len(ordered), dtype=np.int32))
    return ordered.head(top_k) if top_k else ordered


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b between two equally long sequences; NaN when either is constant (or n < 2).

    tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2)), n0 = n(n-1)/2 pairs, n1 / n2 the pairs tied in x / y.
    O(n^2) over the pair matrix: groups here are best-of-N sets of a handful of responses.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("kendall_tau_b needs two 1-d sequences of the same length")
    n = len(x)
    if n < 2:
        return float("nan")
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    dx = np.sign(x[None, :] - x[:, None])[upper]
    dy = np.sign(y[None, :] - y[:, None])[upper]
    n0 = n * (n - 1) / 2
    tied_x = float(np.sum(dx == 0))
    tied_y = float(np.sum(dy == 0))
    denom = np.sqrt((n0 - tied_x) * (n0 - tied_y))
    if denom == 0:
        return float("nan")
    return float(np.sum(dx * dy) / denom)


@dataclass
class Agreement:
    groups_ranked: int = 0      # prompts with >= 2 human-ranked units
    top1_hits: int = 0          # of those, where the model's best is a human-best unit
    tau_groups: int = 0         # of those, where tau-b is defined (neither side constant)
    tau_sum: float = 0.0

    def add(self, other: "Agreement") -> None:
        self.groups_ranked += other.groups_ranked
        self.top1_hits += other.top1_hits
        self.tau_groups += other.tau_groups
        self.tau_sum += other.tau_sum

    def to_dict(self) -> dict:
        return {"groups_ranked": self.groups_ranked, "top1_hits": self.top1_hits,
                "top1_agreement": self.top1_hits / self.groups_ranked if self.groups_ranked else None,
                "tau_groups": self.tau_groups, "tau_sum": self.tau_sum,
                "mean_kendall_tau_b": self.tau_sum / self.tau_groups if self.tau_groups else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Agreement":
        return cls(d["groups_ranked"], d["top1_hits"], d["tau_groups"], d["tau_sum"])


def group_agreement(units: pd.DataFrame) -> Agreement:
    """Agreement between model scores and human ranks for one prompt's units."""
    ranked = units[~pd.isna(units["human_rank"]) & ~pd.isna(units["score"])]
    out = Agreement()
    if len(ranked) < 2:
        return out
    out.groups_ranked = 1
    model_best = rank_units(ranked).iloc[0]
    out.top1_hits = int(model_best["human_rank"] == ranked["human_rank"].min())
    tau = kendall_tau_b(ranked["score"].to_numpy(dtype=np.float64), -ranked["human_rank"].to_numpy(dtype=np.float64))
    if not np.isnan(tau):
        out.tau_groups = 1
        out.tau_sum = tau
    return out


def agreement_over_prompts(units: pd.DataFrame) -> Agreement:
    """Agreement summed over every prompt in `units` (grouped by prompt_id)."""
    total = Agreement()
    for _, group in units.groupby("prompt_id", sort=True):
        total.add(group_agreement(group))
    return total
