"""Row filters over annotated units: absolute cut-offs and quantile cut-offs fitted on the whole run.

A filter names one column (or an objective with `field: rating | debiased | gate | rating_mean |
rating_std`, default rating,
resolved to that column) and exactly one rule:

    min: v             keep value >= v
    max: v             keep value <= v
    above_quantile: q  keep value >  Q(q)   (Q: numpy's default linear quantile over the whole run;
                                              `above_quantile: 0.5` is "above its median")
    below_quantile: q  keep value <  Q(q)
    top: f             keep the best fraction f: value >= the k-th largest value, k = ceil(f * n)
                       (rows tied with the k-th value are kept too)
    bottom: f          keep value <= the k-th smallest value, k = ceil(f * n)

Quantile rules are *resolved* once, on every value of the column in the run (not per file or per
block), into an absolute cut-off. This is exact: the job gathers the column's values on the driver
(8 bytes a value: 100M units take 0.8 GB per quantile column, plus one working copy while the
cut-off is selected), so exact cut-offs are supported to a few hundred million units per node.
After that every filter is a plain comparison that any worker can apply to any block. A missing value
(null / NaN) never passes a filter.

Counting: filters apply in the order given. `removed` is how many rows each filter removed from
what the filters before it left (so the removals add up to rows_in - rows_out); `failed` is how
many rows fail it on its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema

RULES = ("min", "max", "above_quantile", "below_quantile", "top", "bottom")
QUANTILE_RULES = ("above_quantile", "below_quantile", "top", "bottom")
OBJECTIVE_FIELDS = {
    "rating": schema.RATING_PREFIX,
    "debiased": schema.DEBIASED_PREFIX,
    "gate": schema.GATE_PREFIX,
    "rating_mean": schema.ENSEMBLE_RATING_MEAN_PREFIX,  # with an ensemble: the members' mean rating
    "rating_std": schema.ENSEMBLE_RATING_STD_PREFIX,  # ... and their spread (e.g. `max:` keeps the sure ones)
}


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class Filter:
    column: str
    rule: str
    value: float
    cutoff: float | None = None  # absolute cut-off: `value` for min/max, resolved for quantile rules
    label: str = ""  # what the user wrote, for manifests and the report

    @classmethod
    def from_dict(cls, d: dict) -> Filter:
        """{column|objective, [field: rating|gate], <rule>: value}."""
        if not isinstance(d, dict):
            raise FilterError(f"a filter must be a mapping, got {d!r}")
        d = dict(d)
        column, objective = d.pop("column", None), d.pop("objective", None)
        field = d.pop("field", "rating")
        if (column is None) == (objective is None):
            raise FilterError(f"filter {d}: give exactly one of 'column' or 'objective'")
        if objective is not None:
            if field not in OBJECTIVE_FIELDS:
                raise FilterError(
                    f"filter on {objective}: field must be one of {list(OBJECTIVE_FIELDS)}, not {field!r}"
                )
            column = schema.objective_column(OBJECTIVE_FIELDS[field], objective)
        rules = [k for k in d if k in RULES]
        unknown = sorted(set(d) - set(RULES))
        if unknown:
            raise FilterError(f"filter on {column}: unknown key(s) {unknown}; rules: {list(RULES)}")
        if len(rules) != 1:
            raise FilterError(f"filter on {column}: give exactly one rule of {list(RULES)}, got {rules}")
        rule = rules[0]
        try:
            value = float(d[rule])
        except (TypeError, ValueError):
            raise FilterError(f"filter on {column}: {rule} must be a number, got {d[rule]!r}") from None
        if rule in ("above_quantile", "below_quantile") and not 0.0 <= value <= 1.0:
            raise FilterError(f"filter on {column}: {rule} must be in [0, 1], got {value}")
        if rule in ("top", "bottom") and not 0.0 < value <= 1.0:
            raise FilterError(f"filter on {column}: {rule} is a fraction in (0, 1], got {value}")
        label = f"{objective or column} {rule} {d[rule]}" + (f" ({field})" if objective and field != "rating" else "")
        cutoff = value if rule in ("min", "max") else None
        return cls(column=column, rule=rule, value=value, cutoff=cutoff, label=label)

    @property
    def needs_fit(self) -> bool:
        return self.rule in QUANTILE_RULES

    def resolved(self, values: np.ndarray) -> Filter:
        """This filter with its absolute cut-off computed from every value of the column in the run."""
        if not self.needs_fit:
            return self
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        if len(v) == 0:
            raise FilterError(f"filter {self.label}: column {self.column} has no values to take a quantile of")
        if self.rule == "above_quantile":
            cutoff = float(np.quantile(v, self.value))
        elif self.rule == "below_quantile":
            cutoff = float(np.quantile(v, self.value))
        else:
            k = max(1, math.ceil(self.value * len(v)))
            at = len(v) - k if self.rule == "top" else k - 1
            # The k-th value by selection, not a full sort: exact, O(n), one copy of the column.
            cutoff = float(np.partition(v, at)[at])
        return Filter(self.column, self.rule, self.value, cutoff, self.label)

    def passes(self, values) -> np.ndarray:
        if self.cutoff is None:
            raise FilterError(f"filter {self.label}: quantile cut-off not resolved (call resolve_filters first)")
        v = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=np.float64)
        with np.errstate(invalid="ignore"):
            if self.rule in ("min", "top"):
                ok = v >= self.cutoff
            elif self.rule in ("max", "bottom"):
                ok = v <= self.cutoff
            elif self.rule == "above_quantile":
                ok = v > self.cutoff
            else:
                ok = v < self.cutoff
        return ok & ~np.isnan(v)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_filters(items: list[dict] | None) -> list[Filter]:
    return [Filter.from_dict(d) for d in (items or [])]


def columns_to_fit(filters: list[Filter]) -> list[str]:
    """Columns whose whole-run values are needed before filtering (the first pass)."""
    return sorted({f.column for f in filters if f.needs_fit})


def resolve_filters(filters: list[Filter], column_values: dict[str, np.ndarray]) -> list[Filter]:
    return [f.resolved(column_values[f.column]) if f.needs_fit else f for f in filters]


def _values(df, column: str) -> np.ndarray:
    if isinstance(df, pa.Table):
        col = df.column(column)
        return (
            pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
            if col.type != pa.string()
            else col.to_numpy(zero_copy_only=False)
        )
    return df[column].to_numpy()


def apply_filters(df, filters: list[Filter]) -> tuple[np.ndarray, list[dict]]:
    """Boolean keep-mask over the rows of df (an Arrow table or a pandas frame) and, per filter,
    {label, column, cutoff, removed, failed}."""
    columns = df.column_names if isinstance(df, pa.Table) else df.columns
    keep = np.ones(len(df), dtype=bool)
    counts = []
    for f in filters:
        if f.column not in columns:
            raise FilterError(f"filter {f.label}: no column {f.column!r} in the data")
        ok = f.passes(_values(df, f.column))
        counts.append(
            {
                "label": f.label,
                "column": f.column,
                "rule": f.rule,
                "value": f.value,
                "cutoff": f.cutoff,
                "removed": int(np.sum(keep & ~ok)),
                "failed": int(np.sum(~ok)),
            }
        )
        keep &= ok
    return keep, counts


def merge_filter_counts(parts: list[list[dict]]) -> list[dict]:
    """Sum per-block filter counts (same filters, same order) into run totals."""
    parts = [p for p in parts if p]
    if not parts:
        return []
    out = [dict(c) for c in parts[0]]
    for p in parts[1:]:
        for total, c in zip(out, p):
            total["removed"] += c["removed"]
            total["failed"] += c["failed"]
    return out


def best_per_prompt(df: pd.DataFrame, score_column: str = "score") -> np.ndarray:
    """Mask keeping one row per prompt_id: the highest score; ties go to the smallest unit_id so the
    choice does not depend on row order. Rows without a score are never chosen (rank 0 of rerank)."""
    from pipeline.curation.rerank import rank_order

    keys = pd.DataFrame(
        {
            "prompt_id": df["prompt_id"].to_numpy(),
            "unit_id": df["unit_id"].to_numpy(),
            "score": pd.to_numeric(df[score_column], errors="coerce").to_numpy(dtype=np.float64),
        }
    )
    rows, rank, _ = rank_order(keys)
    keep = np.zeros(len(df), dtype=bool)
    keep[rows[rank == 0]] = True
    return keep
