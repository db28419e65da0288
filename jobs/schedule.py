"""Submit a labeling job on a schedule, at most once per (job, date, config).

    python -m jobs.schedule --address http://127.0.0.1:8265 --config jobs/configs/x.yaml \
        [--date 2026-11-23] [--job-name x] [--incremental] [--resubmit-failed] [--dry-run]
        [--working-dir .] [--entrypoint "python -m jobs.label --config {config} --run-id {run_id}"]
        [--curate jobs/configs/curate_dpo_nightly.yaml ...]

The submission id is `<job_name>-<date>-<config_hash8>`, where config_hash8 is the first 8 hex
digits of the sha256 of the canonical config (parsed YAML as sorted, compact JSON: comments,
key order, formatting and credentials do not matter). Ray refuses a second job with an existing submission
id, so a retried cron run, or two schedulers racing, never start the same job twice.

Before submitting, the scheduler looks for jobs of that id on the cluster:
- none                     -> submit `<id>`
- PENDING/RUNNING/SUCCEEDED -> submit nothing, report the existing id (exit 0)
- only FAILED/STOPPED      -> submit nothing and exit 3, unless --resubmit-failed: then submit
                              `<id>-retry<n>`; it runs with the same run id, so the labeling job
                              resumes (committed shards are skipped).

The job runs `python -m jobs.label --config <config> --run-id <id>` with the current directory
as its working dir. `--dry-run` also runs the job's `--check` on that config (from the working
dir; no Ray started) and exits 2 when the job would refuse it; any bad flag exits 2 too.
With `--curate CONFIG` (repeatable), the same job then runs
`python -m jobs.curate --config CONFIG` for each, once labeling succeeded: label -> curate as one
schedule slot. A curation config of a schedule reads the labeling output by its manifests
(`run: <output>/latest` for tonight's run, `run: <output>/<job>-*` for every night; see
pipeline/curation/inputs.py), so it never needs the run id; the curation configs' content is part
of the submission id's hash (without them the hash is the labeling config's alone, as before).

Token auth: the token comes from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or
~/.ray/auth_token with RAY_AUTH_MODE=token), as for the `ray` CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config_schema import Schema
from pipeline.secrets import scrub, without_credentials

RETRYABLE = {"FAILED", "STOPPED"}
SCHEDULE_KEY = "armolabel.schedule"  # job metadata naming the schedule slot a job belongs to
EXIT_PREVIOUS_FAILED = 3
# Not shipped to the cluster with the working dir (on top of what .gitignore excludes).
WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache"]


# ---- what the scheduler is given: its schema --------------------------------------------------


@dataclass
class ScheduleRequest:
    """jobs.schedule's inputs (its command-line flags), checked like every config kind."""

    config: str  # the job's config (YAML), relative to working_dir
    date: str  # YYYY-MM-DD
    address: str | None = None  # the Ray dashboard (job API); required unless dry_run
    job_name: str | None = None  # default: the config file's stem
    working_dir: str = "."
    incremental: bool = False
    resubmit_failed: bool = False
    dry_run: bool = False
    entrypoint: str | None = None  # replaces `python -m jobs.label ...`; {config} and {run_id} filled in


SCHEMA = Schema(
    "schedule", ScheduleRequest, {(ScheduleRequest, "date"): str, (ScheduleRequest, "job_name"): str | None}
)
ENTRYPOINT_FIELDS = {"config", "run_id"}


def request_errors(req: dict[str, Any]) -> list[str]:
    """Every problem of the scheduler's inputs, each naming its flag's key."""
    errors, _bad = SCHEMA.type_errors(req)
    if errors:
        return errors
    out = []
    try:
        dt.date.fromisoformat(req["date"])
    except ValueError:
        out.append(f"date: expected YYYY-MM-DD, got {req['date']!r}")
    if not req.get("address") and not req.get("dry_run"):
        out.append("address: required unless dry_run (--address or RAY_API_SERVER_ADDRESS)")
    wd = Path(req.get("working_dir") or ".")
    if not wd.is_dir():
        out.append(f"working_dir: no such directory {str(wd)!r}")
    elif not (wd / req["config"]).is_file():
        out.append(f"config: no such file {req['config']!r} under the working dir {str(wd)!r}")
    if req.get("entrypoint"):
        import string

        try:
            names = {f for _, f, _, _ in string.Formatter().parse(req["entrypoint"]) if f is not None}
        except ValueError as e:
            out.append(f"entrypoint: not a valid template: {e}")
        else:
            if names - ENTRYPOINT_FIELDS:
                out.append(
                    f"entrypoint: unknown placeholder(s) {sorted(names - ENTRYPOINT_FIELDS)}; "
                    f"known: {{config}}, {{run_id}}"
                )
    return out


def check_submitted_config(config_path: str, working_dir: str, entrypoint: str | None) -> dict[str, Any]:
    """--dry-run: the check of the job the entrypoint runs (jobs.label unless it names jobs.curate or
    jobs.train_heads) on the config it would submit, from the working dir as the job sees it."""
    from pipeline.config_check import check_curate_config, check_label_config, check_train_config

    with contextlib.chdir(working_dir):
        if entrypoint and "jobs.curate" in entrypoint:
            report = check_curate_config(config_path)
        elif entrypoint and "jobs.train_heads" in entrypoint:
            report = check_train_config(config_path)
        else:
            report = check_label_config(config_path)
    return {"kind": report.kind, "ok": report.ok, "errors": report.errors, "summary": report.lines}


# ---- pure parts: identity and the decision -------------------------------------------------


def canonical_config(text: str) -> str:
    """The config's content independent of comments, key order, formatting and credentials (a
    rotated key is the same job: storage_options credentials and URI userinfo are left out)."""
    return json.dumps(without_credentials(yaml.safe_load(text)), sort_keys=True, separators=(",", ":"), default=str)


def config_hash(text: str) -> str:
    return hashlib.sha256(canonical_config(text).encode()).hexdigest()


def submission_id(job_name: str, date: str, config_sha256: str) -> str:
    """`<job_name>-<date>-<hash8>`; the name is reduced to characters safe in ids and paths."""
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", job_name).strip("-.") or "job"
    dt.date.fromisoformat(date)  # refuse anything but YYYY-MM-DD
    return f"{name}-{date}-{config_sha256[:8]}"


@dataclass(frozen=True)
class ExistingJob:
    submission_id: str
    status: str


@dataclass(frozen=True)
class Decision:
    action: str  # "submit" | "exists" | "previous_failed"
    submission_id: str  # the id to submit, or the existing job that decided it
    status: str | None = None  # status of that existing job


def retry_index(base_id: str, job_id: str) -> int | None:
    """0 for the base id, n for `<base>-retry<n>`, None for an unrelated job."""
    if job_id == base_id:
        return 0
    m = re.fullmatch(re.escape(base_id) + r"-retry(\d+)", job_id)
    return int(m.group(1)) if m else None


def decide(base_id: str, existing: Iterable[ExistingJob], resubmit_failed: bool = False) -> Decision:
    """What to do for one schedule slot, given the cluster's jobs."""
    indexed = ((retry_index(base_id, j.submission_id), j) for j in existing)
    attempts = sorted(((i, j) for i, j in indexed if i is not None), key=lambda t: t[0])
    if not attempts:
        return Decision("submit", base_id)
    for _, job in attempts:
        if job.status not in RETRYABLE:  # running, pending or done: nothing to do
            return Decision("exists", job.submission_id, job.status)
    last_index, last = attempts[-1]
    if not resubmit_failed:
        return Decision("previous_failed", last.submission_id, last.status)
    return Decision("submit", f"{base_id}-retry{last_index + 1}")


# ---- talking to the cluster ----------------------------------------------------------------


def auth_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """An explicit bearer header when a token is given by env var or file; otherwise Ray's own
    lookup applies (~/.ray/auth_token when RAY_AUTH_MODE=token)."""
    source: Mapping[str, str] = os.environ if env is None else env
    token = source.get("RAY_AUTH_TOKEN")
    if not token and source.get("RAY_AUTH_TOKEN_PATH"):
        token = Path(source["RAY_AUTH_TOKEN_PATH"]).expanduser().read_text().strip()
    return {"Authorization": f"Bearer {token.strip()}"} if token else {}


def existing_jobs(client, base_id: str) -> list[ExistingJob]:
    return [
        ExistingJob(j.submission_id, str(j.status))
        for j in client.list_jobs()
        if j.submission_id and retry_index(base_id, j.submission_id) is not None
    ]


def label_entrypoint(config_path: str, run_id: str, incremental: bool = False, python: str = "python") -> str:
    args = [python, "-m", "jobs.label", "--config", config_path, "--run-id", run_id]
    if incremental:
        args.append("--incremental")
    return shlex.join(args)


def schedule_hash(label_text: str, curate_texts: Iterable[str] = ()) -> str:
    """The slot's config hash: the labeling config's (config_hash) alone, or with the curation
    configs' canonical content after it, in order."""
    curate_texts = list(curate_texts)
    if not curate_texts:
        return config_hash(label_text)
    h = hashlib.sha256(canonical_config(label_text).encode())
    for text in curate_texts:
        h.update(b"\x1e" + canonical_config(text).encode())
    return h.hexdigest()


def check_curation_reads_labels(label_text: str, curate: Mapping[str, str]) -> None:
    """Each curation config of a schedule must read the labeling output (`run:` under its `output`),
    or it would curate something else than what the slot labeled. ValueError naming the file."""
    output = str((yaml.safe_load(label_text) or {}).get("output", "")).rstrip("/")
    for path, text in curate.items():
        run = str((yaml.safe_load(text) or {}).get("run", ""))
        parent = run.rstrip("/").rsplit("/", 1)[0]
        if not output or parent != output:
            raise ValueError(
                f"{path}: run: {run!r} does not read the labeling output {output!r}; use "
                f"{output}/latest (tonight's run) or {output}/<job>-* (every night)"
            )


def curate_entrypoint(config_path: str, python: str = "python") -> str:
    return shlex.join([python, "-m", "jobs.curate", "--config", config_path])


def schedule(
    client,
    config_path: str,
    *,
    date: str,
    job_name: str | None = None,
    working_dir: str = ".",
    incremental: bool = False,
    resubmit_failed: bool = False,
    dry_run: bool = False,
    entrypoint: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    curate: list[str] | None = None,
) -> dict[str, Any]:
    """Submit the job for this slot unless it already exists; returns a report (see main).

    `entrypoint` overrides the labeling command (its `{config}` and `{run_id}` are filled in).
    `curate`: curation configs (relative to the working dir) run after labeling, in this order.
    `client` is a ray.job_submission.JobSubmissionClient (None only with dry_run).
    """
    # The job reads the config from its working dir, so hash the copy that will be shipped.
    text = (Path(working_dir) / config_path).read_text()
    curate_texts = {c: (Path(working_dir) / c).read_text() for c in curate or []}
    check_curation_reads_labels(text, curate_texts)
    digest = schedule_hash(text, curate_texts.values())
    base_id = submission_id(job_name or Path(config_path).stem, date, digest)
    # The run id stays the base id across retries, so a retry resumes the same output.
    command = (
        entrypoint.format(config=config_path, run_id=base_id)
        if entrypoint
        else label_entrypoint(config_path, base_id, incremental)
    )
    # Curation only after labeling succeeded (`&&`); a retry relabels nothing committed, then curates.
    command = " && ".join([command, *(curate_entrypoint(c) for c in curate or [])])
    report: dict[str, Any] = {
        "config": config_path,
        "curate": list(curate or []),
        "config_sha256": digest,
        "date": date,
        "base_submission_id": base_id,
        "run_id": base_id,
        "entrypoint": command,
    }
    if dry_run:
        report["check"] = check_submitted_config(config_path, working_dir, entrypoint)
    if client is None:
        assert dry_run, "a client is needed unless dry_run"
        return {**report, "action": "dry_run", "submission_id": base_id, "status": None}
    decision = decide(base_id, existing_jobs(client, base_id), resubmit_failed)
    report.update(asdict(decision))
    if decision.action != "submit" or dry_run:
        if dry_run:
            report["action"] = f"dry_run:{decision.action}"
        return report
    renv = {"working_dir": working_dir, "excludes": list(WORKING_DIR_EXCLUDES), **(runtime_env or {})}
    try:
        client.submit_job(
            entrypoint=command,
            submission_id=decision.submission_id,
            runtime_env=renv,
            metadata={SCHEDULE_KEY: base_id, "config_sha256": digest, "date": date},
        )
    except RuntimeError as e:
        # Lost a race with another scheduler: Ray keeps submission ids unique, so report theirs.
        if "already exists" not in str(e):
            raise
        job = client.get_job_info(decision.submission_id)
        report.update(action="exists", status=str(job.status))
        return report
    report.update(action="submitted", status="PENDING")
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.schedule", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        help="Ray dashboard (job API) address, e.g. http://127.0.0.1:8265",
    )
    ap.add_argument("--config", required=True, help="labeling job config (YAML), relative to the working dir")
    ap.add_argument(
        "--date",
        default=dt.datetime.now(dt.UTC).date().isoformat(),
        help="schedule date YYYY-MM-DD (default: today, UTC)",
    )
    ap.add_argument("--job-name", help="default: the config file's stem")
    ap.add_argument("--working-dir", default=".", help="shipped to the cluster as the job's working dir")
    ap.add_argument("--incremental", action="store_true", help="pass --incremental to jobs.label")
    ap.add_argument(
        "--resubmit-failed",
        action="store_true",
        help="if this slot's job FAILED or was STOPPED, submit <id>-retry<n> (resumes the run)",
    )
    ap.add_argument("--dry-run", action="store_true", help="report what would happen, submit nothing")
    ap.add_argument(
        "--curate",
        action="append",
        default=[],
        metavar="CONFIG",
        help="curation config run after labeling in the same job (repeatable; relative to the working dir)",
    )
    ap.add_argument(
        "--entrypoint",
        help="command template replacing `python -m jobs.label ...`; {config} and {run_id} are filled in",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    request = {f: getattr(args, f) for f in ScheduleRequest.__dataclass_fields__}
    if errors := request_errors(request):
        print(
            scrub("schedule error: " + (errors[0] if len(errors) == 1 else "\n  - ".join(["", *errors]))),
            file=sys.stderr,
        )
        return 2
    from ray.exceptions import AuthenticationError

    try:
        client = None
        if args.address:
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(args.address, headers=auth_headers())
        report = schedule(
            client,
            args.config,
            date=args.date,
            job_name=args.job_name,
            working_dir=args.working_dir,
            incremental=args.incremental,
            resubmit_failed=args.resubmit_failed,
            dry_run=args.dry_run,
            entrypoint=args.entrypoint,
            curate=args.curate,
        )
    except (OSError, yaml.YAMLError, ValueError, AuthenticationError) as e:
        # A bad config, an unreachable cluster or a refused token: nothing was submitted. Scrubbed:
        # a YAML error quotes the offending line.
        print(scrub(f"schedule error: {e}"), file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    if "check" in report and not report["check"]["ok"]:  # --dry-run: the job would refuse this config
        print(scrub(f"schedule error: the {report['check']['kind']} config would be refused:"), file=sys.stderr)
        print(scrub("\n".join(f"  - {e}" for e in report["check"]["errors"])), file=sys.stderr)
        return 2
    return EXIT_PREVIOUS_FAILED if report["action"] == "previous_failed" else 0


if __name__ == "__main__":
    sys.exit(main())
