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
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pyarrow as pa

from pipeline import evaluation
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
        report = evaluation.evaluate_methods(units, heads, baseline)
    elif args.heads:
        if not args.run:
            ap.error("--heads needs --run")
        heads, baseline = _load_heads(args.heads)
        report = evaluation.evaluate_methods(read_run_units(args.run), heads, baseline)
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
        report = evaluation.evaluate(units, scores, predicted)
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
