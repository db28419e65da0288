"""Column contracts, defined once.

A *unit* is one conversation to score: a prompt (chat messages) plus one response. Readers turn
every input row into one unit per response (a preference row gives two, a best-of-N row gives N),
or into one quarantine unit when the row is bad. Every later stage reads and writes the columns
named here, and the annotated Parquet output is `OUTPUT_FIXED` plus, per objective, a rating, a debiased
rating and a gate column.
"""

from __future__ import annotations

import pyarrow as pa

KINDS = ("instruction", "preference", "best_of_n", "rated")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
RATING = pa.struct([("name", pa.string()), ("raw", pa.float64()), ("value", pa.float64())])

# --- what readers emit (one row per unit) -------------------------------------------------
UNIT_FIELDS = [
    ("unit_id", pa.string()),  # f"{row_id}-{response_index}"
    ("row_id", pa.string()),  # stable id of the input row (ids.row_id / ids.bad_row_id)
    ("prompt_id", pa.string()),  # stable id of the prompt messages (ids.prompt_id)
    ("kind", pa.string()),  # one of KINDS; null for quarantined rows
    ("source", pa.string()),  # corpus name, e.g. "hh-rlhf"
    ("source_uri", pa.string()),  # file the row came from (local path or s3://)
    ("source_row", pa.int64()),  # 0-based line (JSONL), element (JSON array) or row (Parquet/HF)
    ("prompt", MESSAGES),  # every message before the response; last one is the user turn
    ("response", pa.string()),  # the assistant response being scored
    ("response_index", pa.int32()),  # position in the row: preference 0 = chosen, 1 = rejected
    ("n_responses", pa.int32()),
    ("preference", pa.string()),  # "chosen" | "rejected" | null
    ("tie", pa.bool_()),  # preference row judged a tie (order then as in the file)
    ("label_confidence", pa.float64()),  # share of annotators agreeing, or |strength| / max of a signed label
    ("human_rank", pa.int32()),  # best-of-N human rank, 0 = best, null if unranked
    ("ratings", pa.list_(RATING)),  # absolute ratings: raw value and its map to [0, 1]
    ("quarantine_reason", pa.string()),  # null for good units
    ("raw", pa.string()),  # raw text of a quarantined row (cut to RAW_MAX_CHARS)
    # shard bookkeeping, added by the reader: a shard is a chunk of consecutive rows of one file
    ("shard_id", pa.string()),
    ("shard_unit", pa.int64()),  # index of this unit within its shard (0 .. shard_units-1)
    ("shard_units", pa.int64()),  # units in the shard
    ("shard_rows", pa.int64()),  # input rows in the shard (good + quarantined)
]
UNIT_SCHEMA = pa.schema(UNIT_FIELDS)
UNIT_COLUMNS = [name for name, _ in UNIT_FIELDS]
RAW_MAX_CHARS = 4096

# --- added by tokenisation (CPU stage) ---------------------------------------------------------
TOKEN_FIELDS = [
    ("input_ids", pa.list_(pa.int32())),  # the templated conversation
    ("prompt_input_ids", pa.list_(pa.int32())),  # encoders only: the prompt alone; null for decoders
    ("prompt_end", pa.int32()),  # decoders: index of the prompt's last token in input_ids
    ("prompt_tokens", pa.int32()),
    ("response_tokens", pa.int32()),
    ("total_tokens", pa.int32()),  # len(input_ids)
    ("tokens_before_truncation", pa.int32()),
    ("truncated", pa.bool_()),
]

# --- the annotated output (one row per unit) ---------------------------------------------------
OUTPUT_FIXED_FIELDS = [
    ("unit_id", pa.string()),
    ("row_id", pa.string()),
    ("prompt_id", pa.string()),
    ("kind", pa.string()),
    ("source", pa.string()),
    ("source_uri", pa.string()),
    ("source_row", pa.int64()),
    ("prompt", MESSAGES),
    ("response", pa.string()),
    ("response_index", pa.int32()),
    ("n_responses", pa.int32()),
    ("preference", pa.string()),
    ("tie", pa.bool_()),
    ("label_confidence", pa.float64()),
    ("human_rank", pa.int32()),
    ("ratings", pa.list_(RATING)),
    ("prompt_tokens", pa.int32()),
    ("response_tokens", pa.int32()),
    ("total_tokens", pa.int32()),
    ("tokens_before_truncation", pa.int32()),
    ("truncated", pa.bool_()),
    ("score", pa.float32()),
    # With an ensemble of heads beside the heads (heads.ensemble: K): the mean, sample standard
    # deviation and minimum of the K members' scores, from the same embeddings; null without one.
    ("score_mean", pa.float32()),
    ("score_std", pa.float32()),
    ("score_min", pa.float32()),
    ("backbone_fingerprint", pa.string()),
    ("heads_fingerprint", pa.string()),
    ("run_id", pa.string()),
]
ENSEMBLE_COLUMNS = ("score_mean", "score_std", "score_min")
RATING_PREFIX = "rating_"  # per-objective absolute rating from the regression head (r)
DEBIASED_PREFIX = "debiased_"  # the same after verbosity debiasing (r · T): what the score combines
GATE_PREFIX = "gate_"  # per-objective gate weight (sums to the learned scale beta)
# With an ensemble: per objective, the members' mean and sample standard deviation of the rating r
# (null without one). Not under "rating_": readers that take every rating_* column get ratings only.
ENSEMBLE_RATING_MEAN_PREFIX = "ensemble_rating_mean_"
ENSEMBLE_RATING_STD_PREFIX = "ensemble_rating_std_"
PER_OBJECTIVE_PREFIXES = (
    RATING_PREFIX,
    DEBIASED_PREFIX,
    GATE_PREFIX,
    ENSEMBLE_RATING_MEAN_PREFIX,
    ENSEMBLE_RATING_STD_PREFIX,
)
EMBEDDING_FIELDS = [("embedding", pa.list_(pa.float32())), ("prompt_embedding", pa.list_(pa.float32()))]

QUARANTINE_FIELDS = [
    ("unit_id", pa.string()),
    ("row_id", pa.string()),
    ("source", pa.string()),
    ("source_uri", pa.string()),
    ("source_row", pa.int64()),
    ("stage", pa.string()),  # where it was caught: read | template | score
    ("quarantine_reason", pa.string()),
    ("raw", pa.string()),
    ("run_id", pa.string()),
]
QUARANTINE_SCHEMA = pa.schema(QUARANTINE_FIELDS)


def objective_column(prefix: str, objective: str) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in objective.lower())
    return prefix + safe


# With reward models (model.reward_models): one float32 column per model, what its own class returns.
REWARD_MODEL_PREFIX = "rm_"


def output_schema(
    objectives: list[str], with_embeddings: bool = False, reward_models: list[str] | tuple[str, ...] = ()
) -> pa.Schema:
    fields = list(OUTPUT_FIXED_FIELDS)
    fields += [(objective_column(prefix, o), pa.float32()) for prefix in PER_OBJECTIVE_PREFIXES for o in objectives]
    fields += [(REWARD_MODEL_PREFIX + name, pa.float32()) for name in reward_models]
    if with_embeddings:
        fields += EMBEDDING_FIELDS
    return pa.schema(fields)
