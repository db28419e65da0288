"""The labeling job end to end on real data, real SmolLM2 and real trained heads.

Each run is a real `python -m jobs.label` process with its own embedded Ray, as users run it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from label_fixtures import REPO, SHARED, label_config, manifest, read_output, run_module, small_inputs, write_yaml

pytestmark = pytest.mark.slow


def expected_units(inputs: list[dict], limit: int) -> tuple[set[str], set[str]]:
    """(good unit ids, quarantined unit ids) by the pure reader, without Ray."""
    from pipeline.corpus import InputSpec, read_units

    good, bad = set(), set()
    for spec in inputs:
        t = read_units([InputSpec.from_dict(spec)], limit_rows=limit)
        for uid, reason in zip(t.column("unit_id").to_pylist(), t.column("quarantine_reason").to_pylist()):
            (bad if reason else good).add(uid)
    return good, bad


def outcome(run_dir: Path) -> tuple[list[str], set[str], set[str]]:
    """(labeled unit ids as written, units the reader quarantined, units quarantined later: too long
    for max_tokens even after dropping old turns)."""
    ids = read_output(run_dir).column("unit_id").to_pylist()
    q = read_output(run_dir, "quarantine")
    q = q.to_pylist() if q is not None else []
    return ids, {r["unit_id"] for r in q if r["stage"] == "read"}, {r["unit_id"] for r in q if r["stage"] != "read"}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, smollm2_heads):
    """The labeling job over a few LLMBar and OASST rows (label_fixtures.label_config's defaults)."""
    tmp = tmp_path_factory.mktemp("label")
    cfg = label_config(tmp, smollm2_heads, count_units=True)  # the parsing pass that gives an ETA
    path = write_yaml(tmp / "job.yaml", cfg)
    proc = run_module("jobs.label", "--config", str(path))
    return {"tmp": tmp, "cfg": cfg, "config_path": path, "run_dir": tmp / "labels" / "t1", "stdout": proc.stdout}


def test_every_row_labeled_or_quarantined_exactly_once(small_run):
    run_dir, cfg = small_run["run_dir"], small_run["cfg"]
    good, bad = expected_units(cfg["inputs"], cfg["limit_rows_per_input"])
    ids, q_read, q_later = outcome(run_dir)
    assert len(ids) == len(set(ids)), "a unit was written twice"
    # The reader's verdicts are the pure reader's; units the reader passed are labeled, or quarantined
    # later for a stated reason.
    assert q_read == bad
    assert set(ids) | q_later == good and not set(ids) & q_later
    q_table = read_output(run_dir, "quarantine")
    q = q_table.to_pylist() if q_table is not None else []
    assert all("more than max_tokens" in r["quarantine_reason"] for r in q if r["stage"] != "read")
    man = manifest(run_dir)
    for source, counts in man["sources"].items():
        assert counts["rows_in"] == counts["rows_labeled"] + counts["rows_quarantined"], source
        assert counts["units_in"] == counts["units_labeled"] + counts["units_quarantined"], source
    assert sum(c["units_labeled"] for c in man["sources"].values()) == len(ids) == len(good) - len(q_later)
    assert man["sources"]["llmbar"]["rows_in"] == cfg["limit_rows_per_input"]
    assert man["config_hash"] and man["versions"]["ray"] and man["wall_time_s"] > 0
    assert man["tokens_per_s"] > 0 and man["units_per_s"] > 0
    # progress lines: the planned total announced at the start, then units, rates, share and ETA
    announced = re.search(r"run \S+: \d+ file\(s\), (\d+) unit\(s\) to label", small_run["stdout"])
    lines = re.findall(r"(\d+) units, [\d.]+ units/s, \d+ tokens/s, ([\d.]+)% of (\d+), ETA \d+s", small_run["stdout"])
    assert announced and lines, small_run["stdout"]
    for done, share, total in lines:
        assert total == announced.group(1) and float(share) == pytest.approx(100 * int(done) / int(total), abs=0.05)


def test_output_schema_and_readers(small_run, smollm2_heads):
    import duckdb
    import pandas as pd
    import polars as pl
    from datasets import load_dataset

    from pipeline import schema
    from pipeline.heads.model import ArmoHeads

    run_dir = small_run["run_dir"]
    objectives = list(ArmoHeads.load(smollm2_heads).objectives)
    want = schema.output_schema(objectives)
    files = sorted(str(p) for p in (run_dir / "data").glob("*.parquet"))
    for f in files:
        assert pq.read_schema(f).names == want.names
    n = sum(pq.read_metadata(f).num_rows for f in files)
    assert len(pd.read_parquet(run_dir / "data")) == n
    assert pl.read_parquet(str(run_dir / "data" / "*.parquet")).height == n
    assert duckdb.sql(f"select count(*) from read_parquet('{run_dir}/data/*.parquet')").fetchall()[0][0] == n
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(small_run["tmp"] / "hf"))
    assert ds.num_rows == n
    df = pd.read_parquet(run_dir / "data")
    gates = df[[schema.objective_column(schema.GATE_PREFIX, o) for o in objectives]].to_numpy()
    assert (gates >= 0).all()
    np.testing.assert_allclose(gates.sum(1), gates.sum(1)[0], rtol=1e-4)  # every row sums to beta
    assert df["score"].notna().all()
    assert (df["total_tokens"] <= 512).all() and (df["run_id"] == "t1").all()
    assert df["backbone_fingerprint"].nunique() == 1 and df["heads_fingerprint"].nunique() == 1
    # the job's closing summary: mean score and the most-gated objective per source
    line = next(x for x in small_run["stdout"].splitlines() if x.startswith("scores by source: "))
    summary = json.loads(line.removeprefix("scores by source: "))
    for source, part in df.groupby("source"):
        assert summary[source]["units"] == len(part)
        assert summary[source]["mean_score"] == pytest.approx(part["score"].mean(), abs=1e-3)
        gate_means = {o: part[schema.objective_column(schema.GATE_PREFIX, o)].mean() for o in objectives}
        assert summary[source]["top_gate"] == max(gate_means, key=gate_means.get)


def test_scores_equal_a_direct_computation(small_run, smollm2_heads):
    """Recompute a few units without the pipeline: chat template by hand, one unpadded forward
    pass each with plain transformers, the heads on the two hidden states."""
    import torch

    from pipeline import schema
    from pipeline.embed.backbone import BackboneSpec, load_backbone
    from pipeline.heads.model import ArmoHeads

    df = read_output(small_run["run_dir"]).to_pandas()
    heads = ArmoHeads.load(smollm2_heads)
    backbone = load_backbone(BackboneSpec(path="smollm2"))
    tok, model = backbone.tokenizer, backbone.model
    sample = df[~df["truncated"]].sort_values("unit_id").iloc[::7].head(5)
    assert len(sample) >= 3
    for _, row in sample.iterrows():
        prompt = [dict(m) for m in row["prompt"]]
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": row["response"]}], tokenize=False)
        head = tok.apply_chat_template(prompt, tokenize=False)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        prompt_ids = tok(head, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.inference_mode():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0].float().numpy()
        out = heads.score(hidden[[-1]], hidden[[len(prompt_ids) - 1]])
        assert row["total_tokens"] == len(ids)
        np.testing.assert_allclose(row["score"], out.score[0], rtol=1e-3, atol=1e-4)
        for k, obj in enumerate(heads.objectives):
            np.testing.assert_allclose(
                row[schema.objective_column(schema.RATING_PREFIX, obj)], out.rewards[0, k], rtol=1e-3, atol=1e-4
            )
            np.testing.assert_allclose(
                row[schema.objective_column(schema.GATE_PREFIX, obj)], out.gate[0, k], rtol=1e-3, atol=1e-4
            )


def test_exported_armorm_checkpoint_scores_like_backbone_plus_heads(small_run, smollm2_heads):
    """Heads + SmolLM2 exported to the released layout (jobs.export_armorm), then the same job with
    `model.armorm_checkpoint`: the same scores, through the same embedding engine."""
    tmp = small_run["tmp"]
    ckpt = tmp / "armorm"
    run_module("jobs.export_armorm", "--heads", smollm2_heads, "--backbone", "smollm2", "--out", str(ckpt))
    assert (ckpt / "config.json").exists() and (ckpt / "model.safetensors.index.json").exists()
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForRewardModelWithGating"]
    cfg = dict(small_run["cfg"], run_id="ckpt")
    cfg["model"] = {"armorm_checkpoint": str(ckpt), "template": cfg["model"]["template"]}
    run_module("jobs.label", "--config", str(write_yaml(tmp / "ckpt.yaml", cfg)))
    ours = read_output(small_run["run_dir"]).to_pandas().set_index("unit_id").sort_index()
    theirs = read_output(tmp / "labels" / "ckpt").to_pandas().set_index("unit_id").sort_index()
    assert list(theirs.index) == list(ours.index)
    np.testing.assert_allclose(theirs["score"], ours["score"], rtol=1e-4, atol=1e-5)
    assert (
        theirs["heads_fingerprint"].nunique() == 1
        and theirs["heads_fingerprint"].iloc[0] != ours["heads_fingerprint"].iloc[0]
    )


def test_rerun_with_same_run_id_redoes_nothing(small_run):
    run_dir = small_run["run_dir"]
    before = sorted(p.name for p in (run_dir / "data").glob("*.parquet"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run_dir / "data").glob("*.parquet")}
    run_module("jobs.label", "--config", str(small_run["config_path"]))
    man = manifest(run_dir)
    assert man["shards_this_attempt"] == 0 and man["units_labeled_this_attempt"] == 0
    assert sorted(p.name for p in (run_dir / "data").glob("*.parquet")) == before
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "data").glob("*.parquet")} == mtimes


def _start_job(config_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.label", "--config", str(config_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"job ended before the event (rc={proc.returncode}):\n{proc.stdout.read()[-5000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the job"
        time.sleep(0.5)


def _markers(run_dir: Path) -> list[Path]:
    return list((run_dir / "_shards").glob("*.json")) if (run_dir / "_shards").exists() else []


def test_killed_driver_then_rerun_completes_without_duplicates(tmp_path, smollm2_heads):
    cfg = label_config(tmp_path, smollm2_heads, limit_rows_per_input=24)
    path = write_yaml(tmp_path / "job.yaml", cfg)
    run_dir = tmp_path / "labels" / "t1"
    proc = _start_job(path)
    _wait_for(lambda: len(_markers(run_dir)) >= 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it embeds die at once
    proc.wait()
    assert not (run_dir / "manifest.json").exists()
    committed = len(_markers(run_dir))
    run_module("jobs.label", "--config", str(path))
    man = manifest(run_dir)
    assert 0 < man["shards_this_attempt"] < man["shards"]
    assert man["shards"] - man["shards_this_attempt"] >= committed
    ids, _, q_later = outcome(run_dir)
    good, _ = expected_units(cfg["inputs"], 24)
    assert len(ids) == len(set(ids)) and set(ids) | q_later == good


def test_killed_scoring_actor_is_replaced_and_rows_appear_once(tmp_path, smollm2_heads):
    import psutil

    cfg = label_config(tmp_path, smollm2_heads, limit_rows_per_input=24)
    path = write_yaml(tmp_path / "job.yaml", cfg)
    run_dir = tmp_path / "labels" / "t1"
    proc = _start_job(path)

    def scoring_actors():
        found = []
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                title = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if ("MapWorker" in title and "EmbedScore" in title) or "_StageActor" in title:
                found.append(p)
        return found

    _wait_for(lambda: len(_markers(run_dir)) >= 1 and scoring_actors(), proc)
    victims = scoring_actors()
    for p in victims:
        p.kill()
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    man = manifest(run_dir)
    ids, _, q_later = outcome(run_dir)
    good, _ = expected_units(cfg["inputs"], 24)
    assert victims and len(ids) == len(set(ids)) and set(ids) | q_later == good
    assert sum(c["units_labeled"] for c in man["sources"].values()) == len(ids) == len(good) - len(q_later)


def test_corrupt_file_among_good_ones_is_quarantined(tmp_path, smollm2_heads):
    rows = json.loads((SHARED / "llmbar" / "LLMBar_Natural.json").read_text())[:6]
    inputs_dir = tmp_path / "in"
    inputs_dir.mkdir()
    (inputs_dir / "a.json").write_text(json.dumps(rows[:3]))
    (inputs_dir / "b.json").write_text(json.dumps(rows[3:])[:-40])  # cut off: not valid JSON
    with gzip.open(inputs_dir / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"input": "", "output_1": "x", "output_2": "y", "label": 1}) + "\n")
        f.write(json.dumps(rows[5]) + "\n")
    cfg = label_config(
        tmp_path,
        smollm2_heads,
        inputs=[{"path": str(inputs_dir), "format": "llmbar", "source": "llmbar"}],
        limit_rows_per_input=None,
    )
    run_module("jobs.label", "--config", str(write_yaml(tmp_path / "job.yaml", cfg)))
    run_dir = tmp_path / "labels" / "t1"
    data, quarantined = read_output(run_dir), read_output(run_dir, "quarantine")
    # a.json: 3 rows; b.json: the 2 elements before the cut (the rest is one quarantined unit);
    # c.jsonl.gz: 1 good row after an empty-prompt row
    assert data.num_rows == 2 * 6
    reasons = quarantined.column("quarantine_reason").to_pylist()
    uris = quarantined.column("source_uri").to_pylist()
    assert any("b.json" in u for u in uris) and any("empty" in r for r in reasons)
    man = manifest(run_dir)["sources"]["llmbar"]
    assert (
        man["rows_labeled"] == 6
        and man["rows_quarantined"] == 2
        and man["rows_in"] == man["rows_labeled"] + man["rows_quarantined"]
    )


def test_incremental_run_labels_only_new_files(tmp_path, smollm2_heads):
    rows = json.loads((SHARED / "llmbar" / "LLMBar_Natural.json").read_text())
    inputs_dir = tmp_path / "in"
    inputs_dir.mkdir()
    (inputs_dir / "day1.json").write_text(json.dumps(rows[:3]))
    spec = [{"path": str(inputs_dir), "format": "llmbar", "source": "llmbar"}]
    cfg = label_config(tmp_path, smollm2_heads, inputs=spec, limit_rows_per_input=None, run_id="day1")
    first = run_module("jobs.label", "--config", str(write_yaml(tmp_path / "job.yaml", cfg)))
    # Without count_units there is no parsing pass before the run: the plan announces bytes, no ETA.
    size = (inputs_dir / "day1.json").stat().st_size
    assert f"run day1: 1 file(s), {size} input bytes to label" in first.stdout and "ETA" not in first.stdout
    (inputs_dir / "day2.json").write_text(json.dumps(rows[3:5]))
    run_module("jobs.label", "--config", str(tmp_path / "job.yaml"), "--run-id", "day2", "--incremental")
    day2 = tmp_path / "labels" / "day2"
    man = manifest(day2)
    assert [Path(f["uri"]).name for f in man["input_files"]] == ["day2.json"]
    assert [Path(f["uri"]).name for f in man["skipped_input_files"]] == ["day1.json"]
    assert read_output(day2).num_rows == 4


def test_output_to_s3(tmp_path, smollm2_heads, s3_server):
    so = s3_server.storage_options
    bucket = s3_server.make_bucket("labels").removeprefix("s3://")
    fs = s3_server.filesystem()
    cfg = label_config(
        tmp_path,
        smollm2_heads,
        inputs=small_inputs()[:1],
        limit_rows_per_input=6,
        output=f"s3://{bucket}/runs",
        storage_options=so,
    )
    run_module("jobs.label", "--config", str(write_yaml(tmp_path / "job.yaml", cfg)))
    files = fs.ls(f"{bucket}/runs/t1/data")
    assert files and all(f.endswith(".parquet") for f in files)
    n = sum(pq.read_metadata(fs.open(f, "rb")).num_rows for f in files)
    assert n == 12
    man = json.loads(fs.cat(f"{bucket}/runs/t1/manifest.json"))
    assert man["sources"]["llmbar"]["rows_labeled"] == 6
