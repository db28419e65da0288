"""The labeling job end to end on real data, real SmolLM2 and real trained heads.

Each run is a real `python -m jobs.label` process with its own embedded Ray, as users run it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from label_fixtures import (
    REPO,
    SHARED,
    kill_test_inputs,
    label_config,
    manifest,
    read_output,
    run_module,
    small_inputs,
    write_yaml,
)

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
    for max_tokens even after dropping old turns). A unit in quarantine/ twice fails here: the
    sets are built only after counting."""
    ids = read_output(run_dir).column("unit_id").to_pylist()
    q = read_output(run_dir, "quarantine")
    q = q.to_pylist() if q is not None else []
    twice = [u for u, n in Counter(r["unit_id"] for r in q).items() if n > 1]
    assert not twice, f"quarantine rows written twice: {twice[:5]}"
    return ids, {r["unit_id"] for r in q if r["stage"] == "read"}, {r["unit_id"] for r in q if r["stage"] != "read"}


def test_expected_units_pinned_by_hand():
    """The pure reader is the judge of the job tests: pin what it says on rows read by hand, so it
    is not its own judge. LLMBar's first rows: two units each, the `label` side chosen."""
    from pipeline.corpus import InputSpec, read_units

    rows = json.loads((SHARED / "llmbar" / "LLMBar_Natural.json").read_text())[:3]
    t = read_units([InputSpec.from_dict(small_inputs()[0])], limit_rows=3).to_pylist()
    assert len(t) == 6 and all(u["quarantine_reason"] is None for u in t)
    for i, row in enumerate(rows):
        chosen = row["output_1"] if row["label"] == 1 else row["output_2"]
        rejected = row["output_2"] if row["label"] == 1 else row["output_1"]
        pair = [u for u in t if u["source_row"] == i]
        assert {u["preference"]: u["response"] for u in pair} == {"chosen": chosen, "rejected": rejected}
        assert pair[0]["prompt"][-1]["content"] == row["input"]


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
    """Heads + SmolLM2 (+ the heads' 3-member ensemble) exported to the released layout
    (jobs.export_armorm), then the same job with `model.armorm_checkpoint`: the same scores and
    ensemble spreads, through the same embedding engine."""
    tmp = small_run["tmp"]
    ckpt = tmp / "armorm"
    run_module("jobs.export_armorm", "--heads", smollm2_heads, "--backbone", "smollm2", "--out", str(ckpt))
    assert (ckpt / "config.json").exists() and (ckpt / "model.safetensors.index.json").exists()
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForRewardModelWithGating"]
    # The LLMBar input alone: the checkpoint's scores of those units against the run's (a second
    # pass over the long OASST replies would only repeat the comparison at twice the cost).
    cfg = dict(small_run["cfg"], run_id="ckpt", inputs=small_run["cfg"]["inputs"][:1])
    cfg["model"] = {"armorm_checkpoint": str(ckpt), "template": cfg["model"]["template"]}
    run_module("jobs.label", "--config", str(write_yaml(tmp / "ckpt.yaml", cfg)))
    theirs = read_output(tmp / "labels" / "ckpt").to_pandas().set_index("unit_id").sort_index()
    ours = read_output(small_run["run_dir"]).to_pandas().set_index("unit_id").sort_index()
    ours = ours[ours["source"] == "llmbar"]
    assert list(theirs.index) == list(ours.index) and len(ours) > 0
    np.testing.assert_allclose(theirs["score"], ours["score"], rtol=1e-4, atol=1e-5)
    # the heads' ensemble travelled with the export (<ckpt>/ensemble/): the same spread columns
    assert (ckpt / "ensemble" / "ensemble.json").exists()
    for col in ("score_mean", "score_std", "score_min", "ensemble_rating_std_hh_rlhf_harmlessness"):
        assert theirs[col].notna().all() and ours[col].notna().all(), col
        np.testing.assert_allclose(theirs[col], ours[col], rtol=1e-3, atol=1e-5, err_msg=col)
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
    cfg = label_config(tmp_path, smollm2_heads, kill_test_inputs(tmp_path), limit_rows_per_input=40)
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
    good, _ = expected_units(cfg["inputs"], 40)
    assert len(ids) == len(set(ids)) and set(ids) | q_later == good


def test_killed_scoring_actor_is_replaced_and_rows_appear_once(tmp_path, smollm2_heads):
    import psutil

    cfg = label_config(tmp_path, smollm2_heads, kill_test_inputs(tmp_path), limit_rows_per_input=40)
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

    def busy_actors():
        # Ray titles an actor process after the method it is running: `.submit` is a scoring call.
        found = []
        for p in scoring_actors():
            try:
                if " ".join(p.cmdline()).rstrip().endswith(".submit"):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    _wait_for(lambda: len(_markers(run_dir)) >= 1 and busy_actors(), proc)
    victims = busy_actors()
    for p in victims:
        p.kill()
    committed_at_kill = len(_markers(run_dir))
    victim_pids = {p.pid for p in victims}
    replacements: set[int] = set()

    def replaced():
        replacements.update(p.pid for p in scoring_actors() if p.pid not in victim_pids)
        return bool(replacements)

    _wait_for(replaced, proc)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    man = manifest(run_dir)
    ids, _, q_later = outcome(run_dir)
    good, _ = expected_units(cfg["inputs"], 40)
    # The kill hit a scoring call in progress, and with one actor in the pool every shard committed
    # after it was scored by the replacement.
    assert victims and replacements and len(_markers(run_dir)) > committed_at_kill
    assert len(ids) == len(set(ids)) and set(ids) | q_later == good
    assert sum(c["units_labeled"] for c in man["sources"].values()) == len(ids) == len(good) - len(q_later)


def test_resume_removes_what_an_interrupted_attempt_left(small_run, tmp_path):
    """Plant what a crash leaves, instead of hoping a SIGKILL lands mid-write: the parts of a shard
    written but never committed (its marker missing), a stray second copy of a committed shard's
    units under another range name, and a temporary file of an atomic write. Readers never see
    the uncommitted shard; the resume removes all three and writes the shard once."""
    from pipeline import storage

    root = tmp_path / "labels"
    shutil.copytree(small_run["run_dir"], root / "t1")
    run_dir = root / "t1"
    markers = sorted(_markers(run_dir))
    victim = json.loads(markers[0].read_text())
    markers[0].unlink()  # the driver died between this shard's writes and its marker
    parts = [run_dir / Path(f).parent.name / Path(f).name for f in victim["files"]]
    assert parts and all(p.exists() for p in parts)
    kept = json.loads(markers[1].read_text())
    data_part = next(Path(f) for f in kept["files"] if Path(f).parent.name == "data")
    stray = run_dir / "data" / (data_part.name.rsplit("-", 2)[0] + "-0000000-0000999.parquet")
    shutil.copy(run_dir / "data" / data_part.name, stray)
    tmp_file = run_dir / "data" / f"{storage.TMP_PREFIX}0123-{data_part.name}"
    tmp_file.write_bytes(b"PAR1 cut off")
    committed = storage.run_data_files(str(run_dir))
    assert not any(Path(u).name in {p.name for p in parts if p.parent.name == "data"} for u in committed)

    cfg = {**small_run["cfg"], "output": str(root)}
    proc = run_module("jobs.label", "--config", str(write_yaml(tmp_path / "job.yaml", cfg)))
    assert f"{len(parts) + 2} partial file(s) removed" in proc.stdout, proc.stdout[-3000:]
    assert not stray.exists() and not tmp_file.exists()
    man = manifest(run_dir)
    assert man["shards_this_attempt"] == 1 and man["cleanup"]["partial_files_removed"] == len(parts) + 2
    assert markers[0].exists()  # the shard written again and committed
    ids, _, q_later = outcome(run_dir)
    good, _ = expected_units(cfg["inputs"], cfg["limit_rows_per_input"])
    counts = Counter(ids)
    assert max(counts.values()) == 1 and set(counts) | q_later == good


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


def test_output_to_s3_under_faults_then_resume_cleans_what_a_crash_left(tmp_path, smollm2_heads, s3_server):
    """Input and output on S3 behind the fault proxy (throttling, 500s, resets after the write was
    applied, stalls past the read timeout): every unit once, the retries counted in the manifest.
    Then what a crash leaves on S3 is planted (a shard's parts without its marker, a stray copy
    of a committed part, an unfinished multipart upload) and the resume removes it."""
    from s3_faults import FaultPlan, FaultProxy, fault_total

    from pipeline import storage

    fs = s3_server.filesystem()
    bucket = s3_server.make_bucket("labels").removeprefix("s3://")
    src = SHARED / "llmbar" / "LLMBar_Natural.json"
    fs.put_file(str(src), f"{bucket}/in/{src.name}")
    inputs = [{"path": f"s3://{bucket}/in/{src.name}", "format": "llmbar", "source": "llmbar"}]
    direct = s3_server.storage_options
    plan = FaultPlan(rate=0.12, stall_s=3.0, seed=7)
    with FaultProxy(s3_server.endpoint_url, plan) as proxy:
        so = {**direct, "endpoint_url": proxy.url, "config_kwargs": {"read_timeout": 2}}
        cfg = label_config(
            tmp_path, smollm2_heads, inputs=inputs, limit_rows_per_input=10, output=f"s3://{bucket}/runs"
        )
        cfg["storage_options"] = so
        cfg["resources"] = {**cfg["resources"], "rows_per_shard": 2, "units_per_call": 4}
        path = write_yaml(tmp_path / "job.yaml", cfg)
        run_module("jobs.label", "--config", str(path))
        counts = proxy.counts()
        run_dir = f"s3://{bucket}/runs/t1"
        man = storage.read_json(f"{run_dir}/manifest.json", direct)
        landed = fault_total(counts)
        assert landed >= 3 and fault_total(counts, cls="write") and fault_total(counts, cls="read"), counts
        assert man["storage_retries"] >= 1, man["storage_retries"]

        def labeled(sub: str = "data") -> Counter:
            c: Counter = Counter()
            try:
                files = storage.run_data_files(run_dir, direct, sub=sub)
            except FileNotFoundError:
                return c
            for uri in files:
                c.update(pq.read_table(fs.open(uri, "rb"), columns=["unit_id"]).column("unit_id").to_pylist())
            return c

        good, _ = expected_units([{**inputs[0], "storage_options": direct}], 10)
        first, q = labeled(), labeled("quarantine")
        assert max(first.values()) == 1 and max(q.values(), default=1) == 1
        assert set(first) | set(q) == good and len(good) == 20
        assert sum(first.values()) == man["sources"]["llmbar"]["units_labeled"]

        # What a crash leaves.
        markers = sorted(fs.ls(f"{bucket}/runs/t1/_shards"))
        victim = json.loads(fs.cat(markers[0]))
        fs.rm(markers[0])
        kept = json.loads(fs.cat(markers[1]))
        part = next(f for f in kept["files"] if "/data/" in f).removeprefix("s3://")
        stray = part.rsplit("-", 2)[0] + "-0000000-0000999.parquet"
        fs.copy(part, stray)
        upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key="runs/t1/data/killed-writer.parquet")
        fs.call_s3(
            "upload_part",
            Bucket=bucket,
            Key="runs/t1/data/killed-writer.parquet",
            UploadId=upload["UploadId"],
            PartNumber=1,
            Body=b"x" * 1024,
        )
        assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
        unmarked = {f.rsplit("/", 1)[1] for f in victim["files"] if "/data/" in f}
        seen = {u.rsplit("/", 1)[1] for u in storage.run_data_files(run_dir, direct)}
        assert unmarked and not unmarked & seen  # a reader never sees the uncommitted shard

        run_module("jobs.label", "--config", str(path))
    man = storage.read_json(f"{run_dir}/manifest.json", direct)
    assert man["cleanup"]["uploads_aborted"] == 1
    assert man["cleanup"]["partial_files_removed"] == len(victim["files"]) + 1
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
    assert not fs.exists(stray) and man["shards_this_attempt"] == 1
    again = labeled()
    assert again == first  # every unit once, the same units as before the crash
    assert sorted(storage.parquet_files(f"{run_dir}/data", direct)) == sorted(storage.run_data_files(run_dir, direct))
