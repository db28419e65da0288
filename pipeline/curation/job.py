"""The curation job's driver on Ray: a shuffle of a labeled run through files, one task per output file.

1. Scatter: Ray tasks read slices of the run (row groups, projected to the columns the task needs;
   never the embeddings) in batches and append each unit to the fragment of its partition,
   partition = stable_hash(prompt_id) mod P, as Arrow IPC files under a scratch directory. The
   number of partitions P follows the data (`partition_rows` units each, at least one per output
   file), not the number of output files; no task ever holds more than one batch. The same pass
   returns every value of the columns that quantile filters need, so whole-run cut-offs are exact.
2. Each partition holds whole prompts (every unit of a prompt, across input files and nodes), so
   the task's pure function (pipeline.curation.tasks) sees whole best-of-N groups and preference
   rows; partitions are taken one after another, so the peak memory of a task is that of one
   partition, whatever the size of the run.
   - dpo (run_pairs_task): the fragments carry every column the pairs need; one gather task per
     output file builds the pairs of its partitions.
   - sft, rerank (run_unit_task): the fragments carry only what the selection reads plus each
     unit's position in the run; the selection writes a plan, the output columns (texts, ratings)
     of the selected units are read back from the run slice by slice, and one task per output
     file writes them in order. The text columns are read once and never shuffled whole.
3. Each output file `data/train-<k>-of-<n>.parquet` (the name `datasets` maps to a `train` split)
   is written atomically, its partitions' rows in partition order, each sorted by a stable key: a
   rerun rewrites the same files with the same bytes, and files of an earlier run with another
   layout are removed. The per-partition counts are summed into `<output>/manifest.json`.
"""

from __future__ import annotations

import math
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline import schema, storage
from pipeline.curation import calibration as cal
from pipeline.curation import score_column as sc
from pipeline.curation import uncertainty
from pipeline.curation.config import CurateConfig
from pipeline.curation.inputs import resolve_runs, run_files
from pipeline.curation.pairs import human_pair_margins, merge_counts
from pipeline.curation.rerank import Agreement
from pipeline.curation.tasks import (
    RERANK_OUTPUT_COLUMNS,
    RERANK_SELECT_COLUMNS,
    SFT_OUTPUT_COLUMNS,
    SFT_SELECT_COLUMNS,
    UnitSelection,
    build_dpo,
    rating_columns,
    rerank_rows,
    rerank_selection,
    sft_rows,
    sft_selection,
)
from pipeline.curation.thresholds import Filter, columns_to_fit, merge_filter_counts, parse_filters, resolve_filters
from pipeline.curation.uncertainty import CONSERVATIVE, read_columns, with_conservative
from pipeline.runtime import init_ray
from pipeline.secrets import scrub

MANIFEST = "manifest.json"
SLICE_PARTITIONS = 8  # a scatter task reads up to this many partitions' worth of units
BATCH_ROWS = 50_000  # ... in batches of at most this many units
SPLIT = "train"
# Position columns of the unit tasks' shuffle (see run_unit_task); never written to an output.
POS_SLICE, POS_ROW, POS_PART, POS_OUT = "__slice", "__row", "__partition", "__position"
# Arrow's bundled mimalloc commits each new arena eagerly by default. On the 2-core VM of
# BENCHMARKS.md, taking and building 75 % of 400,000 units spent 6.6-9.3 s in the kernel against
# 1 s of user time; with arenas committed on demand, 0.8-1.1 s (same user time, same peak RSS), and
# the 0.8M-unit sft read-back went from 13.5 s to 3.3-4.2 s.
# Set for the workers of an embedded Ray (see pipeline.runtime.init_ray); a cluster sets it itself.
WORKER_ENV = {"MIMALLOC_ARENA_EAGER_COMMIT": "0"}
# Uncompressed: fragments live a few seconds on local or cluster scratch; lz4 cost more CPU than it saved I/O.
IPC_OPTIONS = ipc.IpcWriteOptions(compression=None)


def _say(msg: str) -> None:
    print(scrub(f"[curate] {msg}"), flush=True)


def output_name(k: int, n: int) -> str:
    return f"{SPLIT}-{k:05d}-of-{n:05d}.parquet"


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def stable_hash(keys) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes, computed over the Arrow buffers one byte position at
    a time (a loop over key length, not over rows). Stable across processes, machines and versions."""
    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    arr = arr.cast(pa.large_string())
    n = len(arr)
    if arr.null_count:
        raise ValueError("stable_hash: null key")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(int(lengths.max()) if n else 0):
            live = np.flatnonzero(lengths > k)
            h[live] = (h[live] ^ data[starts[live] + k].astype(np.uint64)) * _FNV_PRIME
    return h


def partition_of(keys, n: int) -> np.ndarray:
    return (stable_hash(keys) % np.uint64(n)).astype(np.int64)


def run_schema(files: list[str], storage_options: dict | None) -> pa.Schema:
    fs, path = storage.filesystem(files[0], storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def task_schema(cfg: CurateConfig, files: list[str]) -> pa.Schema:
    """The run's schema as the tasks see it: cfg.score_column under the name `score`
    (pipeline.curation.score_column)."""
    return sc.presented_schema(run_schema(files, cfg.storage_options or None), cfg.score_column)


def plan_slices(files: list[str], storage_options: dict | None, rows_per_slice: int) -> tuple[list[tuple], int]:
    """Slices of the run for the scatter tasks: (file, [row groups]) of about rows_per_slice units,
    from the Parquet footers (no data read). Returns the slices and the run's number of units."""
    slices, total = [], 0
    for uri in files:
        fs, path = storage.filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        groups, rows = [], 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= rows_per_slice:
                slices.append((uri, groups))
                groups, rows = [], 0
        if groups:
            slices.append((uri, groups))
        total += meta.num_rows
    return slices, total


def partition_layout(total_units: int, partition_rows: int, output_files: int | None) -> tuple[int, int]:
    """(partitions, output files): partitions of at most about partition_rows units, a whole number of
    them per output file (output_files None: one file per partition)."""
    needed = max(1, math.ceil(total_units / partition_rows))
    files = output_files or needed
    return files * math.ceil(needed / files), files


def _fragment_uri(scratch: str, partition: int, slice_id: int) -> str:
    return storage.join(scratch, f"p-{partition:05d}", f"s-{slice_id:06d}.arrow")


class Fragments:
    """The IPC fragments one task appends to: one stream per partition, opened on its first table."""

    def __init__(self, uri_of: Callable[[int], str], storage_options: dict | None):
        self.uri_of, self.storage_options = uri_of, storage_options
        self.writers: dict[int, tuple] = {}

    def write(self, partition: int, table: pa.Table) -> None:
        if partition not in self.writers:
            fs, path = storage.filesystem(self.uri_of(partition), self.storage_options)
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            sink = fs.open(path, "wb")
            self.writers[partition] = (sink, ipc.new_stream(sink, table.schema, options=IPC_OPTIONS))
        self.writers[partition][1].write_table(table)

    def __enter__(self) -> Fragments:
        return self

    def __exit__(self, *exc) -> None:
        for sink, writer in self.writers.values():
            writer.close()
            sink.close()


@dataclass(frozen=True)
class Scatter:
    """What every scatter task of one run shares."""

    columns: list[str]  # read from the run
    key: str  # partition = stable_hash(key) mod partitions
    partitions: int
    scratch: str
    batch_rows: int
    fit_columns: list[str]  # whole-run values returned for the quantile filters
    storage_options: dict | None
    positions: bool = False  # add each unit's slice and row in its slice (POS_SLICE, POS_ROW)
    conservative_lambda: float = 1.0  # λ of score_conservative, when a quantile filter needs its values
    score_column: str = sc.DEFAULT  # the run's column read as `score` (pipeline.curation.score_column)


def scatter_slice(uri: str, row_groups: list[int], slice_id: int, spec: Scatter) -> dict:
    """Scatter one slice: each batch is split by partition and appended to that partition's fragment
    of this slice. With `spec.positions`, each unit also carries its slice and its row within the
    slice, so that its other columns can be read back from the run later. Returns the rows read and
    the fit columns' values."""
    fs, path = storage.filesystem(uri, spec.storage_options)
    values: dict[str, list[np.ndarray]] = {c: [] for c in spec.fit_columns}
    rows = 0
    with (
        fs.open(path, "rb") as f,
        Fragments(lambda p: _fragment_uri(spec.scratch, p, slice_id), spec.storage_options) as out,
    ):
        read = sc.source_columns(spec.columns, spec.score_column)  # score_column for `score`
        for batch in pq.ParquetFile(f).iter_batches(batch_size=spec.batch_rows, row_groups=row_groups, columns=read):
            table = sc.present(pa.Table.from_batches([batch]), spec.columns, spec.score_column)
            if spec.positions:
                table = table.append_column(POS_SLICE, pa.array(np.full(table.num_rows, slice_id, np.int32)))
                table = table.append_column(POS_ROW, pa.array(np.arange(rows, rows + table.num_rows)))
            rows += table.num_rows
            for c in spec.fit_columns:
                if c == CONSERVATIVE:  # derived: score_mean − λ·score_std (the tasks derive it the same way)
                    values[c].append(with_conservative(table, spec.conservative_lambda).column(c).to_numpy(False))
                    continue
                values[c].append(pc.cast(table.column(c), pa.float64()).to_numpy(zero_copy_only=False))
            for p, part in _split_by(table, partition_of(table.column(spec.key), spec.partitions)):
                out.write(p, part)
    return {"rows": rows, "values": {c: np.concatenate(v) if v else np.zeros(0) for c, v in values.items()}}


def _runs(sorted_key: np.ndarray):
    """(value, start, end) of each run of equal values in a sorted integer key."""
    if not len(sorted_key):
        return
    bounds = np.flatnonzero(np.diff(sorted_key)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(sorted_key)]):
        yield int(sorted_key[lo]), int(lo), int(hi)


def _split_by(table: pa.Table, key: np.ndarray):
    """(value, sub-table) for each value of an integer key (one per row), in value order; rows keep
    their order within a value."""
    order = np.argsort(key, kind="stable")
    table = table.take(pa.array(order))
    for value, lo, hi in _runs(key[order]):
        yield value, table.slice(lo, hi - lo)


def read_partition(scratch: str, partition: int, storage_options: dict | None, schema_: pa.Schema) -> pa.Table:
    """Every fragment of one partition (in slice order), as one table."""
    tables = []
    for uri in storage.list_files(storage.join(scratch, f"p-{partition:05d}"), storage_options):
        fs, path = storage.filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            tables.append(ipc.open_stream(f).read_all())
    return pa.concat_tables(tables, promote_options="default") if tables else schema_.empty_table()


def task_fn(cfg: CurateConfig, filters: list[Filter], calibration: dict | None):
    """The pairs task's pure function of one partition: table -> (output table, counts)."""
    if cfg.task == "dpo":
        temperature = calibration["temperature"] if calibration else 1.0
        lam = float(cfg.conservative_lambda)
        return lambda units: build_dpo(units, filters, cfg.pairs.rules(), temperature, cfg.pairs.reward_margin, lam)
    raise ValueError(f"task {cfg.task!r} has no per-partition step")


def gather_file(
    k: int,
    n_files: int,
    partitions: list[int],
    cfg: CurateConfig,
    filters: list[Filter],
    calibration: dict | None,
    scratch: str,
    in_schema: pa.Schema,
    out_dir: str,
) -> dict:
    """Output file k: its partitions one at a time through the task function; results are staged in
    scratch (so only one partition is ever in memory), then streamed into the Parquet file."""
    so = cfg.storage_options or None
    fn = task_fn(cfg, filters, calibration)
    counts, staged, out_schema, rows = [], [], None, 0
    for p in partitions:
        table, c = fn(read_partition(scratch, p, so, in_schema))
        counts.append(c)
        if table.num_rows and len(partitions) > 1:
            uri = storage.join(scratch, "out", f"r-{p:05d}.arrow")
            storage.write_atomic(uri, partial(_write_ipc, table=table), so)
            staged.append(uri)
        if table.num_rows:
            out_schema, rows = table.schema, rows + table.num_rows
        if len(partitions) > 1:
            del table  # one partition in memory at a time
    name = output_name(k, n_files)
    if rows and len(partitions) == 1:
        # One partition per file (the default layout): its table is still in memory, write it directly.
        storage.write_atomic(storage.join(out_dir, name), lambda f: pq.write_table(table, f, compression="zstd"), so)
    elif rows:

        def write(f):
            with pq.ParquetWriter(f, out_schema, compression="zstd") as writer:
                for uri in staged:
                    sfs, spath = storage.filesystem(uri, so)
                    with sfs.open(spath, "rb") as s:
                        writer.write_table(ipc.open_stream(s).read_all())

        storage.write_atomic(storage.join(out_dir, name), write, so)
    return {"file": name if rows else None, "counts": counts}


def _write_ipc(f, table: pa.Table) -> None:
    with ipc.new_stream(f, table.schema, options=IPC_OPTIONS) as w:
        w.write_table(table)


def shuffle(
    cfg: CurateConfig,
    files: list[str],
    columns: list[str],
    key: str,
    fit_columns: list[str],
    scratch: str,
    output_files: int | None,
    positions: bool = False,
) -> dict:
    """The scatter pass over the whole run; returns the layout, the slices and the fit columns'
    whole-run values."""
    import ray

    so = cfg.storage_options or None
    # Scatter tasks stream their slice in batches, so a slice can be larger than a partition: fewer
    # slices keep the number of fragments (slices x partitions) down on big runs.
    slices, total = plan_slices(files, so, SLICE_PARTITIONS * cfg.partition_rows)
    partitions, n_files = partition_layout(total, cfg.partition_rows, output_files)
    storage.remove(scratch, so)
    t0 = time.time()
    spec = Scatter(
        columns,
        key,
        partitions,
        scratch,
        min(cfg.partition_rows, BATCH_ROWS),
        fit_columns,
        so,
        positions,
        float(cfg.conservative_lambda),
        cfg.score_column,
    )
    task = ray.remote(num_cpus=1)(scatter_slice)
    refs = [task.remote(uri, groups, i, spec) for i, (uri, groups) in enumerate(slices)]
    results = ray.get(refs)
    values = {c: np.concatenate([r["values"][c] for r in results]) if results else np.zeros(0) for c in fit_columns}
    _say(
        f"scattered {total} units from {len(slices)} slice(s) into {partitions} partition(s) "
        f"in {time.time() - t0:.1f} s"
    )
    return {"partitions": partitions, "files": n_files, "units": total, "values": values, "slices": slices}


# Columns each task reads besides the filter columns (the rest of a run is never read). dpo reads
# them all in its shuffle; sft and rerank shuffle only what their selection reads and read the
# output columns back from the run for the selected units (run_unit_task).
DPO_COLUMNS = [
    "unit_id",
    "row_id",
    "prompt_id",
    "kind",
    "source",
    "prompt",
    "response",
    "response_index",
    "preference",
    "tie",
    "human_rank",
    "score",
    "score_std",  # pairs.min_margin_uncertainty (read when the run has it)
]
UNIT_TASKS = {
    # task: (selection columns, output columns, output rows builder)
    "sft": (SFT_SELECT_COLUMNS, SFT_OUTPUT_COLUMNS, sft_rows),
    "rerank": (RERANK_SELECT_COLUMNS, RERANK_OUTPUT_COLUMNS, rerank_rows),
}


def _present(names: list[str], wanted) -> list[str]:
    """The wanted columns that the run has, in the run's order (a missing filter column is reported
    by the filter step)."""
    wanted = set(wanted)
    return [n for n in names if n in wanted]


def task_columns(task: str, names: list[str], filters: list[Filter]) -> tuple[list[str], list[str]]:
    """(the columns the shuffle carries, the columns read back for the output; [] for dpo): a task's
    own, every filtered column, and the per-objective ratings that sft and rerank carry."""
    filtered = read_columns({f.column for f in filters})  # score_conservative: its score_mean, score_std
    if task == "dpo":
        return _present(names, set(DPO_COLUMNS) | filtered), []
    select, output, _ = UNIT_TASKS[task]
    return _present(names, set(select) | filtered), _present(names, set(output) | set(rating_columns(names)))


def unit_selection_fn(cfg: CurateConfig, filters: list[Filter]):
    """The unit task's selection over one partition of light columns: table -> UnitSelection."""
    if cfg.task == "sft":
        s = cfg.sft
        lam = float(cfg.conservative_lambda)
        return lambda units: sft_selection(
            units, filters, s.one_per_prompt, s.kinds, s.exclude_human_rejected, s.order, lam
        )
    if cfg.task == "rerank":
        r, lam = cfg.rerank, float(cfg.conservative_lambda)
        return lambda units: rerank_selection(units, filters, r.top_k, r.kinds, r.order, lam)
    raise ValueError(f"task {cfg.task!r} is not a unit task")


def _plan_uri(scratch: str, slice_id: int, partition: int) -> str:
    return storage.join(scratch, "plan", f"s-{slice_id:06d}", f"p-{partition:05d}.arrow")


def _rows_uri(scratch: str, partition: int, slice_id: int) -> str:
    return storage.join(scratch, "rows", f"p-{partition:05d}", f"s-{slice_id:06d}.arrow")


def select_units(
    partitions: list[int], cfg: CurateConfig, filters: list[Filter], scratch: str, light_schema: pa.Schema
) -> list[dict]:
    """Unit tasks, step 2: the selection of each partition (one at a time) on its light columns. The
    selected units' positions, output order and computed columns are written as a plan per (slice,
    partition) for the read-back step. Returns each partition's counts."""
    so = cfg.storage_options or None
    select = unit_selection_fn(cfg, filters)
    counts = []
    for p in partitions:
        units = read_partition(scratch, p, so, light_schema)
        sel: UnitSelection = select(units)
        counts.append(sel.counts)
        if not len(sel.rows):
            continue
        take = pa.array(sel.rows)
        plan = pa.table(
            {
                POS_SLICE: units.column(POS_SLICE).take(take),
                POS_ROW: units.column(POS_ROW).take(take),
                POS_PART: pa.array(np.full(len(sel.rows), p, np.int32)),
                POS_OUT: pa.array(np.arange(len(sel.rows), dtype=np.int64)),
                **{c: pa.array(v) for c, v in sel.computed.items()},
            }
        )
        for s, part in _split_by(plan, plan.column(POS_SLICE).to_numpy()):
            storage.write_atomic(_plan_uri(scratch, s, p), partial(_write_ipc, table=part), so)
    return counts


def read_back_slice(
    uri: str,
    row_groups: list[int],
    slice_id: int,
    output_columns: list[str],
    cfg: CurateConfig,
    calibration: dict | None,
    scratch: str,
) -> int:
    """Unit tasks, step 3: the output columns of this slice's selected units, read from the run (only
    the row groups holding one), built into output rows batch by batch and appended to the fragment
    of their partition. Returns the rows written."""
    so = cfg.storage_options or None
    plans = [_read_ipc(u, so) for u in storage.list_files(storage.join(scratch, "plan", f"s-{slice_id:06d}"), so)]
    if not plans:
        return 0
    plan = pa.concat_tables(plans)
    plan = plan.take(pc.sort_indices(plan, [(POS_ROW, "ascending")]))
    want = plan.column(POS_ROW).to_numpy()
    plan_part = plan.column(POS_PART).to_numpy()
    computed = [c for c in plan.column_names if c not in (POS_SLICE, POS_ROW, POS_PART, POS_OUT)]
    build = UNIT_TASKS[cfg.task][2]
    fs, path = storage.filesystem(uri, so)
    written = 0
    with fs.open(path, "rb") as f, Fragments(lambda p: _rows_uri(scratch, p, slice_id), so) as out:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(g).num_rows for g in row_groups]
        starts = np.r_[0, np.cumsum(sizes)]  # row in the slice of each row group's first row
        for g, start, end in zip(row_groups, starts[:-1], starts[1:]):
            if np.searchsorted(want, start) == np.searchsorted(want, end):
                continue  # no selected unit in this row group: not read
            lo = start
            read = sc.source_columns(output_columns, cfg.score_column)
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=read):
                hi = lo + batch.num_rows
                a, b = np.searchsorted(want, [lo, hi])
                # The batch's selected units grouped by partition, so that one take builds them all.
                by_part = np.argsort(plan_part[a:b], kind="stable")
                sub = plan.slice(a, b - a).take(pa.array(by_part))
                table = sc.present(pa.Table.from_batches([batch]), output_columns, cfg.score_column)
                rows = build(
                    table.take(pa.array(want[a:b][by_part] - lo)),
                    {c: sub.column(c).to_numpy() for c in computed},
                    calibration,
                ).append_column(POS_OUT, sub.column(POS_OUT))
                for p, i, j in _runs(plan_part[a:b][by_part]):
                    out.write(p, rows.slice(i, j - i))
                    written += j - i
                lo = hi
    return written


def write_unit_file(k: int, n_files: int, partitions: list[int], scratch: str, out_dir: str, so: dict | None) -> str:
    """Unit tasks, step 4: output file k, its partitions' rows in partition order, each in the order
    its selection gave (one partition in memory at a time)."""
    name = output_name(k, n_files)

    def write(f):
        writer = None
        for p in partitions:
            frags = [_read_ipc(u, so) for u in storage.list_files(storage.join(scratch, "rows", f"p-{p:05d}"), so)]
            if not frags:
                continue
            table = pa.concat_tables(frags)
            order = np.empty(table.num_rows, dtype=np.int64)
            order[table.column(POS_OUT).to_numpy()] = np.arange(table.num_rows)
            table = table.take(pa.array(order)).drop_columns([POS_OUT])
            if writer is None:
                writer = pq.ParquetWriter(f, table.schema, compression="zstd")
            writer.write_table(table)
            del table, frags
        if writer is not None:
            writer.close()

    storage.write_atomic(storage.join(out_dir, name), write, so)
    return name


def _read_ipc(uri: str, so: dict | None) -> pa.Table:
    fs, path = storage.filesystem(uri, so)
    with fs.open(path, "rb") as f:
        return ipc.open_stream(f).read_all()


def run_unit_task(
    cfg: CurateConfig,
    files: list[str],
    names: list[str],
    filters: list[Filter],
    calibration: dict | None,
    scratch: str,
    out_dir: str,
) -> tuple[list[dict], list[str], dict]:
    """sft and rerank: write only selected units, so the shuffle carries just what the selection reads.

    1. scatter the light columns (ids, kind, preference, score, filter columns) with each unit's
       position (slice, row) in the run;
    2. select per partition -> a plan: the chosen units' positions, output order, computed columns;
    3. per slice, read the output columns (texts, ratings) of the chosen units back from the run,
       build their output rows and append them to their partition's fragment;
    4. per output file, its partitions' rows in order.
    The heavy text columns are read once and written once per selected unit, never shuffled whole.
    Returns (per-partition counts, written file names, layout)."""
    import ray

    so = cfg.storage_options or None
    select_cols, output_cols = task_columns(cfg.task, names, filters)
    in_schema = task_schema(cfg, files)
    light_schema = pa.schema(
        [in_schema.field(c) for c in select_cols] + [pa.field(POS_SLICE, pa.int32()), pa.field(POS_ROW, pa.int64())]
    )
    layout = shuffle(cfg, files, select_cols, "prompt_id", columns_to_fit(filters), scratch, cfg.output_files, True)
    if layout["values"]:
        _say(f"whole-run quantiles of {sorted(layout['values'])}")
        filters = resolve_filters(filters, layout["values"])
    n_files, per_file = layout["files"], layout["partitions"] // layout["files"]
    groups = [list(range(k * per_file, (k + 1) * per_file)) for k in range(n_files)]
    t1 = time.time()
    select = ray.remote(num_cpus=1)(select_units)
    counts_per_file = ray.get([select.remote(g, cfg, filters, scratch, light_schema) for g in groups])
    t2 = time.time()
    read_back = ray.remote(num_cpus=1)(read_back_slice)
    ray.get(
        [
            read_back.remote(uri, rgs, i, output_cols, cfg, calibration, scratch)
            for i, (uri, rgs) in enumerate(layout["slices"])
        ]
    )
    t3 = time.time()
    write = ray.remote(num_cpus=1)(write_unit_file)
    todo = [k for k in range(n_files) if sum(c["rows_out"] for c in counts_per_file[k])]
    written = ray.get([write.remote(k, n_files, groups[k], scratch, out_dir, so) for k in todo])
    _say(
        f"{cfg.task} on {layout['partitions']} partition(s) -> {len(written)} file(s): selection "
        f"{t2 - t1:.1f} s, read back {t3 - t2:.1f} s, write {time.time() - t3:.1f} s"
    )
    layout["resolved_filters"] = filters
    return [c for cs in counts_per_file for c in cs], written, layout


def _scratch(cfg: CurateConfig) -> str:
    return cfg.scratch or (cfg.output + ".shuffle" if cfg.task == "calibrate" else storage.join(cfg.output, "_shuffle"))


def merge_bucket_counts(counts: list[dict]) -> dict:
    out = {
        "rows_in": sum(c["rows_in"] for c in counts),
        "rows_out": sum(c["rows_out"] for c in counts),
        "filters": merge_filter_counts([c["filters"] for c in counts]),
    }
    if any("selection" in c for c in counts):
        out["selection"] = merge_filter_counts([c.get("selection", []) for c in counts])
    if any("one_per_prompt_removed" in c for c in counts):
        out["one_per_prompt_removed"] = sum(c.get("one_per_prompt_removed", 0) for c in counts)
    if any("pairs" in c for c in counts):
        out["pairs"] = {
            origin: merge_counts([c["pairs"][origin] for c in counts]) for origin in ("best_of_n", "preference")
        }
    if any("agreement" in c for c in counts):
        total = Agreement()
        for c in counts:
            total.add(Agreement.from_dict(c["agreement"]))
        out["agreement"] = total.to_dict()
        out["prompts"] = sum(c["prompts"] for c in counts)
    if any("agreement_by_order" in c for c in counts):  # rerank.order other than score
        by_order = Agreement()
        for c in counts:
            by_order.add(Agreement.from_dict(c["agreement_by_order"]))
        out["order"] = next(c["order"] for c in counts if "order" in c)
        out["agreement_by_order"] = by_order.to_dict()
        out["top1_changed"] = sum(c.get("top1_changed", 0) for c in counts)
    return out


def _base_manifest(cfg: CurateConfig, files: list[str], t0: float) -> dict:
    so = cfg.storage_options or None
    runs = resolve_runs(cfg.run, so)
    return {
        "task": cfg.task,
        "status": "complete",
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "score_column": cfg.score_column,  # the run's column the tasks read as `score`
        "run": cfg.run,
        "run_id": runs[0].run_id,  # the newest run read (the only one for a run directory)
        "runs": [{"run_dir": r.run_dir, "run_id": r.run_id, "files": len(r.files)} for r in runs],
        "input_files": files,
        "versions": storage.versions(),
        "wall_time_s": round(time.time() - t0, 3),
    }


def write_manifest(uri: str, man: dict, storage_options: dict | None) -> None:
    """Every manifest this job writes goes through here."""
    storage.write_json(uri, man, storage_options)


def run_pairs_task(
    cfg: CurateConfig,
    files: list[str],
    names: list[str],
    filters: list[Filter],
    calibration: dict | None,
    scratch: str,
    out_dir: str,
) -> tuple[list[dict], list[str], dict]:
    """dpo: the shuffle carries every column the pairs need (their rules compare response texts); one
    gather task per output file. Returns (per-partition counts, written file names, layout)."""
    import ray

    columns, _ = task_columns(cfg.task, names, filters)
    in_schema = task_schema(cfg, files)
    in_schema = pa.schema([in_schema.field(c) for c in columns])
    layout = shuffle(cfg, files, columns, "prompt_id", columns_to_fit(filters), scratch, cfg.output_files)
    if layout["values"]:
        _say(f"whole-run quantiles of {sorted(layout['values'])}")
        filters = resolve_filters(filters, layout["values"])
    n_files, per_file = layout["files"], layout["partitions"] // layout["files"]
    t1 = time.time()
    task = ray.remote(num_cpus=1)(gather_file)
    summaries = ray.get(
        [
            task.remote(
                k,
                n_files,
                list(range(k * per_file, (k + 1) * per_file)),
                cfg,
                filters,
                calibration,
                scratch,
                in_schema,
                out_dir,
            )
            for k in range(n_files)
        ]
    )
    _say(f"{cfg.task} on {layout['partitions']} partition(s) -> {n_files} file(s) in {time.time() - t1:.1f} s")
    layout["resolved_filters"] = filters
    return [c for s in summaries for c in s["counts"]], [s["file"] for s in summaries if s["file"]], layout


def run(cfg: CurateConfig) -> dict:
    """Run one curation task; returns its manifest (also written next to the output)."""
    t0 = time.time()
    init_ray(cfg.ray_address, worker_env=WORKER_ENV)
    _say(f"ray ready in {time.time() - t0:.1f} s")
    so = cfg.storage_options or None
    files = run_files(cfg.run, so)  # one run, tonight's (<root>/latest) or several nights, newest first
    if cfg.task == "calibrate":
        return run_calibrate(cfg, files, t0)

    filters = parse_filters(cfg.filters)
    uncertainty.check(cfg, run_schema(files, so).names)  # the ensemble keys against the run's columns
    calibration = cal.load(cfg.calibration, so) if cfg.calibration else None

    # A manifest left by an earlier run would describe files this run is about to replace.
    storage.remove(storage.join(cfg.output, MANIFEST), so)
    out_dir = storage.join(cfg.output, "data")
    scratch = _scratch(cfg)
    names = task_schema(cfg, files).names  # score_column shown as `score`
    run_task = run_unit_task if cfg.task in UNIT_TASKS else run_pairs_task
    try:
        counts_per_partition, written, layout = run_task(cfg, files, names, filters, calibration, scratch, out_dir)
    finally:
        storage.remove(scratch, so)
    written = sorted(written)
    stale = [u for u in storage.list_files(out_dir, so) if posixpath.basename(u) not in set(written)]
    for uri in stale:
        storage.remove(uri, so)
    counts = merge_bucket_counts(counts_per_partition)
    man = {
        **_base_manifest(cfg, files, t0),
        **counts,
        "resolved_filters": [f.to_dict() for f in layout["resolved_filters"]],
        "partitions": layout["partitions"],
        "output": {"dir": out_dir, "files": written, "stale_files_removed": len(stale)},
    }
    write_manifest(storage.join(cfg.output, MANIFEST), man, so)
    _say(f"{cfg.task}: {man['rows_in']} units in, {man['rows_out']} rows out, {len(written)} file(s) -> {out_dir}")
    return man


def margins_of_partition(partition: int, scratch: str, storage_options: dict | None, in_schema: pa.Schema):
    return human_pair_margins(read_partition(scratch, partition, storage_options, in_schema))


def run_calibrate(cfg: CurateConfig, files: list[str], t0: float) -> dict:
    import ray

    so = cfg.storage_options or None
    names = task_schema(cfg, files).names  # score_column shown as `score`
    columns = cfg.calibrate.columns or ["score"] + sorted(
        n for n in names if n.startswith((schema.RATING_PREFIX, schema.DEBIASED_PREFIX))
    )
    missing = sorted(set(columns) - set(names))
    if missing:
        raise ValueError(f"calibrate.columns: not in the run: {missing}")
    pair_cols = ["row_id", "kind", "preference", "tie", "score"]
    # row_id is the shuffle key even when no temperature is fitted
    read = sorted(set(columns) | {"row_id"} | (set(pair_cols) if cfg.calibrate.fit_temperature else set()))
    scratch = _scratch(cfg)
    in_schema = task_schema(cfg, files)
    in_schema = pa.schema([in_schema.field(c) for c in read])
    try:
        # Human pairs are whole within a partition by row_id; one pass also gathers the columns to fit.
        layout = shuffle(cfg, files, read, "row_id", columns, scratch, None)
        values = layout["values"]
        temperature, n_pairs = 1.0, 0
        if cfg.calibrate.fit_temperature:
            task = ray.remote(num_cpus=1)(margins_of_partition)
            margins = np.concatenate(
                [np.zeros(0)] + ray.get([task.remote(p, scratch, so, in_schema) for p in range(layout["partitions"])])
            )
            n_pairs = len(margins)
            if n_pairs:
                temperature = cal.fit_temperature(margins)
    finally:
        storage.remove(scratch, so)
    calibration = cal.fit_calibration(values, cfg.calibrate.method, cfg.calibrate.n_quantiles, temperature, cfg.run)
    calibration["temperature_pairs"] = n_pairs
    calibration["score_column"] = cfg.score_column  # what its `score` map and T describe
    cal.save(calibration, cfg.output, so)
    man = {
        **_base_manifest(cfg, files, t0),
        "rows_in": int(len(values["score"])) if "score" in values else None,
        "columns": {c: calibration["columns"][c]["n"] for c in columns},
        "temperature": temperature,
        "temperature_pairs": n_pairs,
        "output": {"calibration": cfg.output},
    }
    write_manifest(calibration_manifest_uri(cfg.output), man, so)
    _say(f"calibrate: {len(columns)} column(s), T = {temperature:.4g} from {n_pairs} human pair(s) -> {cfg.output}")
    return man


def calibration_manifest_uri(calibration_uri: str) -> str:
    return calibration_uri[: -len(".json")] + ".manifest.json"
