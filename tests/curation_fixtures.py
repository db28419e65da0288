"""A labeled run for the curation and report tests, built from REAL rows of ../shared/data.

Rows are parsed here with plain json (independently of the project's readers), turned into units
with the project's stable ids, and given ratings, gates and scores by a deterministic stand-in for
the scoring model (a seeded function of response length and a text hash). The run is laid out like
the labeling job's output: `<run_dir>/data/*.parquet` with `output_schema(objectives)` and
`<run_dir>/manifest.json`. The units of one prompt are spread over several files, and the files
hold different source mixes (so per-file score quantiles differ from whole-run ones).

To test against a real labeling run instead, make `annotated_run` return that run's directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ids, schema

OBJECTIVES = ["hh_rlhf.harmlessness", "pandalm.helpfulness", "topical_chat.overall"]
N_FILES = 4
HH_PAIRS = 120
PANDALM_PAIRS = 150
# Stand-in source bias: makes score distributions differ per source (and so per file).
SOURCE_BIAS = {"hh-rlhf": -0.15, "pandalm": 0.10, "oasst": 0.25}


def _unit_hash(text: str, salt: str) -> float:
    """A number in [0, 1) from a text: the stand-in's 'model noise'."""
    h = hashlib.sha256(f"{salt}\x1f{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def stand_in_scores(source: str, prompt_id: str, response: str):
    """Ratings (one per objective), debiased ratings (a length penalty), gates (softmax, sum 1) and
    score = sum(gates * debiased)."""
    length = np.log1p(len(response))
    ratings = np.array(
        [0.08 * length + 0.5 * _unit_hash(response, f"r{k}") + SOURCE_BIAS[source] for k in range(len(OBJECTIVES))],
        dtype=np.float32,
    )
    debiased = (ratings - np.float32(0.03 * length)).astype(np.float32)
    logits = np.array([2.0 * _unit_hash(prompt_id, f"g{k}") for k in range(len(OBJECTIVES))])
    gates = (np.exp(logits) / np.exp(logits).sum()).astype(np.float32)
    score = float(np.float32(np.dot(gates.astype(np.float64), debiased.astype(np.float64))))
    return ratings.tolist(), debiased.tolist(), gates.tolist(), score


# --- plain-json parsing of the real files -------------------------------------------------------------
def _hh_turns(transcript: str) -> list[dict]:
    parts = re.split(r"\n\n(Human|Assistant): ?", transcript)
    turns = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": text.strip()})
    return turns


def hh_rows(data: Path, n: int) -> list[dict]:
    rows = []
    with gzip.open(data / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if len(rows) == n:
                break
            d = json.loads(line)
            chosen, rejected = _hh_turns(d["chosen"]), _hh_turns(d["rejected"])
            if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
                continue
            rows.append(
                {
                    "source": "hh-rlhf",
                    "kind": "preference",
                    "source_row": line_no,
                    "prompt": chosen[:-1],
                    "responses": [chosen[-1]["content"], rejected[-1]["content"]],
                    "preference": ["chosen", "rejected"],
                    "tie": False,
                    "human_rank": [None, None],
                    "uri": str(data / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
                }
            )
    return rows


def pandalm_rows(data: Path, n: int) -> list[dict]:
    path = data / "pandalm" / "testset-v1.json"
    rows = []
    for i, d in enumerate(json.loads(path.read_text(encoding="utf-8"))[:n]):
        votes = [int(d[f"annotator{k}"]) for k in (1, 2, 3)]
        counts = {v: votes.count(v) for v in set(votes)}
        label, top = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
        tie = label == 0 or top == 1
        text = d["instruction"] + (f"\n\n{d['input']}" if d.get("input") else "")
        responses = [d["response1"], d["response2"]]
        if label == 2 and not tie:
            responses = responses[::-1]  # response_index 0 is the chosen one
        rows.append(
            {
                "source": "pandalm",
                "kind": "preference",
                "source_row": i,
                "prompt": [{"role": "user", "content": text}],
                "responses": responses,
                "preference": ["chosen", "rejected"],
                "tie": tie,
                "human_rank": [None, None],
                "confidence": top / 3,
                "uri": str(path),
            }
        )
    return rows


def oasst_rows(data: Path) -> list[dict]:
    """One best-of-N row per prompter message with >= 2 assistant replies, at any depth of the tree."""
    path = data / "oasst" / "en_100_message.jsonl"
    rows = []

    def walk(node: dict, history: list[dict], line_no: int) -> None:
        prompt = history + [{"role": "user", "content": node["text"]}]
        replies = [r for r in node["replies"] if r["role"] == "assistant" and not r.get("deleted")]
        if len(replies) >= 2:
            rows.append(
                {
                    "source": "oasst",
                    "kind": "best_of_n",
                    "source_row": line_no,
                    "prompt": prompt,
                    "responses": [r["text"] for r in replies],
                    "preference": [None] * len(replies),
                    "tie": None,
                    "human_rank": [r.get("rank") for r in replies],
                    "uri": str(path),
                }
            )
        for r in replies:
            for follow_up in r["replies"]:
                if follow_up["role"] == "prompter":
                    walk(follow_up, prompt + [{"role": "assistant", "content": r["text"]}], line_no)

    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            walk(json.loads(line), [], line_no)
    return rows


def units_of(rows: list[dict], run_id: str) -> list[dict]:
    units = []
    for row in rows:
        rid = ids.row_id(row["source"], row["prompt"], row["responses"])
        pid = ids.prompt_id(row["prompt"])
        prompt_tokens = sum(len(m["content"].split()) for m in row["prompt"])
        for i, response in enumerate(row["responses"]):
            ratings, debiased, gates, score = stand_in_scores(row["source"], pid, response)
            u = {
                "unit_id": ids.unit_id(rid, i),
                "row_id": rid,
                "prompt_id": pid,
                "kind": row["kind"],
                "source": row["source"],
                "source_uri": row["uri"],
                "source_row": row["source_row"],
                "prompt": row["prompt"],
                "response": response,
                "response_index": i,
                "n_responses": len(row["responses"]),
                "preference": row["preference"][i],
                "tie": row["tie"],
                "label_confidence": row.get("confidence"),
                "human_rank": row["human_rank"][i],
                "ratings": [],
                "prompt_tokens": prompt_tokens,
                "response_tokens": len(response.split()),
                "total_tokens": prompt_tokens + len(response.split()),
                "tokens_before_truncation": prompt_tokens + len(response.split()),
                "truncated": False,
                "score": score,
                "backbone_fingerprint": "stand-in",
                "heads_fingerprint": "stand-in",
                "run_id": run_id,
            }
            for k, obj in enumerate(OBJECTIVES):
                u[schema.objective_column(schema.RATING_PREFIX, obj)] = ratings[k]
                u[schema.objective_column(schema.DEBIASED_PREFIX, obj)] = debiased[k]
                u[schema.objective_column(schema.GATE_PREFIX, obj)] = gates[k]
            units.append(u)
    return units


FILE_OFFSET = {"hh-rlhf": 0, "pandalm": 2, "oasst": 1}


def write_run(
    data: Path, run_dir: Path, run_id: str = "fixture", hh_pairs: int = HH_PAIRS, pandalm_pairs: int = PANDALM_PAIRS
) -> Path:
    rows = hh_rows(data, hh_pairs) + pandalm_rows(data, pandalm_pairs) + oasst_rows(data)
    units = units_of(rows, run_id)
    out_schema = schema.output_schema(OBJECTIVES)
    by_file: dict[int, list[dict]] = {k: [] for k in range(N_FILES)}
    for u in units:
        # Responses of one prompt land in different files; files differ in their source mix.
        by_file[(FILE_OFFSET[u["source"]] + u["response_index"]) % N_FILES].append(u)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    for k, part in by_file.items():
        pq.write_table(pa.Table.from_pylist(part, schema=out_schema), run_dir / "data" / f"part-{k:02d}.parquet")
    sources = {}
    for u in units:
        sources.setdefault(u["source"], {"units_labeled": 0})["units_labeled"] += 1
    manifest = {
        "run_id": run_id,
        "status": "complete",
        "objectives": OBJECTIVES,
        "sources": sources,
        "output": {"data": str(run_dir / "data"), "quarantine": str(run_dir / "quarantine")},
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run_dir


@pytest.fixture(scope="session")
def annotated_run(shared_data, tmp_path_factory) -> Path:
    """Directory of a labeled run (data/*.parquet + manifest.json) over real shared-data rows."""
    return write_run(shared_data, tmp_path_factory.mktemp("annotated") / "fixture")


def load_units(run_dir: Path):
    """Every unit of a run as one pandas frame: the tests' independent reference."""
    return pq.read_table(run_dir / "data").to_pandas()


OASST_TREES = 20


@pytest.fixture(scope="session")
def labeled_run(smollm2_heads, tmp_path_factory) -> Path:
    """A run written by the real labeling job (SmolLM2 + heads trained on real data) over real
    HH-RLHF, PandaLM and Open Assistant rows: curation must hold on actual model scores too."""
    from label_fixtures import SHARED, first_lines, label_config, run_module, write_yaml

    tmp = tmp_path_factory.mktemp("labeled_for_curation")
    # 20 of the 43 OASST trees still give 119 best-of-N units, at half the cost of all of them.
    oasst = first_lines(SHARED / "oasst" / "en_100_message.jsonl", OASST_TREES, tmp / "oasst_first_trees.jsonl")
    inputs = [
        {"path": str(SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh_rlhf"},
        {"path": str(SHARED / "pandalm" / "testset-v1.json"), "format": "pandalm"},
        {"path": str(oasst), "format": "oasst_best_of_n", "source": "oasst"},
    ]
    cfg = label_config(
        tmp, smollm2_heads, inputs, run_id="real", limit_rows_per_input=60, resources={"rows_per_shard": 16}
    )
    run_module("jobs.label", "--config", str(write_yaml(tmp / "job.yaml", cfg)))
    return tmp / "labels" / "real"


# --- seeded random units for the equivalence tests --------------------------------------------------
def random_units(seed: int, n_prompts: int = 40):
    """A pandas frame of units in the output schema's columns with every corner the pair, rerank and
    SFT rules name: best-of-N groups of 1-6 with tied scores, identical texts, missing scores and
    tied / missing human ranks; preference rows that are complete, human ties (labelled or not),
    halves, triples, or hold a missing score or identical texts; repeated identical rows."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    units = []
    for p in range(n_prompts):
        pid = f"p{rng.integers(10**6):06d}-{p}"
        prompt = [{"role": "user", "content": f"question {p}"}]
        if rng.random() < 0.5:
            n = int(rng.integers(1, 7))
            rid = f"{pid}-bon"
            for i in range(n):
                units.append(
                    {
                        "unit_id": f"{rid}-{i}",
                        "row_id": rid,
                        "prompt_id": pid,
                        "kind": "best_of_n",
                        "source": "oasst",
                        "prompt": prompt,
                        "response": f"answer {rng.integers(4)}",
                        "response_index": i,
                        "preference": None,
                        "tie": None,
                        "human_rank": None if rng.random() < 0.2 else int(rng.integers(0, 3)),
                        "score": np.nan if rng.random() < 0.1 else float(rng.integers(0, 5)) / 4,
                    }
                )
        for r in range(int(rng.integers(0, 3))):
            rid = f"{pid}-pref{r}"
            shape = rng.choice(["pair", "pair", "pair", "tie", "tie_unlabelled", "half", "triple", "same_label"])
            n = {"half": 1, "triple": 3}.get(shape, 2)
            labels = {
                "pair": ["chosen", "rejected"],
                "tie": ["chosen", "rejected"],
                "tie_unlabelled": [None, None],
                "half": ["chosen"],
                "triple": ["chosen", "rejected", "rejected"],
                "same_label": ["chosen", "chosen"],
            }[shape]
            for i in range(n):
                units.append(
                    {
                        "unit_id": f"{rid}-{i}",
                        "row_id": rid,
                        "prompt_id": pid,
                        "kind": "preference",
                        "source": "hh-rlhf",
                        "prompt": prompt,
                        "response": f"reply {rng.integers(3)}",
                        "response_index": i,
                        "preference": labels[i],
                        "tie": shape.startswith("tie"),
                        "human_rank": None,
                        "score": np.nan if rng.random() < 0.05 else float(rng.integers(-4, 5)) / 8,
                    }
                )
        if rng.random() < 0.2:
            units.append(
                {
                    "unit_id": f"{pid}-instr-0",
                    "row_id": f"{pid}-instr",
                    "prompt_id": pid,
                    "kind": "instruction",
                    "source": "alpaca",
                    "prompt": prompt,
                    "response": "text",
                    "response_index": 0,
                    "preference": None,
                    "tie": None,
                    "human_rank": None,
                    "score": float(rng.integers(0, 5)) / 4,
                }
            )
    repeats = [dict(u) for u in units if rng.random() < 0.08]  # identical rows, as repeated input rows give
    df = pd.DataFrame(units + repeats)
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # arrival order is arbitrary
    df["score"] = df["score"].astype(np.float32)
    df["human_rank"] = df["human_rank"].astype("Int32")
    df["tie"] = df["tie"].astype("boolean")
    df["rating_a"] = rng.random(len(df)).astype(np.float32)
    return df
