"""The vectorised tasks against a small, plain reference written here from the rules in the docstrings
of pipeline/curation/pairs.py, tasks.py and rerank.py: one prompt at a time, one row at a time, on
seeded random units with every corner (tied scores, identical texts, missing scores, human ties,
halves and triples of preference rows, repeated rows, margins at the thresholds)."""

import math
from itertools import combinations

import numpy as np
import pytest
from curation_fixtures import random_units

from pipeline.curation.pairs import PairRules, make_pairs
from pipeline.curation.tasks import rerank, select_sft

SEEDS = range(40)


def nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def unique(rows):
    seen, out = set(), []
    for r in sorted(rows, key=lambda r: r["unit_id"]):  # stable: the first arrival of a repeat is kept
        if r["unit_id"] not in seen:
            seen.add(r["unit_id"])
            out.append(r)
    return out


def best_first(rows):
    return sorted((r for r in rows if not nan(r["score"])), key=lambda r: (-r["score"], r["unit_id"]))


def reference_pairs(rows, rules):
    pairs, counts = (
        [],
        {o: {"pairs_in": 0, "kept": 0, "flipped": 0, "dropped": {}} for o in ("best_of_n", "preference")},
    )

    def drop(origin, why):
        counts[origin]["dropped"][why] = counts[origin]["dropped"].get(why, 0) + 1

    def pair(better, worse, origin, action, agrees):
        pairs.append((better["unit_id"], worse["unit_id"], origin, action, agrees, better["score"] - worse["score"]))

    by_prompt = {}
    for r in unique(rows):
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    for units in by_prompt.values():
        group = best_first([u for u in units if u["kind"] in rules.group_kinds])
        if rules.best_of_n != "none" and len(group) >= 2:
            cands = [(group[0], group[-1])] if rules.best_of_n == "best_worst" else list(combinations(group, 2))
            for b, w in cands:
                counts["best_of_n"]["pairs_in"] += 1
                m = b["score"] - w["score"]
                if b["response"] == w["response"]:
                    drop("best_of_n", "identical_response")
                elif m == 0:
                    drop("best_of_n", "score_tie")
                elif m < rules.min_margin:
                    drop("best_of_n", "below_min_margin")
                else:
                    counts["best_of_n"]["kept"] += 1
                    hb, hw = b["human_rank"], w["human_rank"]
                    pair(b, w, "best_of_n", "kept", None if nan(hb) or nan(hw) or hb == hw else hb < hw)
        if rules.preference == "none":
            continue
        by_row = {}
        for u in units:
            if u["kind"] == "preference":
                by_row.setdefault(u["row_id"], []).append(u)
        for row in by_row.values():
            counts["preference"]["pairs_in"] += 1
            tie = len(row) == 2 and any(u["tie"] is True for u in row)
            labels = sorted(u["preference"] for u in row if isinstance(u["preference"], str))
            if tie:
                c, r = sorted(row, key=lambda u: u["response_index"])
            elif len(row) == 2 and labels == ["chosen", "rejected"]:
                c, r = sorted(row, key=lambda u: u["preference"])
            else:
                drop("preference", "incomplete_pair")
                continue
            if nan(c["score"]) or nan(r["score"]):
                drop("preference", "missing_score")
                continue
            m = c["score"] - r["score"]
            if c["response"] == r["response"]:
                drop("preference", "identical_response")
            elif tie and rules.human_ties == "drop":
                drop("preference", "human_tie")
            elif abs(m) < rules.tie_epsilon:
                drop("preference", "near_tie")
            elif tie and m == 0:
                drop("preference", "score_tie")
            elif tie:
                counts["preference"]["kept"] += 1
                pair(c, r, "preference", "kept", None) if m > 0 else pair(r, c, "preference", "kept", None)
            elif m >= 0 or rules.preference == "keep":
                counts["preference"]["kept"] += 1
                pair(c, r, "preference", "kept", m >= 0)
            elif rules.preference == "drop":
                drop("preference", "reward_disagrees")
            else:
                counts["preference"]["flipped"] += 1
                pair(r, c, "preference", "flipped", False)
    return sorted(pairs, key=lambda p: (p[0], p[1], p[2])), counts


def rules_for(seed):
    rng = np.random.default_rng(1000 + seed)
    return PairRules(
        best_of_n=str(rng.choice(["best_worst", "all_pairs", "none"])),
        min_margin=float(rng.choice([0.0, 0.25, 0.5])),
        group_kinds=[("best_of_n",), ("best_of_n", "preference"), ("best_of_n", "instruction")][seed % 3],
        preference=str(rng.choice(["keep", "drop", "flip", "none"])),
        tie_epsilon=float(rng.choice([0.0, 0.125, 0.2])),
        human_ties=str(rng.choice(["drop", "use_reward"])),
    )


def reference_rows(df):
    """The frame as plain dicts for the references: None for nulls, but NaN for a missing score."""
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    for r in rows:
        r["score"] = float("nan") if r["score"] is None else float(r["score"])
    return rows


@pytest.mark.parametrize("seed", SEEDS)
def test_pairs_match_the_reference(seed):
    df = random_units(seed)
    rows = reference_rows(df)
    rules = rules_for(seed)
    table, counts = make_pairs(df, rules)
    want, want_counts = reference_pairs(rows, rules)
    got = sorted(
        zip(
            table.column("chosen_unit_id").to_pylist(),
            table.column("rejected_unit_id").to_pylist(),
            table.column("origin").to_pylist(),
            table.column("action").to_pylist(),
            table.column("human_agrees").to_pylist(),
            table.column("score_margin").to_pylist(),
        ),
        key=lambda p: (p[0], p[1], p[2]),
    )
    assert got == want
    for origin, c in counts.items():
        d = c.to_dict()
        assert {k: d[k] for k in ("pairs_in", "kept", "flipped", "dropped")} == {
            **want_counts[origin],
            "dropped": dict(sorted(want_counts[origin]["dropped"].items())),
        }
        assert d["kept"] + d["flipped"] + d["dropped_total"] == d["pairs_in"]
    repeated = df[df["unit_id"].duplicated()]
    assert counts["best_of_n"].duplicate_units == int(repeated["kind"].isin(rules.group_kinds).sum())
    assert counts["preference"].duplicate_units == int((repeated["kind"] == "preference").sum())
    # every pair stays within its prompt; chosen and rejected are different units
    by_unit = {r["unit_id"]: r for r in rows}
    for c_id, r_id, *_ in got:
        assert c_id != r_id and by_unit[c_id]["prompt_id"] == by_unit[r_id]["prompt_id"]


@pytest.mark.parametrize("seed", SEEDS)
def test_sft_and_rerank_match_the_reference(seed):
    df = random_units(seed)
    rows = reference_rows(df)
    kinds = [None, ["best_of_n"], ["preference", "instruction"]][seed % 3]
    eligible = [r for r in unique(rows) if kinds is None or r["kind"] in kinds]
    # SFT: not human-rejected, then one per prompt (highest score, ties to the smallest unit_id)
    sft_rows = [r for r in eligible if r["preference"] != "rejected"]
    best = {}
    for r in best_first(sft_rows):
        best.setdefault(r["prompt_id"], r)
    table, counts = select_sft(df, [], one_per_prompt=True, kinds=kinds)
    assert table.column("unit_id").to_pylist() == [
        r["unit_id"] for r in sorted(best.values(), key=lambda r: r["prompt_id"])
    ]
    assert counts["one_per_prompt_removed"] == len(sft_rows) - len(best)
    assert counts["selection"][0]["removed"] == len(df) - df["unit_id"].nunique()
    first = table.to_pylist()[:1]
    for out in first:
        unit = next(r for r in rows if r["unit_id"] == out["unit_id"])
        assert out["messages"] == list(unit["prompt"]) + [{"role": "assistant", "content": unit["response"]}]
    # rerank: top 2 per prompt with ranks and candidates (scored or not)
    top_k = 2
    want = []
    for pid in sorted({r["prompt_id"] for r in eligible}):
        cands = [r for r in eligible if r["prompt_id"] == pid]
        want += [(r["unit_id"], k, len(cands)) for k, r in enumerate(best_first(cands)[:top_k])]
    table, counts = rerank(df, [], top_k, kinds)
    got = list(
        zip(
            table.column("unit_id").to_pylist(),
            table.column("rank").to_pylist(),
            table.column("n_candidates").to_pylist(),
        )
    )
    assert got == want and counts["prompts"] == len({r["prompt_id"] for r in eligible})
    assert "prompt" not in table.column_names and "messages" in table.column_names
