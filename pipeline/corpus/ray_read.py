"""Reading a corpus as a Ray Dataset of units: one streamed read task per input file."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import ray

from pipeline import schema
from pipeline.corpus.reader import as_specs, iter_shards, summarize, units_table  # noqa: F401 - re-exported
from pipeline.corpus.spec import InputSpec, expand_all

# Read tasks are light (parsing, hashing); scoring actors hold whole CPUs on small machines.
READ_TASK_CPUS = 0.5


def plan_files(specs: list[InputSpec], files: list[str] | None = None) -> list[tuple[int, str]]:
    """(spec index, file) for every input file of the specs, optionally only those in `files`."""
    wanted = set(files) if files is not None else None
    tasks = []
    for i, uris in enumerate(expand_all(specs)):
        for uri in uris:
            if wanted is None or uri in wanted:
                tasks.append((i, uri))
    return tasks


def read_corpus(
    specs: Sequence[InputSpec | dict],
    rows_per_shard: int = 1024,
    exclude_shards: set[str] | None = None,
    files: list[str] | None = None,
    limit_rows: int | None = None,
    num_cpus: float = READ_TASK_CPUS,
    shard_transform: Callable[[pa.Table], pa.Table] | None = None,
    field_use: bool = False,
    tasks: Sequence[tuple[int, str]] | None = None,
) -> ray.data.Dataset:
    """A Dataset of units (UNIT_SCHEMA, pyarrow blocks), one block per shard.

    Each input file is read by one task that streams it shard by shard, so files are read in
    parallel and none is loaded whole. `exclude_shards` (ids of shards already written) are still
    read, for the file-wide duplicate check, but not emitted. `files` restricts the read to those
    inputs (as expand_files names them); `limit_rows` stops each file after that many records.
    `shard_transform` runs on each shard's table inside the read task: work that must see whole
    rows (e.g. tokenization that quarantines a pair together) belongs there, because Ray may
    merge or slice blocks anywhere downstream. `field_use` adds the reader's FIELD_USE column
    (which record fields the adapter read, per shard) for the labeling job's manifest. `tasks`:
    (spec index, file) pairs expanded already (the labeling plan's), instead of expanding the
    specs here.
    """
    resolved = as_specs(specs)
    if tasks is None:
        tasks = plan_files(resolved, files)
    if not tasks:
        return ray.data.from_arrow(schema.UNIT_SCHEMA.empty_table())
    skip = frozenset(exclude_shards or ())

    def read_file(batch: pa.Table):
        for spec_index, uri in zip(batch.column("spec").to_pylist(), batch.column("uri").to_pylist()):
            for units in iter_shards(resolved[spec_index], uri, rows_per_shard, limit_rows):
                if units[0]["shard_id"] not in skip:
                    table = units_table(units, field_use)
                    yield shard_transform(table) if shard_transform is not None else table

    # The Dataset is created here, not through pipeline.stage's adapter: the reader is the source
    # of the plan (one task per file), not a stage over an existing Dataset.
    items = [{"spec": i, "uri": uri} for i, uri in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(read_file, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus, zero_copy_batch=True)
