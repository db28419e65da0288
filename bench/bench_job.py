"""The whole labeling job against the bare embedding engine, on the same rows, side by side.

  bare:      one process: read_units -> tokenize_many -> EmbeddingEngine.embed (model already loaded)
  job, N:    `python -m jobs.label` with N scoring actors (embedded local Ray), its steady throughput
             from the manifest: tokens / (end of the last scoring call - start of the first), so Ray
             start-up and model loading are excluded but every pipeline stall is included.

Pipeline efficiency = job tokens/s / bare tokens/s (target >= 0.9). Scaling = job tokens/s with N
actors / with 1. Both use the same CPU threads in total (--threads, split across actors).
The last line of output is ONE JSON object with the headline figures.

  .venv/bin/python bench/bench_job.py                     # SmolLM2, 120 rows each of HH-RLHF and PandaLM
  .venv/bin/python bench/bench_job.py --rows 40 --actors 1   # quick
  .venv/bin/python bench/bench_job.py --input best_of_n   # Open Assistant best-of-N (prompts shared per row)

The bare engine embeds the units in consecutive calls of --units-per-call, as the job's actors
receive them, so both share prompts within the same calls and compute the same tokens (reported:
computed_tokens, useful_tokens from the manifest's padding accounting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import yaml  # noqa: E402

DATA = (REPO / ".." / "shared" / "data").resolve()


INPUTS = {
    "pairs": [
        {"path": str(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh_rlhf"},
        {"path": str(DATA / "pandalm" / "testset-v1.json"), "format": "pandalm"},
    ],
    "best_of_n": [{"path": str(DATA / "oasst" / "en_100_message.jsonl"), "format": "oasst_best_of_n"}],
}
_input = "pairs"


def inputs() -> list[dict]:
    return INPUTS[_input]


def bare_engine(args) -> dict:
    import torch

    from pipeline.corpus import InputSpec, read_units
    from pipeline.embed import BackboneSpec, EmbeddingEngine, TemplatePolicy, load_backbone, tokenize_many
    from pipeline.embed.templating import TemplateError

    backbone = load_backbone(BackboneSpec(path=args.backbone))
    engine = EmbeddingEngine(backbone, token_budget=args.token_budget, num_threads=args.threads)
    t0 = time.perf_counter()
    units = read_units([InputSpec.from_dict(i) for i in inputs()], limit_rows=args.rows)
    good = units.filter(units.column("quarantine_reason").is_null())
    toks = tokenize_many(
        backbone.tokenizer,
        good.column("prompt").to_pylist(),
        good.column("response").to_pylist(),
        TemplatePolicy(max_tokens=args.max_tokens),
        backbone.kind,
    )
    # The job quarantines a whole row when one of its units cannot be templated (a pair or a ranked
    # group is kept whole), so the bare path drops those rows too: both then embed the same units.
    rows = good.column("row_id").to_pylist()
    bad_rows = {rows[i] for i, t in enumerate(toks) if isinstance(t, TemplateError)}
    ok = [t for i, t in enumerate(toks) if rows[i] not in bad_rows]
    computed = useful = embedded = 0
    for start in range(0, len(ok), args.units_per_call):  # the job's scoring calls, in input order
        call = ok[start : start + args.units_per_call]
        emb = engine.embed(
            [t.input_ids for t in call],
            [t.prompt_end for t in call],
            [t.prompt_input_ids for t in call] if backbone.kind == "encoder" else None,
        )
        computed, useful, embedded = computed + emb.computed_tokens, useful + emb.useful_tokens, embedded + emb.tokens
    wall = time.perf_counter() - t0
    tokens = sum(t.total_tokens for t in ok)
    return {
        "units": len(ok),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "threads": torch.get_num_threads(),
        "embedding_tokens": embedded,
        "computed_tokens": computed,
        "useful_tokens": useful,
    }


def job(args, actors: int, workdir: Path) -> dict:
    cfg = {
        "run_id": f"bench-{actors}",
        "output": str(workdir / "labels"),
        "model": {"backbone": {"path": args.backbone}, "template": {"max_tokens": args.max_tokens}},
        "inputs": inputs(),
        "limit_rows_per_input": args.rows,
        "resources": {
            "actors": actors,
            "num_cpus_per_actor": 0.5,
            "threads_per_actor": max(args.threads // actors, 1),
            "token_budget": args.token_budget,
            "rows_per_shard": args.rows_per_shard,
            "units_per_call": args.units_per_call,
        },
        "progress_interval_s": 30,
    }
    path = workdir / f"job-{actors}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--config", str(path)], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    man = json.loads((workdir / "labels" / f"bench-{actors}" / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in man["sources"].values())
    return {
        "actors": actors,
        "threads_per_actor": cfg["resources"]["threads_per_actor"],
        "units": sum(s["units_labeled"] for s in man["sources"].values()),
        "tokens": tokens,
        "process_wall_s": round(time.perf_counter() - t0, 1),
        "startup_and_total_tokens_per_s": man["tokens_per_s"],
        "scoring_window_s": man["scoring_window_s"],
        "tokens_per_s": man["steady_tokens_per_s"],
        "computed_tokens": man.get("computed_tokens"),
        "useful_tokens": man.get("useful_tokens"),
        "padding_waste": man.get("padding_waste"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--rows", type=int, default=120, help="rows per input (HH-RLHF, PandaLM)")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--token-budget", type=int, default=None, help="default: the engine's, by device")
    ap.add_argument("--rows-per-shard", type=int, default=32)
    ap.add_argument("--units-per-call", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in total")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--input", choices=sorted(INPUTS), default="pairs")
    args = ap.parse_args()
    global _input
    _input = args.input

    bare = bare_engine(args)
    print("bare engine:", json.dumps(bare), flush=True)
    jobs = []
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        for n in args.actors:
            jobs.append(job(args, n, Path(tmp)))
            print(f"job, {n} actor(s):", json.dumps(jobs[-1]), flush=True)
    one = next((j for j in jobs if j["actors"] == 1), jobs[0])
    assert all(j["tokens"] == bare["tokens"] for j in jobs), "job and engine saw different tokens"
    headline = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "backbone": args.backbone,
        "input": args.input,
        "units": bare["units"],
        "tokens": bare["tokens"],
        "computed_tokens": {"bare": bare["computed_tokens"], **{str(j["actors"]): j["computed_tokens"] for j in jobs}},
        "bare_tokens_per_s": bare["tokens_per_s"],
        "job_tokens_per_s": {str(j["actors"]): j["tokens_per_s"] for j in jobs},
        "pipeline_efficiency": round(one["tokens_per_s"] / bare["tokens_per_s"], 3),
        "scaling_vs_1_actor": {str(j["actors"]): round(j["tokens_per_s"] / one["tokens_per_s"], 3) for j in jobs},
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
