"""The objective registry: built-in scales, objectives declared in input specs and train configs,
and a declared rated objective trained as a ridge head like a built-in one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline import objectives
from pipeline.corpus import InputSpec, InputSpecError, read_units
from pipeline.heads.checkpoint import RELEASE_OBJECTIVES
from pipeline.heads.train import train_heads
from pipeline.labeling.config import ConfigError
from pipeline.training import load_train_config

REPO = os.path.join(os.path.dirname(__file__), "..")


def test_builtins_follow_the_release_and_the_cards():
    # docs/armorm.md "Stage 1": the release's 19 objectives in this order; objective 4 is verbosity.
    assert objectives.ARMORM_NAMES == RELEASE_OBJECTIVES and len(RELEASE_OBJECTIVES) == 19
    assert objectives.ARMORM_NAMES[4] == objectives.ARMORM_VERBOSITY == "helpsteer-verbosity"
    assert objectives.ARMORM_NAMES[10] == "beavertails-is_safe"
    hs = objectives.get("helpsteer-helpfulness")
    assert [hs.to_unit(x) for x in range(5)] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])  # (x + 0.5) / 5
    assert objectives.get("helpsteer2-verbosity").to_unit(2) == pytest.approx(0.5)
    uf = objectives.get("ultrafeedback-overall_score")
    assert (uf.to_unit(1), uf.to_unit(10), uf.to_unit(5.5)) == (0.0, 1.0, 0.5)
    assert objectives.get("ultrafeedback-honesty").to_unit(4) == 0.75
    safe = objectives.get("beavertails-is_safe")
    assert [safe.to_unit(v) for v in (True, False, "True", "false", 1, 0)] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="is not one of"):
        safe.to_unit("maybe")
    assert [o.name for o in objectives.for_source("helpsteer")] == list(RELEASE_OBJECTIVES[:5])
    assert objectives.get("sfres.overall").to_unit(6) == 1.0  # the shared-data objectives are unchanged


def test_objective_definitions_are_checked():
    with pytest.raises(ValueError, match="kind must be"):
        objectives.Objective("x", "score", low=0, high=1)
    with pytest.raises(ValueError, match="native scale low < high"):
        objectives.Objective("x", "rated", low=3, high=3)
    with pytest.raises(ValueError, match="must be a number in"):
        objectives.Objective("x", "rated", values={"good": 2})
    with pytest.raises(ValueError, match="unknown key"):
        objectives.Objective.from_dict({"name": "x", "kind": "rated", "lo": 1})
    assert objectives.Objective("t-x", "rated", low=1, high=7).kind == "rating"
    with pytest.raises(ValueError, match="would share its output columns with 'helpsteer-helpfulness'"):
        objectives.register({"name": "HelpSteer.helpfulness", "kind": "rated", "low": 0, "high": 4})
    with pytest.raises(KeyError, match="declare it"):
        objectives.get("nobody.knows")


TONE = {
    "name": "support-tone",
    "kind": "rated",
    "values": {"polite": 1.0, "neutral": 0.5, "rude": 0.0},
    "description": "tone of a support reply",
}
CLARITY = {"name": "support-clarity", "kind": "rated", "low": 1, "high": 7}


def _write(tmp_path, records, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


RECORDS = [
    {"ticket": "My order is late.", "reply": "Sorry! It ships today.", "tone": "Polite", "clarity": "6"},
    {"ticket": "Refund?", "reply": "No.", "tone": "rude", "clarity": 1},
    {"ticket": "Where is it?", "reply": "Somewhere.", "tone": "sarcastic", "clarity": 2},
]


def test_objectives_declared_in_an_input_spec(tmp_path):
    spec = {
        "path": _write(tmp_path, RECORDS),
        "objectives": [TONE, CLARITY],
        "source": "support",
        "columns": {
            "prompt": "ticket",
            "response": "reply",
            "ratings": {"support-tone": "tone", "support-clarity": "clarity"},
        },
    }
    units = read_units(InputSpec.from_dict(spec)).to_pylist()
    assert [(u["kind"], u["ratings"]) for u in units[:2]] == [
        (
            "rated",
            [
                {"name": "support-clarity", "raw": 6.0, "value": 5 / 6},
                {"name": "support-tone", "raw": 1.0, "value": 1.0},
            ],
        ),
        (
            "rated",
            [{"name": "support-clarity", "raw": 1.0, "value": 0.0}, {"name": "support-tone", "raw": 0.0, "value": 0.0}],
        ),
    ]
    assert units[2]["quarantine_reason"] == "rating 'tone' = 'sarcastic' is not one of ['neutral', 'polite', 'rude']"
    # The same definition again is fine; another one under the same name is refused, as is a built-in's name.
    InputSpec.from_dict(spec)
    with pytest.raises(InputSpecError, match="different definition"):
        InputSpec.from_dict({**spec, "objectives": [{**CLARITY, "high": 10}]})
    with pytest.raises(InputSpecError, match="is a built-in"):
        InputSpec.from_dict(
            {
                "path": spec["path"],
                "objectives": [{"name": "helpsteer-helpfulness", "kind": "rated", "low": 1, "high": 5}],
            }
        )


def test_a_rebuilt_spec_registers_its_objectives_in_a_fresh_process(tmp_path):
    """Read tasks run in other processes (Ray workers) and rebuild the spec from its dict."""
    spec = InputSpec.from_dict(
        {
            "path": _write(tmp_path, RECORDS[:2]),
            "objectives": [CLARITY],
            "columns": {"prompt": "ticket", "response": "reply", "ratings": {"support-clarity": "clarity"}},
        }
    )
    code = (
        "import json, sys\nfrom pipeline.corpus import InputSpec, read_units\n"
        "t = read_units(InputSpec.from_dict(json.loads(sys.argv[1])))\n"
        "print(json.dumps([r[0]['value'] for r in t.column('ratings').to_pylist()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec.to_dict())], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [5 / 6, 0.0]


def test_train_config_objectives_reach_every_input_and_the_heads(tmp_path):
    path = _write(tmp_path, RECORDS[:2])
    cfg_file = tmp_path / "train.yaml"
    declared = {"name": "support-empathy", "kind": "rated", "low": 0, "high": 10}
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "heads_out": str(tmp_path / "heads"),
                "objectives": [declared],
                "inputs": [
                    {
                        "path": path,
                        "columns": {"prompt": "ticket", "response": "reply", "ratings": {"support-empathy": "clarity"}},
                    }
                ],
            }
        )
    )
    cfg = load_train_config(str(cfg_file))
    assert objectives.get("support-empathy").high == 10
    (spec,) = cfg.input_specs()
    assert spec["objectives"] == [declared]
    assert cfg.heads_options()["objectives"] == [declared]
    assert cfg.embedding_run().inputs == cfg.input_specs()
    units = read_units(InputSpec.from_dict(spec)).to_pylist()
    assert [u["ratings"][0]["value"] for u in units] == [0.6, 0.1]
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "heads_out": "h",
                "inputs": [{"path": path}],
                "objectives": [{"name": "support-empathy", "kind": "rated", "low": 0, "high": 5}],
            }
        )
    )
    with pytest.raises(ConfigError, match="different definition"):
        load_train_config(str(cfg_file))


def test_a_declared_rated_objective_trains_a_ridge_head():
    objectives.register(CLARITY)
    rng = np.random.default_rng(0)
    w = rng.normal(size=8)
    rows = []
    for i in range(300):
        x = rng.normal(size=8)
        x[0] = 1.0
        y = float(np.clip(0.5 + 0.1 * x[1:] @ w[1:], 0, 1))
        rows.append(
            {
                "row_id": f"r{i}",
                "kind": "rated",
                "source": "support",
                "preference": None,
                "tie": False,
                "human_rank": None,
                "ratings": [{"name": "support-clarity", "raw": 1 + 6 * y, "value": y}],
                "response_tokens": 10,
                "embedding": x.tolist(),
                "prompt_embedding": rng.normal(size=8).tolist(),
            }
        )
    for i in range(100):
        p = rng.normal(size=8).tolist()
        a, b = rng.normal(size=8), rng.normal(size=8)
        a, b = (a, b) if a @ w > b @ w else (b, a)
        for emb, pref in ((a, "chosen"), (b, "rejected")):
            rows.append(
                {
                    "row_id": f"p{i}",
                    "kind": "preference",
                    "source": "support_pairs",
                    "preference": pref,
                    "tie": False,
                    "human_rank": None,
                    "ratings": None,
                    "response_tokens": 10,
                    "embedding": emb.tolist(),
                    "prompt_embedding": p,
                }
            )
    # A declared pairwise objective names the source's Bradley-Terry head (once, not twice).
    helpful = {"name": "support_pairs.helpful", "kind": "pairwise", "source": "support_pairs", "attribute": "helpful"}
    result = train_heads(
        pa.Table.from_pylist(rows),
        {
            "gating": {"steps": 20, "batch_size": 64, "hidden_dim": 16, "eval_every": 10},
            "verbosity": "none",
            "baseline": False,
            "objectives": [helpful],
        },
    )
    heads = result.heads
    assert heads.objectives == ["support-clarity", "support_pairs.helpful"]
    assert result.summary["objectives"]["support-clarity"]["kind"] == "rating"
    assert result.summary["objectives"]["support-clarity"]["rows"] == 300
    assert heads.metadata["objective_definitions"]["support-clarity"]["high"] == 7
    X = np.array([r["embedding"] for r in rows[:300]])
    truth = np.array([r["ratings"][0]["value"] for r in rows[:300]])
    assert np.corrcoef(X @ heads.regression_weight[0], truth)[0, 1] > 0.99


def test_readme_train_config_example_is_valid(tmp_path):
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = text.split("The ArmoRM recipe on hub data")[1].split("```yaml\n")[1].split("```")[0]
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(block)
    cfg = load_train_config(str(cfg_file))
    specs = [InputSpec.from_dict(s) for s in cfg.input_specs()]
    assert [s.format for s in specs] == ["helpsteer", "helpsteer2_preference", "ultrafeedback", "mapping"]
    assert objectives.get("support-clarity").to_unit(4) == 0.5
    assert cfg.heads_options()["verbosity"] == "helpsteer-verbosity"
