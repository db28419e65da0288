"""Label corpora with gated multi-objective rewards.

    python -m jobs.label --config jobs/configs/demo.yaml
    ray job submit --working-dir . -- python -m jobs.label --config jobs/configs/<name>.yaml

Locally it starts an embedded Ray; under `ray job submit` it joins the cluster. Rerunning with
the same run id resumes: committed shards are skipped, the rest are redone. `--check` validates
the config and reads the first rows of each input without starting Ray.

Exit codes: 0 done, 2 bad config (every problem listed, each naming its key), 4 the run went over
`max_quarantine_fraction` (what it labeled is committed; the manifest's status says
`failed_quarantine`), 5 another live driver holds the run id (nothing was done), 1 anything else
(a stalled run included: what was committed stays, a rerun resumes).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.labeling.config import ConfigError, load_config

EXIT_RUN_HELD = 5  # another live driver holds the run id (its lease); nothing was done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.label", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML job config")
    ap.add_argument("--run-id", help="override run_id (same id = resume)")
    ap.add_argument("--output", help="override the output root URI")
    ap.add_argument("--incremental", action="store_true", help="only input files no earlier run recorded")
    ap.add_argument(
        "--check",
        action="store_true",
        help="validate the whole config and read the first rows of each input, without Ray; exit 0 or 2",
    )
    args = ap.parse_args(argv)
    from pipeline.secrets import inline_credentials_warning, install_excepthook, scrub

    install_excepthook()  # a traceback printed at exit shows no credential
    overrides = {k: v for k, v in {"run_id": args.run_id, "output": args.output}.items() if v}
    if args.incremental:
        overrides["incremental"] = True
    if args.check:
        from pipeline.config_check import check_label_config, finish

        return finish(check_label_config(args.config, overrides))
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(scrub(f"config error: {e}"), file=sys.stderr)
        return 2
    if warning := inline_credentials_warning(cfg.to_dict()):
        print(warning, file=sys.stderr)
    from pipeline.labeling.lease import LeaseHeld, LeaseLost
    from pipeline.labeling.manifest import EXIT_QUARANTINE, QuarantineLimitExceeded, score_summary
    from pipeline.labeling.run import run
    from pipeline.labeling.watch import Stalled
    from pipeline.storage import UnsupportedStore
    from pipeline.training import ensure_heads

    try:
        ensure_heads(cfg)  # model.train_if_missing: train the heads first when they do not exist
        man = run(cfg)
    except (ConfigError, UnsupportedStore) as e:  # the train_if_missing config; a store without a lease
        print(scrub(f"config error: {e}"), file=sys.stderr)
        return 2
    except QuarantineLimitExceeded as e:  # what was labeled is committed; the manifest says why
        print(scrub(f"run failed: {e}"), file=sys.stderr)
        return EXIT_QUARANTINE
    except LeaseHeld as e:  # another live driver has this run: nothing was touched
        print(scrub(f"label error: {e}"), file=sys.stderr)
        return EXIT_RUN_HELD
    except (Stalled, LeaseLost) as e:  # what was committed stays; a rerun resumes
        print(scrub(f"label error: {e}"), file=sys.stderr)
        return 1
    print(
        scrub(
            json.dumps(
                {
                    "run_dir": cfg.run_dir,
                    "manifest": f"{cfg.run_dir}/manifest.json",
                    "data": man["output"]["data"],
                    "sources": man["sources"],
                    "units_per_s": man["units_per_s"],
                    "tokens_per_s": man["tokens_per_s"],
                },
                indent=2,
            )
        )
    )
    if man["objectives"] and any(s["units_labeled"] for s in man["sources"].values()):
        print(
            scrub(
                "scores by source: "
                + json.dumps(score_summary(cfg.run_dir, man["objectives"], cfg.storage_options or None))
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
