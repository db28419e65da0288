"""Evaluate reward scores against human labels and write a JSON report.

    # heads trained by jobs.train_heads, on that config's held-out split (cached embeddings):
    python -m jobs.evaluate --train-config jobs/configs/train_smollm2.yaml --out eval.json
    # any heads on any corpus embedded by a labeling run with `embeddings: true`:
    python -m jobs.evaluate --heads runs/heads/smollm2 --run runs/embeddings/<run_id> --out eval.json
    # the `score` column of any annotated run (e.g. scored with a released ArmoRM checkpoint):
    python -m jobs.evaluate --scored-run runs/labels/demo --out eval.json
    # EVALUATION.md's tables from reports, labelled:
    python -m jobs.evaluate --table smollm2=eval_smollm2.json minilm=eval_minilm.json

Metrics: pairwise accuracy per source (equal scores count half), Pearson/Spearman per rated
objective, best-of-N top-1 and Kendall tau against human ranks; always beside the length baseline.
With an ensemble (saved beside the heads by `heads.ensemble: K`, or the score_std column of a scored
run): selective accuracy, its area, ECE and mean_score_std per source, and the conservative orders
(mean − λ·std, `--lambda`, default 1) against the plain one (see pipeline/evaluation.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pyarrow as pa

from pipeline import evaluation
from pipeline.heads.ensemble import load_beside
from pipeline.heads.model import ArmoHeads, load_baseline
from pipeline.labeling.config import ConfigError
from pipeline.schema import RATING_PREFIX, objective_column
from pipeline.secrets import scrub
from pipeline.training import is_test_row, load_train_config, read_run_units
from pipeline.units import human_ratings


def _load_heads(path: str):
    heads = ArmoHeads.load(path)
    baseline = None
    if os.path.isdir(os.path.join(path, "baseline")):
        baseline = load_baseline(os.path.join(path, "baseline"))
    return heads, baseline


def _ensemble_for(path: str, heads, units: pa.Table):
    """The ensemble beside the heads, checked against them and the run's backbone (None: none)."""
    ensemble = load_beside(path)
    if ensemble is not None:
        fps = sorted(set(units.column("backbone_fingerprint").to_pylist()) - {None})
        if len(fps) > 1:
            raise SystemExit(f"the run's units come from {len(fps)} backbones; evaluate one at a time")
        ensemble.check(heads.fingerprint, fps[0] if fps else None, f"{path}/ensemble")
    return ensemble


def _scored_uncertainty(units: pa.Table, lam: float):
    """The uncertainty of a scored run from its score_std / score_mean / score_min columns, when any unit has one."""
    if "score_std" not in units.column_names or units.column("score_std").null_count == units.num_rows:
        return None
    col = lambda n: units.column(n).to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
    std, mean = col("score_std"), col("score_mean")
    return evaluation.Uncertainty(std, "score", mean - lam * std, col("score_min"), lam)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train-config", help="evaluate heads_out of this training config on its test split")
    mode.add_argument("--scored-run", help="evaluate the score column of an annotated run")
    mode.add_argument("--heads", help="heads directory (with --run: an embed-only run with embeddings)")
    mode.add_argument("--table", nargs="+", metavar="LABEL=REPORT", help="print markdown tables of JSON reports")
    ap.add_argument("--run", help="run directory holding embeddings (with --heads)")
    ap.add_argument("--all-rows", action="store_true", help="with --train-config: every row, not only the test split")
    ap.add_argument("--out", help="write the JSON report here (default: print it)")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0, help="conservative score: mean − λ·std")
    args = ap.parse_args(argv)

    if args.table:
        reports = {}
        for item in args.table:
            label, _, path = item.partition("=")
            with open(path) as f:
                reports[label] = json.load(f)
        print(evaluation.markdown_tables(reports), end="")
        return 0
    if args.train_config:
        try:
            cfg = load_train_config(args.train_config)
        except ConfigError as e:
            print(scrub(f"config error: {e}"), file=sys.stderr)
            return 2
        units = read_run_units(cfg.embedding_run().run_dir, cfg.storage_options or None)
        if not args.all_rows:
            units = units.filter(pa.array(is_test_row(units.column("row_id").to_pylist(), cfg.test_fraction)))
        heads, baseline = _load_heads(cfg.heads_out)
        ensemble = _ensemble_for(cfg.heads_out, heads, units)
        report = evaluation.evaluate_methods(units, heads, baseline, ensemble, args.lam)
    elif args.heads:
        if not args.run:
            ap.error("--heads needs --run")
        heads, baseline = _load_heads(args.heads)
        units = read_run_units(args.run)
        ensemble = _ensemble_for(args.heads, heads, units)
        report = evaluation.evaluate_methods(units, heads, baseline, ensemble, args.lam)
    else:
        units = read_run_units(args.scored_run)
        scores = {
            "score": units.column("score").to_numpy(zero_copy_only=False).astype(np.float64),
            evaluation.LENGTH_BASELINE: evaluation.length_scores(units),
        }
        predicted = {
            name: units.column(objective_column(RATING_PREFIX, name)).to_numpy(zero_copy_only=False).astype(np.float64)
            for name in human_ratings(units)
            if objective_column(RATING_PREFIX, name) in units.column_names
        }
        report = evaluation.evaluate(units, scores, predicted, _scored_uncertainty(units, args.lam))
    text = json.dumps(report, indent=2, default=float)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(
        text
        if not args.out
        else json.dumps({"mean_pairwise_accuracy": report["mean_pairwise_accuracy"], "report": args.out})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
