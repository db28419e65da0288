"""What each curation task does to one partition of units (pandas in, Arrow table + counts out).

A partition holds every unit of its prompts (the job hash-partitions units by prompt_id), so these
functions see whole best-of-N groups and whole preference rows. They never touch Ray or storage,
and return rows sorted by a stable key so that the written files do not depend on arrival order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import schema
from pipeline.curation import calibration as cal
from pipeline.curation.pairs import PairCounts, PairRules, pairs_for_prompt, to_trl
from pipeline.curation.rerank import Agreement, agreement_over_prompts, rank_units
from pipeline.curation.thresholds import Filter, apply_filters, best_per_prompt

ASSISTANT = "assistant"


def rating_columns(columns) -> list[str]:
    """Per-objective rating and debiased-rating columns, carried into the outputs for transparency."""
    return sorted(c for c in columns if c.startswith((schema.RATING_PREFIX, schema.DEBIASED_PREFIX)))


def conversation(prompt, response: str) -> list[dict]:
    """Prompt messages plus the response as the assistant turn (TRL's conversational `messages`)."""
    return [{"role": m["role"], "content": m["content"]} for m in prompt] + [{"role": ASSISTANT, "content": response}]


def _pre_filter(units: pd.DataFrame, kinds: list | None, exclude_rejected: bool) -> tuple[pd.DataFrame, list[dict]]:
    """Selection steps that are not thresholds, counted like filters so the manifest explains them.
    Units repeated with the same unit_id (identical input rows: ids are content-based) are kept once."""
    steps = []
    units = units.sort_values("unit_id", kind="mergesort")
    keep = ~units["unit_id"].duplicated().to_numpy()
    steps.append({"label": "unique unit_id", "removed": int(np.sum(~keep)), "failed": int(np.sum(~keep))})
    if kinds is not None:
        ok = units["kind"].isin(list(kinds)).to_numpy()
        steps.append({"label": f"kind in {list(kinds)}", "removed": int(np.sum(keep & ~ok)), "failed": int(np.sum(~ok))})
        keep &= ok
    if exclude_rejected:
        ok = ~units["preference"].isin(["rejected"]).to_numpy(dtype=bool)
        steps.append({"label": "not human-rejected", "removed": int(np.sum(keep & ~ok)), "failed": int(np.sum(~ok))})
        keep &= ok
    return units[keep], steps


def _has_score_calibration(calibration: dict | None) -> bool:
    return bool(calibration) and "score" in calibration["columns"]


def _calibrated(units: pd.DataFrame, calibration: dict | None) -> dict:
    if not _has_score_calibration(calibration):
        return {}
    return {"score_calibrated": pa.array(cal.apply_column(calibration, "score", units["score"].to_numpy()),
                                         pa.float64())}


def sft_schema(ratings: list[str], calibrated: bool) -> pa.Schema:
    fields = [("messages", schema.MESSAGES), ("prompt_id", pa.string()), ("unit_id", pa.string()),
              ("row_id", pa.string()), ("source", pa.string()), ("kind", pa.string()), ("score", pa.float32())]
    fields += [(c, pa.float32()) for c in ratings]
    if calibrated:
        fields.append(("score_calibrated", pa.float64()))
    return pa.schema(fields)


def select_sft(units: pd.DataFrame, filters: list[Filter], one_per_prompt: bool, kinds: list | None = None,
               exclude_human_rejected: bool = True, calibration: dict | None = None) -> tuple[pa.Table, dict]:
    ratings = rating_columns(units.columns)
    rows_in = len(units)
    units, steps = _pre_filter(units, kinds, exclude_human_rejected)
    keep, filter_counts = apply_filters(units, filters)
    units = units[keep]
    removed_by_one_per_prompt = 0
    if one_per_prompt:
        best = best_per_prompt(units)
        removed_by_one_per_prompt = int(np.sum(~best))
        units = units[best]
    units = units.sort_values(["prompt_id", "unit_id"], kind="mergesort")
    data = {"messages": [conversation(p, r) for p, r in zip(units["prompt"], units["response"])],
            **{c: units[c].tolist() for c in ("prompt_id", "unit_id", "row_id", "source", "kind", "score", *ratings)}}
    data.update(_calibrated(units, calibration))
    table = pa.table(data, schema=sft_schema(ratings, _has_score_calibration(calibration)))
    counts = {"rows_in": rows_in, "rows_out": table.num_rows, "selection": steps, "filters": filter_counts,
              "one_per_prompt_removed": removed_by_one_per_prompt}
    return table, counts


DPO_SCHEMA = pa.schema([
    ("prompt", schema.MESSAGES), ("chosen", schema.MESSAGES), ("rejected", schema.MESSAGES),
    ("score_chosen", pa.float64()), ("score_rejected", pa.float64()), ("margin", pa.float64()),
    ("p_chosen", pa.float64()),        # P(chosen beats rejected) = sigmoid(margin / T)
    ("prompt_id", pa.string()), ("source", pa.string()),
    ("origin", pa.string()),           # best_of_n | preference
    ("action", pa.string()),           # kept | flipped (against the human label)
    ("human_agrees", pa.bool_()),      # does the human label / rank agree with the reward's order
    ("row_id", pa.string()), ("chosen_unit_id", pa.string()), ("rejected_unit_id", pa.string()),
])


def build_dpo(units: pd.DataFrame, filters: list[Filter], rules: PairRules,
              temperature: float = 1.0) -> tuple[pa.Table, dict]:
    rows_in = len(units)
    keep, filter_counts = apply_filters(units, filters)
    units = units[keep]
    pairs: list[dict] = []
    totals = {"best_of_n": PairCounts(), "preference": PairCounts()}
    for _, group in units.groupby("prompt_id", sort=True):
        p, counts = pairs_for_prompt(group, rules)
        pairs += p
        for origin, c in counts.items():
            t = totals[origin]
            t.pairs_in += c.pairs_in
            t.kept += c.kept
            t.flipped += c.flipped
            t.duplicate_units += c.duplicate_units
            for reason, n in c.dropped.items():
                t.dropped[reason] = t.dropped.get(reason, 0) + n
    df = to_trl(pairs)
    df["p_chosen"] = cal.win_probability(df["score_chosen"].to_numpy(dtype=np.float64),
                                         df["score_rejected"].to_numpy(dtype=np.float64), temperature)
    df = df.sort_values(["prompt_id", "origin", "chosen_unit_id", "rejected_unit_id"], kind="mergesort")
    table = pa.Table.from_pandas(df[DPO_SCHEMA.names], schema=DPO_SCHEMA, preserve_index=False)
    counts = {"rows_in": rows_in, "rows_out": table.num_rows, "filters": filter_counts,
              "pairs": {k: v.to_dict() for k, v in totals.items()}}
    return table.replace_schema_metadata(None), counts


def rerank_schema(ratings: list[str], calibrated: bool) -> pa.Schema:
    fields = [("messages", schema.MESSAGES), ("prompt", schema.MESSAGES), ("response", pa.string()),
              ("prompt_id", pa.string()), ("unit_id", pa.string()), ("row_id", pa.string()),
              ("source", pa.string()), ("kind", pa.string()), ("rank", pa.int32()), ("n_candidates", pa.int32()),
              ("score", pa.float32()), ("human_rank", pa.int32())]
    fields += [(c, pa.float32()) for c in ratings]
    if calibrated:
        fields.append(("score_calibrated", pa.float64()))
    return pa.schema(fields)


def rerank(units: pd.DataFrame, filters: list[Filter], top_k: int, kinds: list | None = None,
           calibration: dict | None = None) -> tuple[pa.Table, dict]:
    """Per prompt, the top_k surviving units by score with their rank (0 = best); agreement with human
    ranks is measured on every scored unit of the selected kinds, before the filters."""
    ratings = rating_columns(units.columns)
    rows_in = len(units)
    units, steps = _pre_filter(units, kinds, exclude_rejected=False)
    agreement = agreement_over_prompts(units) if len(units) else Agreement()
    keep, filter_counts = apply_filters(units, filters)
    units = units[keep]
    ranked = []
    for _, group in units.groupby("prompt_id", sort=True):
        top = rank_units(group, top_k)
        ranked.append(top.assign(n_candidates=np.int32(len(group))))
    cols = ["prompt", "response", "prompt_id", "unit_id", "row_id", "source", "kind", "rank", "n_candidates",
            "score", "human_rank", *ratings]
    out = pd.concat(ranked) if ranked else pd.DataFrame({c: [] for c in cols})
    data = {"messages": [conversation(p, r) for p, r in zip(out["prompt"], out["response"])],
            "prompt": [[{"role": m["role"], "content": m["content"]} for m in p] for p in out["prompt"]]}
    for c in cols[1:]:
        data[c] = [None if pd.isna(v) else v for v in out[c]] if c == "human_rank" else out[c].tolist()
    data.update(_calibrated(out, calibration))
    table = pa.table(data, schema=rerank_schema(ratings, _has_score_calibration(calibration)))
    counts = {"rows_in": rows_in, "rows_out": table.num_rows, "selection": steps, "filters": filter_counts,
              "prompts": int(units["prompt_id"].nunique()), "agreement": agreement.to_dict()}
    return table, counts
