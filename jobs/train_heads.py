"""Train ArmoRM-style heads (regression, debiasing, gating, and a single-head baseline) from a config.

    python -m jobs.train_heads --config jobs/configs/train_smollm2.yaml

Embeds the configured corpora with the labeling job (embed-only; cached and reused on rerun),
fits on the train split, saves the heads and evaluates them on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.labeling.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.train_heads", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML training config")
    ap.add_argument("--heads-out", help="override heads_out")
    ap.add_argument(
        "--check",
        action="store_true",
        help="validate the whole config and read the first rows of each input, without Ray; exit 0 or 2",
    )
    args = ap.parse_args(argv)
    from pipeline.secrets import install_excepthook, scrub

    install_excepthook()  # a traceback printed at exit shows no credential
    if args.check:
        from pipeline.config_check import check_train_config, finish

        return finish(check_train_config(args.config))
    from pipeline.labeling.manifest import EXIT_QUARANTINE, QuarantineLimitExceeded
    from pipeline.training import train_from_config

    try:
        summary = train_from_config(args.config, heads_out=args.heads_out)
    except ConfigError as e:
        print(scrub(f"config error: {e}"), file=sys.stderr)
        return 2
    except QuarantineLimitExceeded as e:  # the embedding run quarantined too much of the corpora
        print(scrub(f"run failed: {e}"), file=sys.stderr)
        return EXIT_QUARANTINE
    print(scrub(json.dumps({k: summary[k] for k in ("heads", "heads_fingerprint", "units", "wall_time_s")}, indent=2)))
    print(json.dumps({"mean_pairwise_accuracy": summary["evaluation"]["mean_pairwise_accuracy"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
