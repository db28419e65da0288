from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from curation_fixtures import load_units

from pipeline.curation.pairs import PairRules, human_pair_margins, make_pairs, merge_counts

PROMPT = [{"role": "user", "content": "q"}]


def group(scores, responses=None, human_rank=None, prompt_id="p"):
    n = len(scores)
    return pd.DataFrame(
        {
            "unit_id": [f"{prompt_id}-{i}" for i in range(n)],
            "row_id": ["r"] * n,
            "prompt_id": [prompt_id] * n,
            "kind": ["best_of_n"] * n,
            "source": ["s"] * n,
            "prompt": [PROMPT] * n,
            "response": responses or [f"answer {i}" for i in range(n)],
            "response_index": list(range(n)),
            "preference": [None] * n,
            "tie": [None] * n,
            "human_rank": human_rank or [None] * n,
            "score": scores,
        }
    )


def pref_row(row_id, s_chosen, s_rejected, tie=False, same_text=False, prompt_id="p"):
    return pd.DataFrame(
        {
            "unit_id": [f"{row_id}-0", f"{row_id}-1"],
            "row_id": [row_id] * 2,
            "prompt_id": [prompt_id] * 2,
            "kind": ["preference"] * 2,
            "source": ["s"] * 2,
            "prompt": [PROMPT] * 2,
            "response": ["good", "good" if same_text else "bad"],
            "response_index": [0, 1],
            "preference": ["chosen", "rejected"],
            "tie": [tie, tie],
            "human_rank": [None, None],
            "score": [s_chosen, s_rejected],
        }
    )


def best_of_n_pairs(units, rules):
    """The best-of-N pairs of `units` as a list of dicts, and their counts."""
    table, counts = make_pairs(units, rules)
    return table.to_pylist(), counts["best_of_n"]


def preference_pairs(units, rules):
    table, counts = make_pairs(units, rules)
    return table.to_pylist(), counts["preference"]


def test_best_worst_pairs_the_highest_with_the_lowest_score():
    pairs, counts = best_of_n_pairs(group([0.2, 0.9, 0.5, 0.1]), PairRules(best_of_n="best_worst"))
    [p] = pairs
    assert (p["chosen_unit_id"], p["rejected_unit_id"]) == ("p-1", "p-3")
    assert p["score_chosen"] == 0.9 and p["score_rejected"] == 0.1 and p["score_margin"] == pytest.approx(0.8)
    assert counts.to_dict() == {
        "pairs_in": 1,
        "kept": 1,
        "flipped": 0,
        "dropped": {},
        "dropped_total": 0,
        "duplicate_units": 0,
    }


def test_all_pairs_respects_the_margin_and_never_pairs_a_unit_with_itself():
    scores = [0.10, 0.12, 0.50, 0.90]
    pairs, counts = best_of_n_pairs(group(scores), PairRules(best_of_n="all_pairs", min_margin=0.05))
    expected = {
        (f"p-{i}", f"p-{j}") if scores[i] > scores[j] else (f"p-{j}", f"p-{i}")
        for i, j in combinations(range(4), 2)
        if abs(scores[i] - scores[j]) >= 0.05
    }
    assert {(p["chosen_unit_id"], p["rejected_unit_id"]) for p in pairs} == expected
    assert counts.pairs_in == 6 and counts.kept == 5 and counts.dropped == {"below_min_margin": 1}
    assert all(p["chosen_unit_id"] != p["rejected_unit_id"] and p["score_margin"] >= 0.05 for p in pairs)


def test_best_of_n_drops_identical_texts_and_equal_scores_and_counts_them():
    pairs, counts = best_of_n_pairs(group([0.5, 0.5, 0.1], responses=["x", "y", "x"]), PairRules(best_of_n="all_pairs"))
    # (0,1): equal scores; (0,2): identical text; (1,2): kept
    assert [(p["chosen_unit_id"], p["rejected_unit_id"]) for p in pairs] == [("p-1", "p-2")]
    assert counts.dropped == {"score_tie": 1, "identical_response": 1}
    assert counts.kept + counts.flipped + sum(counts.dropped.values()) == counts.pairs_in == 3


def test_best_worst_choice_does_not_depend_on_row_order():
    g = group([0.7, 0.7, 0.2, 0.2])
    a, _ = best_of_n_pairs(g, PairRules())
    b, _ = best_of_n_pairs(g.iloc[::-1], PairRules())
    assert a == b and (a[0]["chosen_unit_id"], a[0]["rejected_unit_id"]) == ("p-0", "p-3")


def rows_for_policy():
    return pd.concat(
        [
            pref_row("r1", 0.9, 0.4),  # reward agrees, margin 0.5
            pref_row("r2", 0.3, 0.6),  # reward disagrees, margin -0.3
            pref_row("r3", 0.500, 0.505),  # near tie (|m| = 0.005 < eps)
            pref_row("r4", 0.2, 0.7, tie=True),  # human tie
            pref_row("r5", 0.8, 0.1, same_text=True),
            pref_row("r6", 0.8, 0.1).iloc[:1],  # half a pair
        ],
        ignore_index=True,
    )


@pytest.mark.parametrize(
    "policy, kept, flipped, dropped",
    [
        ("keep", 2, 0, {"near_tie": 1, "human_tie": 1, "identical_response": 1, "incomplete_pair": 1}),
        (
            "drop",
            1,
            0,
            {"near_tie": 1, "human_tie": 1, "identical_response": 1, "incomplete_pair": 1, "reward_disagrees": 1},
        ),
        ("flip", 1, 1, {"near_tie": 1, "human_tie": 1, "identical_response": 1, "incomplete_pair": 1}),
    ],
)
def test_preference_policy_counts_reconcile(policy, kept, flipped, dropped):
    pairs, counts = preference_pairs(rows_for_policy(), PairRules(preference=policy, tie_epsilon=0.01))
    c = counts.to_dict()
    assert (c["pairs_in"], c["kept"], c["flipped"], c["dropped"]) == (6, kept, flipped, dict(sorted(dropped.items())))
    assert c["kept"] + c["flipped"] + c["dropped_total"] == c["pairs_in"]
    assert len(pairs) == kept + flipped
    by_row = {p["row_id"]: p for p in pairs}
    assert by_row["r1"]["chosen_unit_id"] == "r1-0" and by_row["r1"]["human_agrees"] is True
    if policy == "flip":
        flipped_pair = by_row["r2"]
        assert (flipped_pair["chosen_unit_id"], flipped_pair["rejected_unit_id"]) == ("r2-1", "r2-0")
        assert flipped_pair["action"] == "flipped" and flipped_pair["score_margin"] == pytest.approx(0.3)
    if policy == "keep":
        assert by_row["r2"]["score_margin"] == pytest.approx(-0.3) and by_row["r2"]["human_agrees"] is False


def test_human_ties_oriented_by_reward_when_asked():
    pairs, counts = preference_pairs(pref_row("t", 0.2, 0.7, tie=True), PairRules(human_ties="use_reward"))
    [p] = pairs
    assert (p["chosen_unit_id"], p["rejected_unit_id"], p["human_agrees"]) == ("t-1", "t-0", None)
    assert counts.kept == 1
    # a tie whose units carry no chosen/rejected label is still a tie, not an incomplete pair
    unlabeled = pref_row("u", 0.2, 0.7, tie=True).assign(preference=None)
    assert preference_pairs(unlabeled, PairRules(human_ties="use_reward"))[1].kept == 1


def test_pairs_on_real_rows_stay_within_their_prompt_and_reconcile(annotated_run):
    units = load_units(annotated_run)
    rules = PairRules(best_of_n="all_pairs", min_margin=0.02, preference="flip", tie_epsilon=0.01)
    # two disjoint sets of whole prompts, merged as the job merges its partitions
    prompts = sorted(units["prompt_id"].unique())
    pairs, totals = [], {"best_of_n": [], "preference": []}
    for ids in (prompts[::2], prompts[1::2]):
        table, c = make_pairs(units[units["prompt_id"].isin(ids)], rules)
        pairs += table.to_pylist()
        for k, v in c.items():
            totals[k].append(v.to_dict())
    by_unit = units.drop_duplicates("unit_id").set_index("unit_id")
    for p in pairs:
        assert p["chosen_unit_id"] != p["rejected_unit_id"]
        chosen, rejected = by_unit.loc[p["chosen_unit_id"]], by_unit.loc[p["rejected_unit_id"]]
        assert chosen["prompt_id"] == rejected["prompt_id"] == p["prompt_id"]
        assert p["score_chosen"] == float(chosen["score"]) and p["score_rejected"] == float(rejected["score"])
        if p["origin"] == "preference":
            assert chosen["row_id"] == rejected["row_id"] == p["row_id"]
        assert p["score_margin"] == pytest.approx(p["score_chosen"] - p["score_rejected"])
    bon, pref = merge_counts(totals["best_of_n"]), merge_counts(totals["preference"])
    n_pref_rows = units[units["kind"] == "preference"]["row_id"].nunique()
    # real PandaLM holds repeated rows (same instruction and responses -> same content ids)
    assert pref["duplicate_units"] == int(units[units["kind"] == "preference"]["unit_id"].duplicated().sum()) > 0
    sizes = units[units["kind"] == "best_of_n"].drop_duplicates("unit_id").groupby("prompt_id").size()
    assert pref["pairs_in"] == n_pref_rows
    assert bon["pairs_in"] == int((sizes * (sizes - 1) // 2).sum())
    for c in (bon, pref):
        assert c["kept"] + c["flipped"] + c["dropped_total"] == c["pairs_in"]
    assert sum(p["origin"] == "preference" for p in pairs) == pref["kept"] + pref["flipped"]
    assert pref["dropped"].get("human_tie", 0) == units[units["tie"] == True]["row_id"].nunique()  # noqa: E712
    assert pref["flipped"] > 0 and bon["kept"] > 0


def test_trl_format_is_conversational_and_has_no_margin_column():
    table, _ = make_pairs(pref_row("r1", 0.9, 0.4), PairRules())
    [row] = table.to_pylist()
    assert row["prompt"] == PROMPT
    assert row["chosen"] == [{"role": "assistant", "content": "good"}]
    assert row["rejected"] == [{"role": "assistant", "content": "bad"}]
    assert table.column_names[:6] == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_margin"]
    assert "margin" not in table.column_names  # RewardTrainer would read it as its loss margin


def test_no_pairs_gives_an_empty_table_of_the_pair_schema():
    table, counts = make_pairs(pref_row("r6", 0.8, 0.1).iloc[:1], PairRules())
    assert table.num_rows == 0 and table.column_names[:3] == ["prompt", "chosen", "rejected"]
    assert counts["preference"].dropped == {"incomplete_pair": 1}


def test_human_pair_margins_skip_ties_and_incomplete_rows():
    units = rows_for_policy()
    m = human_pair_margins(units)
    # r1, r2, r3, r5 are complete untied rows (r4 tie, r6 half a pair); ordered by row_id
    assert np.allclose(m, [0.5, -0.3, -0.005, 0.7])
