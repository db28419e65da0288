"""Which column of a run curation ranks by: `score_column` (default `score`), shown to the tasks as `score`.

A run labeled with heads has `score`; a run labeled with reward models carries `rm_<name>` columns
(float32, nullable) beside or instead of it, and its `score` may be all null or absent. Every task
ranks by the one column the config names: the job reads that column from the run and presents it
under the name `score` at the two places the run is read (the scatter and the read-back in
pipeline.curation.job), so the task logic is the same code whatever the column: pair margins and
flips, best-of-N picks, SFT `one_per_prompt`, rerank order, agreement with human ranks, and the
calibrate task's `score` map and temperature.

With a column other than `score`:
- the run's own `score` is not read. `score` in filters and in the outputs (`score`, `score_chosen`,
  `score_rejected`, `score_margin`, `p_chosen`) holds the chosen column's values; the outputs do not
  repeat it under its own name (a file keeps one meaning of `score`; the manifest's `score_column`
  says which column it was). A filter may still name the column itself (`column: rm_x`).
- the ensemble-only keys (`sft.order` / `rerank.order` `conservative` or `ensemble_min`,
  `pairs.min_margin_uncertainty`) are refused: score_mean, score_std and score_min describe the heads'
  ensemble, not that column.
- a `calibration` file is used only when it was fitted with the same score_column (the calibrate task
  records it; a file without the key was fitted on `score`).

Refused as config errors naming `score_column` and the run, before any work (the config check that
both `--check` and the job run): a run without the column, a column that is not numeric, and a column
that holds no value in the data the task reads.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

SCORE = "score"
DEFAULT = SCORE
REWARD_PREFIX = "rm_"  # reward-model score columns of a run: rm_<name>
ENSEMBLE_ORDERS = ("conservative", "ensemble_min")


def presented_schema(run_schema: pa.Schema, score_column: str) -> pa.Schema:
    """The run's schema as the tasks see it: score_column's field under the name `score` (the run's
    own `score` left out); the column also keeps its own name (a filter may name it)."""
    if score_column == SCORE or score_column not in run_schema.names:
        return run_schema
    fields = [f for f in run_schema if f.name != SCORE]
    return pa.schema([*fields, run_schema.field(score_column).with_name(SCORE)], metadata=run_schema.metadata)


def source_columns(columns: list[str], score_column: str) -> list[str]:
    """The run columns to read for `columns` as the tasks name them: `score` is read from score_column."""
    out: list[str] = []
    for c in columns:
        c = score_column if c == SCORE else c
        if c not in out:
            out.append(c)
    return out


def present(table: pa.Table, columns: list[str], score_column: str) -> pa.Table:
    """A table read with source_columns(columns) as the tasks name it: exactly `columns`, in that
    order, `score` holding score_column's values."""
    if score_column == SCORE:
        return table
    return pa.Table.from_arrays([table.column(score_column if c == SCORE else c) for c in columns], names=list(columns))


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _reward_columns(names) -> str:
    cols = [n for n in names if n == SCORE or n.startswith(REWARD_PREFIX)]
    return ", ".join(cols) if cols else "none"


def uses_score(cfg) -> bool:
    """Whether the config's task reads the score at all (calibrate may fit other columns only)."""
    if cfg.task != "calibrate":
        return True
    c = cfg.calibrate
    return bool(c.fit_temperature) or c.columns is None or SCORE in c.columns


def key_errors(cfg) -> list[str]:
    """The keys that cannot go with a score_column other than `score` (no run needed)."""
    sc = cfg.score_column
    if sc == SCORE:
        return []
    why = (
        f"ranks by the heads' ensemble (score_mean, score_std, score_min), which does not describe score_column {sc!r}"
    )
    errors = []
    if cfg.task == "sft" and cfg.sft.one_per_prompt and cfg.sft.order in ENSEMBLE_ORDERS:
        errors.append(f"sft.order: {cfg.sft.order!r} {why}; use order: score (the chosen column)")
    if cfg.task == "rerank" and cfg.rerank.order in ENSEMBLE_ORDERS:
        errors.append(f"rerank.order: {cfg.rerank.order!r} {why}; use order: score (the chosen column)")
    if cfg.task == "dpo" and cfg.pairs.min_margin_uncertainty:
        errors.append(f"pairs.min_margin_uncertainty: uses score_std, the spread of the heads' ensemble, not of {sc!r}")
    return errors


def calibration_errors(cfg, calibration: dict) -> list[str]:
    """A calibration applied to the chosen column must have been fitted on it."""
    fitted = calibration.get("score_column", DEFAULT)
    if cfg.task == "calibrate" or fitted == cfg.score_column:
        return []
    return [
        f"calibration: {cfg.calibration} was fitted with score_column {fitted!r} (its score map and temperature "
        f"describe that column), but this config's score_column is {cfg.score_column!r}"
    ]


def _has_value(pf: pq.ParquetFile, column: str) -> bool:
    """Whether any row of the file holds a value of the (flat) column: from the row groups' null
    counts where the writer kept statistics, else by reading that column of the row group."""
    meta = pf.metadata
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        if not rg.num_rows:
            continue
        chunk = next((rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == column), None)
        stats = chunk.statistics if chunk is not None and chunk.is_stats_set else None
        if stats is not None and stats.has_null_count:
            if stats.null_count < rg.num_rows:
                return True
        elif pf.read_row_group(g, columns=[column]).column(0).null_count < rg.num_rows:
            return True
    return False


def run_errors(cfg, runs, storage_options: dict | None) -> list[str]:
    """score_column against the runs the config reads (pipeline.curation.inputs.LabeledRun): every
    run has it, numeric, and it holds at least one value. Reads the files' footers (and a column
    chunk only where a writer kept no statistics)."""
    if not uses_score(cfg):
        return []
    sc = cfg.score_column
    errors: list[str] = []
    found, units = False, 0
    for run in runs:
        for uri in run.files:
            fs, path = storage.filesystem(uri, storage_options)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                if sc not in names:
                    errors.append(
                        f"score_column: the run {run.run_dir} has no column {sc!r} ({uri}; its score and "
                        f"reward-model columns: {_reward_columns(names)})"
                    )
                    break
                t = pf.schema_arrow.field(sc).type
                if not _numeric(t):
                    errors.append(f"score_column: column {sc!r} of the run {run.run_dir} is {t}, not numeric ({uri})")
                    break
                units += pf.metadata.num_rows
                found = found or _has_value(pf, sc)
    if not errors and not found:
        errors.append(
            f"score_column: column {sc!r} holds no value in the run {cfg.run} (all {units} unit(s) are null); "
            "name a column that was scored (`rm_<name>` for a reward model)"
        )
    return errors
