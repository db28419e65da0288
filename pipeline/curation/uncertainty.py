"""Curation with an ensemble's uncertainty (runs labeled with heads that carry `heads.ensemble: K`):
the derived column `score_conservative` = score_mean − λ·score_std, the orders it and score_min
give, and the checks of the keys that use them.

    conservative_lambda: 1.0                 # λ (>= 0)
    filters: [{column: score_conservative, min: 0.2}]   # thresholds on conservative scores (any rule)
    rerank: {order: conservative}            # score | conservative | ensemble_min
    sft:    {one_per_prompt: true, order: conservative}
    pairs:  {min_margin_uncertainty: 2.0}    # keep a pair when margin >= k·sqrt(std_a² + std_b²)

A unit without the ensemble columns (null score_std) has no conservative score: it fails every
filter on it and gets no rank in a conservative order (counted, never silently ranked by `score`).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curation.config import ConfigError, CurateConfig

CONSERVATIVE = "score_conservative"
ORDERS = {"score": "score", "conservative": CONSERVATIVE, "ensemble_min": "score_min"}
SOURCES = {CONSERVATIVE: ("score_mean", "score_std"), "score_min": ("score_min",)}


def conservative_scores(mean, std, lam: float) -> np.ndarray:
    return np.asarray(mean, np.float64) - float(lam) * np.asarray(std, np.float64)


def with_conservative(table: pa.Table, lam: float) -> pa.Table:
    """The table with `score_conservative` appended (float64, null where score_mean or score_std is),
    when it has score_mean and score_std and not the column already."""
    names = table.column_names
    if CONSERVATIVE in names or not {"score_mean", "score_std"} <= set(names):
        return table
    f = lambda c: pc.cast(table.column(c), pa.float64()).to_numpy(zero_copy_only=False)  # noqa: E731
    values = conservative_scores(f("score_mean"), f("score_std"), lam)
    return table.append_column(CONSERVATIVE, pa.array(values, pa.float64(), mask=np.isnan(values)))


def read_columns(wanted) -> set[str]:
    """Run columns to read for these wanted columns (a derived one stands for its sources)."""
    out = set()
    for c in wanted:
        out |= set(SOURCES.get(c, ())) if c == CONSERVATIVE else {c}
    return out


def order_column(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
    return ORDERS[order]


def check(cfg: CurateConfig, names: list[str]) -> None:
    """The uncertainty keys of a config against a run's columns: clear errors before any work."""
    lam = cfg.conservative_lambda
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"conservative_lambda: expected a finite number >= 0, got {lam!r}")
    for where, order in (("sft.order", cfg.sft.order), ("rerank.order", cfg.rerank.order)):
        if order not in ORDERS:
            raise ConfigError(f"{where}: must be one of {list(ORDERS)}, got {order!r}")
    has = set(names)
    needs: list[tuple[str, str]] = []
    if cfg.task == "sft" and cfg.sft.one_per_prompt and cfg.sft.order != "score":
        needs.append(("sft.order", ORDERS[cfg.sft.order]))
    if cfg.task == "rerank" and cfg.rerank.order != "score":
        needs.append(("rerank.order", ORDERS[cfg.rerank.order]))
    if cfg.task == "dpo" and cfg.pairs.min_margin_uncertainty:
        needs.append(("pairs.min_margin_uncertainty", "score_std"))
    for f in cfg.filters or []:
        if isinstance(f, dict) and f.get("column") == CONSERVATIVE:
            needs.append(("filters", CONSERVATIVE))
    for where, column in needs:
        missing = sorted(set(SOURCES.get(column, (column,))) - has)
        if missing:
            raise ConfigError(
                f"{where}: needs {column}, but the run has no {missing} column(s) (label it with heads that carry "
                "an ensemble: heads.ensemble: K in the train config)"
            )
