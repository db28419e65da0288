"""The curation job's driver on Ray Data: two passes over a labeled run.

1. Quantile filters need whole-run cut-offs: a first pass reads only the filtered columns and
   resolves every quantile rule to an absolute value (exact: the values of one column are small).
2. The main pass tags each unit with a bucket = hash(prompt_id) mod `output_files`, groups by bucket
   (a Ray Data hash shuffle, across files and nodes), and runs the task's pure function
   (pipeline.curation.tasks) on each bucket, which therefore holds whole prompts. Each bucket is
   written to `part-<bucket>-of-<n>.parquet`, rows sorted by a stable key, atomically: a rerun
   rewrites the same files with the same bytes, and files of an earlier run with another layout are
   removed. The per-bucket counts are summed into `<output>/manifest.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
from functools import partial

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema, storage
from pipeline.curation import calibration as cal
from pipeline.curation.config import CurateConfig
from pipeline.curation.pairs import human_pair_margins, merge_counts
from pipeline.curation.rerank import Agreement
from pipeline.curation.tasks import build_dpo, rerank, select_sft
from pipeline.curation.thresholds import Filter, columns_to_fit, merge_filter_counts, parse_filters, resolve_filters
from pipeline.runtime import init_ray

BUCKET = "_bucket"
MANIFEST = "manifest.json"


def _say(msg: str) -> None:
    from pipeline.secrets import scrub

    print(scrub(f"[curate] {msg}"), flush=True)


def bucket_of(key: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % n


def part_name(bucket: int, n: int) -> str:
    return f"part-{bucket:05d}-of-{n:05d}.parquet"


def _ray_source(files: list[str], storage_options: dict | None):
    """Paths and filesystem for ray.data.read_parquet (s3:// goes through fsspec with our options)."""
    if not storage.is_remote(files[0]):
        return files, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = storage.filesystem(files[0], storage_options)
    return [storage.filesystem(f, storage_options)[1] for f in files], PyFileSystem(FSSpecHandler(fs))


def run_schema(files: list[str], storage_options: dict | None) -> pa.Schema:
    fs, path = storage.filesystem(files[0], storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def read_run(files: list[str], storage_options: dict | None, columns: list[str] | None = None):
    import ray.data

    paths, filesystem = _ray_source(files, storage_options)
    ds = ray.data.read_parquet(paths, filesystem=filesystem)
    return ds.select_columns(columns) if columns else ds  # projected into the read


def column_values(files: list[str], columns: list[str], storage_options: dict | None) -> dict[str, np.ndarray]:
    """First pass: every value of a few (score) columns over the whole run."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in read_run(files, storage_options, columns).iter_batches(batch_format="numpy", batch_size=65536):
        for c in columns:
            parts[c].append(np.asarray(batch[c], dtype=np.float64))
    return {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}


def _add_bucket(batch: pa.Table, key: str, n: int) -> pa.Table:
    buckets = [bucket_of(k, n) for k in batch.column(key).to_pylist()]
    return batch.append_column(BUCKET, pa.array(buckets, pa.int32()))


def _process_bucket(units: pd.DataFrame, cfg: CurateConfig, filters: list[Filter], calibration: dict | None,
                    out_dir: str) -> pd.DataFrame:
    bucket = int(units[BUCKET].iloc[0])
    units = units.drop(columns=BUCKET).reset_index(drop=True)
    if cfg.task == "sft":
        table, counts = select_sft(units, filters, cfg.sft.one_per_prompt, cfg.sft.kinds,
                                   cfg.sft.exclude_human_rejected, calibration)
    elif cfg.task == "dpo":
        temperature = calibration["temperature"] if calibration else 1.0
        table, counts = build_dpo(units, filters, cfg.pairs.rules(), temperature)
    elif cfg.task == "rerank":
        table, counts = rerank(units, filters, cfg.rerank.top_k, cfg.rerank.kinds, calibration)
    else:
        raise ValueError(f"task {cfg.task!r} has no per-bucket step")
    name = part_name(bucket, cfg.output_files)
    if table.num_rows:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_atomic(storage.join(out_dir, name), buf.getvalue(), cfg.storage_options or None)
    return pd.DataFrame({"bucket": [bucket], "file": [name if table.num_rows else None],
                         "counts": [json.dumps(counts)]})


def merge_bucket_counts(counts: list[dict]) -> dict:
    out = {"rows_in": sum(c["rows_in"] for c in counts), "rows_out": sum(c["rows_out"] for c in counts),
           "filters": merge_filter_counts([c["filters"] for c in counts])}
    if any("selection" in c for c in counts):
        out["selection"] = merge_filter_counts([c.get("selection", []) for c in counts])
    if any("one_per_prompt_removed" in c for c in counts):
        out["one_per_prompt_removed"] = sum(c.get("one_per_prompt_removed", 0) for c in counts)
    if any("pairs" in c for c in counts):
        out["pairs"] = {origin: merge_counts([c["pairs"][origin] for c in counts])
                        for origin in ("best_of_n", "preference")}
    if any("agreement" in c for c in counts):
        total = Agreement()
        for c in counts:
            total.add(Agreement.from_dict(c["agreement"]))
        out["agreement"] = total.to_dict()
        out["prompts"] = sum(c["prompts"] for c in counts)
    return out


def _base_manifest(cfg: CurateConfig, files: list[str], t0: float) -> dict:
    from pipeline.labeling.manifest import versions

    so = cfg.storage_options or None
    run_manifest_uri = storage.join(cfg.run, "manifest.json")
    run_id = None
    if storage.exists(run_manifest_uri, so):
        run_id = json.loads(storage.read_bytes(run_manifest_uri, so)).get("run_id")
    return {"task": cfg.task, "status": "complete", "config": cfg.to_dict(), "config_hash": cfg.hash(),
            "run": cfg.run, "run_id": run_id, "input_files": files, "versions": versions(),
            "wall_time_s": round(time.time() - t0, 3)}


def run(cfg: CurateConfig) -> dict:
    """Run one curation task; returns its manifest (also written next to the output)."""
    t0 = time.time()
    init_ray(cfg.ray_address)
    so = cfg.storage_options or None
    files = storage.run_data_files(cfg.run, so)
    if cfg.task == "calibrate":
        return run_calibrate(cfg, files, t0)

    filters = parse_filters(cfg.filters)
    fit_cols = columns_to_fit(filters)
    if fit_cols:
        _say(f"first pass: whole-run quantiles of {fit_cols}")
        filters = resolve_filters(filters, column_values(files, fit_cols, so))
    calibration = cal.load(cfg.calibration, so) if cfg.calibration else None

    # A manifest left by an earlier run would describe files this run is about to replace.
    storage.remove(storage.join(cfg.output, MANIFEST), so)
    out_dir = storage.join(cfg.output, "data")
    columns = [n for n in run_schema(files, so).names if n not in dict(schema.EMBEDDING_FIELDS)]
    ds = read_run(files, so, columns)
    ds = ds.map_batches(_add_bucket, fn_kwargs={"key": "prompt_id", "n": cfg.output_files}, batch_format="pyarrow")
    ds = ds.groupby(BUCKET, num_partitions=min(cfg.output_files, 200)).map_groups(partial(_process_bucket, cfg=cfg, filters=filters, calibration=calibration,
                                               out_dir=out_dir), batch_format="pandas")
    summaries = ds.take_all()
    written = sorted(s["file"] for s in summaries if s["file"])
    stale = [u for u in storage.list_files(out_dir, so) if posixpath.basename(u) not in set(written)]
    for uri in stale:
        storage.remove(uri, so)
    counts = merge_bucket_counts([json.loads(s["counts"]) for s in summaries])
    man = {**_base_manifest(cfg, files, t0), **counts,
           "resolved_filters": [f.to_dict() for f in filters],
           "output": {"dir": out_dir, "files": written, "stale_files_removed": len(stale)}}
    from pipeline.labeling.manifest import write_json

    write_json(storage.join(cfg.output, MANIFEST), man, so)
    _say(f"{cfg.task}: {man['rows_in']} units in, {man['rows_out']} rows out, {len(written)} file(s) -> {out_dir}")
    return man


def _margins_of_bucket(units: pd.DataFrame) -> pd.DataFrame:
    m = human_pair_margins(units.drop(columns=BUCKET))
    return pd.DataFrame({"margin": m})


def run_calibrate(cfg: CurateConfig, files: list[str], t0: float) -> dict:
    so = cfg.storage_options or None
    names = run_schema(files, so).names
    columns = cfg.calibrate.columns or ["score"] + sorted(
        n for n in names if n.startswith((schema.RATING_PREFIX, schema.DEBIASED_PREFIX)))
    missing = sorted(set(columns) - set(names))
    if missing:
        raise ValueError(f"calibrate.columns: not in the run: {missing}")
    values = column_values(files, columns, so)
    temperature, n_pairs = 1.0, 0
    if cfg.calibrate.fit_temperature:
        ds = read_run(files, so, ["row_id", "kind", "preference", "tie", "score"])
        ds = ds.map_batches(_add_bucket, fn_kwargs={"key": "row_id", "n": cfg.output_files}, batch_format="pyarrow")
        margins = [r["margin"] for r in ds.groupby(BUCKET, num_partitions=min(cfg.output_files, 200)).map_groups(_margins_of_bucket, batch_format="pandas")
                   .take_all()]
        n_pairs = len(margins)
        if n_pairs:
            temperature = cal.fit_temperature(np.asarray(margins))
    calibration = cal.fit_calibration(values, cfg.calibrate.method, cfg.calibrate.n_quantiles, temperature, cfg.run)
    calibration["temperature_pairs"] = n_pairs
    cal.save(calibration, cfg.output, so)
    man = {**_base_manifest(cfg, files, t0), "rows_in": int(len(values["score"])) if "score" in values else None,
           "columns": {c: calibration["columns"][c]["n"] for c in columns}, "temperature": temperature,
           "temperature_pairs": n_pairs, "output": {"calibration": cfg.output}}
    from pipeline.labeling.manifest import write_json

    write_json(calibration_manifest_uri(cfg.output), man, so)
    _say(f"calibrate: {len(columns)} column(s), T = {temperature:.4g} from {n_pairs} human pair(s) -> {cfg.output}")
    return man


def calibration_manifest_uri(calibration_uri: str) -> str:
    return calibration_uri[: -len(".json")] + ".manifest.json"
