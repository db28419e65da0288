"""The curation jobs with ensemble uncertainty on a run written by the real labeling job (SmolLM2,
heads with a 3-member ensemble trained on real data: score_std etc. are real): the kept, flipped and
dropped DPO pairs and the conservative rerank order against brute-force references computed here
with Python loops over the same Parquet, and jobs.evaluate's uncertainty entries on that run."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from curation_fixtures import load_units

from jobs import evaluate as evaluate_cli
from pipeline.curation.config import parse_config
from pipeline.curation.job import run

pytestmark = pytest.mark.slow
K = 1.0
LAM = 1.0


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def curate(run_dir, out, task: str, output_files: int | None = 2, **cfg) -> dict:
    """The curation job on the labeled run (None: the job's default number of output files)."""
    cfg = {"task": task, "run": str(run_dir), "output": str(out), **cfg}
    if output_files is not None:
        cfg["output_files"] = output_files
    return run(parse_config(cfg))


def _units(run_dir) -> dict:
    """unit_id -> row (repeated unit_ids are identical content: one kept, and counted)."""
    out = {}
    for r in load_units(run_dir).to_dict("records"):
        out.setdefault(r["unit_id"], r)
    return out


def _f(x) -> float:
    return math.nan if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _spread(a, b) -> float:
    return math.sqrt(_f(a["score_std"]) ** 2 + _f(b["score_std"]) ** 2)


def reference_dpo(units: dict):
    """best_worst best-of-N pairs and flip-policy preference pairs with the uncertainty rule."""
    pairs, dropped = [], {"best_of_n": {}, "preference": {}}

    def drop(origin, reason):
        dropped[origin][reason] = dropped[origin].get(reason, 0) + 1

    groups: dict[str, list] = {}
    rows: dict[str, list] = {}
    for u in units.values():
        if u["kind"] == "best_of_n":
            groups.setdefault(u["prompt_id"], []).append(u)
        elif u["kind"] == "preference":
            rows.setdefault(u["row_id"], []).append(u)
    for g in groups.values():
        g = [u for u in g if not math.isnan(_f(u["score"]))]
        if len(g) < 2:
            continue
        g.sort(key=lambda u: (-_f(u["score"]), u["unit_id"]))
        best, worst = g[0], g[-1]
        margin = _f(best["score"]) - _f(worst["score"])
        if best["response"] == worst["response"]:
            drop("best_of_n", "identical_response")
        elif margin == 0:
            drop("best_of_n", "score_tie")
        elif math.isnan(_spread(best, worst)):
            drop("best_of_n", "missing_uncertainty")
        elif margin < K * _spread(best, worst):
            drop("best_of_n", "uncertain_margin")
        else:
            pairs.append((best["unit_id"], worst["unit_id"], "kept"))
    for r in rows.values():
        labels = sorted(u["preference"] for u in r if u["preference"])
        tie = len(r) == 2 and any(bool(u["tie"]) for u in r)
        if not (tie or (len(r) == 2 and labels == ["chosen", "rejected"])):
            drop("preference", "incomplete_pair")
            continue
        if tie:  # human_ties: drop, after the missing-score and identical-text rules
            if math.isnan(_f(r[0]["score"]) - _f(r[1]["score"])):
                drop("preference", "missing_score")
            elif r[0]["response"] == r[1]["response"]:
                drop("preference", "identical_response")
            else:
                drop("preference", "human_tie")
            continue
        c = next(u for u in r if u["preference"] == "chosen")
        j = next(u for u in r if u["preference"] == "rejected")
        m = _f(c["score"]) - _f(j["score"])
        if math.isnan(m):
            drop("preference", "missing_score")
        elif c["response"] == j["response"]:
            drop("preference", "identical_response")
        elif math.isnan(_spread(c, j)):
            drop("preference", "missing_uncertainty")
        elif abs(m) < K * _spread(c, j):
            drop("preference", "uncertain_margin")
        elif m < 0:
            pairs.append((j["unit_id"], c["unit_id"], "flipped"))
        else:
            pairs.append((c["unit_id"], j["unit_id"], "kept"))
    return sorted(pairs), dropped


def test_dpo_uncertainty_rule_matches_the_brute_force(ray_session, labeled_run, tmp_path):
    units = _units(labeled_run)
    assert all(not math.isnan(_f(u["score_std"])) and _f(u["score_std"]) > 0 for u in units.values())
    out = tmp_path / "dpo"
    man = curate(
        labeled_run, out, "dpo", pairs={"best_of_n": "best_worst", "preference": "flip", "min_margin_uncertainty": K}
    )
    got = pq.read_table(out / "data").to_pylist()
    expect, dropped = reference_dpo(units)
    assert sorted((p["chosen_unit_id"], p["rejected_unit_id"], p["action"]) for p in got) == expect
    for origin in ("best_of_n", "preference"):
        assert man["pairs"][origin]["dropped"] == dict(sorted(dropped[origin].items()))
    uncertain = sum(d.get("uncertain_margin", 0) for d in dropped.values())
    assert uncertain > 0 and len(expect) > 0  # the rule bites on real scores, and leaves pairs


def test_sft_on_an_objectives_ensemble_spread_matches_the_brute_force(ray_session, labeled_run, tmp_path):
    """Keep the units whose members agree on harmlessness (its rating spread at most the run's
    median spread), the per-objective ensemble columns a filter reaches with `field: rating_std`."""
    units = _units(labeled_run)
    col = "ensemble_rating_std_hh_rlhf_harmlessness"
    stds = sorted(_f(u[col]) for u in units.values() if not math.isnan(_f(u[col])))
    assert len(stds) == len(units) and len(set(stds)) > len(stds) // 2  # real, distinct spreads
    cut = stds[len(stds) // 2]
    out = tmp_path / "sft"
    man = curate(
        labeled_run, out, "sft", filters=[{"objective": "hh_rlhf.harmlessness", "field": "rating_std", "max": cut}]
    )
    got = pq.read_table(out / "data").column("unit_id").to_pylist()
    expect = [uid for uid, u in units.items() if u["preference"] != "rejected" and _f(u[col]) <= cut]
    assert len(got) == len(set(got)) and sorted(got) == sorted(expect)
    dropped = sum(1 for u in units.values() if u["preference"] != "rejected" and _f(u[col]) > cut)
    assert man["filters"][0]["removed"] == dropped > 0


def test_conservative_rerank_matches_the_brute_force(ray_session, labeled_run, tmp_path):
    units = _units(labeled_run)
    out = tmp_path / "rerank"
    man = curate(
        labeled_run,
        out,
        "rerank",
        output_files=None,
        rerank={"top_k": 2, "kinds": ["best_of_n"], "order": "conservative"},
        conservative_lambda=LAM,
    )
    got = pq.read_table(out / "data").to_pylist()
    by_prompt: dict[str, list] = {}
    for u in units.values():
        if u["kind"] == "best_of_n":
            v = _f(u["score_mean"]) - LAM * _f(u["score_std"])
            by_prompt.setdefault(u["prompt_id"], []).append((-v, u["unit_id"], _f(u["score"])))
    expect = []
    changed = 0
    for pid in sorted(by_prompt):
        ranked = sorted(by_prompt[pid])
        expect += [(pid, uid, rank) for rank, (_, uid, _) in enumerate(ranked[:2])]
        plain_best = sorted((-s, uid) for _, uid, s in by_prompt[pid])[0][1]
        changed += plain_best != ranked[0][1]
    assert sorted((r["prompt_id"], r["unit_id"], r["rank"]) for r in got) == sorted(expect)
    assert man["order"] == "conservative" and man["top1_changed"] == changed
    for r in got:
        u = units[r["unit_id"]]
        assert r["order_score"] == pytest.approx(_f(u["score_mean"]) - LAM * _f(u["score_std"]), abs=1e-6)


def test_evaluate_reports_uncertainty_of_the_labeled_run(labeled_run, tmp_path):
    out = tmp_path / "eval.json"
    assert evaluate_cli.main(["--scored-run", str(labeled_run), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    units = _units(labeled_run)
    for source, entry in report["pairwise"].items():
        assert set(entry["selective_accuracy"]) == {"25", "50", "75", "100"}
        assert entry["selective_accuracy"]["100"] == pytest.approx(entry["score"])
        stds = [_f(u["score_std"]) for u in units.values() if u["source"] == source]
        assert entry["mean_score_std"] == pytest.approx(float(np.mean(stds)), rel=1e-5)
        assert 0 <= entry["ece"] <= 1
    for entry in report["best_of_n"].values():
        assert {"top1_same", "kendall_tau_b"} <= set(entry["conservative_vs_plain"])
