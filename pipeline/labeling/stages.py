"""The labeling job's stages: tokenize (CPU) -> embed + score (model actors) -> write (CPU).

Each stage declares the columns it reads and writes (see pipeline/schema.py for their meaning).
A unit that fails in any stage is quarantined with a reason and carried on to the writer, so
that every input unit ends in exactly one output file: labeled or quarantined.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema, storage
from pipeline.corpus.field_use import FieldUse
from pipeline.corpus.reader import FIELD_USE
from pipeline.embed.backbone import BackboneSpec, load_backbone, load_tokenizer, resolve_kind
from pipeline.embed.checkpoint import checkpoint_backbone, checkpoint_tokenizer, local_checkpoint
from pipeline.embed.engine import EmbeddingEngine
from pipeline.embed.templating import TemplateError, TemplatePolicy, tokenize_many
from pipeline.heads.ensemble import EnsembleError, HeadsEnsemble, load_beside
from pipeline.heads.model import ArmoHeads
from pipeline.labeling.commit import RANGE_SCHEMA, RangeSummary, contiguous_runs, part_name, summaries_table
from pipeline.stage import Resources, Stage, StageError

QUARANTINE_STAGE = "quarantine_stage"
# Internal columns (reported in markers and the manifest, not written to the output):
SCORED_ON = "scored_on"  # the node that scored the unit (the run's first scoring stage)
# "<stage>@<node>" of every scoring stage that scored the unit, one column per stage
STAGE_NODE_PREFIX = "scored_on:"
SCORED_FROM = "scored_from"  # wall-clock start and end of the scoring call (unix seconds):
SCORED_UNTIL = "scored_until"  # the driver measures pipeline throughput from them
COMPUTED_TOKENS = "computed_tokens"  # token positions the backbone ran, charged per unit (padding included)
USEFUL_TOKENS = "useful_tokens"  # tokens that had to run (each distinct prompt of a call once)
# Storage requests the read task retried while it read a shard (on the shard's first unit; see
# count_read_retries), summed with the write task's own into each range's storage_retries.
READ_RETRIES = "read_storage_retries"


def count_read_retries(table: pa.Table) -> pa.Table:
    """Runs in the read task after each shard is read: charges the storage retries this process
    made since the last shard to this shard's first unit."""
    n = table.num_rows
    if n == 0:
        return table
    retried = sum(storage.FAULTS.take().values())
    return _set_column(table, READ_RETRIES, [retried] + [0] * (n - 1), pa.int64())


TOKEN_COLUMNS = [name for name, _ in schema.TOKEN_FIELDS]
DEBIASED_PREFIX = schema.DEBIASED_PREFIX


def _set_column(table: pa.Table, name: str, values, type_=None) -> pa.Table:
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


def _quarantine_stage_column(batch: pa.Table) -> list:
    if QUARANTINE_STAGE in batch.column_names:
        return batch.column(QUARANTINE_STAGE).to_pylist()
    return ["read" if r is not None else None for r in batch.column("quarantine_reason").to_pylist()]


class TokenizeStage(Stage):
    """Chat template + tokenization, apart from the model so it never starves the accelerator.

    A row whose unit fails (prefix check, over-long with the quarantine policy) is quarantined
    whole: every unit of the row, so preference pairs and best-of-N groups stay intact.
    """

    name = "tokenize"
    reads = ("row_id", "prompt", "response", "n_responses", "response_index", "quarantine_reason")
    writes = tuple(TOKEN_COLUMNS) + ("quarantine_reason", QUARANTINE_STAGE)

    def __init__(
        self,
        backbone: dict | None,
        template: dict,
        resources: Resources | None = None,
        armorm_checkpoint: str | None = None,
        storage_options: dict | None = None,
    ):
        self.backbone_spec = backbone
        self.armorm_checkpoint = armorm_checkpoint  # local or remote: the tokenizer comes from it
        self.storage_options = storage_options
        self.template = template
        self.resources = resources or Resources(num_cpus=0.25)

    def setup(self) -> None:
        if self.armorm_checkpoint:
            self.tokenizer = _checkpoint_tokenizer(self.armorm_checkpoint, self.storage_options)
            self.kind = "decoder"  # the released layout is a Llama
        else:
            spec = BackboneSpec.from_dict(self.backbone_spec or {})
            self.tokenizer = load_tokenizer(spec)
            self.kind = resolve_kind(spec)  # decoder | encoder, without loading the weights
        self.policy = TemplatePolicy(**self.template)

    def process(self, batch: pa.Table) -> pa.Table:
        def tokenize(prompts, responses):
            return tokenize_many(self.tokenizer, prompts, responses, self.policy, self.kind)

        results, reasons, stages = tokenize_rows_whole(batch, tokenize)
        out = batch
        for name, type_ in schema.TOKEN_FIELDS:
            out = _set_column(out, name, [getattr(r, name) if r is not None else None for r in results], type_)
        out = _set_column(out, "quarantine_reason", reasons, pa.string())
        return _set_column(out, QUARANTINE_STAGE, stages, pa.string())


def tokenize_rows_whole(batch: pa.Table, tokenize, label: str = "") -> tuple[list, list, list]:
    """(result per unit or None, quarantine reasons, quarantine stages) of `tokenize(prompts,
    responses)` over the batch's good units. A unit that fails quarantines its whole row (every
    unit of it), so preference pairs and best-of-N groups stay intact; `label` prefixes its reason."""
    n = batch.num_rows
    reasons = batch.column("quarantine_reason").to_pylist()
    stages = _quarantine_stage_column(batch)
    row_ids = batch.column("row_id").to_pylist()
    good = [i for i in range(n) if reasons[i] is None]
    _check_rows_whole(batch, good, row_ids)
    prompts = batch.column("prompt").to_pylist()
    responses = batch.column("response").to_pylist()
    results: list = [None] * n
    failed_rows: dict[str, str] = {}
    for i, res in zip(good, tokenize([prompts[i] for i in good], [responses[i] for i in good])):
        if isinstance(res, TemplateError):
            failed_rows.setdefault(row_ids[i], label + res.reason)
        else:
            results[i] = res
    for i in good:
        if row_ids[i] in failed_rows:
            reasons[i], stages[i], results[i] = failed_rows[row_ids[i]], "template", None
    return results, reasons, stages


_CHECKPOINT_TOKENIZERS: dict[str, object] = {}  # per process: Ray reuses workers across read tasks


def _checkpoint_tokenizer(path: str, storage_options: dict | None):
    """The tokenizer the scoring stage will use for this checkpoint (its own files, its pad and
    length checks), from the per-machine copy when the checkpoint is remote."""
    if path not in _CHECKPOINT_TOKENIZERS:
        directory = local_checkpoint(path, storage_options)
        config = storage.read_json(storage.join(directory, "config.json"))
        _CHECKPOINT_TOKENIZERS[path] = checkpoint_tokenizer(directory, config)
    return _CHECKPOINT_TOKENIZERS[path]


def _check_rows_whole(batch: pa.Table, good: list[int], row_ids: list) -> None:
    """Every good row must arrive with all its units (readers emit whole rows per shard)."""
    n_resp = batch.column("n_responses").to_pylist()
    seen = Counter(row_ids[i] for i in good)
    for i in good:
        if seen[row_ids[i]] != n_resp[i]:
            raise StageError(
                f"row {row_ids[i]}: {seen[row_ids[i]]} of {n_resp[i]} units in one batch; batches must hold whole rows"
            )


@dataclass
class ScoringModel:
    """What the score stage needs to know about the model, without loading it."""

    backbone: dict | None
    heads: str | None
    armorm_checkpoint: str | None
    token_budget: int | None
    embeddings: bool
    num_threads: int | None = None  # CPU only: torch intra-op threads per actor
    share_prompts: str = "auto"  # compute each distinct prompt once per call (see embed.engine)
    storage_options: dict | None = None  # for heads and checkpoints on s3:// (or any fsspec URI)


class EmbedScoreStage(Stage):
    """The backbone over a call's units, then the reward heads. Held by actors. Decoders compute
    each distinct prompt of the call once (shared-prompt packed rows, EmbeddingEngine)."""

    name = "embed_score"
    reads = ("input_ids", "prompt_end", "prompt_input_ids", "quarantine_reason")
    heads: ArmoHeads | None
    heads_fingerprint: str | None
    ensemble: HeadsEnsemble | None

    def __init__(self, model: ScoringModel, objectives: list[str], resources: Resources):
        self.model = model
        self.objectives = objectives
        self.resources = resources
        self.writes = self.columns_written(objectives, model.embeddings)

    @staticmethod
    def columns_written(objectives: list[str], embeddings: bool) -> tuple[str, ...]:
        per_objective = [
            schema.objective_column(prefix, obj) for obj in objectives for prefix in schema.PER_OBJECTIVE_PREFIXES
        ]
        return (
            *per_objective,
            "score",
            *schema.ENSEMBLE_COLUMNS,
            *(("embedding", "prompt_embedding") if embeddings else ()),
            "backbone_fingerprint",
            "heads_fingerprint",
            "quarantine_reason",
            SCORED_ON,
            STAGE_NODE_PREFIX + EmbedScoreStage.name,
            SCORED_FROM,
            SCORED_UNTIL,
            COMPUTED_TOKENS,
            USEFUL_TOKENS,
            QUARANTINE_STAGE,
        )

    def setup(self) -> None:
        self.node = _node_name()

        self.ensemble = None
        if self.model.armorm_checkpoint:
            settings = {k: v for k, v in (self.model.backbone or {}).items() if k in ("device", "dtype")}
            backbone, self.heads = checkpoint_backbone(
                self.model.armorm_checkpoint, storage_options=self.model.storage_options, **settings
            )
            self.heads_fingerprint = backbone.fingerprint  # one id for the checkpoint: weights + heads
            # An export of heads trained with an ensemble carries it (jobs.export_armorm).
            self.ensemble = self._ensemble_beside(self.model.armorm_checkpoint, self.heads.fingerprint, backbone)
        else:
            backbone = load_backbone(BackboneSpec.from_dict(self.model.backbone or {}))
            self.heads = None
            self.heads_fingerprint = None
            self.ensemble = None
            if self.model.heads:
                self.heads = ArmoHeads.load(self.model.heads, self.model.storage_options)
                self.heads_fingerprint = self.heads.fingerprint
                # An ensemble saved beside the heads adds score_mean / score_std / score_min and the
                # per-objective ensemble_rating_mean_* / ensemble_rating_std_*.
                self.ensemble = self._ensemble_beside(self.model.heads, self.heads_fingerprint, backbone)
        self.engine = EmbeddingEngine(
            backbone,
            token_budget=self.model.token_budget,
            num_threads=self.model.num_threads,
            share_prompts=self.model.share_prompts,
        )
        self.backbone_fingerprint = backbone.fingerprint
        if self.heads is not None and list(self.heads.objectives) != list(self.objectives):
            raise StageError(f"heads objectives {self.heads.objectives} != job objectives {self.objectives}")

    def _ensemble_beside(self, directory: str, heads_fingerprint: str, backbone) -> HeadsEnsemble | None:
        """The ensemble saved in `<directory>/ensemble/`, checked against these heads and backbone."""
        try:
            ensemble = load_beside(directory, self.model.storage_options)
            if ensemble is not None:
                ensemble.check(heads_fingerprint, backbone.fingerprint, f"{directory}/ensemble")
            return ensemble
        except EnsembleError as e:
            raise StageError(str(e)) from e

    def process(self, batch: pa.Table) -> pa.Table:
        started = time.time()
        n = batch.num_rows
        reasons, stages, good = units_to_score(batch)
        k = len(self.objectives)
        ratings = np.full((n, k), np.nan, np.float32)
        debiased = np.full((n, k), np.nan, np.float32)
        gates = np.full((n, k), np.nan, np.float32)
        score = np.full(n, np.nan, np.float32)
        spread = np.full((n, len(schema.ENSEMBLE_COLUMNS)), np.nan, np.float32)
        rating_mean = np.full((n, k), np.nan, np.float32)
        rating_std = np.full((n, k), np.nan, np.float32)
        emb = pemb = None
        computed = np.zeros(n, np.int64)
        useful = np.zeros(n, np.int64)
        if len(good):
            ids = batch.column("input_ids").take(pa.array(good)).to_pylist()
            ends = batch.column("prompt_end").take(pa.array(good)).to_pylist()
            pids = batch.column("prompt_input_ids").take(pa.array(good)).to_pylist()
            e = self.engine.embed(ids, ends, pids if any(p is not None for p in pids) else None)
            if e.computed is not None:
                computed[good], useful[good] = e.computed, e.useful
            else:  # encoders: response and prompt passes, padding not counted
                computed[good] = useful[good] = [len(x) + len(p or ()) for x, p in zip(ids, pids)]
            if self.model.embeddings:
                emb, pemb = e.response, e.prompt
            if self.heads is not None:
                out = self.heads.score(e.response, e.prompt)
                ratings[good], debiased[good] = out.rewards, out.debiased
                gates[good], score[good] = out.gate, out.score
                if self.ensemble is not None:  # the same embeddings: no extra backbone pass
                    ens = self.ensemble.outputs(e.response, e.prompt)
                    spread[good] = np.column_stack([ens.score.mean, ens.score.std, ens.score.min])
                    rating_mean[good], rating_std[good] = ens.rating_mean, ens.rating_std
                    for i in good[~np.isfinite(spread[good]).all(axis=1)]:
                        reasons[i], stages[i] = "non-finite ensemble score", "score"
                for i in good[~np.isfinite(score[good])]:
                    reasons[i], stages[i] = "non-finite score", "score"
        out_t = batch
        per_objective = dict(zip(schema.PER_OBJECTIVE_PREFIXES, (ratings, debiased, gates, rating_mean, rating_std)))
        for j, obj in enumerate(self.objectives):
            for prefix, values in per_objective.items():
                out_t = _set_column(out_t, schema.objective_column(prefix, obj), _masked(values[:, j]))
        out_t = _set_column(out_t, "score", _masked(score))
        for j, name in enumerate(schema.ENSEMBLE_COLUMNS):
            out_t = _set_column(out_t, name, _masked(spread[:, j]))
        if self.model.embeddings:
            h_resp = [None] * n
            h_prompt = [None] * n
            if emb is not None and pemb is not None:
                for row, i in enumerate(good):
                    h_resp[i], h_prompt[i] = emb[row], pemb[row]
            out_t = _set_column(out_t, "embedding", h_resp, pa.list_(pa.float32()))
            out_t = _set_column(out_t, "prompt_embedding", h_prompt, pa.list_(pa.float32()))
        out_t = _set_column(out_t, "backbone_fingerprint", [self.backbone_fingerprint] * n, pa.string())
        out_t = _set_column(out_t, "heads_fingerprint", [self.heads_fingerprint] * n, pa.string())
        out_t = _set_column(out_t, "quarantine_reason", reasons, pa.string())
        out_t = _set_column(out_t, SCORED_ON, [self.node] * n, pa.string())
        out_t = _set_column(out_t, STAGE_NODE_PREFIX + self.name, scored_by(self.name, self.node, n, good), pa.string())
        out_t = _set_column(out_t, SCORED_FROM, [started] * n, pa.float64())
        out_t = _set_column(out_t, SCORED_UNTIL, [time.time()] * n, pa.float64())
        out_t = _set_column(out_t, COMPUTED_TOKENS, computed, pa.int64())
        out_t = _set_column(out_t, USEFUL_TOKENS, useful, pa.int64())
        return _set_column(out_t, QUARANTINE_STAGE, stages, pa.string())


def units_to_score(batch: pa.Table) -> tuple[list, list, np.ndarray]:
    """(quarantine reasons, quarantine stages, positions of the units not quarantined) of a
    scoring stage's batch: a stage scores only the units no earlier stage quarantined."""
    reasons = batch.column("quarantine_reason").to_pylist()
    good = np.array([i for i, r in enumerate(reasons) if r is None], dtype=np.int64)
    return reasons, _quarantine_stage_column(batch), good


def scored_by(stage: str, node: str, n: int, scored: np.ndarray) -> list[str | None]:
    """The STAGE_NODE_PREFIX column of a scoring stage: "<stage>@<node>" on the units it scored (the
    `scored` positions), null on those quarantined before it."""
    out: list[str | None] = [None] * n
    for i in scored:
        out[int(i)] = f"{stage}@{node}"
    return out


def _node_name() -> str:
    """Which node does the scoring: the Ray node id inside Ray, else the host name."""
    import socket

    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - provenance only; never fail scoring over it
        pass
    return socket.gethostname()


def _masked(values: np.ndarray) -> pa.Array:
    return pa.array(values, type=pa.float32(), mask=np.isnan(values))


def output_columns(objectives: list[str], embeddings: bool, reward_models: list[str] | tuple = ()) -> pa.Schema:
    return schema.output_schema(objectives, with_embeddings=embeddings, reward_models=reward_models)


class WriteStage(Stage):
    """Writes each contiguous range of a shard's units to files named after the shard and range
    (labeled units to data/, quarantined ones to quarantine/), atomically, and returns one
    RangeSummary row per range (RANGE_SCHEMA, nothing else) for the driver's ledger."""

    name = "write"
    reads = (
        "shard_id",
        "shard_unit",
        "shard_units",
        "shard_rows",
        "source",
        "source_uri",
        "quarantine_reason",
        "response_index",
        "total_tokens",
    )
    writes = tuple(RANGE_SCHEMA.names)

    def __init__(
        self,
        run_dir: str,
        run_id: str,
        objectives: list[str],
        embeddings: bool,
        storage_options: dict | None,
        resources: Resources | None = None,
        reward_models: list[str] | tuple[str, ...] = (),
        null_columns: tuple[str, ...] = (),
    ):
        self.run_dir = run_dir
        self.run_id = run_id
        self.out_schema = output_columns(objectives, embeddings, reward_models)
        # Output columns no stage of this run computes (the backbone pass's, in a run of reward
        # models only): written as nulls, so every run has the same columns.
        self.null_columns = null_columns
        self.storage_options = storage_options
        self.resources = resources or Resources(num_cpus=0.25)

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        batch = _set_column(batch, "run_id", [self.run_id] * n, pa.string())
        for name in self.null_columns:
            batch = _set_column(batch, name, pa.nulls(n, self.out_schema.field(name).type))
        if QUARANTINE_STAGE not in batch.column_names:
            batch = _set_column(batch, QUARANTINE_STAGE, _quarantine_stage_column(batch), pa.string())
        shard_ids = batch.column("shard_id").to_numpy(zero_copy_only=False)
        summaries = []
        for sid in np.unique(shard_ids):
            positions = np.nonzero(shard_ids == sid)[0]
            shard = batch.take(pa.array(positions))
            units = shard.column("shard_unit").to_numpy()
            for first, last, pos in contiguous_runs(units):
                summaries.append(self._write_range(shard.take(pa.array(pos)), str(sid), first, last))
        return summaries_table(summaries)

    def _write_range(self, part: pa.Table, sid: str, first: int, last: int) -> RangeSummary:
        bad_mask = pc.is_valid(part.column("quarantine_reason"))
        good, bad = part.filter(pc.invert(bad_mask)), part.filter(bad_mask)
        name = part_name(sid, first, last)
        read_retries = (pc.sum(part.column(READ_RETRIES)).as_py() or 0) if READ_RETRIES in part.column_names else 0
        files = []
        if good.num_rows:
            uri = storage.join(self.run_dir, "data", name)
            _write_parquet(uri, good.select(self.out_schema.names).cast(self.out_schema), self.storage_options)
            files.append(uri)
        if bad.num_rows:
            bad = _set_column(bad, "stage", bad.column(QUARANTINE_STAGE))
            uri = storage.join(self.run_dir, "quarantine", name)
            q = bad.select(schema.QUARANTINE_SCHEMA.names).cast(schema.QUARANTINE_SCHEMA)
            _write_parquet(uri, q, self.storage_options)
            files.append(uri)
        first_units = pc.equal(part.column("response_index"), 0)
        tokens = pc.sum(good.column("total_tokens")).as_py() if good.num_rows else 0
        cols = part.column_names
        use = _shard_field_use(part)
        return RangeSummary(
            shard_id=sid,
            first=first,
            last=last,
            source=part.column("source")[0].as_py(),
            source_uri=part.column("source_uri")[0].as_py(),
            shard_units=part.column("shard_units")[0].as_py(),
            shard_rows=part.column("shard_rows")[0].as_py(),
            units=part.num_rows,
            labeled_units=good.num_rows,
            quarantined_units=bad.num_rows,
            rows_labeled=pc.sum(pc.and_(first_units, pc.invert(bad_mask))).as_py() or 0,
            rows_quarantined=pc.sum(pc.and_(first_units, bad_mask)).as_py() or 0,
            tokens=tokens or 0,
            # Absent when no scoring stage ran (e.g. every unit quarantined by the reader).
            computed_tokens=(pc.sum(part.column(COMPUTED_TOKENS)).as_py() or 0) if COMPUTED_TOKENS in cols else 0,
            useful_tokens=(pc.sum(part.column(USEFUL_TOKENS)).as_py() or 0) if USEFUL_TOKENS in cols else 0,
            storage_retries=read_retries + sum(storage.FAULTS.take().values()),
            reasons=dict(Counter(bad.column("quarantine_reason").to_pylist())),
            scored_on=dict(Counter(part.column(SCORED_ON).to_pylist())) if SCORED_ON in cols else {},
            scored_by_stage=dict(
                sum(
                    (
                        Counter(pc.drop_null(part.column(c)).to_pylist())
                        for c in cols
                        if c.startswith(STAGE_NODE_PREFIX)
                    ),
                    Counter(),
                )
            ),
            scored_from=pc.min(part.column(SCORED_FROM)).as_py() if SCORED_FROM in cols else None,
            scored_until=pc.max(part.column(SCORED_UNTIL)).as_py() if SCORED_UNTIL in cols else None,
            fields_present=dict(use.present) if use is not None else None,
            fields_read=sorted(use.read) if use is not None else None,
            files=files,
        )


def _shard_field_use(part: pa.Table) -> FieldUse | None:
    """The reader's field use of the shard (the reader puts it on the shard's first unit only), if
    the read carried it."""
    if FIELD_USE not in part.column_names:
        return None
    values = pc.drop_null(part.column(FIELD_USE))
    return FieldUse.from_dict(values[0].as_py()) if len(values) else None


def _write_parquet(uri: str, table: pa.Table, storage_options: dict | None) -> None:
    storage.write_atomic(uri, lambda f: pq.write_table(table, f, compression="zstd"), storage_options)
