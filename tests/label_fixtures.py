"""Shared set-up for the labeling job's tests: small real inputs, real SmolLM2 heads, config files.

Heads are trained once per session on a small slice of the real shared data (the same code path
as the demo), so every job test scores with real weights and real heads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "data").resolve()

# Short conversations keep a CPU forward pass cheap; the policy still truncates the long ones.
TEMPLATE = {"system_prompt": "template_default", "max_tokens": 512, "overflow": "truncate_prompt"}
RESOURCES = {"actors": 1, "num_cpus_per_actor": 1, "token_budget": 4096, "rows_per_shard": 8, "units_per_call": 8}


def small_inputs() -> list[dict]:
    return [
        {"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar", "source": "llmbar"},
        {"path": str(SHARED / "oasst" / "en_100_message.jsonl"), "format": "oasst_best_of_n", "source": "oasst"},
    ]


def first_lines(src: Path, n: int, out: Path) -> Path:
    """The first n records of a JSON-lines file, as they are (a real file, cut short): a row limit
    cannot shorten a few long OASST trees, whose replies are most of a CPU run's cost."""
    with open(src) as f:
        out.write_text("".join(line for _, line in zip(range(n), f)))
    return out


def kill_test_inputs(tmp: Path) -> list[dict]:
    """More shards of short LLMBar rows and four OASST trees: runs long enough to be killed mid-way."""
    oasst = first_lines(SHARED / "oasst" / "en_100_message.jsonl", 4, tmp / "oasst_first_trees.jsonl")
    llmbar, _ = small_inputs()
    return [llmbar, {"path": str(oasst), "format": "oasst_best_of_n", "source": "oasst"}]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def label_config(tmp: Path, heads: str | None, inputs: list[dict] | None = None, **over) -> dict:
    cfg = {
        "run_id": "t1",
        "output": str(tmp / "labels"),
        "model": {"backbone": {"path": "smollm2"}, "heads": heads, "template": TEMPLATE},
        "inputs": inputs if inputs is not None else small_inputs(),
        "resources": dict(RESOURCES),
        "limit_rows_per_input": 12,
        "progress_interval_s": 2.0,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


@pytest.fixture(scope="session")
def smollm2_heads(tmp_path_factory) -> str:
    """Heads trained on a small real slice, through jobs.train_heads' own code path."""
    reuse = os.environ.get("ARMOLABEL_TEST_HEADS")  # a developer's shortcut: heads from an earlier session
    if reuse and (Path(reuse) / "training.json").exists():
        return reuse
    return train_smollm2_heads(tmp_path_factory.mktemp("heads"))


def train_smollm2_heads(tmp: Path) -> str:
    """The test heads (also used by bench/bench_chaos.py): trained on a small real slice."""
    heads = tmp / "smollm2"
    if (heads / "training.json").exists():
        return str(heads)
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": "test-smollm2",
        "heads_out": str(heads),
        "embeddings_out": str(tmp / "embeddings"),
        "backbone": {"path": "smollm2"},
        "template": TEMPLATE,
        "test_fraction": 0.25,
        "limit_rows_per_input": 40,
        "inputs": [
            {"path": str(SHARED / "unieval" / "topical_chat.json"), "format": "unieval_topical_chat"},
            {"path": str(SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh_rlhf"},
            {"path": str(SHARED / "pandalm" / "testset-v1.json"), "format": "pandalm"},
        ],
        # ensemble: the labeled runs built on these heads carry score_mean / score_std / score_min
        "heads": {"gating": {"steps": 150, "batch_size": 64}, "ensemble": 3},
        "resources": {"actors": 1, "num_cpus_per_actor": 1, "token_budget": 4096, "rows_per_shard": 16},
    }
    path = write_yaml(tmp / "train.yaml", cfg)
    run_module("jobs.train_heads", "--config", str(path))
    assert (heads / "training.json").exists()
    return str(heads)


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run a job entry point as users do: a fresh Python process with its own embedded Ray."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_output(run_dir: Path, sub: str = "data"):
    files = sorted((run_dir / sub).glob("*.parquet"))
    if not files:
        return None
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())
