"""`--check`: a whole config validated and its inputs tried, before anything starts. No Ray, no model.

The jobs' `--check` flag (jobs.label, jobs.train_heads, jobs.curate) and `jobs.schedule --dry-run`
use this: the config is parsed with every check of the job itself (types, keys, files, backbone),
then each input is listed and its first rows are read through the job's own pure reader
(pipeline.corpus.inspection), and a short summary is printed. Exit 0 when all is well, 2 with one
message listing every problem otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.config_schema import ConfigErrors, format_errors
from pipeline.secrets import scrub

EXIT_OK = 0
EXIT_CONFIG = 2
CHECK_ROWS = 5  # records read per input


@dataclass
class CheckReport:
    kind: str  # labeling | training | curation
    config: str  # the file checked
    lines: list[str] = field(default_factory=list)  # the summary
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        head = f"{self.kind} config {self.config}: " + ("ok" if self.ok else f"{len(self.errors)} error(s)")
        return "\n".join([head, *(f"  {line}" for line in self.lines), *(f"  warning: {w}" for w in self.warnings)])


def _path_of(backbone: dict | str) -> str:
    return backbone if isinstance(backbone, str) else str(backbone.get("path"))


def reachable(key: str, uri: str, storage_options: dict | None) -> list[str]:
    """An output location that cannot even be listed (unreachable store, refused credentials) is an
    error naming its key; one that does not exist yet is fine (the job creates it)."""
    try:
        storage.exists(uri, storage_options)
    except Exception as e:  # noqa: BLE001 - any store error: say which key
        return [scrub(f"{key}: cannot reach {uri}: {type(e).__name__}: {e}")]
    return []


def input_lines(inputs: list[dict], storage_options: dict | None, rows: int = CHECK_ROWS) -> tuple[list, list, list]:
    """(summary lines, errors, warnings) of each input: its files and what its first `rows`
    records became. An input that cannot be read is an error naming it; one whose rows read were
    all quarantined is a warning (the run's max_quarantine_fraction would then fail it)."""
    from pipeline.corpus import InputSpec
    from pipeline.corpus.inspection import inspect_input

    lines: list[str] = []
    errors: list[str] = []
    warnings: list[str] = []
    for i, raw in enumerate(inputs):
        try:
            spec = InputSpec.from_dict({"storage_options": storage_options, **raw})
            r = inspect_input(spec, rows)
        except Exception as e:  # noqa: BLE001 - reported with the input's position
            errors.append(scrub(f"inputs[{i}]: cannot read: {type(e).__name__}: {e}"))
            continue
        path = r["path"] if isinstance(r["path"], str) else ", ".join(r["path"])
        files = r["files"]
        lines.append(
            f"inputs[{i}] {path}: format {r['format']}, source {', '.join(r['sources']) or '-'}, "
            f"{len(files)} file(s) opened; first {r['records_read']} record(s) -> "
            f"{r['rows_ok']} row(s) ok, {r['rows_quarantined']} quarantined"
        )
        if r["records_read"] and not r["rows_ok"]:
            reasons = "; ".join(q["examples"][0]["reason"] for q in r["quarantine"].values() if q["examples"])
            warnings.append(f"inputs[{i}]: every row read was quarantined ({reasons})")
        if r["unused_label_fields"]:
            warnings.append(f"inputs[{i}]: fields that look like labels are never read: {r['unused_label_fields']}")
    return lines, errors, warnings


@storage.probing()
def check_label_config(path: str, overrides: dict | None = None, rows: int = CHECK_ROWS) -> CheckReport:
    from pipeline.labeling.config import load_config

    report = CheckReport("labeling", path)
    try:
        cfg = load_config(path, overrides)
    except ConfigErrors as e:
        report.errors = e.errors
        return report
    m, r = cfg.model, cfg.resources
    model = f"checkpoint {m.armorm_checkpoint}" if m.armorm_checkpoint else f"backbone {_path_of(m.backbone)}"
    heads = f", heads {m.heads}" if m.heads else (", embed-only (no heads)" if not m.armorm_checkpoint else "")
    report.lines.append(f"run {cfg.run_dir}; {model}{heads}")
    report.lines.append(
        f"resources: actors {r.actors}, {r.num_gpus_per_actor} GPU / {r.num_cpus_per_actor} CPU per actor, "
        f"{r.rows_per_shard} rows per shard"
    )
    q = cfg.max_quarantine_fraction
    report.lines.append(f"max_quarantine_fraction: per source {q.per_source}, overall {q.overall}")
    report.errors += reachable("output", cfg.output, cfg.storage_options or None)
    if m.heads and m.train_if_missing:
        train = check_train_config(m.train_if_missing, rows)
        report.lines.append(f"model.train_if_missing {m.train_if_missing}: " + ("ok" if train.ok else "invalid"))
        report.errors += [f"model.train_if_missing ({m.train_if_missing}): {e}" for e in train.errors]
    lines, errors, warnings = input_lines(cfg.inputs, cfg.storage_options or None, rows)
    report.lines += lines
    report.errors += errors
    report.warnings += warnings
    return report


@storage.probing()
def check_train_config(path: str, rows: int = CHECK_ROWS) -> CheckReport:
    from pipeline.training import load_train_config

    report = CheckReport("training", path)
    try:
        cfg = load_train_config(path, check_files=True)
    except ConfigErrors as e:
        report.errors = e.errors
        return report
    report.lines.append(
        f"heads_out {cfg.heads_out}; backbone {_path_of(cfg.backbone)}; embedding run "
        f"{cfg.embedding_run().run_dir}; test_fraction {cfg.test_fraction}"
    )
    for key in ("heads_out", "embeddings_out"):
        report.errors += reachable(key, getattr(cfg, key), cfg.storage_options or None)
    lines, errors, warnings = input_lines(cfg.input_specs(), cfg.storage_options or None, rows)
    report.lines += lines
    report.errors += errors
    report.warnings += warnings
    return report


@storage.probing()
def check_curate_config(path: str, overrides: dict | None = None) -> CheckReport:
    """The curation config, and the labeled run it reads: its data files, rows, and the columns
    the filters need."""
    import pyarrow.parquet as pq

    from pipeline.curation import score_column
    from pipeline.curation.config import load_config
    from pipeline.curation.inputs import run_files
    from pipeline.curation.thresholds import parse_filters

    report = CheckReport("curation", path)
    try:
        cfg = load_config(path, overrides)  # score_column against the run's files (type, values) included
    except ConfigErrors as e:
        report.errors = e.errors
        return report
    so = cfg.storage_options or None
    files = run_files(cfg.run, so)  # the files the job reads: one run, <root>/latest or a glob of runs
    rows, columns = 0, set()
    for uri in files:
        fs, p = storage.filesystem(uri, so)
        with fs.open(p, "rb") as fh:
            meta = pq.ParquetFile(fh)
            rows += meta.metadata.num_rows
            columns |= set(score_column.presented_schema(meta.schema_arrow, cfg.score_column).names)
    report.lines.append(f"task {cfg.task}: run {cfg.run} ({len(files)} data file(s), {rows} unit(s)) -> {cfg.output}")
    if cfg.score_column != score_column.SCORE:
        report.lines.append(f"score_column: {cfg.score_column} (read as `score` by every rule and output)")
    report.errors += reachable("output", cfg.output, so)
    for i, f in enumerate(parse_filters(cfg.filters)):
        if f.column not in columns:
            report.errors.append(
                f"filters[{i}]: column {f.column!r} is not in the run (its columns: {', '.join(sorted(columns))})"
            )
        else:
            report.lines.append(f"filters[{i}]: {f.label}")
    return report


def finish(report: CheckReport, out: Any = None, err: Any = None) -> int:
    """Print the summary (stdout) and the errors (stderr, one message); the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    print(scrub(report.render()), file=out)
    if report.errors:
        print(scrub(f"config error: {format_errors(report.errors)}"), file=err)
        return EXIT_CONFIG
    return EXIT_OK
