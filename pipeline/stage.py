"""Processing stages and the one place that turns them into Ray Data operators.

A stage is a small class that declares the columns it reads and writes and the resources it
wants; it transforms one pyarrow Table into another and never talks to Ray. `apply_stage`
is the adapter: tasks for cheap stateless stages, an actor pool for stages that hold a model.
The few other Ray Data calls a driver needs (block size, re-batching, counting, streaming the
results) are here too, so that drivers hold no Ray Data specifics. The one exception is the
corpus reader (pipeline/corpus/ray_read.py), which creates the Dataset: it is the source, not a
stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)  # e.g. {"scorer": 1}
    actors: int | tuple[int, int] | None = None  # None: stateless tasks; int or (min, max): an actor pool
    batch_size: int | None = None  # rows per call; None: one whole block (one shard) per call


class StageError(RuntimeError):
    pass


class Stage:
    """Subclasses set `name`, `reads`, `writes`, and implement `process`; `setup` runs once per
    worker process (load a model there, not in __init__, so the stage object stays small to ship)."""

    name: str = "stage"
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    resources: Resources = Resources()

    def setup(self) -> None:
        pass

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        missing = [c for c in self.reads if c not in batch.column_names]
        if missing:
            raise StageError(f"stage {self.name}: input lacks columns {missing}")
        out = self.process(batch)
        missing = [c for c in self.writes if c not in out.column_names]
        if missing:
            raise StageError(f"stage {self.name}: output lacks declared columns {missing}")
        return out


class _StageActor:
    """Actor wrapper: one stage instance (and its model) per actor process."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.stage(batch)


def stage_function(stage: Stage):
    """The stage as a plain function with lazy, once-per-process setup: for running it inside
    another task (e.g. a read task's per-shard hook) or as a stateless Ray task."""
    ready = {"done": False}

    def run(batch: pa.Table) -> pa.Table:
        # Ray reuses worker processes; setup is cached by the stage (e.g. per-process model cache).
        if not ready["done"]:
            stage.setup()
            ready["done"] = True
        return stage(batch)

    return run


def apply_stage(ds, stage: Stage, resources: Resources | None = None):
    """Add a stage to a Ray Dataset plan."""
    res = resources or stage.resources
    common: dict[str, Any] = dict(batch_format="pyarrow", batch_size=res.batch_size, zero_copy_batch=True)
    if res.num_gpus:
        common["num_gpus"] = res.num_gpus
    common["num_cpus"] = res.num_cpus
    if res.custom:
        common["resources"] = dict(res.custom)
    if res.actors is None:
        return ds.map_batches(stage_function(stage), **common)
    from ray.data import ActorPoolStrategy

    lo, hi = (res.actors, res.actors) if isinstance(res.actors, int) else res.actors
    # initial_size=max: the whole pool starts at once instead of ramping up one actor at a time.
    pool = ActorPoolStrategy(min_size=lo, max_size=hi, initial_size=hi)
    # Actors that die are restarted and their in-flight batches retried: Ray Data's actor pools
    # default to max_restarts=-1 / max_task_retries=-1 (tested by killing a scoring actor).
    return ds.map_batches(_StageActor, fn_constructor_args=(stage,), compute=pool, **common)


def set_max_block_bytes(n: int) -> None:
    """Ray Data merges what a task yields into blocks of up to this size (DataContext, this process)."""
    import ray.data

    ray.data.DataContext.get_current().target_max_block_size = n


def rebatch(ds, rows_per_block: int, num_cpus: float = 1.0):
    """Blocks of at most `rows_per_block` rows (a block is the unit of streaming).

    Ray Data's `repartition(target_num_rows_per_block=)` runs its re-bundling tasks with its default
    of one CPU each, which cannot be set through its API: beside several scoring pools on a small
    machine that CPU is never free, and the run waits forever (seen on 2 cores with three pools).
    The same logical operator is built here with `num_cpus` for its tasks (re-bundling only moves
    references and slices blocks)."""
    from ray.data import Dataset
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.map_operator import StreamingRepartition

    op = StreamingRepartition(
        target_num_rows_per_block=rows_per_block,
        input_dependencies=[ds._logical_plan.dag],
        ray_remote_args={"num_cpus": num_cpus},
    )
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def count_rows(ds) -> int:
    """Run the plan to the end and count its rows (nothing is kept)."""
    return int(ds.count())


def stream(ds) -> Iterator[pa.Table]:
    """The plan's output blocks as pyarrow tables, each as soon as it is ready."""
    # prefetch_batches=0: with Ray's default of 1 the iterator holds each block until the next one
    # arrives, so every commit (and progress line) would wait for one more block.
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0)


def tolerate_actor_init_deaths(n: int) -> None:
    """Replace an actor that dies while it starts (its node lost mid-start) up to n times in a row
    before failing the run (DataContext, this process; Ray Data's default fails on the first)."""
    import ray.data

    ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = n
