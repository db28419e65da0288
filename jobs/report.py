"""Render a labeled run (and curation manifests) as one self-contained HTML report.

    python -m jobs.report --run runs/labels/demo --out report.html
    python -m jobs.report --run runs/labels/demo \
        --curation-manifest runs/curated/demo-dpo/manifest.json --out report.html

Inline SVG charts only: the file opens offline and can be mailed or attached to a run.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.curation.report import build_report
from pipeline.secrets import install_excepthook, lift_uri_credentials, scrub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="labeled run directory (local or s3://) with data/*.parquet")
    ap.add_argument(
        "--curation-manifest", action="append", default=[], help="manifest.json of a curation job (repeatable)"
    )
    ap.add_argument("--out", required=True, help="HTML file to write")
    ap.add_argument("--storage-options", default="{}", help="JSON storage options for s3:// (endpoint_url, ...)")
    args = ap.parse_args(argv)
    install_excepthook()  # a traceback printed at exit shows no credential
    try:
        storage_options = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        print(scrub(f"--storage-options is not JSON: {e}"), file=sys.stderr)
        return 2

    try:  # s3://KEY:SECRET@... in the paths: moved into the options (and remembered)
        (run, out, *manifests), storage_options = lift_uri_credentials(
            [args.run, args.out, *args.curation_manifest], storage_options, "--run/--out/--curation-manifest"
        )
        stats = build_report(run, out, manifests, storage_options)
    except (FileNotFoundError, ValueError) as e:
        print(scrub(f"error: {e}"), file=sys.stderr)
        return 2
    print(
        scrub(
            json.dumps(
                {"out": out, "units": stats["units"], "sources": stats["sources"], "objectives": stats["objectives"]},
                indent=2,
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
