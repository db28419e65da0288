"""The labeling job with sequence-classifier reward models, end to end on real weights and real data.

The reward models are real ones made here (tests/reward_model_fixtures.py): SmolLM2-135M-Instruct
with a Bradley-Terry head fitted on LLMBar / PandaLM pairs, exported as LlamaForSequenceClassification,
and all-MiniLM-L6-v2 as BertForSequenceClassification with a head fitted on its pooled output.
They score held-out sets (HH-RLHF, OASST: neither head saw them) next to the SmolLM2 heads, in one
run and each alone; every column is checked against transformers' class one conversation at a time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from label_fixtures import REPO, SHARED, first_lines, label_config, manifest, read_output, run_module, write_yaml
from reward_model_fixtures import minilm_classifier, smollm2_classifier
from test_reward_models import reference_rewards

pytestmark = pytest.mark.slow

LIMIT = 10  # HH-RLHF rows; OASST: the first 3 trees


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("reward-models")
    return {"smollm2": str(smollm2_classifier(base / "smollm2")), "minilm": str(minilm_classifier(base / "minilm"))}


def held_out_inputs(tmp: Path, trees: int = 3) -> list[dict]:
    oasst = first_lines(SHARED / "oasst" / "en_100_message.jsonl", trees, tmp / "oasst_first.jsonl")
    return [
        {"path": str(SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh_rlhf", "source": "hh-rlhf"},
        {"path": str(oasst), "format": "oasst_best_of_n", "source": "oasst"},
    ]


def reward_models(classifiers: dict[str, str], names=("smollm2", "minilm")) -> list[dict]:
    return [{"name": n, "path": classifiers[n], "template": {"max_tokens": 512}} for n in names]


# Up to three scoring pools (the heads' backbone and two reward models) at once on 2 cores, with
# room left for the read and write tasks: half a CPU per actor.
POOL = {"num_cpus_per_actor": 0.5}


def label(tmp: Path, heads: str | None, models: list[dict], run_id: str, inputs: list[dict], **over) -> Path:
    cfg = label_config(
        tmp,
        heads,
        inputs,
        run_id=run_id,
        limit_rows_per_input=LIMIT,
        model={"reward_models": models},
        resources=POOL,
        max_quarantine_fraction={"per_source": None, "overall": None},
        **over,
    )
    if heads is None:
        cfg["model"].pop("heads")
    run_module("jobs.label", "--config", str(write_yaml(tmp / f"{run_id}.yaml", cfg)))
    return tmp / "labels" / run_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_heads, classifiers) -> dict[str, Path]:
    """The heads and both reward models in one run, and each of the three alone."""
    tmp = tmp_path_factory.mktemp("label-rm")
    inputs = held_out_inputs(tmp)
    return {
        "all": label(tmp, smollm2_heads, reward_models(classifiers), "all", inputs),
        "smollm2": label(tmp, None, reward_models(classifiers, ["smollm2"]), "smollm2", inputs),
        "minilm": label(tmp, None, reward_models(classifiers, ["minilm"]), "minilm", inputs),
        "heads": label(tmp, smollm2_heads, [], "heads", inputs),
    }


def by_unit(run_dir: Path, column: str) -> dict[str, float]:
    t = read_output(run_dir)
    ids = t.column("unit_id").to_pylist()
    assert len(ids) == len(set(ids)), "a unit written twice"
    return dict(zip(ids, t.column(column).to_pylist()))


def test_each_column_equals_its_run_alone(runs):
    for column, alone in (("rm_smollm2", "smollm2"), ("rm_minilm", "minilm"), ("score", "heads")):
        together, single = by_unit(runs["all"], column), by_unit(runs[alone], column)
        # a unit one model quarantines (its row over that model's context) is quarantined in the
        # run of all three: the run's labeled units are those every model could score
        assert set(together) <= set(single) and len(together) >= 20
        common = sorted(together)
        np.testing.assert_allclose([together[u] for u in common], [single[u] for u in common], rtol=1e-4, atol=1e-5)
        assert all(v is not None for v in together.values())


def test_reward_model_columns_are_what_the_class_returns(runs, classifiers):
    t = read_output(runs["all"]).to_pylist()
    for name in ("smollm2", "minilm"):
        want = reference_rewards(Path(classifiers[name]), t, cap=512)
        got = [u[f"rm_{name}"] for u in t]
        checked = [(g, w) for g, w in zip(got, want) if w is not None]
        # the class is called on the whole conversation; the few over 512 tokens were truncated by the
        # template rule (oldest turns dropped), which the class alone cannot reproduce
        assert len(checked) >= 0.8 * len(t)
        g, w = np.array(checked).T
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
        assert np.std(w) > 1e-2


def test_runs_of_reward_models_only(runs, classifiers):
    run_dir = runs["smollm2"]
    t = read_output(run_dir)
    assert t.column("score").null_count == t.num_rows and t.column("backbone_fingerprint").null_count == t.num_rows
    assert "rm_minilm" not in t.column_names and t.column("rm_smollm2").null_count == 0
    # token counts are the reward model's own input (its chat template, SmolLM2's tokenizer)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(classifiers["smollm2"])
    row = t.slice(0, 1).to_pylist()[0]
    conv = [dict(m) for m in row["prompt"]] + [{"role": "assistant", "content": row["response"]}]
    assert row["total_tokens"] == len(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
    man = manifest(run_dir)
    (rm,) = man["reward_models"]
    assert rm["name"] == "smollm2" and rm["column"] == "rm_smollm2" and len(rm["fingerprint"]) == 16
    assert set(man["scored_by_stage"]) == {f"rm_smollm2@{node}" for node in man["scored_on"]}
    assert sum(man["scored_by_stage"].values()) == t.num_rows  # units over its context are not scored
    both = manifest(runs["all"])["scored_by_stage"]
    assert {k.split("@")[0] for k in both} == {"embed_score", "rm_smollm2", "rm_minilm"}
    # quarantined units name the model whose context they exceed
    q = read_output(runs["all"], "quarantine")
    reasons = q.column("quarantine_reason").to_pylist() if q is not None else []
    assert all(r.startswith(("reward model smollm2:", "reward model minilm:", "conversation has")) for r in reasons)


def test_resuming_with_other_reward_models_is_refused(runs, classifiers, tmp_path):
    cfg = label_config(
        runs["smollm2"].parents[1],
        None,
        held_out_inputs(tmp_path),
        run_id="smollm2",
        model={"reward_models": reward_models(classifiers, ["minilm"])},
    )
    cfg["model"].pop("heads")
    path = write_yaml(tmp_path / "other.yaml", cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--config", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "different reward_models" in proc.stdout + proc.stderr


def test_killed_reward_model_actor_leaves_every_unit_once(tmp_path, classifiers):
    """Two reward models in one run; a scoring actor killed mid-call is replaced, and every unit
    the pure reader expects is written exactly once (counted, not compared as sets)."""
    import psutil

    from pipeline.corpus import InputSpec, read_units

    inputs = held_out_inputs(tmp_path, trees=6)
    cfg = label_config(
        tmp_path,
        None,
        inputs,
        limit_rows_per_input=40,
        resources=POOL,
        model={"reward_models": reward_models(classifiers)},
        max_quarantine_fraction={"per_source": None, "overall": None},
    )
    cfg["model"].pop("heads")
    path = write_yaml(tmp_path / "job.yaml", cfg)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.label", "--config", str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run_dir = tmp_path / "labels" / "t1"
    try:
        deadline, victims = time.monotonic() + 600, []
        while not victims and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if not list((run_dir / "_shards").glob("*.json")):
                continue
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    title = " ".join(p.cmdline()).rstrip()
                except psutil.Error:
                    continue
                if "_StageActor" in title and title.endswith(".submit"):  # an actor in a scoring call
                    victims.append(p)
        assert victims, "no scoring call caught in flight"
        for p in victims:
            p.kill()
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-5000:]
    written = read_output(run_dir).column("unit_id").to_pylist()
    q = read_output(run_dir, "quarantine")
    quarantined = q.column("unit_id").to_pylist() if q is not None else []
    counts = Counter(written + quarantined)
    assert not [u for u, n in counts.items() if n > 1], "units written twice"
    expected = Counter()
    for spec in inputs:
        expected.update(read_units([InputSpec.from_dict(spec)], limit_rows=40).column("unit_id").to_pylist())
    assert counts == expected
    man = manifest(run_dir)
    assert sum(c["units_labeled"] for c in man["sources"].values()) == len(written)
