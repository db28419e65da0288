"""Curation with ensemble uncertainty on seeded random units (every corner of the pair and rerank
rules): the uncertainty pair rule, the conservative and ensemble-minimum orders and thresholds on
the conservative score, each against a brute-force reference written here with Python loops."""

import math

import numpy as np
import pandas as pd
import pytest
from curation_fixtures import random_units

from pipeline.curation.config import ConfigError, parse_config
from pipeline.curation.pairs import PairRules, make_pairs
from pipeline.curation.tasks import rerank, select_sft
from pipeline.curation.thresholds import parse_filters
from pipeline.curation.uncertainty import check

LAM = 1.5


def with_ensemble(seed: int) -> pd.DataFrame:
    df = random_units(seed)
    rng = np.random.default_rng(seed + 100)
    # per unit_id (repeated rows are identical content, so identical ensemble columns too)
    ids = sorted(set(df["unit_id"]))
    std = {u: (np.nan if rng.random() < 0.15 else float(rng.integers(0, 4)) / 16) for u in ids}
    mean = {u: float(rng.integers(-4, 5)) / 8 for u in ids}
    low = {u: mean[u] - float(rng.integers(0, 3)) / 8 for u in ids}
    df["score_std"] = df["unit_id"].map(std).astype(np.float32)
    df["score_mean"] = df["unit_id"].map(mean).astype(np.float32)
    df["score_min"] = df["unit_id"].map(low).astype(np.float32)
    return df


def _spread(row_a, row_b) -> float:
    a, b = row_a["score_std"], row_b["score_std"]
    return math.sqrt(a * a + b * b) if not (math.isnan(a) or math.isnan(b)) else math.nan


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [0.5, 2.0])
def test_uncertain_pairs_are_dropped_like_the_loop_says(seed, k):
    df = with_ensemble(seed)
    base, base_counts = make_pairs(df, PairRules(best_of_n="all_pairs", preference="flip"))
    got, counts = make_pairs(df, PairRules(best_of_n="all_pairs", preference="flip", min_margin_uncertainty=k))
    by_unit = {r["unit_id"]: r for r in df.to_dict("records")}
    # brute force over the pairs the other rules leave: margin and spread from the units themselves
    expect, missing, uncertain = [], {"best_of_n": 0, "preference": 0}, {"best_of_n": 0, "preference": 0}
    for p in base.to_pylist():
        a, b = by_unit[p["chosen_unit_id"]], by_unit[p["rejected_unit_id"]]
        u = _spread(a, b)
        margin = abs(float(a["score"]) - float(b["score"]))
        if math.isnan(u):
            missing[p["origin"]] += 1
        elif margin < k * u:
            uncertain[p["origin"]] += 1
        else:
            expect.append((p["chosen_unit_id"], p["rejected_unit_id"], p["action"]))
    assert [(p["chosen_unit_id"], p["rejected_unit_id"], p["action"]) for p in got.to_pylist()] == expect
    for origin in ("best_of_n", "preference"):
        c = counts[origin].to_dict()
        assert c["dropped"].get("missing_uncertainty", 0) == missing[origin]
        assert c["dropped"].get("uncertain_margin", 0) == uncertain[origin]
        assert c["kept"] + c["flipped"] + c["dropped_total"] == c["pairs_in"] == base_counts[origin].pairs_in
    assert sum(missing.values()) > 0 and len(got) > 0
    assert k < 1 or sum(uncertain.values()) > 0


def test_the_rule_needs_score_std():
    df = with_ensemble(0).drop(columns=["score_std"])
    with pytest.raises(ValueError, match="no score_std column"):
        make_pairs(df, PairRules(min_margin_uncertainty=1.0))
    with pytest.raises(ValueError, match="min_margin_uncertainty"):
        PairRules(min_margin_uncertainty=-1.0)


def _reference_order(df: pd.DataFrame, value, top_k: int) -> list[tuple[str, str, int]]:
    """Per prompt (sorted), units with a value sorted by (value desc, unit_id), cut to top_k."""
    units = {}
    for r in df.to_dict("records"):
        units.setdefault(r["unit_id"], r)  # repeated rows: one unit
    by_prompt: dict[str, list] = {}
    for r in units.values():
        v = value(r)
        if not math.isnan(v):
            by_prompt.setdefault(r["prompt_id"], []).append((-v, r["unit_id"]))
    out = []
    for pid in sorted(by_prompt):
        for rank, (_, uid) in enumerate(sorted(by_prompt[pid])[:top_k]):
            out.append((pid, uid, rank))
    return out


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize(
    "order, value",
    [
        ("conservative", lambda r: float(r["score_mean"]) - LAM * float(r["score_std"])),
        ("ensemble_min", lambda r: float(r["score_min"])),
    ],
)
def test_conservative_rerank_order(seed, order, value):
    df = with_ensemble(seed)
    table, counts = rerank(df, [], top_k=2, order=order, lam=LAM)
    got = list(zip(table.column("prompt_id").to_pylist(), table.column("unit_id").to_pylist()))
    got_ranks = table.column("rank").to_pylist()
    expect = _reference_order(df, value, 2)
    assert sorted(zip(*zip(*got), got_ranks)) == sorted(expect)
    assert np.allclose(table.column("order_score").to_numpy(), [value(r) for r in _rows(df, table)], atol=1e-6)
    plain = {p: u for p, u, r in _reference_order(df, lambda r: float(r["score"]), 1)}
    cons = {p: u for p, u, r in _reference_order(df, value, 1)}
    prompts = set(plain) | set(cons)
    assert counts["top1_changed"] == sum(plain.get(p) != cons.get(p) for p in prompts)
    assert counts["order"] == order and counts["agreement_by_order"]["groups_ranked"] >= 0


def _rows(df, table):
    by_unit = {r["unit_id"]: r for r in df.to_dict("records")}
    return [by_unit[u] for u in table.column("unit_id").to_pylist()]


def test_sft_threshold_and_best_per_prompt_on_conservative_scores():
    df = with_ensemble(4)
    filters = parse_filters([{"column": "score_conservative", "min": 0.0}])
    table, counts = select_sft(df, filters, True, exclude_human_rejected=False, order="conservative", lam=LAM)
    units = {}
    for r in df.to_dict("records"):
        units.setdefault(r["unit_id"], r)
    best: dict[str, tuple] = {}
    for r in units.values():
        c = float(r["score_mean"]) - LAM * float(r["score_std"])
        if math.isnan(c) or c < 0.0:  # fails the threshold (a missing std never passes)
            continue
        key = (-c, r["unit_id"])
        if r["prompt_id"] not in best or key < best[r["prompt_id"]]:
            best[r["prompt_id"]] = key
    expect = sorted((p, k[1]) for p, k in best.items())
    assert list(zip(table.column("prompt_id").to_pylist(), table.column("unit_id").to_pylist())) == expect
    (f,) = counts["filters"]
    n_unique = len(units)
    assert f["removed"] == n_unique - sum(
        1
        for r in units.values()
        if not math.isnan(float(r["score_std"])) and float(r["score_mean"]) - LAM * float(r["score_std"]) >= 0
    )


def test_config_keys_are_checked(annotated_run, tmp_path):
    base = {"run": str(annotated_run), "output": str(tmp_path / "o")}
    names = ["unit_id", "score", "score_mean", "score_std", "score_min"]
    check(parse_config({**base, "task": "rerank", "rerank": {"order": "conservative"}}), names)
    with pytest.raises(ConfigError, match="rerank.order: must be one of"):
        check(parse_config({**base, "task": "rerank", "rerank": {"order": "pessimistic"}}), names)
    with pytest.raises(ConfigError, match="conservative_lambda"):
        check(parse_config({**base, "task": "rerank", "conservative_lambda": -1}), names)
    with pytest.raises(ConfigError, match="needs score_std"):
        check(parse_config({**base, "task": "dpo", "pairs": {"min_margin_uncertainty": 1}}), ["unit_id", "score"])
    with pytest.raises(ConfigError, match=r"filters: needs score_conservative.*\['score_mean', 'score_std'\]"):
        check(
            parse_config({**base, "task": "sft", "filters": [{"column": "score_conservative", "top": 0.5}]}), ["score"]
        )
    with pytest.raises(ConfigError, match="pairs.min_margin_uncertainty: expected a number, got .x."):
        parse_config({**base, "task": "dpo", "pairs": {"min_margin_uncertainty": "x"}})


def test_report_draws_accuracy_against_coverage():
    import re

    from pipeline.curation.report import COVERAGE_STEPS, render_html, report_stats

    df = with_ensemble(5)
    for s in (6, 7):  # more preference rows
        more = with_ensemble(s)
        more["unit_id"] = more["unit_id"] + f"-{s}"
        more["row_id"] = more["row_id"] + f"-{s}"
        df = pd.concat([df, more], ignore_index=True)
    df["run_id"] = "r"
    stats = report_stats(df)
    html = render_html(stats)
    # brute force: whole, untied human pairs with scores and spreads, most confident first
    rows: dict[str, list] = {}
    seen = set()
    for r in df.to_dict("records"):
        if r["kind"] == "preference" and r["unit_id"] not in seen:
            seen.add(r["unit_id"])
            rows.setdefault(r["row_id"], []).append(r)
    pairs = []
    for units in rows.values():
        labels = sorted(str(u["preference"]) for u in units)
        if labels != ["chosen", "rejected"] or any(bool(u["tie"]) for u in units):
            continue
        c = next(u for u in units if u["preference"] == "chosen")
        j = next(u for u in units if u["preference"] == "rejected")
        vals = [float(c["score"]), float(j["score"]), float(c["score_std"]), float(j["score_std"])]
        if any(math.isnan(v) for v in vals):
            continue
        pairs.append((vals[0] - vals[1], math.sqrt(vals[2] ** 2 + vals[3] ** 2)))
    assert len(pairs) >= 10
    conf = [abs(m) / u if u > 0 else (math.inf if m else 0.0) for m, u in pairs]
    order = sorted(range(len(pairs)), key=lambda i: (-conf[i], i))
    points = re.findall(r'data-series="by margin / uncertainty" data-x="([0-9.]+)" data-y="([0-9.]+)"', html)
    assert len(points) == len(COVERAGE_STEPS)
    for x, y in points:
        k = max(1, math.ceil(len(pairs) * float(x) / 100))
        right = [1.0 if pairs[i][0] > 0 else 0.5 if pairs[i][0] == 0 else 0.0 for i in order[:k]]
        assert float(y) == pytest.approx(sum(right) / k, abs=1e-5)
