"""Which labeled runs a curation config reads: one run, tonight's, or several nights as one input.

`run:` in a curation config is one of
- a run directory (`<labels root>/<run_id>`, holding `data/*.parquet`): that run;
- `<labels root>/latest`: the newest complete run under the root that labeled something, found
  from the runs' manifests (`status: complete`, newest manifest first), so a nightly schedule's
  curation finds tonight's run without knowing its id;
- a glob of run directories (`<labels root>/nightly-*`): every complete run it matches, read as
  one input (incremental nights), newest first.

Several runs may hold the same unit (a file relabeled after it changed, or two runs over the same
inputs): unit ids are content-based, and the tasks keep each unit_id once (the first in read
order, so the newest run's copy; counted in the manifest's `unique unit_id` / `duplicate_units`).
"""

from __future__ import annotations

import datetime as dt
import posixpath
from dataclasses import dataclass

from pipeline import storage

LATEST = "latest"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class LabeledRun:
    run_dir: str
    run_id: str | None
    files: list[str]  # its data Parquet files
    written_at: float  # its manifest's modification time (0: none)


def _mtime(info: dict) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if isinstance(v, dt.datetime):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


def _run(run_dir: str, so: dict | None, require_complete: bool) -> LabeledRun | None:
    manifest = storage.join(run_dir, MANIFEST)
    fs, path = storage.filesystem(manifest, so)
    run_id, written = None, 0.0
    if fs.exists(path):
        try:
            m = storage.read_json(manifest, so)
        except (OSError, ValueError):
            m = {}
        if require_complete and m.get("status") != "complete":
            return None
        run_id, written = m.get("run_id"), _mtime(fs.info(path))
    elif require_complete:
        return None
    try:  # committed parts only: a run resuming or crashed mid-shard is read as far as it committed
        files = storage.run_data_files(run_dir, so)
    except FileNotFoundError:
        files = []
    return LabeledRun(run_dir, run_id, files, written)


def complete_runs(root: str, so: dict | None, pattern: str = "*") -> list[LabeledRun]:
    """Complete runs in the directories matching `<root>/<pattern>`, newest manifest first (ties:
    the later run id first)."""
    fs, path = storage.filesystem(storage.join(root, pattern), so)
    runs = []
    for d in fs.glob(path):
        if posixpath.basename(d.rstrip("/")).startswith((".", "_")) or not fs.isdir(d):
            continue
        run = _run(storage.to_uri(fs, d), so, require_complete=True)
        if run is not None:
            runs.append(run)
    return sorted(runs, key=lambda r: (r.written_at, r.run_id or "", r.run_dir), reverse=True)


def resolve_runs(run: str, so: dict | None = None) -> list[LabeledRun]:
    """The labeled runs `run` names (module docstring), newest first, each with data files.
    FileNotFoundError (naming what was looked for) when there is none."""
    if storage.parquet_files(storage.join(run, "data"), so):
        single = _run(run, so, require_complete=False)
        assert single is not None
        return [single]
    parent, last = posixpath.split(run.rstrip("/")) if storage.is_remote(run) else _split_local(run)
    if last == LATEST:
        runs = [r for r in complete_runs(parent, so) if r.files]
        if not runs:
            raise FileNotFoundError(f"no complete labeled run with data under {parent} (for {run})")
        return runs[:1]
    if any(c in last for c in "*?["):
        runs = [r for r in complete_runs(parent, so, last) if r.files]
        if not runs:
            raise FileNotFoundError(f"no complete labeled run with data matches {run}")
        return runs
    raise FileNotFoundError(
        f"no Parquet files under {storage.join(run, 'data')} (is it a labeled run? "
        f"<root>/latest and <root>/<glob> name runs by their manifests)"
    )


def _split_local(run: str) -> tuple[str, str]:
    import os

    head, tail = os.path.split(run.rstrip(os.sep))
    return head, tail


def run_files(run: str, so: dict | None = None) -> list[str]:
    """Every data file of the runs `run` names, newest run first (the order the tasks' unit_id
    dedupe keeps)."""
    return [f for r in resolve_runs(run, so) for f in r.files]
