import math

import numpy as np
import pandas as pd
import pytest
from curation_fixtures import load_units
from metric_references import brute_tau_b

from pipeline.curation.rerank import (
    Agreement,
    agreement_over_prompts,
    group_agreement,
    rank_units,
)
from pipeline.metrics import kendall_tau_b


def test_kendall_tau_b_matches_brute_force_with_and_without_ties():
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(2, 12))
        x = rng.integers(0, 4, n).astype(float)  # few distinct values: many ties
        y = rng.integers(0, 4, n).astype(float)
        expected = brute_tau_b(x, y)
        got = kendall_tau_b(x, y)
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, abs=1e-12)
            checked += 1
    assert checked > 250


def test_kendall_tau_b_known_values():
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # worked example with ties in both: C = 1, D = 6, tied x = 2, tied y = 1 pairs (of 10)
    assert kendall_tau_b([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) == pytest.approx(-0.47140452079103173)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendall_tau_b([1], [1]))


def units(scores, human_rank=None, prompt_id="p"):
    n = len(scores)
    return pd.DataFrame(
        {
            "unit_id": [f"{prompt_id}-{i}" for i in range(n)],
            "prompt_id": [prompt_id] * n,
            "score": scores,
            "human_rank": human_rank if human_rank is not None else [None] * n,
        }
    )


def test_rank_units_orders_by_score_then_unit_id_and_cuts_to_k():
    ranked = rank_units(units([0.3, 0.9, 0.3, np.nan, 0.5]), top_k=3)
    assert ranked["unit_id"].tolist() == ["p-1", "p-4", "p-0"]
    assert ranked["rank"].tolist() == [0, 1, 2]
    everything = rank_units(units([0.3, 0.9, 0.3, np.nan, 0.5]))
    assert everything["unit_id"].tolist() == ["p-1", "p-4", "p-0", "p-2"]  # no score: not ranked


def test_group_agreement_top1_and_tau():
    perfect = group_agreement(units([0.9, 0.5, 0.1], human_rank=[0, 1, 2]))
    assert (perfect.groups_ranked, perfect.top1_hits, perfect.tau_groups, perfect.tau_sum) == (1, 1, 1, 1.0)
    reversed_ = group_agreement(units([0.1, 0.5, 0.9], human_rank=[0, 1, 2]))
    assert (reversed_.top1_hits, reversed_.tau_sum) == (0, -1.0)
    unranked = group_agreement(units([0.1, 0.5], human_rank=[0, None]))
    assert unranked.groups_ranked == 0
    # a tie for the top score: half the tied units are human-best -> credit 0.5 (pipeline.metrics)
    tied = group_agreement(units([1.0, 1.0, 0.0], human_rank=[1, 0, 2]))
    assert (tied.groups_ranked, tied.top1_hits) == (1, 0.5)


def test_rank_units_ranks_every_prompt_at_once():
    two = pd.concat([units([0.2, 0.8], prompt_id="b"), units([0.5, 0.5, 0.9], prompt_id="a")], ignore_index=True)
    ranked = rank_units(two, top_k=2)
    assert ranked["unit_id"].tolist() == ["a-2", "a-0", "b-1", "b-0"]
    assert ranked["rank"].tolist() == [0, 1, 0, 1]


def test_agreement_on_real_oasst_ranks_matches_an_independent_count(annotated_run):
    df = load_units(annotated_run)
    bon = df[df["kind"] == "best_of_n"].drop_duplicates("unit_id")
    got = agreement_over_prompts(bon).to_dict()
    hits = groups = tau_groups = 0
    tau_sum = 0.0
    for _, g in bon.groupby("prompt_id"):
        g = g[g["human_rank"].notna()]
        if len(g) < 2:
            continue
        groups += 1
        g = g[g["score"].notna()]
        if len(g) < 2:
            groups -= 1
            continue
        top = g[g["score"] == g["score"].max()]  # ties for the top share the credit
        hits += float((top["human_rank"] == g["human_rank"].min()).mean())
        tau = brute_tau_b(g["score"].tolist(), (-g["human_rank"]).tolist())
        if not math.isnan(tau):
            tau_groups += 1
            tau_sum += tau
    assert groups > 50
    assert (got["groups_ranked"], got["tau_groups"]) == (groups, tau_groups)
    assert got["top1_hits"] == pytest.approx(hits)
    assert got["mean_kendall_tau_b"] == pytest.approx(tau_sum / tau_groups)
    # additive over disjoint sets of whole prompts (how the job sums its partitions)
    merged = Agreement()
    prompts = sorted(bon["prompt_id"].unique())
    for ids in (prompts[::2], prompts[1::2]):
        merged.add(agreement_over_prompts(bon[bon["prompt_id"].isin(ids)]))
    merged = merged.to_dict()
    assert merged.pop("tau_sum") == pytest.approx(got.pop("tau_sum"))
    assert merged.pop("top1_hits") == pytest.approx(got.pop("top1_hits"))
    assert merged.pop("top1_agreement") == pytest.approx(got.pop("top1_agreement"))
    assert merged.pop("mean_kendall_tau_b") == pytest.approx(got.pop("mean_kendall_tau_b"))
    assert merged == got
