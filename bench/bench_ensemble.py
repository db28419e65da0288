"""Ensembles of heads on real data, and what they cost at labeling time.

--proof (default): embed every labeled shared set once (an embed-only labeling run, cached under
--embeddings), hold out 20 % of rows by row-id hash, train heads with `ensemble: K` on the training
rows of the --train sources only, and score the held-out rows of every source with the primary heads
and the members. Reports, per source (trained on or not): pairs / units, mean_score_std (relative
to the prompt, as labeling writes it), mean_raw_score_std (the members' raw score spread, prompt
level included), mean_margin_std (the members' spread of each pair's margin), pairwise
accuracy of all pairs and of the most confident half (by margin / uncertainty and by margin alone),
mean_rating_std (the members' per-objective rating spread, averaged over objectives),
and how different the members are (distinct fingerprints, the mean pairwise Pearson correlation of
the members' scores, the mean std). The same numbers jobs.evaluate reports (pipeline.evaluation).

--speed: the labeling score stage (EmbedScoreStage: SmolLM2 forward pass + heads) on the same
tokenized units with heads alone and with the same heads plus a K-member ensemble, rounds
interleaved; reports units/s of both and their ratio (the ensemble adds no backbone pass, only K
more heads evaluations on the same embeddings).

  .venv/bin/python bench/bench_ensemble.py --proof --backbone minilm --members 5
  .venv/bin/python bench/bench_ensemble.py --speed --members 8

The last line of output is ONE JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = (REPO / ".." / "shared" / "data").resolve()

from pipeline import evaluation, metrics  # noqa: E402
from pipeline.units import embeddings_of, preference_pairs  # noqa: E402

INPUTS = [
    {"path": str(SHARED / "unieval" / "topical_chat.json"), "format": "topical_chat"},
    {"path": str(SHARED / "unieval" / "sfres.json"), "format": "sfres"},
    {"path": str(SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh_rlhf"},
    {"path": str(SHARED / "pandalm" / "testset-v1.json"), "format": "pandalm"},
    {"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar"},
    {"path": str(SHARED / "oasst" / "en_100_message.jsonl"), "format": "oasst_best_of_n"},
]


def proof(args) -> dict:
    from pipeline.heads.train import train_heads
    from pipeline.training import TrainConfig, embed_training_corpora, is_test_row, read_run_units

    cfg = TrainConfig(
        name=f"ensemble-proof-{args.backbone}",
        inputs=INPUTS,
        heads_out=str(Path(args.embeddings) / "unused"),
        embeddings_out=args.embeddings,
        backbone={"path": args.backbone},
        template={"system_prompt": "template_default", "max_tokens": 1024, "overflow": "truncate_prompt"},
        resources={"actors": 1, "num_cpus_per_actor": 1, "threads_per_actor": 2, "rows_per_shard": 128},
        limit_rows_per_input=args.limit,
    )
    t0 = time.time()
    units = read_run_units(embed_training_corpora(cfg))
    t_embed = time.time() - t0
    test = is_test_row(units.column("row_id").to_pylist(), 0.2)
    src = np.array(units.column("source").to_pylist(), dtype=object)
    trained_on = np.isin(src, args.train)
    train = units.filter(pa.array(~test & trained_on))
    held = units.filter(pa.array(test))
    opts = {"ensemble": args.members, "gating": {"steps": args.steps, "batch_size": args.batch_size}}
    t0 = time.time()
    result = train_heads(train, opts)
    t_train = time.time() - t0
    ens = result.ensemble
    X, P = embeddings_of(held)
    primary = result.heads.score(X, P).score.astype(np.float64)
    members = ens.member_scores(X, P).astype(np.float64)
    outs = ens.outputs(X, P)
    spread = outs.score
    rating_std = outs.rating_std.mean(axis=1)  # per unit, the members' rating spread averaged over objectives
    raw_std = members.std(axis=1, ddof=1)  # the members' raw score spread, the prompt level included
    corr = np.corrcoef(members.T)
    iu = np.triu_indices(members.shape[1], 1)
    held_src = np.array(held.column("source").to_pylist(), dtype=object)
    pairs = preference_pairs(held)
    per_source = {}
    for s in sorted(set(held_src.tolist())):
        entry = {
            "trained_on": s in args.train,
            "units": int((held_src == s).sum()),
            "mean_score_std": float(spread.std[held_src == s].mean()),
            "mean_rating_std": float(rating_std[held_src == s].mean()),
            "mean_raw_score_std": float(raw_std[held_src == s].mean()),
        }
        sel = pairs.select(pairs.source == s)
        if len(sel):
            m = primary[sel.better] - primary[sel.worse]
            u = metrics.pair_uncertainty(spread.std[sel.better], spread.std[sel.worse])
            entry.update(
                {
                    "pairs": len(sel),
                    # the exact spread of a pair's margin over the members, beside the combined unit stds
                    "mean_margin_std": float((members[sel.better] - members[sel.worse]).std(axis=1, ddof=1).mean()),
                    **evaluation.pair_uncertainty_metrics(m, u),
                }
            )
        per_source[s] = entry
    return {
        "backbone": args.backbone,
        "members": args.members,
        "gating": opts["gating"],
        "train_sources": args.train,
        "limit_rows_per_input": args.limit,
        "train_units": train.num_rows,
        "held_out_units": held.num_rows,
        "distinct_member_fingerprints": len({m.fingerprint for m in ens.members}),
        "member_score_corr_mean": float(corr[iu].mean()),
        "member_score_corr_min": float(corr[iu].min()),
        "embed_s": round(t_embed, 1),
        "train_s": round(t_train, 1),
        "per_source": per_source,
    }


def speed(args) -> dict:
    import torch

    from pipeline.corpus import InputSpec, iter_shards, units_table
    from pipeline.heads.ensemble import DIRECTORY, HeadsEnsemble
    from pipeline.heads.gating import GatingNetwork
    from pipeline.heads.model import ArmoHeads
    from pipeline.labeling.stages import EmbedScoreStage, ScoringModel, TokenizeStage
    from pipeline.stage import Resources

    torch.set_num_threads(args.threads)
    spec = InputSpec.from_dict({"path": str(SHARED / "pandalm" / "testset-v1.json"), "format": "pandalm"})
    shard = units_table(next(iter_shards(spec, spec.paths()[0], rows_per_shard=args.rows, limit_rows=args.rows)))
    backbone = {"path": "smollm2", "dtype": "float32", "device": "cpu"}
    tok = TokenizeStage(backbone, {"max_tokens": 1024, "overflow": "truncate_prompt"})
    tok.setup()
    tokenized = tok(shard)
    k, hidden = 4, 576

    def heads(seed: int) -> ArmoHeads:
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        return ArmoHeads(
            [f"o{i}" for i in range(k)], rng.normal(size=(k, hidden)) * 0.05, np.eye(k), GatingNetwork(hidden, k)
        )

    tmp = Path(tempfile.mkdtemp())
    plain_dir, ens_dir = tmp / "plain", tmp / "ens"
    h = heads(0)
    h.save(str(plain_dir))
    h.save(str(ens_dir))
    members = [heads(i + 1) for i in range(args.members)]
    records = [{"bootstrap_seed": i, "gating_seed": i} for i in range(args.members)]
    HeadsEnsemble(members, records, h.fingerprint, None).save(str(ens_dir / DIRECTORY))
    objectives = [f"o{i}" for i in range(k)]
    stages = {}
    for name, d in (("heads", plain_dir), ("heads+ensemble", ens_dir)):
        st = EmbedScoreStage(ScoringModel(backbone, str(d), None, None, False, args.threads), objectives, Resources())
        st.setup()
        stages[name] = st
    times: dict[str, list[float]] = {n: [] for n in stages}
    good = int(sum(r is None for r in tokenized.column("quarantine_reason").to_pylist()))
    for _ in range(args.rounds):
        for name, st in stages.items():
            t0 = time.perf_counter()
            st(tokenized)
            times[name].append(time.perf_counter() - t0)
    med = {n: float(np.median(t)) for n, t in times.items()}
    return {
        "units": good,
        "members": args.members,
        "threads": args.threads,
        "rounds": args.rounds,
        "seconds_median": med,
        "seconds_all": times,
        "units_per_s": {n: good / t for n, t in med.items()},
        "ensemble_over_heads_time": med["heads+ensemble"] / med["heads"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--proof", action="store_true")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300, help="gating steps per member (and the primary)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--train", nargs="+", default=["hh_rlhf", "pandalm", "topical_chat", "sfres"])
    ap.add_argument("--limit", type=int, default=None, help="--proof: first N rows of each input (default all)")
    ap.add_argument("--embeddings", default=str(REPO / "runs" / "embeddings"))
    ap.add_argument("--rows", type=int, default=32, help="--speed: PandaLM rows (2 units each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = speed(args) if args.speed else proof(args)
    print(json.dumps(out, indent=2, default=float))
    print(json.dumps(out, default=float))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
