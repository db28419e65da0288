"""What each curation task does to one partition of units (Arrow in, Arrow table + counts out).

A partition holds every unit of its prompts (the job hash-partitions units by prompt_id), so these
functions see whole best-of-N groups and whole preference rows. They work on whole columns
(pyarrow compute + numpy: sorts, run boundaries, masks and takes; no Python loop per prompt or per
row), never touch Ray or storage, and return rows sorted by a stable key so that the written files
do not depend on arrival order. pandas frames are accepted too (tests, the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.curation import calibration as cal
from pipeline.curation.pairs import (
    PAIR_SCHEMA,
    PairRules,
    as_table,
    assistant_messages,
    equals,
    is_in,
    make_pairs,
    unique_rows,
)
from pipeline.curation.rerank import Agreement, agreement_over_prompts, arrow_group_codes, float_column, rank_order
from pipeline.curation.thresholds import Filter, apply_filters
from pipeline.curation.uncertainty import order_column, with_conservative

ASSISTANT = "assistant"


def rating_columns(columns) -> list[str]:
    """Per-objective rating and debiased-rating columns, carried into the outputs for transparency."""
    return sorted(c for c in columns if c.startswith((schema.RATING_PREFIX, schema.DEBIASED_PREFIX)))


def conversations(prompts, responses) -> pa.ListArray:
    """Prompt messages plus the response as the assistant turn (TRL's conversational `messages`),
    built from the columns' buffers: offsets grow by one per row, the assistant turn goes last."""
    prompts = pc.cast(prompts, schema.MESSAGES)
    prompts = prompts.combine_chunks() if isinstance(prompts, pa.ChunkedArray) else prompts
    lengths = pc.fill_null(pc.list_value_length(prompts), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(prompts)
    n, total = len(prompts), len(flat)
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths + 1)
    last = offsets[1:] - 1
    idx = np.empty(total + n, dtype=np.int64)
    is_last = np.zeros(total + n, dtype=bool)
    is_last[last] = True
    idx[~is_last] = np.arange(total)
    idx[is_last] = total + np.arange(n)
    turns = pc.list_flatten(assistant_messages(responses))
    values = pa.concat_arrays([flat, turns]).take(pa.array(idx))
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("conversations: more messages than a 32-bit list offset can hold in one partition")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _pre_filter(units: pa.Table, kinds: list | None, exclude_rejected: bool) -> tuple[np.ndarray, list[dict]]:
    """Selection steps that are not thresholds, counted like filters so the manifest explains them.
    Units repeated with the same unit_id (identical input rows: ids are content-based) are kept once.
    Returns the surviving row indices in unit_id order (the heavy columns are taken once, at the end)."""
    steps = []
    rows = unique_rows(units)
    n = units.num_rows
    steps.append({"label": "unique unit_id", "removed": n - len(rows), "failed": n - len(rows)})
    if kinds is not None:
        ok = is_in(units, "kind", kinds)
        steps.append({"label": f"kind in {list(kinds)}", "removed": int(np.sum(~ok[rows])), "failed": int(np.sum(~ok))})
        rows = rows[ok[rows]]
    if exclude_rejected:
        ok = ~equals(units, "preference", "rejected")
        steps.append({"label": "not human-rejected", "removed": int(np.sum(~ok[rows])), "failed": int(np.sum(~ok))})
        rows = rows[ok[rows]]
    return rows, steps


def _light(units: pa.Table, rows: np.ndarray, columns) -> pa.Table:
    """A few (scalar) columns of the given rows, for the selection steps."""
    present = sorted(c for c in set(columns) if c in units.column_names)  # a missing filter column: FilterError later
    return units.select(present).take(pa.array(rows))


def _has_score_calibration(calibration: dict | None) -> bool:
    if not calibration:
        return False
    return "score" in calibration["columns"]


def _calibrated(units: pa.Table, calibration: dict | None) -> dict:
    if not calibration or not _has_score_calibration(calibration):
        return {}
    return {
        "score_calibrated": pa.array(cal.apply_column(calibration, "score", float_column(units, "score")), pa.float64())
    }


def _unit_columns(units: pa.Table, names: list[str], out_schema: pa.Schema) -> dict:
    return {c: pc.cast(units.column(c), out_schema.field(c).type) for c in names}


def sft_schema(ratings: list[str], calibrated: bool) -> pa.Schema:
    fields = [
        ("messages", schema.MESSAGES),
        ("prompt_id", pa.string()),
        ("unit_id", pa.string()),
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("score", pa.float32()),
    ]
    fields += [(c, pa.float32()) for c in ratings]
    if calibrated:
        fields.append(("score_calibrated", pa.float64()))
    return pa.schema(fields)


@dataclass
class UnitSelection:
    """The units of a partition a task writes (sft, rerank): their row indices in output order, the
    columns the selection computed for them (aligned with rows) and the manifest counts. Selection
    reads only light columns; the output rows are built afterwards from just these units, so the
    heavy text columns are read for the selected units only (see pipeline.curation.job)."""

    rows: np.ndarray
    computed: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)


# Columns each selection reads (besides the filter columns) and each output is built from (besides
# the per-objective ratings it carries).
ENSEMBLE_SELECT = ["score_mean", "score_std", "score_min"]  # read when the run has them
SFT_SELECT_COLUMNS = ["unit_id", "prompt_id", "kind", "preference", "score", *ENSEMBLE_SELECT]
SFT_OUTPUT_COLUMNS = ["prompt", "response", "prompt_id", "unit_id", "row_id", "source", "kind", "score"]
RERANK_SELECT_COLUMNS = ["unit_id", "prompt_id", "kind", "score", "human_rank", *ENSEMBLE_SELECT]
RERANK_OUTPUT_COLUMNS = [*SFT_OUTPUT_COLUMNS, "human_rank"]


def _by(light: pa.Table, column: str) -> pa.Table:
    """The light table with `score` replaced by the order column (rank_order ranks by `score`)."""
    if column == "score":
        return light
    if column not in light.column_names:
        raise ValueError(f"order by {column}: the units have no {column} column (label with an ensemble)")
    values = pc.cast(light.column(column), pa.float32())
    return light.set_column(light.column_names.index("score"), "score", values)


def sft_selection(
    units,
    filters: list[Filter],
    one_per_prompt: bool,
    kinds: list | None = None,
    exclude_human_rejected: bool = True,
    order: str = "score",
    lam: float = 1.0,
) -> UnitSelection:
    units = with_conservative(as_table(units), lam)
    column = order_column(order)
    rows_in = units.num_rows
    rows, steps = _pre_filter(units, kinds, exclude_human_rejected)
    keep, filter_counts = apply_filters(_light(units, rows, [f.column for f in filters] + ["unit_id"]), filters)
    rows = rows[keep]
    removed_by_one_per_prompt = 0
    light = _light(units, rows, ["prompt_id", "unit_id", "score", column])
    if one_per_prompt:
        # The highest score (or the order's value) per prompt; ties go to the smallest unit_id;
        # units without that value never chosen.
        order_rows, rank, _ = rank_order(_by(light, column))
        best = order_rows[rank == 0]
        removed_by_one_per_prompt = len(rows) - len(best)
        rows, light = rows[best], light.take(pa.array(best))
    rows = rows[
        pc.sort_indices(light.select(["prompt_id", "unit_id"]), [("prompt_id", "ascending"), ("unit_id", "ascending")])
        .to_numpy()
        .astype(np.int64)
    ]
    counts = {
        "rows_in": rows_in,
        "rows_out": len(rows),
        "selection": steps,
        "filters": filter_counts,
        "one_per_prompt_removed": removed_by_one_per_prompt,
    }
    return UnitSelection(rows, {}, counts)


def sft_rows(selected: pa.Table, computed: dict, calibration: dict | None = None) -> pa.Table:
    """The SFT output rows of the selected units (in their order); row by row, so any slice of the
    selection can be built on its own."""
    ratings = rating_columns(selected.column_names)
    out_schema = sft_schema(ratings, _has_score_calibration(calibration))
    data = {
        "messages": conversations(selected.column("prompt"), selected.column("response")),
        **_unit_columns(selected, ["prompt_id", "unit_id", "row_id", "source", "kind", "score", *ratings], out_schema),
    }
    data.update(_calibrated(selected, calibration))
    return pa.table(data, schema=out_schema)


def select_sft(
    units,
    filters: list[Filter],
    one_per_prompt: bool,
    kinds: list | None = None,
    exclude_human_rejected: bool = True,
    calibration: dict | None = None,
    order: str = "score",
    lam: float = 1.0,
) -> tuple[pa.Table, dict]:
    units = as_table(units)
    sel = sft_selection(units, filters, one_per_prompt, kinds, exclude_human_rejected, order, lam)
    return sft_rows(units.take(pa.array(sel.rows)), sel.computed, calibration), sel.counts


def dpo_schema(reward_margin: bool = False) -> pa.Schema:
    fields = list(PAIR_SCHEMA)
    at = PAIR_SCHEMA.get_field_index("score_margin") + 1
    fields.insert(at, pa.field("p_chosen", pa.float64()))  # P(chosen beats rejected) = sigmoid(score_margin / T)
    if reward_margin:
        # Asked for explicitly: TRL's RewardTrainer subtracts a column named `margin` inside its loss;
        # score_margin / T is the gap in Bradley-Terry logits (T from the calibration).
        fields.append(pa.field("margin", pa.float64()))
    return pa.schema(fields)


DPO_SCHEMA = dpo_schema()


def build_dpo(
    units,
    filters: list[Filter],
    rules: PairRules,
    temperature: float = 1.0,
    reward_margin: bool = False,
    lam: float = 1.0,
) -> tuple[pa.Table, dict]:
    units = with_conservative(as_table(units), lam)
    rows_in = units.num_rows
    keep, filter_counts = apply_filters(
        _light(units, np.arange(units.num_rows), [f.column for f in filters] + ["unit_id"]), filters
    )
    pairs, totals = make_pairs(units, rules, np.flatnonzero(keep))
    sc = pairs.column("score_chosen").to_numpy()
    sr = pairs.column("score_rejected").to_numpy()
    pairs = pairs.add_column(
        PAIR_SCHEMA.get_field_index("score_margin") + 1,
        "p_chosen",
        pa.array(cal.win_probability(sc, sr, temperature), pa.float64()),
    )
    if reward_margin:
        pairs = pairs.append_column("margin", pa.array((sc - sr) / temperature, pa.float64()))
    table = pairs.cast(dpo_schema(reward_margin))
    counts = {
        "rows_in": rows_in,
        "rows_out": table.num_rows,
        "filters": filter_counts,
        "pairs": {k: v.to_dict() for k, v in totals.items()},
    }
    return table, counts


def rerank_schema(ratings: list[str], calibrated: bool) -> pa.Schema:
    # `messages` only (no separate `prompt` / `response`): SFTTrainer takes the file as it is.
    fields = [
        ("messages", schema.MESSAGES),
        ("prompt_id", pa.string()),
        ("unit_id", pa.string()),
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("rank", pa.int32()),
        ("n_candidates", pa.int32()),
        ("score", pa.float32()),
        ("human_rank", pa.int32()),
    ]
    fields += [(c, pa.float32()) for c in ratings]
    if calibrated:
        fields.append(("score_calibrated", pa.float64()))
    return pa.schema(fields)


def rerank_selection(
    units, filters: list[Filter], top_k: int, kinds: list | None = None, order: str = "score", lam: float = 1.0
) -> UnitSelection:
    """Per prompt, the top_k surviving units by score (or by `order`: conservative = score_mean −
    λ·score_std, ensemble_min = score_min) with their rank (0 = best; top_k 1 keeps rank 0 only);
    agreement with human ranks is measured on every scored unit of the selected kinds, before the
    filters: `agreement` by score, and with another order also `agreement_by_order` by it, and
    `top1_changed`: the prompts whose best surviving unit differs between the two orders."""
    units = with_conservative(as_table(units), lam)
    column = order_column(order)
    rows_in = units.num_rows
    rows, steps = _pre_filter(units, kinds, exclude_rejected=False)
    light = _light(units, rows, ["prompt_id", "unit_id", "score", "human_rank", column] + [f.column for f in filters])
    agreement = agreement_over_prompts(light) if len(rows) else Agreement()
    light_all = light
    keep, filter_counts = apply_filters(light, filters)
    rows, light = rows[keep], light.filter(pa.array(keep))
    codes, n_prompts = arrow_group_codes(light.column("prompt_id"))
    candidates = np.bincount(codes, minlength=n_prompts)  # surviving units per prompt, scored or not
    ranked = _by(light, column)
    order_rows, order_rank, _ = rank_order(ranked)
    top = order_rank < top_k
    chosen, rank = order_rows[top], order_rank[top]
    computed = {"rank": rank.astype(np.int32), "n_candidates": candidates[codes[chosen]].astype(np.int32)}
    counts = {
        "rows_in": rows_in,
        "rows_out": len(chosen),
        "selection": steps,
        "filters": filter_counts,
        "prompts": int(n_prompts),
        "agreement": agreement.to_dict(),
    }
    if column != "score":
        counts["order"] = order
        counts["agreement_by_order"] = (
            agreement_over_prompts(_by(light_all, column)) if len(light_all) else Agreement()
        ).to_dict()
        counts["top1_changed"] = top1_changed(codes, n_prompts, rank_order(light), (order_rows, order_rank))
        computed["order_score"] = pc.cast(ranked.column("score").take(pa.array(chosen)), pa.float64()).to_numpy(
            zero_copy_only=False
        )
    return UnitSelection(rows[chosen], computed, counts)


def top1_changed(codes: np.ndarray, n_prompts: int, plain, other) -> int:
    """Prompts whose best unit (rank 0) differs between two rankings (rows, rank) of the same units;
    a prompt ranked by only one of them counts as changed."""
    best = []
    for rows, rank in (plain[:2], other):
        b = np.full(n_prompts, -1, dtype=np.int64)
        top = rows[rank == 0]
        b[codes[top]] = top
        best.append(b)
    return int(np.sum(best[0] != best[1]))


def rerank_rows(selected: pa.Table, computed: dict, calibration: dict | None = None) -> pa.Table:
    """The rerank output rows of the selected units (in their order), with the computed rank and
    n_candidates; row by row, like sft_rows."""
    ratings = rating_columns(selected.column_names)
    out_schema = rerank_schema(ratings, _has_score_calibration(calibration))
    data = {
        "messages": conversations(selected.column("prompt"), selected.column("response")),
        **_unit_columns(selected, ["prompt_id", "unit_id", "row_id", "source", "kind"], out_schema),
        "rank": pa.array(computed["rank"], pa.int32()),
        "n_candidates": pa.array(computed["n_candidates"], pa.int32()),
        **_unit_columns(selected, ["score", "human_rank", *ratings], out_schema),
    }
    data.update(_calibrated(selected, calibration))
    if "order_score" in computed:  # ranked by another order than score: its value, beside score
        out_schema = out_schema.append(pa.field("order_score", pa.float64()))
        data["order_score"] = pa.array(computed["order_score"], pa.float64())
    return pa.table(data, schema=out_schema)


def rerank(
    units,
    filters: list[Filter],
    top_k: int,
    kinds: list | None = None,
    calibration: dict | None = None,
    order: str = "score",
    lam: float = 1.0,
) -> tuple[pa.Table, dict]:
    units = as_table(units)
    sel = rerank_selection(units, filters, top_k, kinds, order, lam)
    return rerank_rows(units.take(pa.array(sel.rows)), sel.computed, calibration), sel.counts
