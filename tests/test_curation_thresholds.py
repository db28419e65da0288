import math

import numpy as np
import pandas as pd
import pytest

from pipeline.curation.thresholds import (
    Filter,
    FilterError,
    apply_filters,
    best_per_prompt,
    columns_to_fit,
    merge_filter_counts,
    parse_filters,
    resolve_filters,
)


def frame(scores, **extra):
    n = len(scores)
    return pd.DataFrame(
        {
            "unit_id": [f"u{i:03d}" for i in range(n)],
            "prompt_id": extra.pop("prompt_id", ["p"] * n),
            "score": np.asarray(scores, dtype=np.float32),
            **extra,
        }
    )


def test_top_fraction_keeps_ceil_f_n_best_rows():
    df = frame(np.arange(10) / 10)
    [f] = resolve_filters(parse_filters([{"column": "score", "top": 0.3}]), {"score": df["score"].to_numpy()})
    keep, [counts] = apply_filters(df, [f])
    assert list(df["unit_id"][keep]) == ["u007", "u008", "u009"]
    assert counts["removed"] == 7 and counts["cutoff"] == pytest.approx(0.7)
    # 25 % of 10 rows -> ceil(2.5) = 3 rows
    [f] = resolve_filters(parse_filters([{"column": "score", "top": 0.25}]), {"score": df["score"].to_numpy()})
    assert apply_filters(df, [f])[0].sum() == math.ceil(2.5)


def test_top_keeps_rows_tied_with_the_cutoff_and_bottom_mirrors_it():
    df = frame([0.1, 0.5, 0.5, 0.5, 0.9])
    values = {"score": df["score"].to_numpy()}
    [top] = resolve_filters(parse_filters([{"column": "score", "top": 0.4}]), values)  # k = 2 -> cut-off 0.5
    assert list(df["unit_id"][apply_filters(df, [top])[0]]) == ["u001", "u002", "u003", "u004"]
    [bottom] = resolve_filters(parse_filters([{"column": "score", "bottom": 0.2}]), values)
    assert list(df["unit_id"][apply_filters(df, [bottom])[0]]) == ["u000"]


def test_above_median_is_strict_and_uses_numpy_linear_quantile():
    df = frame(np.arange(1, 11, dtype=float), rating_x=np.arange(1, 11, dtype=float))
    [f] = parse_filters([{"column": "rating_x", "above_quantile": 0.5}])
    [f] = resolve_filters([f], {"rating_x": df["rating_x"].to_numpy()})
    assert f.cutoff == 5.5
    assert list(df["rating_x"][apply_filters(df, [f])[0]]) == [6, 7, 8, 9, 10]
    [g] = resolve_filters(
        parse_filters([{"column": "rating_x", "below_quantile": 0.2}]), {"rating_x": df["rating_x"].to_numpy()}
    )
    assert g.cutoff == pytest.approx(2.8) and list(df["rating_x"][apply_filters(df, [g])[0]]) == [1, 2]


def test_objective_filter_resolves_to_its_column_and_absolute_cutoffs_are_inclusive():
    [f] = parse_filters([{"objective": "hh_rlhf.harmlessness", "min": 0.8}])
    assert f.column == "rating_hh_rlhf_harmlessness" and f.cutoff == 0.8 and not f.needs_fit
    [g] = parse_filters([{"objective": "hh_rlhf.harmlessness", "field": "gate", "max": 0.5}])
    assert g.column == "gate_hh_rlhf_harmlessness"
    df = pd.DataFrame({"rating_hh_rlhf_harmlessness": [0.79, 0.8, 0.95, np.nan]})
    keep, [counts] = apply_filters(df, [f])
    assert keep.tolist() == [False, True, True, False]  # a missing value never passes
    assert counts["removed"] == 2


def test_whole_run_quantile_differs_from_per_file_quantiles():
    """Two files with different score ranges: 'top 50 %' over the run keeps all of file B and none of
    file A; per file it would keep half of each."""
    file_a = np.linspace(0.0, 0.49, 50)
    file_b = np.linspace(0.5, 0.99, 50)
    [spec] = parse_filters([{"column": "score", "top": 0.5}])
    [whole] = resolve_filters([spec], {"score": np.concatenate([file_a, file_b])})
    [per_a] = resolve_filters([spec], {"score": file_a})
    [per_b] = resolve_filters([spec], {"score": file_b})
    kept_whole = apply_filters(frame(file_a), [whole])[0].sum() + apply_filters(frame(file_b), [whole])[0].sum()
    kept_per_file = apply_filters(frame(file_a), [per_a])[0].sum() + apply_filters(frame(file_b), [per_b])[0].sum()
    assert apply_filters(frame(file_a), [whole])[0].sum() == 0
    assert apply_filters(frame(file_b), [whole])[0].sum() == 50
    assert apply_filters(frame(file_a), [per_a])[0].sum() == 25 and apply_filters(frame(file_b), [per_b])[0].sum() == 25
    assert kept_whole == kept_per_file == 50  # same count, different rows
    assert per_a.cutoff < whole.cutoff < per_b.cutoff


def test_removed_counts_are_sequential_and_add_up():
    rng = np.random.default_rng(0)
    df = frame(rng.random(200), rating_a=rng.random(200), rating_b=rng.random(200))
    filters = parse_filters(
        [
            {"column": "score", "top": 0.5},
            {"column": "rating_a", "min": 0.3},
            {"column": "rating_b", "above_quantile": 0.25},
        ]
    )
    assert columns_to_fit(filters) == ["rating_b", "score"]
    filters = resolve_filters(filters, {c: df[c].to_numpy() for c in ("score", "rating_b")})
    keep, counts = apply_filters(df, filters)
    assert sum(c["removed"] for c in counts) == len(df) - keep.sum()
    manual = (df["score"] >= filters[0].cutoff) & (df["rating_a"] >= 0.3) & (df["rating_b"] > filters[2].cutoff)
    assert keep.tolist() == manual.tolist()
    assert counts[1]["failed"] == int((df["rating_a"] < 0.3).sum()) >= counts[1]["removed"]
    # per-block counts merge into the same totals
    halves = [apply_filters(df.iloc[:77], filters)[1], apply_filters(df.iloc[77:], filters)[1]]
    assert [c["removed"] for c in merge_filter_counts(halves)] == [c["removed"] for c in counts]


def test_unresolved_quantile_filter_refuses_to_apply():
    [f] = parse_filters([{"column": "score", "top": 0.1}])
    with pytest.raises(FilterError, match="not resolved"):
        apply_filters(frame([0.1, 0.2]), [f])


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"column": "score"}, "exactly one rule"),
        ({"column": "score", "min": 1, "max": 2}, "exactly one rule"),
        ({"score": 1}, "exactly one of 'column' or 'objective'"),
        ({"column": "score", "top": 1.5}, "fraction"),
        ({"column": "score", "above_quantile": -0.1}, r"\[0, 1\]"),
        ({"column": "score", "min": "high"}, "must be a number"),
        ({"column": "score", "minimum": 1}, "unknown key"),
        ({"objective": "x.y", "field": "weight", "min": 1}, "field must be"),
    ],
)
def test_bad_filter_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(FilterError, match=message):
        Filter.from_dict(spec)


def test_best_per_prompt_keeps_the_top_score_and_breaks_ties_by_unit_id():
    df = pd.DataFrame(
        {
            "prompt_id": ["a", "a", "a", "b", "b", "c"],
            "unit_id": ["a2", "a1", "a3", "b1", "b2", "c1"],
            "score": [0.9, 0.9, 0.1, 0.2, 0.7, np.nan],
        }
    )
    keep = best_per_prompt(df)
    assert df["unit_id"][keep].tolist() == ["a1", "b2"]  # c has no score: nothing to choose
    shuffled = df.sample(frac=1.0, random_state=3)
    assert sorted(shuffled["unit_id"][best_per_prompt(shuffled)]) == ["a1", "b2"]
