"""The released ArmoRM checkpoint layout (docs/armorm.md, "The released checkpoint"): tensor names,
the config.json keys, and the pure steps of reading and writing it — heads from their tensors, the
config for an export, shard packing. No file is opened here and no backbone is built: reading and
writing checkpoints (through pipeline.storage) and turning one into a backbone live in
pipeline/embed/checkpoint.py, beside the other backbone sources.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.objectives import ARMORM_NAMES

from .gating import RELEASE_DROPOUT, RELEASE_HIDDEN_DIM, RELEASE_N_HIDDEN, RELEASE_TEMPERATURE
from .model import GATING_PREFIX, REGRESSION_KEY, TRANSFORM_KEY, ArmoHeads

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BACKBONE_PREFIX = "model."
EMBEDDING_KEY = BACKBONE_PREFIX + "embed_tokens.weight"
ARMORM_ARCHITECTURE = "LlamaForRewardModelWithGating"
# config keys ArmoRM adds on top of the Llama config (ours last: names and verbosity index)
ARMORM_CONFIG_KEYS = (
    "num_objectives",
    "gating_temperature",
    "gating_hidden_dim",
    "gating_n_hidden",
    "objectives",
    "verbosity_index",
    "gating_dropout",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DEFAULT_SHARD_SIZE = 5 * 1024**3
# The release's pad token: an added token, so no text the original tokenizer reads turns into it
# (the release grew Llama-3's 128,256 ids to 128,257 for it; pad_token_id 128256).
PAD_TOKEN = "[PAD]"

# The release's 19 objectives, in order (docs/armorm.md, "Stage 1"); its config does not name them.
# Defined once, with their scales, in the objective registry.
RELEASE_OBJECTIVES = ARMORM_NAMES


class CheckpointError(ValueError):
    pass


def is_head_tensor(name: str) -> bool:
    return name in (REGRESSION_KEY, TRANSFORM_KEY) or name.startswith(GATING_PREFIX)


def check_shard_names(weight_map: dict[str, str], where: str) -> None:
    """Only plain .safetensors files inside the checkpoint directory are ever read."""
    for shard in set(weight_map.values()):
        if not shard.endswith(".safetensors") or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise CheckpointError(
                f"{where}: refusing shard {shard!r} (only .safetensors files in the checkpoint directory are read)"
            )


def objective_names(config: dict, k: int) -> list[str]:
    names = config.get("objectives")
    if names:
        if len(names) != k:
            raise CheckpointError(f"config lists {len(names)} objective names for {k} objectives")
        return list(names)
    return list(RELEASE_OBJECTIVES) if k == len(RELEASE_OBJECTIVES) else [f"objective_{i}" for i in range(k)]


def config_objective_names(config: dict, where: str) -> list[str]:
    if "num_objectives" not in config:
        raise CheckpointError(f"{where}: not an ArmoRM config (no num_objectives)")
    return objective_names(config, int(config["num_objectives"]))


def infer_verbosity_index(T: np.ndarray) -> int | None:
    """T = I with row v reduced: v is the only row differing from the identity."""
    rows = np.flatnonzero(np.abs(T - np.eye(len(T))).max(axis=1) > 0)
    return int(rows[0]) if len(rows) == 1 else None


def heads_from_checkpoint(
    config: dict, tensors: dict[str, torch.Tensor], where: str, metadata: dict | None = None
) -> ArmoHeads:
    """ArmoHeads from a checkpoint's config and its head tensors (regression_layer, transform, gating.*)."""
    config_objective_names(config, where)
    for required in (REGRESSION_KEY, TRANSFORM_KEY, GATING_PREFIX + "logit_scale"):
        if required not in tensors:
            raise CheckpointError(f"{where}: tensor {required} missing")
    K, H = tensors[REGRESSION_KEY].shape
    if K != config["num_objectives"]:
        raise CheckpointError(f"{where}: regression_layer has {K} rows, config says {config['num_objectives']}")
    n_linear = len([n for n in tensors if n.startswith(GATING_PREFIX + "layers.") and n.endswith(".weight")])
    gating_config = {
        "in_features": H,
        "num_objectives": K,
        "hidden_dim": int(config.get("gating_hidden_dim", RELEASE_HIDDEN_DIM)),
        "n_hidden": int(config.get("gating_n_hidden", n_linear - 1 if n_linear else RELEASE_N_HIDDEN)),
        "temperature": float(config.get("gating_temperature", RELEASE_TEMPERATURE)),
        "dropout": float(config.get("gating_dropout", RELEASE_DROPOUT)),
    }
    if n_linear != gating_config["n_hidden"] + 1:
        raise CheckpointError(f"{where}: {n_linear} gating layers, config implies {gating_config['n_hidden'] + 1}")
    T = tensors[TRANSFORM_KEY].to(torch.float32).numpy()
    verbosity_index = config.get("verbosity_index", infer_verbosity_index(T))
    return ArmoHeads.from_tensors(
        tensors, objective_names(config, K), gating_config, verbosity_index, metadata=metadata or {}
    )


def llama_config_dict(config: dict) -> dict:
    """The plain Llama config inside an ArmoRM config.json (for transformers.LlamaConfig)."""
    return {k: v for k, v in config.items() if k not in ARMORM_CONFIG_KEYS and k not in ("auto_map", "architectures")}


def armorm_config(backbone_config: dict, heads: ArmoHeads, pad_token_id: int, vocab_size: int) -> dict:
    """config.json of an export: the backbone's Llama config, the ArmoRM keys, our objective names
    and verbosity index, and the dedicated pad token (with the vocabulary grown to hold it)."""
    if backbone_config.get("model_type") != "llama":
        raise CheckpointError(
            f"backbone model_type {backbone_config.get('model_type')!r}: the ArmoRM layout is a Llama model"
        )
    if backbone_config.get("hidden_size") != heads.hidden_size:
        raise CheckpointError(
            f"backbone hidden_size {backbone_config.get('hidden_size')} ≠ heads hidden size {heads.hidden_size}"
        )
    if not 0 <= pad_token_id < vocab_size:
        raise CheckpointError(f"pad_token_id {pad_token_id} outside the vocabulary of {vocab_size}")
    g = heads.gating
    config = {k: v for k, v in backbone_config.items() if k not in ("auto_map", "_name_or_path")}
    config.update(
        {
            "architectures": [ARMORM_ARCHITECTURE],
            "pad_token_id": int(pad_token_id),
            "vocab_size": int(vocab_size),
            "num_objectives": heads.num_objectives,
            "gating_temperature": g.temperature,
            "gating_hidden_dim": g.hidden_dim,
            "gating_n_hidden": g.n_hidden,
            "gating_dropout": g.dropout,
            "objectives": list(heads.objectives),
            "verbosity_index": heads.verbosity_index,
        }
    )
    return config


def pack_shards(sizes: list[int], shard_size: int) -> list[list[int]]:
    """Greedy packing in the given order (the same inputs always give the same shards): indices of
    the tensors of each shard, at most `shard_size` bytes each unless one tensor alone is bigger."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def shard_file_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def grow_embedding(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The embedding matrix with new rows for added tokens, each the mean of the existing rows
    (deterministic; transformers' resize samples around that mean). A right-padded causal model
    never reads a pad's own state, so the value only matters to loaders that pad otherwise."""
    if rows <= weight.shape[0]:
        return weight
    mean = weight.to(torch.float32).mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], 0)
