"""Best-of-N reranking and its agreement with human ranks, over whole columns of many prompts.

Model rank 0 is the highest score; equal scores are ordered by unit_id, so a rerun (or another
row order) gives the same ranks. Units without a score get no rank. Agreement with human ranks
(0 = best) uses the units that have both a score and a human rank, with the one definition of
top-1 agreement and Kendall tau-b in pipeline.metrics (a tie for the top score earns the share of
the tied units that are human-best).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import metrics

__all__ = ["Agreement", "agreement_over_prompts", "group_agreement", "rank_order", "rank_units"]


def _table(units) -> pa.Table:
    if isinstance(units, pa.Table):
        return units
    t = pa.Table.from_pandas(units, preserve_index=False)
    return t.cast(pa.schema([f.with_type(pa.string()) if f.type == pa.large_string() else f for f in t.schema]))


def float_column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for nulls."""
    return pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)


def group_starts(sorted_keys) -> np.ndarray:
    """Start offsets of the runs of equal values in a sorted key column (an Arrow array)."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    change = pc.not_equal(sorted_keys[1:], sorted_keys[:-1]).to_numpy(zero_copy_only=False) if n > 1 else []
    return np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)


def arrow_group_codes(keys) -> tuple[np.ndarray, int]:
    """Integer codes 0..G-1 for the values of a key column (in order of first appearance), and G."""
    enc = pc.dictionary_encode(keys)
    enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), len(enc.dictionary)


def rank_order(units) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with a score, ordered by (prompt_id, score descending, unit_id): their row indices, their
    rank within the prompt (0 = best) and the start offset of each prompt's run in that order."""
    t = _table(units)
    score = float_column(t, "score")
    scored = np.flatnonzero(~np.isnan(score))
    keys = pa.table(
        {"p": t.column("prompt_id").take(scored), "s": pa.array(score[scored]), "u": t.column("unit_id").take(scored)}
    )
    order = (
        pc.sort_indices(keys, [("p", "ascending"), ("s", "descending"), ("u", "ascending")]).to_numpy().astype(np.int64)
    )
    rows = scored[order]
    starts = group_starts(t.column("prompt_id").take(rows).combine_chunks() if len(rows) else pa.array([], pa.string()))
    sizes = np.diff(np.append(starts, len(rows)))
    rank = (np.arange(len(rows)) - np.repeat(starts, sizes)).astype(np.int32)
    return rows, rank, starts


def rank_units(units: pd.DataFrame, top_k: int | None = None) -> pd.DataFrame:
    """The scored units ordered by prompt then best first, with `rank` (0 = best); cut to top_k per prompt."""
    rows, rank, _ = rank_order(units)
    out = units.iloc[rows].assign(rank=rank)
    return out[out["rank"] < top_k] if top_k else out


@dataclass
class Agreement:
    groups_ranked: int = 0  # prompts with >= 2 units that have a score and a human rank
    top1_hits: float = 0.0  # sum over those prompts of the top-1 credit (pipeline.metrics)
    tau_groups: int = 0  # of those, where tau-b is defined (neither side constant)
    tau_sum: float = 0.0

    def add(self, other: Agreement) -> None:
        self.groups_ranked += other.groups_ranked
        self.top1_hits += other.top1_hits
        self.tau_groups += other.tau_groups
        self.tau_sum += other.tau_sum

    def to_dict(self) -> dict:
        return {
            "groups_ranked": self.groups_ranked,
            "top1_hits": self.top1_hits,
            "top1_agreement": self.top1_hits / self.groups_ranked if self.groups_ranked else None,
            "tau_groups": self.tau_groups,
            "tau_sum": self.tau_sum,
            "mean_kendall_tau_b": self.tau_sum / self.tau_groups if self.tau_groups else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Agreement:
        return cls(d["groups_ranked"], d["top1_hits"], d["tau_groups"], d["tau_sum"])


def agreement_over_prompts(units) -> Agreement:
    """Agreement between model scores and human ranks, summed over every prompt in `units`."""
    t = _table(units)
    if t.num_rows == 0:
        return Agreement()
    codes, n = arrow_group_codes(t.column("prompt_id"))
    per = metrics.rank_agreement(codes, float_column(t, "score"), float_column(t, "human_rank"), n)
    counted = ~np.isnan(per["top1"])
    tau = per["tau_b"][~np.isnan(per["tau_b"])]
    # Credits of a few prompts with tied top scores are fractions; otherwise this is a count of hits.
    hits = float(per["top1"][counted].sum())
    return Agreement(int(counted.sum()), int(hits) if hits.is_integer() else hits, int(len(tau)), float(tau.sum()))


def group_agreement(units: pd.DataFrame) -> Agreement:
    """Agreement for one prompt's units (taken as one group whatever their prompt_id)."""
    return agreement_over_prompts(units[["score", "human_rank"]].assign(prompt_id="p"))
