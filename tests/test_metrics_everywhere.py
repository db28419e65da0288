"""One tie rule everywhere: evaluation, curation's rerank agreement and the HTML report all take
best-of-N top-1 and Kendall tau-b from pipeline.metrics, so they give the same answers on the same
units (issue: scores [1, 1, 0] with human ranks [1, 0, 2] gave 0.5, 0 and 0 in three places)."""

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline import evaluation, metrics
from pipeline.curation.report import best_of_n_agreement
from pipeline.curation.rerank import agreement_over_prompts

# (prompt, scores, human ranks) -> the documented top-1 credit (pipeline.metrics' module doc)
CASES = [
    ("tie-at-top", [1.0, 1.0, 0.0], [1, 0, 2], 0.5),  # two tie for the top score, one human-best
    ("hit", [0.2, 0.9, 0.1], [1, 0, 2], 1.0),
    ("miss", [0.9, 0.2, 0.1], [1, 0, 2], 0.0),
    ("no-rank-0", [0.3, 0.4], [1, 2], 0.0),  # best present rank is 1; top score has rank 2
]


def units_frame() -> pd.DataFrame:
    rows = []
    for prompt, scores, ranks, _ in CASES:
        for i, (s, r) in enumerate(zip(scores, ranks)):
            rows.append(
                {
                    "unit_id": f"{prompt}-{i}",
                    "row_id": prompt,
                    "prompt_id": prompt,
                    "source": "bon",
                    "kind": "best_of_n",
                    "preference": None,
                    "tie": False,
                    "human_rank": r,
                    "score": s,
                }
            )
    return pd.DataFrame(rows)


def expected_tau(scores, ranks) -> float:
    return metrics.kendall_tau_b(scores, -np.asarray(ranks, dtype=float))


def test_top1_and_tau_agree_across_evaluation_curation_and_report():
    df = units_frame()
    want_top1 = float(np.mean([c[3] for c in CASES]))
    taus = [expected_tau(c[1], c[2]) for c in CASES]
    want_tau = float(np.mean([t for t in taus if not math.isnan(t)]))

    table = pa.Table.from_pandas(df, preserve_index=False)
    got_eval = evaluation.evaluate(table, {"model": df["score"].to_numpy()})["best_of_n"]["bon"]["model"]
    got_curation = agreement_over_prompts(df).to_dict()
    got_report = best_of_n_agreement(df)["bon"]

    assert got_eval["top1"] == pytest.approx(want_top1)
    assert got_curation["top1_agreement"] == pytest.approx(want_top1)
    assert got_report["top1_agreement"] == pytest.approx(want_top1)
    assert got_eval["kendall_tau"] == pytest.approx(want_tau)
    assert got_curation["mean_kendall_tau_b"] == pytest.approx(want_tau)
    assert got_report["mean_kendall_tau_b"] == pytest.approx(want_tau)
    # the report's chance level: the share of human-best units per prompt, averaged
    assert got_report["top1_chance"] == pytest.approx(np.mean([1 / 3, 1 / 3, 1 / 3, 1 / 2]))


def test_the_pinned_case_alone():
    df = units_frame().query("prompt_id == 'tie-at-top'")
    table = pa.Table.from_pandas(df, preserve_index=False)
    assert evaluation.evaluate(table, {"m": df["score"].to_numpy()})["best_of_n"]["bon"]["m"]["top1"] == 0.5
    assert agreement_over_prompts(df).to_dict()["top1_agreement"] == 0.5
    assert best_of_n_agreement(df)["bon"]["top1_agreement"] == 0.5
