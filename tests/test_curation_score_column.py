"""`score_column`: curation ranks by a column the config names (a reward model's `rm_<name>`), read
from the run under the name `score`. A small labeled run of real rows (tests/curation_fixtures.py)
gets an `rm_x` column whose order differs from `score`; every output is checked against loops over
the input table written here, and the refusals against `--check` and the job."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from curation_fixtures import write_run

from jobs import curate as curate_cli
from pipeline.curation import calibration as cal
from pipeline.curation.config import ConfigError, parse_config

RM = "rm_x"


def rm_value(unit_id: str) -> float | None:
    """A reward model's stand-in score: a function of the unit id alone (so unrelated to `score`),
    distinct per unit, null for about one unit in ten."""
    h = int.from_bytes(hashlib.sha256(f"rm\x1f{unit_id}".encode()).digest()[:8], "big") / 2.0**64
    return None if h < 0.1 else float(np.float32(2.0 * h - 1.0))


def add_columns(run: Path, score: str = "keep") -> Path:
    """rm_x (float32, nullable) and rm_null (float32, all null) on every data file; `score`: keep,
    null (every value null) or drop (no score column)."""
    for f in sorted((run / "data").glob("*.parquet")):
        t = pq.read_table(f)
        ids = t.column("unit_id").to_pylist()
        t = t.append_column(pa.field(RM, pa.float32()), pa.array([rm_value(u) for u in ids], pa.float32()))
        t = t.append_column(pa.field("rm_null", pa.float32()), pa.nulls(t.num_rows, pa.float32()))
        i = t.schema.get_field_index("score")
        if score == "null":
            t = t.set_column(i, t.schema.field(i), pa.nulls(t.num_rows, pa.float32()))
        elif score == "drop":
            t = t.remove_column(i)
        pq.write_table(t, f)
    return run


def small_run(shared_data: Path, where: Path, score: str = "keep", run_id: str = "rm") -> Path:
    return add_columns(write_run(shared_data, where, run_id, hh_pairs=30, pandalm_pairs=30), score)


@pytest.fixture(scope="module")
def rm_run(shared_data, tmp_path_factory) -> Path:
    return small_run(shared_data, tmp_path_factory.mktemp("rm") / "run")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def units_of(run: Path) -> list[dict]:
    """Every unit of the run, each unit_id once (repeated input rows are identical content)."""
    seen, out = set(), []
    for u in pq.read_table(run / "data").to_pylist():
        if u["unit_id"] not in seen:
            seen.add(u["unit_id"])
            out.append(u)
    return out


def curate(run: Path, out: Path, **cfg) -> dict:
    from pipeline.curation.job import run as run_job

    return run_job(parse_config({"run": str(run), "output": str(out), **cfg}))


def output(out: Path) -> list[dict]:
    return pq.read_table(out / "data").to_pylist()


def best_first(units: list[dict], column: str) -> list[dict]:
    """Units with a value, highest first; equal values by unit_id."""
    return sorted((u for u in units if u[column] is not None), key=lambda u: (-u[column], u["unit_id"]))


def reference_pairs(units: list[dict], column: str) -> set[tuple[str, str, str, str]]:
    """(origin, chosen, rejected, action) of the default pair rules (best_worst, flip, human ties
    dropped), by a loop over prompts and preference rows, ranking by `column`."""
    pairs = set()
    by_prompt: dict[str, list[dict]] = {}
    for u in units:
        if u["kind"] == "best_of_n":
            by_prompt.setdefault(u["prompt_id"], []).append(u)
    for group in by_prompt.values():
        ranked = best_first(group, column)
        if len(ranked) < 2:
            continue
        best, worst = ranked[0], ranked[-1]
        if best["response"] != worst["response"] and best[column] != worst[column]:
            pairs.add(("best_of_n", best["unit_id"], worst["unit_id"], "kept"))
    by_row: dict[str, list[dict]] = {}
    for u in units:
        if u["kind"] == "preference":
            by_row.setdefault(u["row_id"], []).append(u)
    for row in by_row.values():
        labels = sorted(str(u["preference"]) for u in row)
        if len(row) != 2 or labels != ["chosen", "rejected"] or any(u["tie"] for u in row):
            continue
        c, r = sorted(row, key=lambda u: u["preference"] != "chosen")
        if c[column] is None or r[column] is None or c["response"] == r["response"]:
            continue
        if c[column] - r[column] < 0:
            pairs.add(("preference", r["unit_id"], c["unit_id"], "flipped"))
        else:
            pairs.add(("preference", c["unit_id"], r["unit_id"], "kept"))
    return pairs


def test_dpo_pairs_follow_the_score_column(ray_session, rm_run, tmp_path):
    units = units_of(rm_run)
    man = curate(rm_run, tmp_path / "dpo", task="dpo", score_column=RM)
    got = output(tmp_path / "dpo")
    pairs = {(p["origin"], p["chosen_unit_id"], p["rejected_unit_id"], p["action"]) for p in got}
    expected = reference_pairs(units, RM)
    assert pairs == expected
    assert expected != reference_pairs(units, "score")  # the two columns do order the run differently
    assert {a for *_, a in expected} == {"kept", "flipped"}
    rm = {u["unit_id"]: u[RM] for u in units}
    for p in got:  # the output's scores are the chosen column's values, margins >= 0
        assert p["score_chosen"] == pytest.approx(rm[p["chosen_unit_id"]])
        assert p["score_rejected"] == pytest.approx(rm[p["rejected_unit_id"]])
        assert p["score_margin"] >= 0
    assert RM not in pq.read_schema(next((tmp_path / "dpo" / "data").glob("*.parquet"))).names
    assert man["score_column"] == RM and man["config"]["score_column"] == RM
    written = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert written["score_column"] == RM


def test_sft_picks_and_score_filters_follow_the_score_column(ray_session, rm_run, tmp_path):
    units = units_of(rm_run)
    man = curate(
        rm_run,
        tmp_path / "sft",
        task="sft",
        score_column=RM,
        filters=[{"column": "score", "top": 0.5}],  # `score` is the chosen column here too
        sft={"one_per_prompt": True},
    )
    # the whole run's values, repeated rows included: the k-th largest is the cut-off
    values = sorted((u[RM] for u in pq.read_table(rm_run / "data").to_pylist() if u[RM] is not None), reverse=True)
    cutoff = values[int(np.ceil(0.5 * len(values))) - 1]
    best: dict[str, dict] = {}
    for u in best_first([u for u in units if u["preference"] != "rejected"], RM):
        if u[RM] >= cutoff and u["prompt_id"] not in best:
            best[u["prompt_id"]] = u
    got = output(tmp_path / "sft")
    assert [(r["prompt_id"], r["unit_id"]) for r in got] == sorted((p, u["unit_id"]) for p, u in best.items())
    assert [r["score"] for r in got] == pytest.approx([best[r["prompt_id"]][RM] for r in got])
    assert man["resolved_filters"][0]["cutoff"] == pytest.approx(cutoff)
    by_score = {u["prompt_id"]: u["unit_id"] for u in reversed(best_first(units, "score"))}
    assert any(by_score[p] != u["unit_id"] for p, u in best.items())  # another pick than by score
    assert RM not in got[0]


def test_rerank_top_k_and_agreement_follow_the_score_column(ray_session, rm_run, tmp_path):
    units = units_of(rm_run)
    man = curate(rm_run, tmp_path / "rerank", task="rerank", score_column=RM, rerank={"top_k": 2})
    expected, candidates = set(), {}
    by_prompt: dict[str, list[dict]] = {}
    for u in units:
        by_prompt.setdefault(u["prompt_id"], []).append(u)
    hits, ranked = 0.0, 0
    for pid, group in by_prompt.items():
        candidates[pid] = len(group)
        for rank, u in enumerate(best_first(group, RM)[:2]):
            expected.add((pid, u["unit_id"], rank))
        judged = [u for u in best_first(group, RM) if u["human_rank"] is not None]
        if len(judged) >= 2:  # top-1: is the unit with the highest rm_x (distinct here) the human-best?
            ranked += 1
            hits += judged[0]["human_rank"] == min(u["human_rank"] for u in judged)
    got = output(tmp_path / "rerank")
    assert {(r["prompt_id"], r["unit_id"], r["rank"]) for r in got} == expected
    assert all(r["n_candidates"] == candidates[r["prompt_id"]] for r in got)
    rm = {u["unit_id"]: u[RM] for u in units}
    assert all(r["score"] == pytest.approx(rm[r["unit_id"]]) for r in got)
    assert man["agreement"]["groups_ranked"] == ranked > 0
    assert man["agreement"]["top1_hits"] == hits
    by_score = {(p, u["unit_id"], k) for p, g in by_prompt.items() for k, u in enumerate(best_first(g, "score")[:2])}
    assert by_score != expected


@pytest.mark.parametrize("score", ["null", "drop"])
def test_a_run_without_scores_is_curated_by_its_reward_column(ray_session, rm_run, shared_data, tmp_path, score):
    """A run labeled by reward models only: `score` all null, or no `score` column at all."""
    run = small_run(shared_data, tmp_path / "run", score=score)
    curate(run, tmp_path / "dpo", task="dpo", score_column=RM)
    pairs = {(p["origin"], p["chosen_unit_id"], p["rejected_unit_id"], p["action"]) for p in output(tmp_path / "dpo")}
    assert pairs == reference_pairs(units_of(run), RM)
    assert pairs == reference_pairs(units_of(rm_run), RM)  # the same units: `score` was never read
    man = curate(run, tmp_path / "rerank", task="rerank", score_column=RM)
    assert man["rows_out"] == len({u["prompt_id"] for u in units_of(run) if u[RM] is not None})


def test_calibrate_fits_the_score_column_and_records_it(ray_session, rm_run, tmp_path):
    out = tmp_path / "cal.json"
    curate(rm_run, out, task="calibrate", score_column=RM, calibrate={"columns": ["score"]})
    c = json.loads(out.read_text())
    values = [u[RM] for u in pq.read_table(rm_run / "data").to_pylist() if u[RM] is not None]
    assert c["score_column"] == RM
    assert c["columns"]["score"]["mean"] == pytest.approx(float(np.mean(values)))
    assert c["columns"]["score"]["n"] == len(values)
    # used by a curation ranking by the same column; refused by one ranking by another
    base = {"task": "dpo", "run": str(rm_run), "output": str(tmp_path / "o"), "calibration": str(out)}
    assert parse_config({**base, "score_column": RM}).score_column == RM
    with pytest.raises(ConfigError, match="calibration: .* fitted with score_column 'rm_x'"):
        parse_config(base)


def test_a_calibration_fitted_on_score_is_refused_with_another_column(rm_run, tmp_path):
    out = str(tmp_path / "old.json")
    cal.save(cal.fit_calibration({"score": np.arange(5.0)}, "zscore"), out)  # no score_column: fitted on score
    base = {"task": "sft", "run": str(rm_run), "output": str(tmp_path / "o"), "calibration": out}
    assert parse_config(base).calibration == out
    with pytest.raises(ConfigError, match="fitted with score_column 'score'.* score_column is 'rm_x'"):
        parse_config({**base, "score_column": RM})


def _refusal(tmp_path: Path, capsys, config: dict) -> tuple[str, str]:
    """(the --check error, the job's error): both exit 2."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert curate_cli.main(["--config", str(path), "--check"]) == 2
    check = capsys.readouterr().err
    assert curate_cli.main(["--config", str(path)]) == 2  # refused before Ray starts
    job = capsys.readouterr().err
    return check, job


@pytest.mark.parametrize(
    "task, column, message",
    [
        ("dpo", "rm_missing", "score_column: the run {run} has no column 'rm_missing' ("),
        ("sft", "source", "score_column: column 'source' of the run {run} is string, not numeric"),
        ("rerank", "rm_null", "score_column: column 'rm_null' holds no value in the run {run} (all "),
        ("calibrate", "rm_null", "score_column: column 'rm_null' holds no value in the run {run} (all "),
    ],
)
def test_unusable_score_columns_are_config_errors(rm_run, tmp_path, capsys, task, column, message):
    out = str(tmp_path / ("c.json" if task == "calibrate" else "o"))
    check, job = _refusal(tmp_path, capsys, {"task": task, "run": str(rm_run), "output": out, "score_column": column})
    assert message.format(run=rm_run) in check
    assert check == job  # the same message from both doors
    assert not (tmp_path / "o").exists()


def test_the_default_score_column_is_checked_too(shared_data, tmp_path, capsys):
    """A run labeled by reward models only, curated without score_column: `score` is all null or
    absent, and the message names the reward columns there are."""
    for score in ("null", "drop"):
        run = small_run(shared_data, tmp_path / score / "run", score=score)
        check, job = _refusal(tmp_path, capsys, {"task": "dpo", "run": str(run), "output": str(tmp_path / "o")})
        if score == "null":
            expected = f"score_column: column 'score' holds no value in the run {run} (all "
        else:
            expected = f"score_column: the run {run} has no column 'score' ("
            assert "reward-model columns: rm_x, rm_null)" in check
        assert expected in check and check == job


def test_a_glob_of_runs_needs_the_column_in_every_run(shared_data, tmp_path, capsys):
    root = tmp_path / "labels"
    small_run(shared_data, root / "night-2", run_id="night-2")
    old = write_run(shared_data, root / "night-1", "night-1", hh_pairs=5, pandalm_pairs=0)  # before rm_x
    config = {"task": "sft", "run": str(root / "night-*"), "output": str(tmp_path / "o"), "score_column": RM}
    check, job = _refusal(tmp_path, capsys, config)
    assert f"score_column: the run {old} has no column 'rm_x'" in check and "night-2 has no" not in check
    assert check == job


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"task": "rerank", "rerank": {"order": "conservative"}}, "rerank.order: 'conservative' ranks by the heads'"),
        ({"task": "sft", "sft": {"one_per_prompt": True, "order": "ensemble_min"}}, "sft.order: 'ensemble_min'"),
        ({"task": "dpo", "pairs": {"min_margin_uncertainty": 1.0}}, "pairs.min_margin_uncertainty: uses score_std"),
    ],
)
def test_ensemble_orders_are_refused_with_another_score_column(rm_run, tmp_path, capsys, patch, key):
    config = {"run": str(rm_run), "output": str(tmp_path / "o"), "score_column": RM, **patch}
    check, job = _refusal(tmp_path, capsys, config)
    assert key in check and check == job
    assert parse_config({**config, "score_column": "score"}).score_column == "score"  # the column they describe


def test_check_reads_score_as_the_column_and_the_key_is_typed(rm_run, tmp_path, capsys):
    config = {
        "task": "sft",
        "run": str(rm_run),
        "output": str(tmp_path / "o"),
        "score_column": RM,
        "filters": [{"column": "score", "min": 0.0}, {"column": RM, "max": 0.9}],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert curate_cli.main(["--config", str(path), "--check"]) == 0, capsys.readouterr().err
    assert "  score_column: rm_x (read as `score` by every rule and output)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="score_column: expected a string"):
        parse_config({**config, "score_column": 3})
    with pytest.raises(ConfigError, match="score_column"):
        parse_config({**config, "score_column": ""})


def test_the_config_hash_includes_the_column_and_not_its_default(rm_run, tmp_path):
    base = {"task": "dpo", "run": str(rm_run), "output": str(tmp_path / "o")}
    plain = parse_config(base)
    assert parse_config({**base, "score_column": "score"}).hash() == plain.hash()
    assert parse_config({**base, "score_column": RM}).hash() != plain.hash()
    d = plain.to_dict()
    d.pop("ray_address")
    d.pop("score_column")  # the hash of a config written before the key existed
    assert plain.hash() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def test_outputs_keep_one_meaning_of_score(ray_session, rm_run, tmp_path):
    """sft with score_column: the output's `score` is rm_x, the run's own score is not carried."""
    curate(rm_run, tmp_path / "sft", task="sft", score_column=RM)
    got = pd.DataFrame(output(tmp_path / "sft"))
    rm = {u["unit_id"]: u[RM] for u in units_of(rm_run)}
    expect = [rm[u] for u in got["unit_id"]]
    assert got["score"].isna().tolist() == [v is None for v in expect]
    assert np.allclose(got["score"].dropna().to_numpy(), [v for v in expect if v is not None])
    assert RM not in got.columns and "score_calibrated" not in got.columns


def test_the_report_says_which_column_scored_a_curation():
    from pipeline.curation.report import _curation_section

    html = _curation_section({"task": "dpo", "score_column": RM, "rows_in": 3, "rows_out": 1})
    assert "Scored by <code>rm_x</code>" in html
    assert "Scored by" not in _curation_section({"task": "dpo", "score_column": "score"})
