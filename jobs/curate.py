"""Turn a labeled run into training data: SFT selection, DPO pairs, best-of-N reranking, calibration.

    python -m jobs.curate --config jobs/configs/curate_dpo.yaml
    ray job submit --working-dir . -- python -m jobs.curate --config jobs/configs/curate_dpo.yaml

Locally it starts an embedded Ray; under `ray job submit` it joins the cluster. Output files are
`data/train-<k>-of-<n>.parquet` (a `train` split for `datasets.load_dataset(<output>)`); a rerun
replaces them instead of adding duplicates. The manifest next
to the output says how many rows each filter removed and which pairs were kept, flipped or dropped.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.curation.config import ConfigError, load_config
from pipeline.secrets import inline_credentials_warning, install_excepthook, scrub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.curate", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML curation config")
    ap.add_argument("--run", help="override the labeled run directory to read")
    ap.add_argument("--output", help="override the output directory (calibrate: the JSON file)")
    ap.add_argument("--task", help="override the task (sft | dpo | rerank | calibrate)")
    ap.add_argument(
        "--check",
        action="store_true",
        help="validate the whole config and the run it reads (files, filter columns), without Ray; exit 0 or 2",
    )
    args = ap.parse_args(argv)
    install_excepthook()  # a traceback printed at exit shows no credential
    overrides = {k: v for k, v in {"run": args.run, "output": args.output, "task": args.task}.items() if v}
    if args.check:
        from pipeline.config_check import check_curate_config, finish

        return finish(check_curate_config(args.config, overrides))
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(scrub(f"config error: {e}"), file=sys.stderr)
        return 2
    if warning := inline_credentials_warning(cfg.to_dict()):
        print(warning, file=sys.stderr)
    from pipeline.curation.job import run  # Ray: imported once the config is known to be good

    try:
        man = run(cfg)
    except ConfigError as e:  # a key checked against the run's columns at start (pipeline.curation.uncertainty)
        print(scrub(f"config error: {e}"), file=sys.stderr)
        return 2
    keys = ("task", "score_column", "rows_in", "rows_out", "filters", "pairs", "agreement", "temperature", "output")
    summary = {k: man[k] for k in keys if k in man}
    print(scrub(json.dumps(summary, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
