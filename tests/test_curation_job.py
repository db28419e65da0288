"""The curation jobs end to end on Ray (num_cpus=2), reading the fixture run of real rows; every
output is checked against a reference computed here with plain pandas over the whole run."""

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from curation_fixtures import load_units

from jobs import curate as curate_cli
from pipeline.curation import calibration as cal
from pipeline.curation.config import ConfigError, parse_config
from pipeline.curation.job import partition_of, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(params=["stand_in_scores", "labeling_job"])
def any_run(request, annotated_run):
    """The fixture run (stand-in scores, units of a prompt spread over files) and a run written by
    the real labeling job."""
    return annotated_run if request.param == "stand_in_scores" else request.getfixturevalue("labeled_run")


def curate(ray_session, **cfg):
    return run(parse_config(cfg))


def read_output(out: Path) -> pd.DataFrame:
    return pq.read_table(out / "data").to_pandas()


def kth_largest_cutoff(values, fraction):
    v = np.sort(np.asarray(values, dtype=np.float64))
    return v[len(v) - int(np.ceil(fraction * len(v)))]


def reference_agreement(bon: pd.DataFrame) -> tuple[int, float, float]:
    """(prompts ranked, top-1 credit, mean Kendall tau-b) by loops over each prompt's units, from the
    definitions (pipeline/metrics.py's docstring): a prompt counts with >= 2 units holding a score and
    a human rank; credit = share of the units tied at the top score that hold the lowest rank;
    tau-b of score against the negated rank, over every pair of units."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for pid, score, rank in zip(bon["prompt_id"], bon["score"], bon["human_rank"]):
        if pd.notna(score) and pd.notna(rank):
            groups.setdefault(pid, []).append((float(score), float(rank)))
    counted, credit, taus = 0, 0.0, []
    for g in groups.values():
        if len(g) < 2:
            continue
        counted += 1
        top, best = max(s for s, _ in g), min(r for _, r in g)
        at_top = [r for s, r in g if s == top]
        credit += sum(r == best for r in at_top) / len(at_top)
        c_minus_d = tied_s = tied_r = pairs = 0
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                ds, dr = np.sign(g[i][0] - g[j][0]), np.sign(g[j][1] - g[i][1])
                pairs += 1
                c_minus_d += ds * dr
                tied_s += ds == 0
                tied_r += dr == 0
        denom = ((pairs - tied_s) * (pairs - tied_r)) ** 0.5
        if denom > 0:
            taus.append(c_minus_d / denom)
    return counted, credit, sum(taus) / len(taus)


def reference_human_margins(units: pd.DataFrame) -> list[float]:
    """score(chosen) - score(rejected) of each preference row_id with exactly two scored units, one
    chosen and one rejected, not a tie: by a loop over the rows as written."""
    rows: dict[str, list] = {}
    for u in units.to_dict("records"):
        if (
            u["kind"] == "preference"
            and not u["tie"]
            and pd.notna(u["score"])
            and u["preference"] in ("chosen", "rejected")
        ):
            rows.setdefault(u["row_id"], []).append(u)
    out = []
    for rid in sorted(rows):
        r = rows[rid]
        if len(r) == 2 and sorted(u["preference"] for u in r) == ["chosen", "rejected"]:
            c, j = (r[0], r[1]) if r[0]["preference"] == "chosen" else (r[1], r[0])
            out.append(float(c["score"]) - float(j["score"]))
    return out


def reference_temperature(margins: list[float]) -> float:
    """argmin over T of sum log(1 + exp(-m / T)): a golden-section search on log T over [1e-3, 1e3]
    of the likelihood itself (the job bisects its derivative)."""
    m = [x for x in margins if x != 0]

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        return sum(math.log1p(math.exp(-x / t)) if -x / t < 30 else -x / t for x in m)

    lo, hi, phi = math.log(1e-3), math.log(1e3), (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def file_digests(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").iterdir())}


def test_sft_top_fraction_uses_whole_run_quantiles_and_one_response_per_prompt(ray_session, any_run, tmp_path):
    units = load_units(any_run)
    out = tmp_path / "sft"
    config = {
        "task": "sft",
        "run": str(any_run),
        "output": str(out),
        "output_files": 3,
        "filters": [{"column": "score", "top": 0.4}, {"objective": "hh_rlhf.harmlessness", "min": 0.3}],
        "sft": {"one_per_prompt": True},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    assert curate_cli.main(["--config", str(tmp_path / "sft.yaml")]) == 0  # the CLI, in this Ray session
    man = json.loads((out / "manifest.json").read_text())

    # reference: the whole run in pandas
    unique = units.drop_duplicates("unit_id")
    eligible = unique[unique["preference"] != "rejected"]
    cutoff = kth_largest_cutoff(units["score"], 0.4)  # filters see the whole run, repeated rows included
    passed = eligible[(eligible["score"] >= cutoff) & (eligible["rating_hh_rlhf_harmlessness"] >= 0.3)]
    best = passed.sort_values(["prompt_id", "score", "unit_id"], ascending=[True, False, True]).drop_duplicates(
        "prompt_id"
    )
    got = read_output(out)
    assert sorted(got["unit_id"]) == sorted(best["unit_id"])
    assert man["rows_in"] == len(units) and man["rows_out"] == len(best)
    assert man["resolved_filters"][0]["cutoff"] == pytest.approx(cutoff)
    f_score, f_harm = man["filters"]
    assert f_score["removed"] == int((eligible["score"] < cutoff).sum())
    assert f_harm["removed"] == int(
        ((eligible["score"] >= cutoff) & (eligible["rating_hh_rlhf_harmlessness"] < 0.3)).sum()
    )
    selection = {s["label"]: s["removed"] for s in man["selection"]}
    assert selection == {
        "unique unit_id": len(units) - len(unique),
        "not human-rejected": int((unique["preference"] == "rejected").sum()),
    }
    assert man["one_per_prompt_removed"] == len(passed) - len(best)
    assert (
        sum(selection.values()) + f_score["removed"] + f_harm["removed"] + man["one_per_prompt_removed"]
        == man["rows_in"] - man["rows_out"]
    )
    # conversational SFT rows: the prompt messages then the response as the assistant turn
    by_unit = units.drop_duplicates("unit_id").set_index("unit_id")
    for _, row in got.head(20).iterrows():
        unit = by_unit.loc[row["unit_id"]]
        assert list(row["messages"][:-1]) == list(unit["prompt"])
        assert row["messages"][-1] == {"role": "assistant", "content": unit["response"]}

    # per-file quantiles would have selected different rows
    per_file = []
    for f in sorted((any_run / "data").glob("*.parquet")):
        part = pq.read_table(f).to_pandas()
        per_file += list(part["unit_id"][part["score"] >= kth_largest_cutoff(part["score"], 0.4)])
    assert set(per_file) != set(units["unit_id"][units["score"] >= cutoff])


def test_dpo_pairs_never_cross_prompts_and_counts_reconcile(ray_session, any_run, tmp_path):
    units = load_units(any_run)
    out = tmp_path / "dpo"
    man = curate(
        ray_session,
        task="dpo",
        run=str(any_run),
        output=str(out),
        output_files=4,
        pairs={"best_of_n": "all_pairs", "min_margin": 0.02, "preference": "flip", "tie_epsilon": 0.01},
    )
    got = read_output(out)
    by_unit = units.drop_duplicates("unit_id").set_index("unit_id")
    chosen, rejected = by_unit.loc[got["chosen_unit_id"]], by_unit.loc[got["rejected_unit_id"]]
    assert (got["chosen_unit_id"] != got["rejected_unit_id"]).all()
    assert (chosen["prompt_id"].to_numpy() == got["prompt_id"].to_numpy()).all()
    assert (rejected["prompt_id"].to_numpy() == got["prompt_id"].to_numpy()).all()
    assert np.allclose(got["score_chosen"], chosen["score"].astype(float)) and np.allclose(
        got["score_rejected"], rejected["score"].astype(float)
    )
    assert np.allclose(got["score_margin"], got["score_chosen"] - got["score_rejected"])
    assert (got["score_margin"] >= 0.01).all()  # flip policy: every kept pair agrees with the reward
    assert np.allclose(got["p_chosen"], 1 / (1 + np.exp(-got["score_margin"])))
    assert [m["content"] for m in got["chosen"][0]] == [chosen["response"].iloc[0]]
    assert got["chosen"][0][0]["role"] == "assistant"
    pref, bon = man["pairs"]["preference"], man["pairs"]["best_of_n"]
    for c in (pref, bon):
        assert c["kept"] + c["flipped"] + c["dropped_total"] == c["pairs_in"]
    assert pref["pairs_in"] == units[units["kind"] == "preference"]["row_id"].nunique()
    sizes = units[units["kind"] == "best_of_n"].drop_duplicates("unit_id").groupby("prompt_id").size()
    assert bon["pairs_in"] == int((sizes * (sizes - 1) // 2).sum())
    assert len(got) == man["rows_out"] == pref["kept"] + pref["flipped"] + bon["kept"]
    assert (got["action"] == "flipped").sum() == pref["flipped"] > 0
    assert not got.duplicated(["chosen_unit_id", "rejected_unit_id"]).any()


def test_rerank_top_k_order_and_agreement(ray_session, any_run, tmp_path):
    units = load_units(any_run)
    out = tmp_path / "rerank"
    man = curate(
        ray_session,
        task="rerank",
        run=str(any_run),
        output=str(out),
        output_files=2,
        rerank={"top_k": 2, "kinds": ["best_of_n"]},
    )
    got = read_output(out)
    bon = units[units["kind"] == "best_of_n"].drop_duplicates("unit_id")
    sizes = bon.groupby("prompt_id").size()
    assert len(got) == int(np.minimum(sizes, 2).sum())
    for pid, g in got.groupby("prompt_id"):
        g = g.sort_values("rank")
        expected = bon[bon["prompt_id"] == pid].sort_values(["score", "unit_id"], ascending=[False, True]).head(2)
        assert g["unit_id"].tolist() == expected["unit_id"].tolist()
        assert g["rank"].tolist() == list(range(len(g)))
        assert (g["n_candidates"] == sizes[pid]).all()
    groups, credit, tau = reference_agreement(bon)
    assert man["agreement"]["groups_ranked"] == groups > 30  # not a trivial few
    assert man["agreement"]["top1_hits"] == pytest.approx(credit)
    assert man["agreement"]["mean_kendall_tau_b"] == pytest.approx(tau)


def test_reruns_write_identical_files_and_remove_stale_ones(ray_session, annotated_run, tmp_path):
    out = tmp_path / "again"
    cfg = dict(
        task="dpo",
        run=str(annotated_run),
        output=str(out),
        output_files=4,
        filters=[{"column": "score", "above_quantile": 0.1}],
    )
    first = curate(ray_session, **cfg)
    digests = file_digests(out)
    second = curate(ray_session, **cfg)
    assert file_digests(out) == digests and len(digests) == 4
    assert {k: first[k] for k in ("rows_in", "rows_out", "pairs", "filters")} == {
        k: second[k] for k in ("rows_in", "rows_out", "pairs", "filters")
    }
    fewer = curate(ray_session, **{**cfg, "output_files": 2})
    assert sorted(file_digests(out)) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert fewer["output"]["stale_files_removed"] == 4
    assert len(read_output(out)) == first["rows_out"]


def test_calibrate_fits_on_the_whole_run(ray_session, any_run, tmp_path):
    units = load_units(any_run)
    target = tmp_path / "heads" / "calibration.json"
    man = curate(
        ray_session,
        task="calibrate",
        run=str(any_run),
        output=str(target),
        output_files=3,
        calibrate={"method": "zscore"},
    )
    c = cal.load(str(target))
    assert c["columns"]["score"]["mean"] == pytest.approx(units["score"].astype(float).mean())
    assert c["columns"]["rating_pandalm_helpfulness"]["std"] == pytest.approx(
        units["rating_pandalm_helpfulness"].astype(float).std(ddof=0)
    )
    assert "debiased_hh_rlhf_harmlessness" in c["columns"]
    margins = reference_human_margins(units)
    assert c["temperature_pairs"] == man["temperature_pairs"] == len(margins) > 20
    assert c["temperature"] == pytest.approx(reference_temperature(margins), rel=1e-4)
    assert json.loads((tmp_path / "heads" / "calibration.manifest.json").read_text())["rows_in"] == len(units)
    # the fitted temperature then sets P(chosen beats rejected) on DPO pairs
    out = tmp_path / "dpo-cal"
    curate(
        ray_session,
        task="dpo",
        run=str(any_run),
        output=str(out),
        calibration=str(target),
        output_files=1,
        pairs={"reward_margin": True},
    )
    got = read_output(out)
    assert np.allclose(got["p_chosen"], 1 / (1 + np.exp(-got["score_margin"] / c["temperature"])))
    # the opt-in loss margin for TRL's RewardTrainer: the gap in Bradley-Terry logits
    assert np.allclose(got["margin"], got["score_margin"] / c["temperature"])


@pytest.fixture
def moto_s3():
    """A moto S3 server for this module's s3 test (in-process threads), and storage_options for it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # Explicit dummy credentials: Ray workers get them through the config, not the environment.
    yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    server.stop()


def test_s3_in_and_out(ray_session, annotated_run, moto_s3):
    from pipeline import storage

    fs, _ = storage.filesystem("s3://curate", moto_s3)
    fs.mkdir("curate")
    for f in sorted(annotated_run.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"curate/runs/fixture/{f.relative_to(annotated_run).as_posix()}")
    man = curate(
        ray_session,
        task="sft",
        run="s3://curate/runs/fixture",
        output="s3://curate/curated/sft",
        storage_options=moto_s3,
        output_files=2,
        filters=[{"column": "score", "top": 0.25}],
    )
    files = sorted(fs.find("curate/curated/sft/data"))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    rows = sum(pq.read_table(f, filesystem=fs).num_rows for f in files)
    units = load_units(annotated_run)
    cutoff = kth_largest_cutoff(units["score"], 0.25)
    unique = units.drop_duplicates("unit_id")
    assert rows == man["rows_out"] == int(((unique["score"] >= cutoff) & (unique["preference"] != "rejected")).sum())
    assert json.loads(fs.cat_file("curate/curated/sft/manifest.json"))["rows_out"] == rows


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"task": "summarise"}, "task: expected one of 'sft', 'dpo', 'rerank' or 'calibrate', got 'summarise'"),
        ({"output_files": 0}, "output_files"),
        ({"filters": [{"column": "score", "top": 2}]}, r"filters\[0\]: .*fraction"),
        ({"pairs": {"preference": "maybe"}}, "pairs.preference: expected one of"),
        ({"pairs": {"margin": 1}}, "pairs.margin: unknown key; did you mean 'min_margin'"),
        ({"sft": {"kinds": ["chat"]}}, "sft.kinds"),
        ({"rerank": {"top_k": 0}}, "rerank.top_k"),
        ({"pairs": {"reward_margin": True}}, "reward_margin: needs `calibration`"),
        ({"partition_rows": 0}, "partition_rows"),
        ({"colour": "blue"}, "unknown key"),
        ({"task": "calibrate"}, "ending in .json"),
        ({"run": "/nonexistent/run"}, "no Parquet files"),
    ],
)
def test_config_errors_are_clear(annotated_run, tmp_path, patch, message):
    base = {"task": "sft", "run": str(annotated_run), "output": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match=message):
        parse_config({**base, **patch})


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("task: sft\n")
    assert curate_cli.main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert "run: missing required key" in capsys.readouterr().err


def test_stable_hash_is_fnv1a_of_the_utf8_bytes():
    import pyarrow as pa

    from pipeline.curation.job import partition_of, stable_hash

    keys = pa.array(["", "a", "foobar", "é"])
    # published FNV-1a 64-bit test vectors ("", "a", "foobar"); "é" is the two bytes c3 a9
    expected = [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    h = 0xCBF29CE484222325
    for b in "é".encode():
        h = ((h ^ b) * 0x100000001B3) % 2**64
    assert stable_hash(keys).tolist() == expected + [h]
    assert stable_hash(keys.slice(1, 2)).tolist() == expected[1:3]  # sliced arrays
    assert partition_of(pa.chunked_array([["a"], ["a", "foobar"]]), 7).tolist() == [expected[1] % 7] * 2 + [
        expected[2] % 7
    ]


@pytest.mark.parametrize(
    "units, rows, files, expected",
    [
        (1000, 200_000, None, (1, 1)),
        (1000, 200_000, 8, (8, 8)),
        (3_200_000, 100_000, None, (32, 32)),
        (3_200_000, 200_000, 5, (20, 5)),
        (950, 100, 2, (10, 2)),
        (0, 100, None, (1, 1)),
    ],
)
def test_partitions_follow_the_data_and_fill_whole_files(units, rows, files, expected):
    from pipeline.curation.job import partition_layout

    assert partition_layout(units, rows, files) == expected


def test_many_small_partitions_give_the_same_rows_and_counts(ray_session, annotated_run, tmp_path):
    """Partitions of 150 units (so about ten, several per file): every output row and every count as
    with the whole run in one partition, because a partition always holds whole prompts."""
    units = load_units(annotated_run)
    cfg = dict(
        task="dpo",
        run=str(annotated_run),
        filters=[{"column": "score", "above_quantile": 0.1}],
        pairs={"best_of_n": "all_pairs", "tie_epsilon": 0.01},
    )
    one = curate(ray_session, **cfg, output=str(tmp_path / "one"), output_files=1)
    many = curate(ray_session, **cfg, output=str(tmp_path / "many"), output_files=3, partition_rows=150)
    assert one["partitions"] == 1 and many["partitions"] == 3 * int(np.ceil(len(units) / 150 / 3))
    assert len(many["output"]["files"]) == 3
    for key in ("rows_in", "rows_out", "pairs", "filters", "resolved_filters"):
        assert one[key] == many[key]
    a = read_output(tmp_path / "one").sort_values(["chosen_unit_id", "rejected_unit_id"]).reset_index(drop=True)
    b = read_output(tmp_path / "many").sort_values(["chosen_unit_id", "rejected_unit_id"]).reset_index(drop=True)
    assert a[["chosen_unit_id", "rejected_unit_id", "score_margin", "action"]].equals(
        b[["chosen_unit_id", "rejected_unit_id", "score_margin", "action"]]
    )
    assert not (tmp_path / "many" / "_shuffle").exists()  # scratch removed


@pytest.mark.parametrize(
    "task, extra",
    [
        ("sft", {"filters": [{"column": "score", "top": 0.5}], "sft": {"one_per_prompt": True}}),
        ("rerank", {"rerank": {"top_k": 2}}),
    ],
)
def test_unit_tasks_give_the_same_rows_whatever_the_layout(ray_session, annotated_run, tmp_path, task, extra):
    """sft and rerank shuffle only light columns and read the selected units' texts back from the
    run by position: with many small partitions and slices (several slices a file, several
    partitions a file) every output row, in order, and every count are those of one partition."""
    cfg = dict(task=task, run=str(annotated_run), **extra)
    one = curate(ray_session, **cfg, output=str(tmp_path / "one"), output_files=1, partition_rows=100_000)
    many = curate(ray_session, **cfg, output=str(tmp_path / "many"), output_files=3, partition_rows=40)
    assert one["partitions"] == 1 and many["partitions"] > 6
    for name in ("rows_in", "rows_out", "filters", "selection", "resolved_filters"):
        assert one[name] == many[name]
    a = read_output(tmp_path / "one")
    b = read_output(tmp_path / "many")
    assert len(a) == one["rows_out"] > 0 and len(many["output"]["files"]) == 3
    key = ["prompt_id", "rank"] if task == "rerank" else ["prompt_id", "unit_id"]
    a, b = (df.sort_values(key).reset_index(drop=True) for df in (a, b))
    assert a.drop(columns="messages").equals(b.drop(columns="messages"))
    assert [list(m) for m in a["messages"]] == [list(m) for m in b["messages"]]
    # each file: its partitions' rows in partition order, each partition in the selection's order
    for f in many["output"]["files"]:
        part = pq.read_table(tmp_path / "many" / "data" / f).to_pandas()
        p = partition_of(pa.array(part["prompt_id"]), many["partitions"])
        assert (np.diff(p) >= 0).all()
        for _, g in part.assign(p=p).groupby("p"):
            assert g[key].equals(g.sort_values(key)[key])
    # the texts are the selected units' own
    by_unit = load_units(annotated_run).drop_duplicates("unit_id").set_index("unit_id")
    for _, row in b.iterrows():
        assert row["messages"][-1]["content"] == by_unit.loc[row["unit_id"], "response"]
        assert list(row["messages"][:-1]) == list(by_unit.loc[row["unit_id"], "prompt"])


def test_embedded_ray_workers_get_the_curation_worker_env(tmp_path):
    """A fresh process starts an embedded Ray through init_ray with the curation job's WORKER_ENV:
    its workers see the variable; one the user set beforehand is kept."""
    import subprocess
    import sys

    code = (
        "import os, ray\n"
        "from pipeline.curation.job import WORKER_ENV\n"
        "from pipeline.runtime import init_ray\n"
        "init_ray(num_cpus=1, worker_env={**WORKER_ENV, 'ARMOLABEL_TEST_KEPT': 'default'})\n"
        "names = ('MIMALLOC_ARENA_EAGER_COMMIT', 'ARMOLABEL_TEST_KEPT')\n"
        "f = ray.remote(lambda: tuple(os.environ.get(k) for k in names))\n"
        "print(ray.get(f.remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MIMALLOC_ARENA_EAGER_COMMIT", "RAY_ADDRESS")}
    env["ARMOLABEL_TEST_KEPT"] = "users"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "('0', 'users')"
