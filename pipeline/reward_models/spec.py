"""A reward model named in a labeling config (`model.reward_models`), and what can be known of it
before any weight is loaded.

`inspect_reward_model` reads only config.json, the tokenizer's config and the safetensors headers,
so `--check` and job start (before Ray) refuse a checkpoint the scoring actors could not load, each
problem naming the model and the file: remote code (`auto_map`), pickle-only weights, no score
head, several logits without a chosen index, a decoder tokenizer without a chat template, an
architecture no registry family covers. Loading itself is strict as well (pipeline/reward_models/
scorer.py): a missing or unexpected tensor is an error, never a silently re-initialised head.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import struct
from dataclasses import asdict, dataclass, field

from pipeline import storage
from pipeline.embed.backbone import file_sha256
from pipeline.heads.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    PICKLE_SUFFIXES,
    SINGLE_FILE,
    CheckpointError,
    check_shard_names,
)
from pipeline.reward_models.families import DECODER, Family, family_of, known_model_types

COLUMN_PREFIX = "rm_"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]*$")
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_VOCABS = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spm.model",
    "sentencepiece.bpe.model",
)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class RewardModelError(ValueError):
    """A reward model that cannot be scored as named; the message names the model and the file."""


@dataclass
class RewardModelResources:
    """The scoring pool of one reward model; a key left out takes the run's `resources` value."""

    actors: int | list[int] | None = None
    num_gpus_per_actor: float | None = None
    num_cpus_per_actor: float | None = None
    threads_per_actor: int | None = None
    custom_resources_per_actor: dict | None = None
    token_budget: int | None = None
    units_per_call: int | None = None


@dataclass
class RewardModelSpec:
    name: str  # the output column is rm_<name>
    path: str  # a local directory or a remote (s3://) one: config.json, safetensors, tokenizer files
    logit_index: int | None = None  # which logit is the reward when the head has several (0-based)
    template: dict = field(default_factory=dict)  # TemplatePolicy fields, for this model's tokenizer
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA, fp32 on CPU)
    device: str = "auto"
    attn_implementation: str = "auto"  # auto: the class's own default (Gemma-2: eager, for soft-capping)
    share_prompts: str = "auto"  # decoders: each distinct prompt once per call where exact (auto | never)
    resources: dict = field(default_factory=dict)  # RewardModelResources fields

    @property
    def column(self) -> str:
        return COLUMN_PREFIX + self.name

    @classmethod
    def from_dict(cls, d: dict) -> RewardModelSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise RewardModelError(f"unknown reward model settings {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if v is not None or k == "logit_index"})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RewardModelInfo:
    """What inspection learned: enough to tokenize and to plan, nothing loaded."""

    name: str
    family: Family
    num_labels: int
    logit_index: int
    pad_token_id: int | None  # config.json's: where the class stops reading a row
    max_position_embeddings: int | None


def _where(spec_name: str, uri: str) -> str:
    return f"reward model {spec_name!r} ({uri})"


def _read_json(uri: str, storage_options: dict | None) -> dict:
    return json.loads(storage.read_bytes(uri, storage_options))


def _listing(path: str, storage_options: dict | None) -> list[str]:
    fs, root = storage.filesystem(path, storage_options)
    if not fs.isdir(root):
        raise RewardModelError(f"{path}: no such directory")
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))


def _safetensors_header(uri: str, storage_options: dict | None) -> dict:
    fs, path = storage.filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 1 << 27:
            raise RewardModelError(f"{uri}: not a safetensors file (header of {n} bytes)")
        return json.loads(f.read(n))


def weight_files(path: str, names: list[str], storage_options: dict | None) -> list[str]:
    """The safetensors files of a checkpoint directory (index or single file); refuses pickles."""
    if INDEX_FILE in names:
        index = storage.join(path, INDEX_FILE)
        weight_map = _read_json(index, storage_options).get("weight_map", {})
        try:
            check_shard_names(weight_map, index)
        except CheckpointError as e:
            raise RewardModelError(str(e)) from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in names]
        if missing:
            raise RewardModelError(f"{storage.join(path, INDEX_FILE)}: shard {missing[0]} is missing")
        return shards
    if SINGLE_FILE in names:
        return [SINGLE_FILE]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise RewardModelError(
            f"{path}: only pickle weights ({', '.join(pickles[:3])}); they are never loaded (they can run code). "
            "Convert them to safetensors (model.save_pretrained(dir, safe_serialization=True))"
        )
    raise RewardModelError(f"{path}: no weights ({SINGLE_FILE} or {INDEX_FILE})")


def inspect_reward_model(spec: RewardModelSpec, storage_options: dict | None = None) -> RewardModelInfo:
    """Everything that can be refused before loading. Raises RewardModelError naming model and file."""
    where = _where(spec.name, spec.path)
    try:
        names = _listing(spec.path, storage_options)
    except RewardModelError as e:
        hint = ""
        if not storage.is_remote(spec.path) and not spec.path.startswith((".", "/", "~")) and spec.path.count("/") == 1:
            hint = (
                "; hub ids are not read: download the model first "
                "(`huggingface-cli download ORG/NAME --local-dir DIR`) and give DIR"
            )
        raise RewardModelError(f"{where}: {e}{hint}") from None
    if CONFIG_FILE not in names:
        raise RewardModelError(f"{where}: no {CONFIG_FILE}")
    config_uri = storage.join(spec.path, CONFIG_FILE)
    config = _read_json(config_uri, storage_options)
    if config.get("auto_map"):
        raise RewardModelError(
            f"{where}: {config_uri} has auto_map: the model needs its own remote code, which is never run; "
            "use a checkpoint of a transformers class"
        )
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise RewardModelError(
            f"{where}: {config_uri} architectures {archs} has no *ForSequenceClassification: "
            "not a sequence-classifier reward model"
        )
    family = family_of(config.get("model_type"))
    if family is None:
        raise RewardModelError(
            f"{where}: {config_uri} model_type {config.get('model_type')!r} is not a supported family "
            f"(supported: {', '.join(known_model_types())})"
        )
    num_labels = len(config.get("id2label") or {}) or int(config.get("num_labels") or 2)
    index = spec.logit_index
    if num_labels > 1 and index is None:
        raise RewardModelError(
            f"{where}: the head has {num_labels} logits ({config_uri} id2label {config.get('id2label')}); "
            "set logit_index to the one that is the reward"
        )
    index = 0 if index is None else index
    if not 0 <= index < num_labels:
        raise RewardModelError(f"{where}: logit_index {index} is outside the head's {num_labels} logit(s)")
    try:
        shards = weight_files(spec.path, names, storage_options)
    except RewardModelError as e:
        raise RewardModelError(f"{where}: {e}") from None
    tensors: set[str] = set()
    for shard in shards:
        tensors |= set(_safetensors_header(storage.join(spec.path, shard), storage_options)) - {"__metadata__"}
    head = head_tensor(family, tensors)
    if head is None:
        raise RewardModelError(
            f"{where}: no score head in {', '.join(shards)} (no {family.head or 'classifier'} weight): "
            "a base or causal LM is not a reward model"
        )
    if not any(n in names for n in TOKENIZER_VOCABS):
        raise RewardModelError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_VOCABS[:4])} ...)")
    if family.kind == DECODER and not _has_chat_template(spec.path, names, storage_options):
        raise RewardModelError(
            f"{where}: decoder reward model without a chat template ({TOKENIZER_CONFIG} has no chat_template, "
            f"no {' / '.join(CHAT_TEMPLATE_FILES)}): its conversations cannot be rendered as it was trained"
        )
    return RewardModelInfo(
        spec.name, family, num_labels, index, config.get("pad_token_id"), config.get("max_position_embeddings")
    )


def head_tensor(family: Family, tensors: set[str]) -> str | None:
    """The score head's weight among a checkpoint's tensor names (decoders: `score.weight`;
    encoders: the last layer of the class's classifier stack)."""
    wanted = [f"{family.head}.weight"] if family.head else ["classifier.out_proj.weight", "classifier.weight"]
    return next((n for n in wanted if n in tensors), None)


def _has_chat_template(path: str, names: list[str], storage_options: dict | None) -> bool:
    if any(n in names for n in CHAT_TEMPLATE_FILES):
        return True
    if TOKENIZER_CONFIG not in names:
        return False
    return bool(_read_json(storage.join(path, TOKENIZER_CONFIG), storage_options).get("chat_template"))


def fingerprint(spec: RewardModelSpec, storage_options: dict | None = None) -> str:
    """Identity of the weights and of what is read from them: config.json, each weight file's
    sha256 (local; remembered per machine by path, size and mtime) or size and ETag (remote: not
    downloaded by the driver), and the logit read. The path is not part of it."""
    names = _listing(spec.path, storage_options)
    h = hashlib.sha256(storage.read_bytes(storage.join(spec.path, CONFIG_FILE), storage_options))
    for shard in weight_files(spec.path, names, storage_options):
        uri = storage.join(spec.path, shard)
        if storage.is_remote(uri):
            fs, p = storage.filesystem(uri, storage_options)
            info = fs.info(p)
            h.update(f"{shard}|{info.get('size')}|{info.get('ETag') or info.get('mtime')}".encode())
        else:
            h.update(f"{shard}|{file_sha256(uri)}".encode())
    h.update(f"|logit={spec.logit_index or 0}".encode())
    return h.hexdigest()[:16]
