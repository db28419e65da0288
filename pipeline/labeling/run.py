"""The labeling job's driver: `run(cfg) = execute(plan_run(cfg))`. Executing a plan wires the Ray
Data pipeline (read + tokenize -> embed + score -> write), commits shards as they complete and
writes the manifest. Resumable (same run id) and incremental (new input files only)."""

from __future__ import annotations

import logging
import time

from pipeline import storage
from pipeline.corpus.ray_read import read_corpus
from pipeline.labeling import manifest as mf
from pipeline.labeling.commit import ShardLedger, shard_of_part, summaries_of
from pipeline.labeling.config import LabelConfig
from pipeline.labeling.plan import RunPlan, plan_run
from pipeline.labeling.stages import EmbedScoreStage, ScoringModel, TokenizeStage, WriteStage
from pipeline.runtime import init_ray
from pipeline.secrets import scrub
from pipeline.stage import Resources, apply_stage, count_rows, rebatch, set_max_block_bytes, stage_function, stream

# Ray Data merges what a task yields into blocks of up to 128 MiB (DataContext default): a file's
# tokenized shards would travel as one block, and nothing would be scored, written or committed
# until a whole file (of any size) is through. Small blocks keep the stream fine-grained: bounded
# memory, commits every few MiB of units, resumable progress. (Blocks still group small shards.)
MAX_BLOCK_BYTES = 4 * 1024**2

log = logging.getLogger("armolabel.label")


def _say(msg: str) -> None:
    print(scrub(f"[label] {msg}"), flush=True)


def _remove_uncommitted_parts(run_dir: str, done: dict, storage_options: dict | None) -> int:
    """Part files of shards without a marker come from an interrupted attempt: delete them so the
    shard is written again from scratch, never twice."""
    removed = 0
    for sub in ("data", "quarantine"):
        for uri in storage.list_files(storage.join(run_dir, sub), storage_options):
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(storage.TMP_PREFIX) or shard_of_part(name) not in done:
                storage.remove(uri, storage_options)
                removed += 1
    return removed


class Progress:
    def __init__(self, total_units: int | None, interval_s: float):
        self.total = total_units
        self.interval = interval_s
        self.start = self.last = time.monotonic()
        self.units = self.tokens = 0
        self.window: list[float] = []  # [first scoring call's start, last one's end] (unix seconds)

    def add(self, units: int, tokens: int, scored_from: float | None = None, scored_until: float | None = None) -> None:
        self.units += units
        self.tokens += tokens
        if scored_from is not None and scored_until is not None:
            self.window = (
                [min(self.window[0], scored_from), max(self.window[1], scored_until)]
                if self.window
                else [scored_from, scored_until]
            )
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
        return msg


def run(cfg: LabelConfig) -> dict:
    """Run (or resume) the labeling job; returns the manifest. Heads named by
    `model.train_if_missing` must exist already: pipeline.training.ensure_heads trains them."""
    return execute(plan_run(cfg))


def execute(plan: RunPlan) -> dict:
    t0 = time.time()
    cfg = plan.cfg
    so = cfg.storage_options or None
    run_dir = cfg.run_dir
    if cfg.incremental:
        _say(f"incremental: {len(plan.skipped)} file(s) done by earlier runs, {len(plan.files)} new")
    mf.check_run_identity(run_dir, plan.identity, so)
    removed = _remove_uncommitted_parts(run_dir, plan.committed, so)
    if plan.committed or removed:
        _say(
            f"resuming run {cfg.run_id}: {len(plan.committed)} shard(s) already committed, "
            f"{removed} partial file(s) removed"
        )
    new_markers: list[dict] = []
    steady: dict = {}
    if plan.files:
        init_ray(cfg.ray_address)
        set_max_block_bytes(MAX_BLOCK_BYTES)
        total = count_rows(_read(plan)) if cfg.count_units else None
        ds = _pipeline(plan)
        what = f"{total} unit(s) to label" if total is not None else f"{plan.input_bytes} input bytes to label"
        _say(f"run {cfg.run_id}: {len(plan.files)} file(s), {what} -> {run_dir}")
        progress = Progress(total, cfg.progress_interval_s)
        new_markers = _drive(ds, run_dir, so, progress)
        steady = progress.steady()
    man = plan.manifest(new_markers, time.time() - t0, steady, storage.versions())
    storage.write_json(storage.join(run_dir, mf.MANIFEST), man, so)
    for warning in mf.unused_label_warnings(man["sources"]):
        _say(warning)
    mf.enforce_quarantine_limit(man, cfg.max_quarantine_fraction, storage.join(run_dir, mf.MANIFEST), so)
    return man


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
    """read + tokenize -> embed + score -> write: a Dataset of the write stage's range summaries."""
    cfg, r, m = plan.cfg, plan.cfg.resources, plan.cfg.model
    so = cfg.storage_options or None
    cpu = Resources(num_cpus=r.cpus_per_cpu_task)
    # Tokenization quarantines a row (a pair, a best-of-N group) whole when one of its units fails,
    # so it must see whole rows. Only the read task sees a shard whole: between operators Ray Data
    # may split a block at any row (target_max_block_size) or merge blocks. So it runs there, on
    # each shard, rather than as an operator of its own (TokenizeStage checks rows are whole).
    tokenize = TokenizeStage(None if m.armorm_checkpoint else m.backbone, m.template, cpu, m.armorm_checkpoint, so)
    # Blocks of at most units_per_call units reach the actors: each scoring call's results are
    # written and committed while the next is scored (a block is the unit of streaming).
    ds = rebatch(_read(plan, stage_function(tokenize)), r.units_per_call)
    scoring = Resources(
        num_cpus=r.num_cpus_per_actor,
        num_gpus=r.num_gpus_per_actor,
        custom=r.custom_resources_per_actor,
        actors=(r.actors[0], r.actors[1]) if isinstance(r.actors, list) else r.actors,
        batch_size=r.units_per_call,
    )
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
    ds = apply_stage(ds, EmbedScoreStage(model, plan.objectives, scoring))
    return apply_stage(ds, WriteStage(cfg.run_dir, cfg.run_id, plan.objectives, cfg.embeddings, so, cpu))


def _drive(ds, run_dir: str, so: dict | None, progress: Progress) -> list[dict]:
    """Consume the write stage's range summaries; commit each shard the moment it is complete."""
    ledger = ShardLedger()
    markers = []
    for table in stream(ds):
        for summary in summaries_of(table):
            progress.add(summary.units, summary.tokens, summary.scored_from, summary.scored_until)
            finished = ledger.add(summary)
            if finished is not None:
                marker = finished.marker()
                storage.write_json(mf.marker_uri(run_dir, marker["shard_id"]), marker, so)
                markers.append(marker)
    incomplete = ledger.incomplete()
    if incomplete:
        raise RuntimeError(f"pipeline ended with incomplete shards {incomplete[:5]}: not every unit was written")
    _say(progress.line())
    return markers
