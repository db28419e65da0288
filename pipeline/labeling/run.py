"""The labeling job's driver: plan the Ray Data pipeline, commit shards as they complete,
write the manifest. Resumable (same run id) and incremental (new input files only)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict

from pipeline import storage
from pipeline.labeling import manifest as mf
from pipeline.labeling.commit import ShardLedger, shard_of_part
from pipeline.labeling.config import LabelConfig
from pipeline.labeling.stages import EmbedScoreStage, ScoringModel, TokenizeStage, WriteStage
from pipeline.runtime import init_ray
from pipeline.stage import Resources, apply_stage, stage_function

# Ray Data merges what a task yields into blocks of up to 128 MiB (DataContext default): a file's
# tokenized shards would travel as one block, and nothing would be scored, written or committed
# until a whole file (of any size) is through. Small blocks keep the stream fine-grained: bounded
# memory, commits every few MiB of units, resumable progress. (Blocks still group small shards.)
MAX_BLOCK_BYTES = 4 * 1024**2

log = logging.getLogger("armolabel.label")


def _say(msg: str) -> None:
    from pipeline.secrets import scrub

    print(scrub(f"[label] {msg}"), flush=True)


def job_objectives(cfg: LabelConfig) -> list[str]:
    """The objective columns this run writes: those of its heads (none in embed-only mode)."""
    m = cfg.model
    if m.armorm_checkpoint:
        from pipeline.embed.checkpoint import read_objective_names

        return read_objective_names(m.armorm_checkpoint)
    if m.heads:
        from pipeline.heads.model import ArmoHeads

        return list(ArmoHeads.read_objectives(m.heads))
    return []


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
    """Run (or resume) the labeling job; returns the manifest."""
    from pipeline.corpus import InputSpec, expand_files, read_corpus

    t0 = time.time()
    init_ray(cfg.ray_address)
    so = cfg.storage_options or None
    run_dir = cfg.run_dir
    if cfg.model.heads and cfg.model.train_if_missing and not storage.exists(cfg.model.heads, so):
        from pipeline.labeling.train import train_from_config

        _say(f"no heads at {cfg.model.heads}: training them first ({cfg.model.train_if_missing})")
        train_from_config(cfg.model.train_if_missing, heads_out=cfg.model.heads)
        t0 = time.time()  # the manifest times the labeling; training writes its own report
    objectives = job_objectives(cfg)

    specs = [InputSpec.from_dict({"storage_options": cfg.storage_options, **i}) for i in cfg.inputs]
    input_files = []
    for spec in specs:
        for uri in expand_files(spec):
            fs, path = storage.filesystem(uri, so)
            input_files.append({"uri": uri, "size": fs.size(path) if fs.isfile(path) else None, "source": spec.source})
    skipped_files = []
    if cfg.incremental:
        earlier = mf.earlier_input_files(cfg.output, cfg.run_id, so)
        skipped_files = [f for f in input_files if f["uri"] in earlier and earlier[f["uri"]]["size"] == f["size"]]
        input_files = [f for f in input_files if f not in skipped_files]
        _say(f"incremental: {len(skipped_files)} file(s) done by earlier runs, {len(input_files)} new")

    mf.check_run_identity(run_dir, cfg.scoring_identity(), so)
    done = mf.completed_shards(run_dir, so)
    removed = _remove_uncommitted_parts(run_dir, done, so)
    if done or removed:
        _say(f"resuming run {cfg.run_id}: {len(done)} shard(s) already committed, {removed} partial file(s) removed")

    files = [f["uri"] for f in input_files]
    r = cfg.resources
    new_markers: list[dict] = []
    steady: dict = {}
    if files:
        import ray.data

        ray.data.DataContext.get_current().target_max_block_size = MAX_BLOCK_BYTES
        cpu = Resources(num_cpus=r.cpus_per_cpu_task)
        backbone = {"path": cfg.model.armorm_checkpoint} if cfg.model.armorm_checkpoint else cfg.model.backbone
        # Tokenization runs inside the read tasks, one shard at a time, so that it sees whole rows.
        tokenize = TokenizeStage(backbone, cfg.model.template, cpu)

        def plan(transform=None):
            return read_corpus(
                specs,
                rows_per_shard=r.rows_per_shard,
                exclude_shards=set(done),
                files=files,
                limit_rows=cfg.limit_rows_per_input,
                num_cpus=r.cpus_per_cpu_task,
                shard_transform=transform,
                field_use=True,
            )

        total = plan().count()  # parsing only: cheap next to the model, and it gives progress an ETA
        # Blocks of at most units_per_call units reach the actors: each scoring call's results are
        # written and committed while the next is scored (a block is the unit of streaming).
        ds = plan(stage_function(tokenize)).repartition(target_num_rows_per_block=r.units_per_call)
        scoring = Resources(
            num_cpus=r.num_cpus_per_actor,
            num_gpus=r.num_gpus_per_actor,
            custom=r.custom_resources_per_actor,
            actors=tuple(r.actors) if isinstance(r.actors, list) else r.actors,
            batch_size=r.units_per_call,
        )
        model = ScoringModel(
            cfg.model.backbone,
            cfg.model.heads,
            cfg.model.armorm_checkpoint,
            r.token_budget,
            cfg.embeddings,
            r.threads_per_actor,
            r.share_prompts,
        )
        ds = apply_stage(ds, EmbedScoreStage(model, objectives, scoring))
        ds = apply_stage(ds, WriteStage(run_dir, cfg.run_id, objectives, cfg.embeddings, cfg.storage_options, cpu))
        _say(f"run {cfg.run_id}: {len(files)} file(s), {total} unit(s) to label -> {run_dir}")
        progress = Progress(total, cfg.progress_interval_s)
        new_markers = _drive(ds, run_dir, so, progress)
        steady = progress.steady()

    markers = list(done.values()) + new_markers
    wall = time.time() - t0
    labeled = sum(m["labeled_units"] for m in new_markers)
    tokens = sum(m["tokens"] for m in new_markers)
    man = {
        "run_id": cfg.run_id,
        "status": "complete",
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
        "versions": storage.versions(),
        "objectives": objectives,
        "input_files": input_files,
        "skipped_input_files": skipped_files,
        "sources": mf.summarize_sources(markers),
        "shards": len(markers),
        "shards_this_attempt": len(new_markers),
        "scored_on": dict(sum((Counter(m.get("scored_on", {})) for m in new_markers), Counter())),
        "units_labeled_this_attempt": labeled,
        "wall_time_s": round(wall, 3),
        "units_per_s": round(labeled / wall, 3) if wall else None,
        "tokens_per_s": round(tokens / wall, 1) if wall else None,
        **mf.token_accounting(new_markers),
        **steady,
        "output": {"data": storage.join(run_dir, "data"), "quarantine": storage.join(run_dir, "quarantine")},
    }
    storage.write_json(storage.join(run_dir, mf.MANIFEST), man, so)
    for source, s in sorted(man["sources"].items()):
        if s.get("unused_label_fields"):
            _say(
                f"warning: source {source!r}: record fields that look like labels were never read: "
                f"{', '.join(s['unused_label_fields'])} (map them in the input spec; check a mapping with "
                f"python -m jobs.inspect --config FILE)"
            )
    return man


def _drive(ds, run_dir: str, so: dict | None, progress: Progress) -> list[dict]:
    """Consume the write stage's summaries; commit each shard the moment it is complete."""
    from pipeline.corpus.field_use import FieldUse

    ledger = ShardLedger()
    reasons: dict[str, Counter] = defaultdict(Counter)
    fields: dict[str, FieldUse] = defaultdict(FieldUse)
    nodes: dict[str, Counter] = defaultdict(Counter)
    markers = []
    # prefetch_batches=0: with Ray's default of 1 the iterator holds each block until the next one
    # arrives, so every commit (and progress line) would wait for one more block to be scored.
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
        for summary in batch.to_pylist():
            reasons[summary["shard_id"]].update(json.loads(summary["reasons"]))
            nodes[summary["shard_id"]].update(json.loads(summary["scored_on"]))
            fields[summary["shard_id"]].merge(FieldUse.from_json(summary.get("record_fields")))
            progress.add(summary["units"], summary["tokens"], summary["scored_from"], summary["scored_until"])
            finished = ledger.add(summary)
            if finished is not None:
                marker = {
                    **finished.totals,
                    "reasons": dict(reasons.pop(summary["shard_id"])),
                    "scored_on": dict(nodes.pop(summary["shard_id"])),
                    "record_fields": json.loads(fields.pop(summary["shard_id"]).to_json()),
                }
                storage.write_json(mf.marker_uri(run_dir, marker["shard_id"]), marker, so)
                markers.append(marker)
    incomplete = ledger.incomplete()
    if incomplete:
        raise RuntimeError(f"pipeline ended with incomplete shards {incomplete[:5]}: not every unit was written")
    _say(progress.line())
    return markers
