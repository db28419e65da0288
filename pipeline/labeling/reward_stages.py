"""The labeling job's stages for sequence-classifier reward models (`model.reward_models`).

Per reward model: its tokenization runs in the read task on each whole shard, after the
backbone's (a unit over its context quarantines its row whole, as the backbone's does), and its
scoring is an actor-pool stage of its own with its own resources, so several models stream through
one run one after another on each block, each on the nodes and GPUs it asks for. The tokenized
inputs travel in internal columns (`_rm_<name>_*`) that the scoring stage drops once it has used
them.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.embed.templating import TemplatePolicy
from pipeline.labeling.stages import (
    COMPUTED_TOKENS,
    QUARANTINE_STAGE,
    SCORED_FROM,
    SCORED_ON,
    SCORED_UNTIL,
    STAGE_NODE_PREFIX,
    USEFUL_TOKENS,
    _masked,
    _node_name,
    _set_column,
    scored_by,
    tokenize_rows_whole,
    units_to_score,
)
from pipeline.reward_models.inputs import reward_model_inputs
from pipeline.reward_models.spec import RewardModelSpec, inspect_reward_model
from pipeline.stage import Resources, Stage

_TOKENIZERS: dict[tuple[str, str], object] = {}  # per process: Ray reuses workers across read tasks


def input_columns(name: str) -> tuple[str, str, str]:
    """The internal columns carrying one reward model's tokenized input to its scoring stage."""
    return f"_rm_{name}_input_ids", f"_rm_{name}_token_type_ids", f"_rm_{name}_prompt_end"


class RewardModelTokenizeStage(Stage):
    """One reward model's input ids for each good unit. `primary`: in a run without the backbone
    pass, the first reward model's tokenization also fills the token count columns of the output."""

    reads = ("row_id", "prompt", "response", "n_responses", "quarantine_reason")

    def __init__(self, spec: RewardModelSpec, primary: bool, storage_options: dict | None = None):
        self.spec = spec
        self.primary = primary
        self.storage_options = storage_options
        self.name = f"tokenize_rm_{spec.name}"
        token_cols = tuple(n for n, _ in schema.TOKEN_FIELDS) if primary else ()
        self.writes = (*input_columns(spec.name), *token_cols, "quarantine_reason", QUARANTINE_STAGE)

    def setup(self) -> None:
        from pipeline.reward_models.scorer import load_tokenizer

        self.info = inspect_reward_model(self.spec, self.storage_options)
        key = (self.spec.path, self.spec.name)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = load_tokenizer(self.spec, self.storage_options)
        self.tokenizer = _TOKENIZERS[key]
        self.policy = TemplatePolicy.from_dict(self.spec.template or {})

    def process(self, batch: pa.Table) -> pa.Table:
        def tokenize(prompts, responses):
            return reward_model_inputs(
                self.tokenizer, self.info.family, prompts, responses, self.policy, self.info.pad_token_id
            )

        results, reasons, stages = tokenize_rows_whole(batch, tokenize, f"reward model {self.spec.name}: ")
        ids_col, types_col, end_col = input_columns(self.spec.name)
        out = _set_column(batch, ids_col, [r.input_ids if r else None for r in results], pa.list_(pa.int32()))
        out = _set_column(out, types_col, [r.token_type_ids if r else None for r in results], pa.list_(pa.int8()))
        out = _set_column(out, end_col, [r.prompt_end if r else None for r in results], pa.int32())
        if self.primary:
            counts = {
                "prompt_tokens": [r.prompt_tokens if r else None for r in results],
                "response_tokens": [r.total_tokens - r.prompt_tokens if r else None for r in results],
                "total_tokens": [r.total_tokens if r else None for r in results],
                "tokens_before_truncation": [r.tokens_before_truncation if r else None for r in results],
                "truncated": [r.truncated if r else None for r in results],
            }
            for name, type_ in schema.TOKEN_FIELDS:
                values = counts.get(name, [None] * batch.num_rows)  # input_ids: the model's own, internal
                out = _set_column(out, name, values, type_)
        out = _set_column(out, "quarantine_reason", reasons, pa.string())
        return _set_column(out, QUARANTINE_STAGE, stages, pa.string())


class RewardModelStage(Stage):
    """One reward model over a call's units (an actor holds the model): writes rm_<name>, adds its
    token accounting to the units' and widens their scoring window, then drops its input columns."""

    def __init__(
        self,
        spec: RewardModelSpec,
        resources: Resources,
        token_budget: int | None,
        num_threads: int | None,
        storage_options: dict | None = None,
        fingerprint: str | None = None,
    ):
        self.spec = spec
        self.fingerprint = fingerprint  # the run identity's: actors need not hash the weights again
        self.resources = resources
        self.token_budget = token_budget
        self.num_threads = num_threads
        self.storage_options = storage_options
        self.name = f"score_rm_{spec.name}"
        self.reads = (*input_columns(spec.name), "quarantine_reason")
        self.writes = (
            spec.column,
            "quarantine_reason",
            QUARANTINE_STAGE,
            SCORED_ON,
            STAGE_NODE_PREFIX + spec.column,
            SCORED_FROM,
            SCORED_UNTIL,
            COMPUTED_TOKENS,
            USEFUL_TOKENS,
        )

    def setup(self) -> None:
        from pipeline.reward_models.scorer import RewardModelScorer

        self.scorer = RewardModelScorer(
            self.spec, self.storage_options, self.token_budget, self.num_threads, self.fingerprint
        )
        self.node = _node_name()

    def process(self, batch: pa.Table) -> pa.Table:
        started = time.time()
        n = batch.num_rows
        reasons, stages, good = units_to_score(batch)
        rewards = np.full(n, np.nan, np.float32)
        computed = np.zeros(n, np.int64)
        useful = np.zeros(n, np.int64)
        ids_col, types_col, end_col = input_columns(self.spec.name)
        if len(good):
            take = pa.array(good)
            ids = batch.column(ids_col).take(take).to_pylist()
            ends = batch.column(end_col).take(take).to_pylist()
            types = batch.column(types_col).take(take).to_pylist()
            scored = self.scorer.score(ids, ends, types)
            rewards[good], computed[good], useful[good] = scored.rewards, scored.computed, scored.useful
            for i in good[~np.isfinite(rewards[good])]:
                reasons[i], stages[i] = f"non-finite reward from reward model {self.spec.name}", "score"
        out = _set_column(batch.drop_columns([ids_col, types_col, end_col]), self.spec.column, _masked(rewards))
        out = _set_column(out, "quarantine_reason", reasons, pa.string())
        out = _set_column(out, QUARANTINE_STAGE, stages, pa.string())
        out = _add(out, COMPUTED_TOKENS, computed)
        out = _add(out, USEFUL_TOKENS, useful)
        if SCORED_ON not in out.column_names:  # the first scoring stage of the run names the node
            out = _set_column(out, SCORED_ON, [self.node] * n, pa.string())
        stage_nodes = scored_by(self.spec.column, self.node, n, good)
        out = _set_column(out, STAGE_NODE_PREFIX + self.spec.column, stage_nodes, pa.string())
        out = _widen(out, SCORED_FROM, started, pc.min_element_wise)
        return _widen(out, SCORED_UNTIL, time.time(), pc.max_element_wise)


def _add(table: pa.Table, name: str, values: np.ndarray) -> pa.Table:
    if name in table.column_names:
        values = values + table.column(name).to_numpy(zero_copy_only=False).astype(np.int64)
    return _set_column(table, name, values, pa.int64())


def _widen(table: pa.Table, name: str, value: float, combine) -> pa.Table:
    column = pa.array([value] * table.num_rows, pa.float64())
    if name in table.column_names:
        column = combine(table.column(name).combine_chunks(), column)
    return _set_column(table, name, column, pa.float64())
