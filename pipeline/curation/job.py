"""The curation job's driver on Ray: one read of a labeled run, a shuffle through files, one task per output file.

1. Scatter: Ray tasks read slices of the run (row groups, projected to the columns the task needs;
   never the embeddings) in batches and append each unit to the fragment of its partition,
   partition = stable_hash(prompt_id) mod P, as Arrow IPC files under a scratch directory. The
   number of partitions P follows the data (`partition_rows` units each, at least one per output
   file), not the number of output files; no task ever holds more than one batch. The same pass
   returns every value of the columns that quantile filters need, so whole-run cut-offs are exact.
2. Gather: one Ray task per output file takes its share of the partitions one after another; each
   partition holds whole prompts (every unit of a prompt, across input files and nodes), so the
   task's pure function (pipeline.curation.tasks) sees whole best-of-N groups and preference rows.
   Peak memory of a task is that of one partition, whatever the size of the run.
3. Each output file `data/train-<k>-of-<n>.parquet` (the name `datasets` maps to a `train` split)
   is written atomically, its partitions' rows in partition order, each sorted by a stable key: a
   rerun rewrites the same files with the same bytes, and files of an earlier run with another
   layout are removed. The per-partition counts are summed into `<output>/manifest.json`.
"""

from __future__ import annotations

import math
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline import schema, storage
from pipeline.curation import calibration as cal
from pipeline.curation.config import CurateConfig
from pipeline.curation.pairs import human_pair_margins, merge_counts
from pipeline.curation.rerank import Agreement
from pipeline.curation.tasks import build_dpo, rerank, select_sft
from pipeline.curation.thresholds import Filter, columns_to_fit, merge_filter_counts, parse_filters, resolve_filters
from pipeline.runtime import init_ray

MANIFEST = "manifest.json"
SLICE_PARTITIONS = 8  # a scatter task reads up to this many partitions' worth of units
BATCH_ROWS = 50_000  # ... in batches of at most this many units
SPLIT = "train"
# Uncompressed: fragments live a few seconds on local or cluster scratch; lz4 cost more CPU than it saved I/O.
IPC_OPTIONS = ipc.IpcWriteOptions(compression=None)


def _say(msg: str) -> None:
    from pipeline.secrets import scrub

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


def scatter_slice(
    uri: str,
    row_groups: list[int],
    slice_id: int,
    columns: list[str],
    key: str,
    partitions: int,
    scratch: str,
    batch_rows: int,
    fit_columns: list[str],
    storage_options: dict | None,
) -> dict:
    """Scatter one slice: each batch is split by partition and appended to that partition's fragment
    of this slice (one IPC stream per partition). Returns the rows read and the fit columns' values."""
    fs, path = storage.filesystem(uri, storage_options)
    writers: dict[int, tuple] = {}
    values: dict[str, list[np.ndarray]] = {c: [] for c in fit_columns}
    rows = 0
    try:
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=columns):
                table = pa.Table.from_batches([batch])
                rows += table.num_rows
                for c in fit_columns:
                    values[c].append(pc.cast(table.column(c), pa.float64()).to_numpy(zero_copy_only=False))
                part = partition_of(table.column(key), partitions)
                order = np.argsort(part, kind="stable")
                table, part = table.take(order), part[order]
                bounds = np.flatnonzero(np.diff(part)) + 1
                for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(part)]):
                    p = int(part[lo])
                    if p not in writers:
                        frag = _fragment_uri(scratch, p, slice_id)
                        ffs, fpath = storage.filesystem(frag, storage_options)
                        ffs.makedirs(posixpath.dirname(fpath), exist_ok=True)
                        sink = ffs.open(fpath, "wb")
                        writers[p] = (sink, ipc.new_stream(sink, table.schema, options=IPC_OPTIONS))
                    writers[p][1].write_table(table.slice(lo, hi - lo))
    finally:
        for sink, writer in writers.values():
            writer.close()
            sink.close()
    return {"rows": rows, "values": {c: np.concatenate(v) if v else np.zeros(0) for c, v in values.items()}}


def read_partition(scratch: str, partition: int, storage_options: dict | None, schema_: pa.Schema) -> pa.Table:
    """Every fragment of one partition (in slice order), as one table."""
    tables = []
    for uri in storage.list_files(storage.join(scratch, f"p-{partition:05d}"), storage_options):
        fs, path = storage.filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            tables.append(ipc.open_stream(f).read_all())
    return pa.concat_tables(tables, promote_options="default") if tables else schema_.empty_table()


def task_fn(cfg: CurateConfig, filters: list[Filter], calibration: dict | None):
    """The task's pure function of one partition: table -> (output table, counts)."""
    if cfg.task == "sft":
        return lambda units: select_sft(
            units, filters, cfg.sft.one_per_prompt, cfg.sft.kinds, cfg.sft.exclude_human_rejected, calibration
        )
    if cfg.task == "dpo":
        temperature = calibration["temperature"] if calibration else 1.0
        return lambda units: build_dpo(units, filters, cfg.pairs.rules(), temperature, cfg.pairs.reward_margin)
    if cfg.task == "rerank":
        return lambda units: rerank(units, filters, cfg.rerank.top_k, cfg.rerank.kinds, calibration)
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
            storage.write_atomic(uri, lambda f, t=table: _write_ipc(f, t), so)
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
) -> dict:
    """The scatter pass over the whole run; returns the layout and the fit columns' whole-run values."""
    import ray

    so = cfg.storage_options or None
    # Scatter tasks stream their slice in batches, so a slice can be larger than a partition: fewer
    # slices keep the number of fragments (slices x partitions) down on big runs.
    slices, total = plan_slices(files, so, SLICE_PARTITIONS * cfg.partition_rows)
    partitions, n_files = partition_layout(total, cfg.partition_rows, output_files)
    storage.remove(scratch, so)
    t0 = time.time()
    task = ray.remote(num_cpus=1)(scatter_slice)
    refs = [
        task.remote(
            uri, groups, i, columns, key, partitions, scratch, min(cfg.partition_rows, BATCH_ROWS), fit_columns, so
        )
        for i, (uri, groups) in enumerate(slices)
    ]
    results = ray.get(refs)
    values = {c: np.concatenate([r["values"][c] for r in results]) if results else np.zeros(0) for c in fit_columns}
    _say(
        f"scattered {total} units from {len(slices)} slice(s) into {partitions} partition(s) "
        f"in {time.time() - t0:.1f} s"
    )
    return {"partitions": partitions, "files": n_files, "units": total, "values": values}


# Columns each task reads besides the filter columns (the rest of a run is never read).
TASK_COLUMNS = {
    "sft": ["unit_id", "row_id", "prompt_id", "kind", "source", "prompt", "response", "preference", "score"],
    "dpo": [
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
    ],
    "rerank": ["unit_id", "row_id", "prompt_id", "kind", "source", "prompt", "response", "human_rank", "score"],
}


def task_columns(task: str, names: list[str], filters: list[Filter]) -> list[str]:
    """The run's columns a task needs: its own, the per-objective ratings it carries into its output
    (sft, rerank), and every filtered column."""
    wanted = set(TASK_COLUMNS[task]) | {f.column for f in filters}
    if task in ("sft", "rerank"):
        wanted |= {n for n in names if n.startswith((schema.RATING_PREFIX, schema.DEBIASED_PREFIX))}
    return [n for n in names if n in wanted]


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
    return out


def _base_manifest(cfg: CurateConfig, files: list[str], t0: float) -> dict:
    so = cfg.storage_options or None
    run_manifest_uri = storage.join(cfg.run, "manifest.json")
    run_id = None
    if storage.exists(run_manifest_uri, so):
        run_id = storage.read_json(run_manifest_uri, so).get("run_id")
    return {
        "task": cfg.task,
        "status": "complete",
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "run": cfg.run,
        "run_id": run_id,
        "input_files": files,
        "versions": storage.versions(),
        "wall_time_s": round(time.time() - t0, 3),
    }


def write_manifest(uri: str, man: dict, storage_options: dict | None) -> None:
    """Every manifest this job writes goes through here."""
    storage.write_json(uri, man, storage_options)


def run(cfg: CurateConfig) -> dict:
    """Run one curation task; returns its manifest (also written next to the output)."""
    import ray

    t0 = time.time()
    init_ray(cfg.ray_address)
    _say(f"ray ready in {time.time() - t0:.1f} s")
    so = cfg.storage_options or None
    files = storage.run_data_files(cfg.run, so)
    if cfg.task == "calibrate":
        return run_calibrate(cfg, files, t0)

    filters = parse_filters(cfg.filters)
    fit_cols = columns_to_fit(filters)
    calibration = cal.load(cfg.calibration, so) if cfg.calibration else None

    # A manifest left by an earlier run would describe files this run is about to replace.
    storage.remove(storage.join(cfg.output, MANIFEST), so)
    out_dir = storage.join(cfg.output, "data")
    scratch = _scratch(cfg)
    in_schema = run_schema(files, so)
    columns = task_columns(cfg.task, in_schema.names, filters)
    in_schema = pa.schema([in_schema.field(c) for c in columns])
    try:
        layout = shuffle(cfg, files, columns, "prompt_id", fit_cols, scratch, cfg.output_files)
        if fit_cols:
            _say(f"whole-run quantiles of {fit_cols}")
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
    finally:
        storage.remove(scratch, so)
    written = sorted(s["file"] for s in summaries if s["file"])
    stale = [u for u in storage.list_files(out_dir, so) if posixpath.basename(u) not in set(written)]
    for uri in stale:
        storage.remove(uri, so)
    counts = merge_bucket_counts([c for s in summaries for c in s["counts"]])
    man = {
        **_base_manifest(cfg, files, t0),
        **counts,
        "resolved_filters": [f.to_dict() for f in filters],
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
    names = run_schema(files, so).names
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
    in_schema = run_schema(files, so)
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
