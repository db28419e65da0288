"""The labeling driver's plan (plan_run) and the manifest it makes of the shard markers, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import storage
from pipeline.corpus import InputSpec, expand_files
from pipeline.heads.gating import GatingNetwork
from pipeline.heads.model import ArmoHeads
from pipeline.labeling import manifest as mf
from pipeline.labeling.config import parse_config
from pipeline.labeling.plan import RunPlan, plan_run

# The manifest's fields, as they were before the driver was split into plan + execute.
MANIFEST_FIELDS = {
    "run_id",
    "status",
    "config_hash",
    "config",
    "versions",
    "objectives",
    "input_files",
    "skipped_input_files",
    "sources",
    "shards",
    "shards_this_attempt",
    "scored_on",
    "scored_by_stage",
    "reward_models",
    "units_labeled_this_attempt",
    "wall_time_s",
    "units_per_s",
    "tokens_per_s",
    "computed_tokens",
    "useful_tokens",
    "padding_waste",
    "output",
}


@pytest.fixture
def inputs(tmp_path, shared_data) -> Path:
    rows = json.loads((shared_data / "llmbar" / "LLMBar_Natural.json").read_text())
    d = tmp_path / "in"
    d.mkdir()
    (d / "day1.json").write_text(json.dumps(rows[:3]))
    (d / "day2.json").write_text(json.dumps(rows[3:5]))
    (d / "day3.json").write_text(json.dumps(rows[5:6]))
    return d


def _heads(directory: Path) -> str:
    k, h = 2, 8
    ArmoHeads(["a.x", "a.y"], np.ones((k, h)), np.eye(k), GatingNetwork(h, k)).save(str(directory))
    return str(directory)


def test_plan_expands_files_once_skips_recorded_ones_and_reads_the_run_state(tmp_path, inputs, monkeypatch):
    heads = _heads(tmp_path / "heads")
    spec = {"path": str(inputs), "format": "llmbar", "source": "llmbar"}
    cfg = parse_config(
        {
            "inputs": [spec],
            "output": str(tmp_path / "out"),
            "run_id": "r2",
            "incremental": True,
            "model": {"heads": heads},
        }
    )
    files = expand_files(InputSpec.from_dict(spec))
    # An earlier complete run recorded day1 (same size: skipped) and day2 (since changed: read again).
    earlier = {
        "status": "complete",
        "input_files": [
            {"uri": files[0], "size": (inputs / "day1.json").stat().st_size},
            {"uri": files[1], "size": 1},
        ],
    }
    storage.write_json(str(tmp_path / "out" / "r1" / mf.MANIFEST), earlier, None)
    marker = {"shard_id": "s-1", "source": "llmbar", "labeled_units": 2}
    storage.write_json(mf.marker_uri(cfg.run_dir, "s-1"), marker, None)

    import pipeline.labeling.plan as plan_module

    calls = []
    real = plan_module.expand_files
    monkeypatch.setattr(plan_module, "expand_files", lambda s: calls.append(s) or real(s))
    plan = plan_run(cfg)
    assert len(calls) == 1  # one expansion per spec, reused for skip, read and manifest
    assert [f.uri for f in plan.skipped] == [files[0]]
    assert [f.uri for f in plan.files] == files[1:]
    assert [f.size for f in plan.files] == [(inputs / n).stat().st_size for n in ("day2.json", "day3.json")]
    assert plan.input_bytes == sum(f.size for f in plan.files)
    assert {f.spec for f in plan.files} == {0} and {f.source for f in plan.files} == {"llmbar"}
    assert plan.objectives == ["a.x", "a.y"]
    assert plan.identity == cfg.scoring_identity() and plan.identity["heads_fingerprint"]
    assert plan.committed == {"s-1": marker}


def test_plan_refuses_missing_heads_and_names_who_trains_them(tmp_path, inputs):
    cfg = parse_config(
        {
            "inputs": [{"path": str(inputs), "format": "llmbar"}],
            "output": str(tmp_path / "out"),
            "model": {"heads": str(tmp_path / "nope"), "train_if_missing": __file__},
        }
    )
    with pytest.raises(FileNotFoundError, match="ensure_heads"):
        plan_run(cfg)


def _marker(sid, source, rows, labeled_rows, units_per_row=2, computed=10, useful=8, node="n1"):
    q_rows = rows - labeled_rows
    return {
        "shard_id": sid,
        "source": source,
        "source_uri": f"/in/{source}.json",
        "shard_rows": rows,
        "shard_units": rows * units_per_row,
        "files": [],
        "units": rows * units_per_row,
        "labeled_units": labeled_rows * units_per_row,
        "quarantined_units": q_rows * units_per_row,
        "rows_labeled": labeled_rows,
        "rows_quarantined": q_rows,
        "tokens": 100 * labeled_rows,
        "computed_tokens": computed,
        "useful_tokens": useful,
        "reasons": {"conversation has 300 tokens, more than max_tokens=256": q_rows * units_per_row} if q_rows else {},
        "scored_on": {node: rows * units_per_row},
        "record_fields": {"present": {"label": rows, "winner": rows}, "read": ["label"]},
    }


def test_manifest_is_a_function_of_plan_and_markers(tmp_path):
    cfg = parse_config(
        {"inputs": [{"path": str(Path(__file__)), "format": "llmbar"}], "output": str(tmp_path), "run_id": "m"}
    )
    earlier = _marker("s-0", "a", rows=4, labeled_rows=4, node="old")
    plan = RunPlan(
        cfg=cfg,
        specs=[],
        files=[],
        skipped=[],
        objectives=["a.x"],
        identity={},
        committed={"s-0": earlier},
    )
    new = [_marker("s-1", "a", rows=3, labeled_rows=2), _marker("s-2", "b", rows=5, labeled_rows=5, node="n2")]
    man = plan.manifest(new, wall_s=2.0, steady={"scoring_window_s": 1.0}, versions={"ray": "x"})
    assert set(man) == MANIFEST_FIELDS | {"scoring_window_s"}
    assert man["shards"] == 3 and man["shards_this_attempt"] == 2
    assert man["units_labeled_this_attempt"] == 4 + 10 and man["units_per_s"] == 7.0
    assert man["tokens_per_s"] == (200 + 500) / 2.0
    assert man["scored_on"] == {"n1": 6, "n2": 10}  # this attempt's nodes only
    assert man["computed_tokens"] == 20 and man["useful_tokens"] == 16 and man["padding_waste"] == 1.25
    a = man["sources"]["a"]  # earlier attempts' shards count in the sources
    assert a["rows_in"] == 7 == a["rows_labeled"] + a["rows_quarantined"] and a["rows_quarantined"] == 1
    assert a["quarantine_reasons"] == {"conversation has N tokens, more than max_tokens=N": 2}
    assert a["unused_label_fields"] == ["winner"]
    assert man["output"] == {"data": str(tmp_path / "m" / "data"), "quarantine": str(tmp_path / "m" / "quarantine")}
    assert man["versions"] == {"ray": "x"} and man["config_hash"] == cfg.hash()
    (warning,) = mf.unused_label_warnings({"b": man["sources"]["b"], "a": a})[:1]
    assert "source 'a'" in warning and "winner" in warning
    assert len(mf.unused_label_warnings(man["sources"])) == 2


def test_count_units_does_not_change_what_the_run_computes(tmp_path):
    base = {"inputs": [{"path": str(Path(__file__)), "format": "llmbar"}], "output": str(tmp_path)}
    assert parse_config(base).count_units is False  # the extra parse pass is opt-in
    assert parse_config({**base, "count_units": True}).hash() == parse_config(base).hash()
