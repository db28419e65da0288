"""Exactly-once under a cluster's and S3's faults, with the wall time next to a clean run.

    .venv/bin/python bench/bench_chaos.py [--limit 60] [--kills 3] [--fault-rate 0.05]

Starts a token-authenticated head (`ray start --head`) and two worker nodes (`ray start
--address`, one `scorer` resource each), moto's S3 server and the fault proxy in front of it;
uploads LLMBar and the OASST best-of-N trees to S3 and labels them through `jobs.schedule`,
twice: once clean, once with worker nodes SIGKILLed whole (and replaced), a share of S3 requests
failed (503 SlowDown, 500, resets, stalls past the read timeout) and a second driver started on
the same run id. Checks both against the pure reader's expected units and prints one JSON
report (the figures in BENCHMARKS.md). Exit 1 when any unit is lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cluster_chaos import ChaosPlan, moto_server, run_chaos, summary  # noqa: E402
from label_fixtures import SHARED, train_smollm2_heads  # noqa: E402
from ray_fixtures import short_temp_dir, start_ray_head, stop_ray_head  # noqa: E402

INPUTS = [
    {"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar", "source": "llmbar"},
    {"path": str(SHARED / "oasst" / "en_100_message.jsonl"), "format": "oasst_best_of_n", "source": "oasst"},
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=60, help="rows per input (None: all)")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--fault-rate", type=float, default=0.05)
    ap.add_argument("--heads", help="trained heads (default: train the test heads under .cache/)")
    ap.add_argument("--skip-clean", action="store_true", help="only the faulty run")
    args = ap.parse_args()
    # absolute: the job runs in Ray's copy of the working directory, not in this one
    heads = str(Path(args.heads).resolve()) if args.heads else train_smollm2_heads(ROOT / ".cache" / "bench-heads")
    base = short_temp_dir("chaos-")
    head = start_ray_head(base, num_cpus=2)
    report: dict = {"limit_rows_per_input": args.limit, "inputs": [i["source"] for i in INPUTS]}
    try:
        with moto_server() as moto:
            if not args.skip_clean:
                clean = run_chaos(
                    head, moto, base, heads, INPUTS, args.limit, ChaosPlan(0, (), 0, 0.0, 0, False), "clean"
                )
                report["clean"] = summary(clean)
                print(json.dumps({"clean": report["clean"]}), flush=True)
            plan = ChaosPlan(kills=args.kills, fault_rate=args.fault_rate)
            faulty = run_chaos(head, moto, base, heads, INPUTS, args.limit, plan, "chaos")
            report["chaos"] = summary(faulty)
            for a in faulty.attempts:  # what a failed attempt's driver printed last, for the record
                if a["status"] != "SUCCEEDED":
                    said = f"--- {a['submission_id']} ({a['status']}), last lines:\n{a['logs'][-3000:]}"
                    print(said, file=sys.stderr)
            report["chaos"]["overlap_said"] = next(
                (ln for ln in (faulty.overlap or {}).get("logs", "").splitlines() if "another driver" in ln), None
            )
    finally:
        stop_ray_head(head)
        shutil.rmtree(base, ignore_errors=True)
    if "clean" in report:
        report["chaos_over_clean_wall"] = round(report["chaos"]["wall_s"] / report["clean"]["wall_s"], 2)
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(report, indent=2))
    bad = report["chaos"]["problems"] or report.get("clean", {}).get("problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
