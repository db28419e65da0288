"""The labeling job's driver: `run(cfg) = execute(plan_run(cfg))`. Executing a plan wires the Ray
Data pipeline (read + tokenize -> embed + score -> write), commits shards as they complete and
writes the manifest. Resumable (same run id) and incremental (new input files only)."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import queue
import threading
import time
from collections.abc import Callable

import pyarrow as pa

from pipeline import storage
from pipeline.corpus.ray_read import read_corpus
from pipeline.labeling import lease as run_lease
from pipeline.labeling import manifest as mf
from pipeline.labeling.commit import ShardLedger, summaries_of, widen_window
from pipeline.labeling.config import LabelConfig, ResourcesConfig
from pipeline.labeling.plan import RunPlan, plan_run
from pipeline.labeling.reward_stages import RewardModelStage, RewardModelTokenizeStage
from pipeline.labeling.stages import EmbedScoreStage, ScoringModel, TokenizeStage, WriteStage, count_read_retries
from pipeline.labeling.watch import PoolWatch, Stalled
from pipeline.reward_models.spec import RewardModelSpec
from pipeline.runtime import cluster_resources, init_ray
from pipeline.schema import OUTPUT_FIXED_FIELDS
from pipeline.secrets import scrub
from pipeline.stage import (
    Resources,
    Stage,
    apply_stage,
    count_rows,
    rebatch,
    set_max_block_bytes,
    stage_function,
    stream,
    tolerate_actor_init_deaths,
)

# Ray Data merges what a task yields into blocks of up to 128 MiB (DataContext default): a file's
# tokenized shards would travel as one block, and nothing would be scored, written or committed
# until a whole file (of any size) is through. Small blocks keep the stream fine-grained: bounded
# memory, commits every few MiB of units, resumable progress. (Blocks still group small shards.)
MAX_BLOCK_BYTES = 4 * 1024**2

log = logging.getLogger("armolabel.label")
OUTPUT_FIXED_NAMES = {name for name, _ in OUTPUT_FIXED_FIELDS}


def _say(msg: str) -> None:
    print(scrub(f"[label] {msg}"), flush=True)


# Scoring actors that die while loading their model (their node lost mid-start) are replaced this
# many times in a row before the run gives up; Ray Data's default (0) fails the run on the first.
ACTOR_INIT_DEATHS = 5


def clean_run(run_dir: str, markers, storage_options: dict | None) -> dict[str, int]:
    """Remove what interrupted attempts left: part files no marker names (a shard written but not
    committed, or written twice by an earlier overlapping attempt), temporary files of atomic
    writes, and unfinished multipart uploads under the run's prefix (a writer killed mid-upload).
    Only under the run's lease: another live driver's files would look the same."""
    keep = storage.named_parts(markers)
    removed = 0
    for sub in ("data", "quarantine"):
        for uri in storage.list_files(storage.join(run_dir, sub), storage_options):
            name = posixpath.basename(uri.rstrip("/"))
            if name.startswith(storage.TMP_PREFIX) or f"{sub}/{name}" not in keep:
                storage.remove(uri, storage_options)
                removed += 1
    st = storage.store(run_dir, storage_options)
    _, prefix = storage.filesystem(run_dir, storage_options)
    uploads = st.abandoned_uploads(prefix)
    for path, upload_id in uploads:
        st.abort_upload(path, upload_id)
    return {"partial_files_removed": removed, "uploads_aborted": len(uploads)}


class Progress:
    def __init__(self, total_units: int | None, interval_s: float, status: Callable[[], str | None] | None = None):
        self.total = total_units
        self.interval = interval_s
        self.status = status  # e.g. PoolWatch.status: what the run waits for, if anything
        self.start = self.last = time.monotonic()
        self.units = self.tokens = 0
        self.window: list[float] = []  # [first scoring call's start, last one's end] (unix seconds)

    def add(self, units: int, tokens: int, scored_from: float | None = None, scored_until: float | None = None) -> None:
        self.units += units
        self.tokens += tokens
        self.window = widen_window(self.window, scored_from, scored_until)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            _say(self.line())

    def steady(self) -> dict:
        """Throughput from the start of the first scoring call to the end of the last: Ray start-up
        and model loading excluded, any stall of the pipeline (reads, tokenization, writes
        not keeping the actors busy) included."""
        if not self.window or self.window[1] <= self.window[0]:
            return {"scoring_window_s": None, "steady_units_per_s": None, "steady_tokens_per_s": None}
        span = self.window[1] - self.window[0]
        return {
            "scoring_window_s": round(span, 3),
            "steady_units_per_s": round(self.units / span, 3),
            "steady_tokens_per_s": round(self.tokens / span, 1),
        }

    def line(self) -> str:
        # Rates over the scoring window once there is one: start-up and model loading would
        # otherwise drag the rate (and inflate the ETA) for most of a short run.
        elapsed = (
            (self.window[1] - self.window[0])
            if self.window and self.window[1] > self.window[0]
            else time.monotonic() - self.start
        )
        elapsed = max(elapsed, 1e-9)
        rate = self.units / elapsed
        msg = f"{self.units} units, {rate:.1f} units/s, {self.tokens / elapsed:.0f} tokens/s"
        if self.total:
            left = max(self.total - self.units, 0)
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            msg += f", {100 * self.units / self.total:.1f}% of {self.total}, ETA {eta}"
        waiting = self.status() if self.status is not None else None
        return f"{msg}; {waiting}" if waiting else msg


def run(cfg: LabelConfig) -> dict:
    """Run (or resume) the labeling job; returns the manifest. Heads named by
    `model.train_if_missing` must exist already: pipeline.training.ensure_heads trains them.

    The run's lease is taken first (LeaseHeld when another live driver has the run), so the plan
    sees what earlier attempts committed and nobody else changes it while this driver runs."""
    so = cfg.storage_options or None
    lease = run_lease.take(cfg.run_dir, so, cfg.lease_ttl_s) if cfg.lease_ttl_s else None
    try:
        if lease is not None and lease.took_over:  # a released lease is simply free
            _say(
                f"took over the lease of a driver that stopped renewing it "
                f"({run_lease.describe(lease.took_over, time.time())})"
            )
        return execute(plan_run(cfg), lease)
    finally:
        if lease is not None:
            lease.release()


def execute(plan: RunPlan, lease: run_lease.RunLease | None = None) -> dict:
    """Carry out a plan. `lease`: the run's lease, held by the caller (run); it is checked before
    every commit, so a driver that lost it stops rather than racing the one that took over."""
    t0 = time.time()
    cfg = plan.cfg
    so = cfg.storage_options or None
    run_dir = cfg.run_dir
    storage.FAULTS.take()  # count this run's retries only
    if cfg.incremental:
        _say(f"incremental: {len(plan.skipped)} file(s) done by earlier runs, {len(plan.files)} new")
    mf.check_run_identity(run_dir, plan.identity, so)
    cleaned = clean_run(run_dir, plan.committed.values(), so)
    if plan.committed or any(cleaned.values()):
        _say(
            f"resuming run {cfg.run_id}: {len(plan.committed)} shard(s) already committed, "
            f"{cleaned['partial_files_removed']} partial file(s) removed, "
            f"{cleaned['uploads_aborted']} unfinished upload(s) aborted"
        )
    new_markers: list[dict] = []
    steady: dict = {}
    if plan.files:
        init_ray(cfg.ray_address)
        set_max_block_bytes(MAX_BLOCK_BYTES)
        tolerate_actor_init_deaths(ACTOR_INIT_DEATHS)
        total = count_rows(_read(plan)) if cfg.count_units else None
        ds = _pipeline(plan)
        what = f"{total} unit(s) to label" if total is not None else f"{plan.input_bytes} input bytes to label"
        _say(f"run {cfg.run_id}: {len(plan.files)} file(s), {what} -> {run_dir}")
        shortfall = capacity_shortfall(cfg, cluster_resources())
        if shortfall:
            _say(f"warning: {shortfall}")
        watch = _pool_watch(cfg)
        progress = Progress(total, cfg.progress_interval_s, watch.status)
        new_markers = _drive(ds, run_dir, so, progress, lease, watch, cfg.stall_timeout_s)
        steady = progress.steady()
    if lease is not None:
        lease.ensure_held()
    # A write retried after its first try was cut off, or a task of an earlier overlapping attempt
    # that finished late, may leave a part no marker names: removed before the run says complete.
    swept = clean_run(run_dir, [*plan.committed.values(), *new_markers], so)["partial_files_removed"]
    faults = {
        "storage_retries": sum(int(m.get("storage_retries") or 0) for m in new_markers)
        + sum(storage.FAULTS.take().values()),
        "cleanup": {**cleaned, "orphans_removed_at_end": swept},
        "lease": _lease_record(lease),
    }
    man = plan.manifest(new_markers, time.time() - t0, {**steady, **faults}, storage.versions())
    verdict = mf.judge_quarantine(man, cfg.max_quarantine_fraction)  # before the one write
    storage.write_json(storage.join(run_dir, mf.MANIFEST), man, so)
    for warning in mf.unused_label_warnings(man["sources"]):
        _say(warning)
    if verdict is not None:
        raise mf.QuarantineLimitExceeded(verdict["message"])
    return man


def _lease_record(lease: run_lease.RunLease | None) -> dict | None:
    if lease is None:
        return None
    return {
        "ttl_s": lease.ttl_s,
        "renewals": lease.renewals,
        "took_over_from": (lease.took_over or {}).get("holder"),
    }


def scoring_pools(cfg: LabelConfig) -> dict[str, ResourcesConfig]:
    """Stage name -> resources of every actor pool the run starts: the backbone's (when it scores)
    and each reward model's (its own keys over the run's)."""
    m = cfg.model
    pools = {EmbedScoreStage.name: cfg.resources} if m.scores_with_backbone() else {}
    for d in m.reward_models:
        spec = RewardModelSpec.from_dict(d)
        pools[spec.column] = _reward_model_resources(spec, cfg.resources)
    return pools


def _actor_needs(r: ResourcesConfig) -> dict[str, float]:
    needs = {"CPU": float(r.num_cpus_per_actor)}
    if r.num_gpus_per_actor:
        needs["GPU"] = float(r.num_gpus_per_actor)
    needs.update(r.custom_resources_per_actor)
    return needs


def _min_actors(r: ResourcesConfig) -> int:
    return r.actors[0] if isinstance(r.actors, list) else r.actors


def _pool_watch(cfg: LabelConfig) -> PoolWatch:
    """The pools' minimum actors together (they all must run for units to get through), and what
    one actor of the first pool asks for."""
    pools = list(scoring_pools(cfg).values())
    return PoolWatch(minimum=sum(_min_actors(r) for r in pools), needs=_actor_needs(pools[0]))


def capacity_shortfall(cfg: LabelConfig, cluster: dict[str, float]) -> str | None:
    """A line when the scoring pools' minimum actors, plus one CPU task, need more of a resource
    than the whole cluster has right now: every pool must hold its minimum at once for a unit to
    pass through, so such a run waits (an autoscaling cluster may still grow to fit)."""
    need: dict[str, float] = {"CPU": float(cfg.resources.cpus_per_cpu_task)}
    for r in scoring_pools(cfg).values():
        for k, v in _actor_needs(r).items():
            need[k] = need.get(k, 0.0) + v * _min_actors(r)
    short = {k: (v, cluster.get(k, 0.0)) for k, v in need.items() if v > cluster.get(k, 0.0) + 1e-9}
    if not short:
        return None
    said = ", ".join(f"{k} {v:g} (cluster: {have:g})" for k, (v, have) in sorted(short.items()))
    return (
        f"the scoring pools' minimum actors and a read task need {said}: the run waits until the "
        "cluster grows; lower resources.num_cpus_per_actor / actors (or a reward model's own resources)"
    )


def _read(plan: RunPlan, transform=None):
    """The plan's input files as a Dataset of units (committed shards left out); `transform` runs
    on each shard inside its read task."""
    cfg, r = plan.cfg, plan.cfg.resources
    return read_corpus(
        plan.specs,
        rows_per_shard=r.rows_per_shard,
        exclude_shards=set(plan.committed),
        tasks=[(f.spec, f.uri) for f in plan.files],  # the plan's expansion, not a new one
        limit_rows=cfg.limit_rows_per_input,
        num_cpus=r.cpus_per_cpu_task,
        shard_transform=transform,
        field_use=True,
    )


def _pipeline(plan: RunPlan):
    """read + tokenize -> [embed + score] -> [each reward model] -> write: a Dataset of the write
    stage's range summaries."""
    cfg, r, m = plan.cfg, plan.cfg.resources, plan.cfg.model
    so = cfg.storage_options or None
    cpu = Resources(num_cpus=r.cpus_per_cpu_task)
    backbone = m.scores_with_backbone()
    reward_models = [RewardModelSpec.from_dict(d) for d in m.reward_models]
    # Tokenization quarantines a row (a pair, a best-of-N group) whole when one of its units fails,
    # so it must see whole rows. Only the read task sees a shard whole: between operators Ray Data
    # may split a block at any row (target_max_block_size) or merge blocks. So it runs there, on
    # each shard, rather than as an operator of its own (TokenizeStage checks rows are whole): the
    # backbone's tokenization, then each reward model's.
    tokenizers: list[Stage] = []
    if backbone:
        tokenizers.append(
            TokenizeStage(None if m.armorm_checkpoint else m.backbone, m.template, cpu, m.armorm_checkpoint, so)
        )
    tokenizers += [RewardModelTokenizeStage(spec, not backbone and j == 0, so) for j, spec in enumerate(reward_models)]
    steps = [stage_function(t) for t in tokenizers]

    def tokenize_shard(table: pa.Table) -> pa.Table:
        for step in steps:
            table = step(table)
        return count_read_retries(table)

    # Blocks of at most units_per_call units reach the actors: each scoring call's results are
    # written and committed while the next is scored (a block is the unit of streaming).
    ds = rebatch(_read(plan, tokenize_shard), r.units_per_call, r.cpus_per_cpu_task)
    if backbone:
        model = ScoringModel(
            m.backbone,
            m.heads,
            m.armorm_checkpoint,
            r.token_budget,
            cfg.embeddings,
            r.threads_per_actor,
            r.share_prompts,
            so,
        )
        ds = apply_stage(ds, EmbedScoreStage(model, plan.objectives, _scoring_resources(r)))
    pools = scoring_pools(cfg)
    fingerprints = {rm["name"]: rm["fingerprint"] for rm in plan.identity.get("reward_models", [])}
    for spec in reward_models:
        own = pools[spec.column]
        stage = RewardModelStage(
            spec, _scoring_resources(own), own.token_budget, own.threads_per_actor, so, fingerprints.get(spec.name)
        )
        ds = apply_stage(ds, stage)
    absent = () if backbone else tuple(c for c in EmbedScoreStage.columns_written([], False) if c in OUTPUT_FIXED_NAMES)
    return apply_stage(
        ds,
        WriteStage(
            cfg.run_dir,
            cfg.run_id,
            plan.objectives,
            cfg.embeddings,
            so,
            cpu,
            reward_models=[spec.name for spec in reward_models],
            null_columns=absent,
        ),
    )


def _scoring_resources(r: ResourcesConfig) -> Resources:
    return Resources(
        num_cpus=r.num_cpus_per_actor,
        num_gpus=r.num_gpus_per_actor,
        custom=r.custom_resources_per_actor,
        actors=(r.actors[0], r.actors[1]) if isinstance(r.actors, list) else r.actors,
        batch_size=r.units_per_call,
    )


def _reward_model_resources(spec: RewardModelSpec, run: ResourcesConfig) -> ResourcesConfig:
    """A reward model's pool: its own `resources` keys, the run's for every key it leaves out."""
    own = {k: v for k, v in (spec.resources or {}).items() if v is not None}
    return dataclasses.replace(run, **own)


def _drive(
    ds,
    run_dir: str,
    so: dict | None,
    progress: Progress,
    lease: run_lease.RunLease | None = None,
    watch: PoolWatch | None = None,
    stall_timeout_s: float | None = None,
) -> list[dict]:
    """Consume the write stage's range summaries; commit each shard the moment it is complete.

    The pipeline's output is pulled on a thread of its own, so this loop wakes every progress
    interval even when nothing arrives: it then says what the run waits for, and fails the run
    (Stalled, with that diagnosis) once nothing was committed for stall_timeout_s."""
    ledger = ShardLedger()
    markers = []
    for table in _pull(ds, progress, watch, stall_timeout_s):
        for summary in summaries_of(table):
            progress.add(summary.units, summary.tokens, summary.scored_from, summary.scored_until)
            finished = ledger.add(summary)
            if finished is not None:
                if lease is not None:
                    lease.ensure_held()
                marker = finished.marker()
                storage.write_json(mf.marker_uri(run_dir, marker["shard_id"]), marker, so)
                markers.append(marker)
    incomplete = ledger.incomplete()
    if incomplete:
        raise RuntimeError(f"pipeline ended with incomplete shards {incomplete[:5]}: not every unit was written")
    _say(progress.line())
    return markers


_END = object()


def _pull(ds, progress: Progress, watch: PoolWatch | None, stall_timeout_s: float | None):
    """The pipeline's output blocks, with a deadline on the wait for each."""
    out: queue.Queue = queue.Queue(maxsize=4)

    def pump() -> None:
        try:
            for table in stream(ds):
                out.put(table)
            out.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, raised there
            out.put(e)

    threading.Thread(target=pump, name="armolabel-pipeline", daemon=True).start()
    last = time.monotonic()
    while True:
        try:
            item = out.get(timeout=max(min(progress.interval, stall_timeout_s or progress.interval), 0.1))
        except queue.Empty:
            idle = time.monotonic() - last
            if stall_timeout_s and idle >= stall_timeout_s:
                raise Stalled(
                    watch.diagnose(idle) if watch else f"no unit committed for {idle:.0f}s (stall_timeout_s)"
                ) from None
            _say(f"{progress.line()} (nothing committed for {idle:.0f}s)")
            continue
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        last = time.monotonic()
        assert isinstance(item, pa.Table)
        yield item
