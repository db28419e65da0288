"""ArmoRM-layout checkpoints as a backbone source, and writing our heads in that layout.

A checkpoint in the released layout (pipeline/heads/checkpoint.py names its parts) carries its own
backbone, tokenizer and heads. `checkpoint_backbone` turns one into the same `Backbone` every other
source gives, so the labeling job scores it through the one EmbeddingEngine (its batching, device
and dtype choice). `export_armorm_checkpoint` writes trained heads with their backbone in the layout.

Reading uses only `json` and `safetensors`: no pickle (`*.bin`, `*.pt`, …) is ever opened or
copied, no checkpoint code is imported, `trust_remote_code` is never involved. The backbone is
rebuilt as a plain `transformers.LlamaModel` from config.json and loaded strictly (a missing or
unexpected tensor is an error — a loader that silently drops part of the model scores garbage).
Files are read and written through pipeline.storage, so a checkpoint may live on s3://; safetensors
are memory-mapped, so a remote checkpoint is first copied once per machine under the cache.

The pad token. Loaders of the released class (and transformers' sequence classifiers) read the
reward at the token before the FIRST pad token of a right-padded row. A pad that also occurs in
text (SmolLM2's pad is <|im_end|>, which closes every turn) makes them read a prompt token instead.
An export therefore always has a dedicated pad: the tokenizer's own when it already has one (an
added special token with no other role that the chat template never writes), else an added
`[PAD]` token, as the release did, with the embedding and `vocab_size` grown by one row. The
labeling job itself reads each row's length and never depends on the pad.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline import storage
from pipeline.embed.backbone import Backbone, _max_length, _resolve_device, _resolve_dtype, cache_root
from pipeline.heads.checkpoint import (
    BACKBONE_PREFIX,
    CONFIG_FILE,
    DEFAULT_SHARD_SIZE,
    EMBEDDING_KEY,
    INDEX_FILE,
    PAD_TOKEN,
    PICKLE_SUFFIXES,
    SINGLE_FILE,
    CheckpointError,
    armorm_config,
    check_shard_names,
    config_objective_names,
    grow_embedding,
    heads_from_checkpoint,
    is_head_tensor,
    llama_config_dict,
    pack_shards,
    shard_file_name,
)
from pipeline.heads.model import ArmoHeads

log = logging.getLogger("armolabel.checkpoint")

# Files a checkpoint directory may hold besides config and weights: the tokenizer's. Only these
# (and the safetensors the index names) are copied from a remote checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    # encoders' vocabularies (reward models: BERT's WordPiece, DeBERTa-v2's and XLM-R's SentencePiece)
    "vocab.txt",
    "spm.model",
    "sentencepiece.bpe.model",
)
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
# A conversation rendered to find the ids the chat template writes (a pad must not be one of them).
_PROBE = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
    {"role": "user", "content": "v"},
    {"role": "assistant", "content": "b"},
]


# --- reading -----------------------------------------------------------------------------------


def _read_json(uri: str, storage_options: dict | None = None) -> dict:
    return json.loads(storage.read_bytes(uri, storage_options))


def read_objective_names(path: str, storage_options: dict | None = None) -> list[str]:
    """Objective names of a checkpoint in the ArmoRM layout, from config.json alone."""
    uri = storage.join(path, CONFIG_FILE)
    return config_objective_names(_read_json(uri, storage_options), uri)


def _weight_map(path: str, storage_options: dict | None, names: list[str]) -> dict[str, str] | None:
    """The index's weight map (None without an index); refuses anything but safetensors shards."""
    if INDEX_FILE not in names:
        return None
    uri = storage.join(path, INDEX_FILE)
    weight_map = dict(_read_json(uri, storage_options)["weight_map"])
    check_shard_names(weight_map, uri)
    return weight_map


def _no_weights(path: str, names: list[str]) -> CheckpointError:
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    return CheckpointError(
        f"{path}: no safetensors weights ({INDEX_FILE} or {SINGLE_FILE})"
        + (f"; pickle files {pickles} are never read" if pickles else "")
    )


def local_checkpoint(path: str, storage_options: dict | None = None) -> str:
    """A local directory with the checkpoint: `path` itself when it is local; a remote one (s3://,
    any fsspec URI) is copied once per machine under the cache, keyed by its URI and its files
    (json contents, shard sizes and ETags), with only its config, index, safetensors shards and
    tokenizer files."""
    if not storage.is_remote(path):
        return os.fspath(path)
    fs, root = storage.filesystem(path, storage_options)
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    if CONFIG_FILE not in names:
        raise CheckpointError(f"{path}: no {CONFIG_FILE}")
    weight_map = _weight_map(path, storage_options, names)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in names]
        if missing:
            raise CheckpointError(f"{storage.join(path, INDEX_FILE)}: shard {missing[0]} is missing")
    elif SINGLE_FILE in names:
        shards = [SINGLE_FILE]
    else:
        raise _no_weights(path, names)
    wanted = (
        [CONFIG_FILE]
        + ([INDEX_FILE] if weight_map is not None else [])
        + shards
        + [n for n in names if n in TOKENIZER_FILES]
    )
    h = hashlib.sha256(path.encode())
    for name in wanted:  # json by content; shards (gigabytes) by size and ETag / mtime
        full = posixpath.join(root, name)
        if name.endswith(".json"):
            h.update(b"\0" + name.encode() + b"\0" + storage.read_bytes(storage.join(path, name), storage_options))
        else:
            info = fs.info(full)
            stamp = [info.get("size"), str(info.get("ETag") or info.get("mtime"))]
            h.update(b"\0" + name.encode() + json.dumps(stamp).encode())
    key = h.hexdigest()[:16]
    final = cache_root() / "checkpoints" / key
    if (final / CONFIG_FILE).is_file():  # written last: a directory with config.json is complete
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
    try:
        for name in sorted(wanted, key=lambda n: n == CONFIG_FILE):
            fs.get_file(posixpath.join(root, name), str(tmp / name))
        try:
            os.rename(tmp, final)
        except OSError:  # another process on this machine copied it first
            if not (final / CONFIG_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _safetensors_map(directory: str) -> dict[str, str]:
    """tensor name -> shard file of a local checkpoint directory (index or single-file layout)."""
    names = sorted(os.listdir(directory))
    weight_map = _weight_map(directory, None, names)
    if weight_map is not None:
        for shard in set(weight_map.values()):
            if not os.path.isfile(os.path.join(directory, shard)):
                raise CheckpointError(f"{os.path.join(directory, INDEX_FILE)}: shard {shard} is missing")
        return weight_map
    if SINGLE_FILE in names:
        with safe_open(os.path.join(directory, SINGLE_FILE), framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise _no_weights(directory, names)


@dataclass
class BackboneWeights:
    """A reference to the backbone tensors (`model.*`) of a checkpoint; nothing is read until `load`."""

    directory: str
    shard_of: dict[str, str]  # tensor name (with "model.") -> shard file name

    def names(self) -> list[str]:
        return sorted(self.shard_of)

    def load(self, dtype: torch.dtype | None = None, strip_prefix: bool = True) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in _read_tensors(self.directory, self.shard_of, self.shard_of).items():
            key = name[len(BACKBONE_PREFIX) :] if strip_prefix else name
            out[key] = t.to(dtype) if dtype is not None else t
        return out


def _read_tensors(directory: str, shard_of: dict[str, str], names) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(shard_of[name], []).append(name)
    out = {}
    for shard, in_shard in sorted(by_file.items()):
        with safe_open(os.path.join(directory, shard), framework="pt") as f:
            for name in in_shard:
                out[name] = f.get_tensor(name)
    return out


def load_armorm_checkpoint(path: str, storage_options: dict | None = None) -> tuple[dict, BackboneWeights, ArmoHeads]:
    """Read a checkpoint in the released ArmoRM layout: (config dict, backbone tensor reference, heads)."""
    directory = local_checkpoint(path, storage_options)
    config_uri = storage.join(directory, CONFIG_FILE)
    config = _read_json(config_uri)
    config_objective_names(config, config_uri)
    shard_of = _safetensors_map(directory)
    head_names = sorted(n for n in shard_of if is_head_tensor(n))
    source = path if storage.is_remote(path) else os.path.abspath(path)
    heads = heads_from_checkpoint(
        config, _read_tensors(directory, shard_of, head_names), path, metadata={"source_checkpoint": source}
    )
    backbone = BackboneWeights(directory, {n: s for n, s in shard_of.items() if n.startswith(BACKBONE_PREFIX)})
    unknown = sorted(set(shard_of) - set(backbone.shard_of) - set(head_names))
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors {unknown[:5]} (this loader would ignore them)")
    return config, backbone, heads


def build_llama_backbone(
    config: dict, weights: BackboneWeights, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """A transformers LlamaModel with exactly the checkpoint's `model.*` tensors (strict)."""
    from transformers import LlamaConfig, LlamaModel

    llama_config = LlamaConfig(**llama_config_dict(config))
    with torch.device("meta"):
        model = LlamaModel(llama_config)  # no memory, no random init: every tensor comes from the file
    state = weights.load(dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    # rotary frequencies are computed buffers, not stored: rebuild them off the meta device
    model.rotary_emb = type(model.rotary_emb)(config=llama_config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"backbone tensors not loaded: {leftover[:5]}")
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which mypy reads as unbound.
    return model.to(device=device).eval()  # type: ignore[call-arg]


def checkpoint_fingerprint(directory: str, heads: ArmoHeads) -> str:
    """Identifies a checkpoint without hashing gigabytes: config.json, the index, every shard's name,
    size and safetensors header (tensor names, dtypes, shapes, offsets), and the heads' full-content
    fingerprint. `directory` is local (see local_checkpoint), so a copy has the same fingerprint."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, INDEX_FILE):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            h.update(name.encode() + b"\0" + Path(p).read_bytes())
    for shard in sorted(set(_safetensors_map(directory).values())):
        p = os.path.join(directory, shard)
        with open(p, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(shard.encode() + str(os.path.getsize(p)).encode() + f.read(min(header_len, 1 << 26)))
    h.update(heads.fingerprint.encode())
    return h.hexdigest()


def checkpoint_tokenizer(directory: str, config: dict):
    """The checkpoint's own tokenizer, its pad checked against config.json (one pad for every loader)."""
    from transformers import AutoTokenizer, LlamaConfig

    if not any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(
            f"{directory}: no tokenizer files; a checkpoint carries its tokenizer (export_armorm_checkpoint writes it)"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    pad = config.get("pad_token_id")
    if tokenizer.pad_token_id is None and pad is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad))
    if pad is not None and tokenizer.pad_token_id != pad:
        raise CheckpointError(
            f"{directory}: config.json has pad_token_id {pad}, the tokenizer "
            f"{tokenizer.pad_token_id}: loaders would disagree on where rows end"
        )
    vocab = int(config["vocab_size"])
    if len(tokenizer) > vocab:
        raise CheckpointError(f"{directory}: the tokenizer has {len(tokenizer)} tokens, the embedding {vocab} rows")
    if tokenizer.pad_token_id is not None and dedicated_pad_id(tokenizer) is None:
        # Our scores do not depend on the pad (positions come from lengths); other loaders' do.
        log.warning(
            "%s: pad token %r also occurs in text; loaders that read the reward before the first pad "
            "will misread this checkpoint (re-export it for a dedicated pad)",
            directory,
            tokenizer.pad_token,
        )
    tokenizer.model_max_length = _max_length(directory, LlamaConfig(**llama_config_dict(config)), tokenizer)
    return tokenizer


def checkpoint_backbone(
    path: str, device: str = "auto", dtype: str = "auto", storage_options: dict | None = None
) -> tuple[Backbone, ArmoHeads]:
    """(Backbone, ArmoHeads) from an ArmoRM-layout checkpoint (local or remote), for the
    EmbeddingEngine: the labeling job scores checkpoints with the same token-budget batching, device
    and dtype choice as any backbone. The tokenizer (and chat template) comes from the checkpoint."""
    start = time.perf_counter()
    config, weights, heads = load_armorm_checkpoint(path, storage_options)
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    model = build_llama_backbone(config, weights, dtype=getattr(torch, dtype), device=device)
    model.requires_grad_(False)
    tokenizer = checkpoint_tokenizer(weights.directory, config)
    name = posixpath.basename(path.rstrip("/")) if storage.is_remote(path) else os.path.basename(os.path.normpath(path))
    backbone = Backbone(
        model=model,
        tokenizer=tokenizer,
        kind="decoder",
        hidden_size=int(config["hidden_size"]),
        device=device,
        dtype=dtype,
        max_length=int(tokenizer.model_max_length),
        fingerprint=checkpoint_fingerprint(weights.directory, heads),
        name=name,
        attn_implementation=getattr(model.config, "_attn_implementation", None) or "sdpa",
        load_seconds=time.perf_counter() - start,
        loaded_from="armorm_checkpoint",
    )
    return backbone, heads


# --- the pad token ----------------------------------------------------------------------------


def _template_ids(tokenizer) -> set[int]:
    """Ids the tokenizer writes around any text: chat-template markup and added special tokens."""
    ids = set(tokenizer("x", add_special_tokens=True)["input_ids"])
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=False)
        ids |= set(tokenizer(text, add_special_tokens=False)["input_ids"])
        prompt = tokenizer.apply_chat_template(_PROBE[:2], tokenize=False, add_generation_prompt=True)
        ids |= set(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ids


def dedicated_pad_id(tokenizer) -> int | None:
    """The tokenizer's pad id when no conversation can contain it: an added special token (byte-pair
    merges never produce one; only its own literal text maps to it) that is not also the
    bos/eos/unk/cls/sep/mask token, nor written by the chat template. None otherwise."""
    pad = tokenizer.pad_token_id
    if pad is None:
        return None
    added = tokenizer.added_tokens_decoder.get(pad)
    if added is None or not added.special:
        return None
    roles = {getattr(tokenizer, f"{r}_token_id", None) for r in ("bos", "eos", "unk", "cls", "sep", "mask")}
    if pad in roles - {None} or pad in _template_ids(tokenizer):
        return None
    return int(pad)


def tokenizer_with_pad(tokenizer, embedding_rows: int):
    """(tokenizer, pad id, embedding rows needed): the tokenizer itself when its pad is dedicated,
    else a copy with an added `[PAD]`. Refuses what cannot be made safe."""
    if len(tokenizer) > embedding_rows:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {embedding_rows} rows")
    pad = dedicated_pad_id(tokenizer)
    if pad is not None:
        return tokenizer, pad, embedding_rows
    if PAD_TOKEN in tokenizer.get_vocab():
        raise CheckpointError(
            f"the tokenizer already has a token {PAD_TOKEN!r} that is not a dedicated pad "
            f"(pad is {tokenizer.pad_token!r}): cannot add one"
        )
    out = copy.deepcopy(tokenizer)  # the caller's (often process-cached) tokenizer stays as it was
    n = len(out)
    out.add_special_tokens({"pad_token": PAD_TOKEN})
    pad = out.pad_token_id
    if pad != n or len(out) != n + 1 or dedicated_pad_id(out) != pad:
        raise CheckpointError(f"adding {PAD_TOKEN!r} did not give a dedicated pad token (got id {pad} for {n} tokens)")
    return out, pad, max(embedding_rows, pad + 1)


# --- export -------------------------------------------------------------------------------------

_SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

_SAFETENSORS_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass
class TensorSource:
    """One tensor of the export, read only when its shard is written: in memory or in a file."""

    tensor: torch.Tensor | None = None
    file: tuple[str, str] | None = None  # (shard path, tensor name in it)
    rows: int | None = None  # grow to this many rows (the embedding, for an added pad)

    def _in_file(self) -> tuple[str, str]:
        if self.file is None:
            raise ValueError("an export source holds a tensor or names one in a file")
        return self.file

    def _shape_kind(self) -> tuple[list[int], int, bool]:
        if self.tensor is not None:
            t = self.tensor
            return list(t.shape), t.element_size(), t.is_floating_point()
        path, name = self._in_file()
        with safe_open(path, framework="pt") as f:
            sl = f.get_slice(name)
            shape, kind = list(sl.get_shape()), sl.get_dtype()
        return shape, _SAFETENSORS_ITEMSIZE.get(kind, 4), kind in ("F64", "F32", "BF16", "F16")

    def dtype_name(self) -> str:
        """The stored dtype, as torch names it ("float32", "bfloat16", …)."""
        if self.tensor is not None:
            return str(self.tensor.dtype).removeprefix("torch.")
        path, name = self._in_file()
        with safe_open(path, framework="pt") as f:
            kind = f.get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPE_NAMES.get(kind, kind.lower())

    def shape(self) -> list[int]:
        shape = self._shape_kind()[0]
        return [max(shape[0], self.rows)] + shape[1:] if self.rows else shape

    def stored_size(self, dtype: torch.dtype | None) -> int:
        """Bytes the tensor will take in the shard (after the optional cast), without reading it."""
        _, itemsize, floating = self._shape_kind()
        if dtype is not None and floating:
            itemsize = torch.tensor([], dtype=dtype).element_size()
        n = 1
        for d in self.shape():
            n *= int(d)
        return n * itemsize

    def load(self, dtype: torch.dtype | None) -> torch.Tensor:
        if self.tensor is not None:
            t = self.tensor.detach()
        else:
            path, name = self._in_file()
            with safe_open(path, framework="pt") as f:
                t = f.get_tensor(name)
        if self.rows:
            t = grow_embedding(t, self.rows)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.contiguous().clone()  # clone: tied tensors must not share storage in safetensors


def backbone_sources(backbone, storage_options: dict | None = None) -> tuple[dict, dict[str, TensorSource]]:
    """(config dict, {name in checkpoint: source}) of the backbone, from a model object or a
    Hugging Face / ArmoRM directory with safetensors weights (heads and lm_head left out)."""
    if isinstance(backbone, (str, os.PathLike)):
        directory = local_checkpoint(os.fspath(backbone), storage_options)
        config = _read_json(os.path.join(directory, CONFIG_FILE))
        shard_of = _safetensors_map(directory)
        has_prefix = any(n.startswith(BACKBONE_PREFIX) for n in shard_of)
        sources = {}
        for name, shard in sorted(shard_of.items()):
            if has_prefix and not name.startswith(BACKBONE_PREFIX):
                continue  # lm_head, the heads of an ArmoRM checkpoint
            out_name = name if has_prefix else BACKBONE_PREFIX + name
            sources[out_name] = TensorSource(file=(os.path.join(directory, shard), name))
        return config, sources
    model = backbone
    base = getattr(model, "model", None)
    if isinstance(base, torch.nn.Module) and hasattr(model, "lm_head"):
        model = base  # a causal LM: keep the decoder, drop lm_head
    config = model.config.to_dict()
    return config, {BACKBONE_PREFIX + name: TensorSource(tensor=t) for name, t in model.state_dict().items()}


def tokenizer_files(tokenizer, directory: str) -> dict[str, bytes]:
    """The tokenizer's files as a checkpoint ships them: saved by transformers, plus a
    special_tokens_map.json (read by transformers 4.x loaders), in a form 4.x also loads."""
    tokenizer.save_pretrained(directory)
    files = {name: Path(directory, name).read_bytes() for name in sorted(os.listdir(directory))}
    tc = json.loads(files["tokenizer_config.json"])
    for key in ("is_local", "local_files_only"):  # where this process loaded from, not properties of the tokenizer
        tc.pop(key, None)
    if tc.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name; 4.x knows the alias
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    files["tokenizer_config.json"] = _json_bytes(tc)
    if SPECIAL_TOKENS_MAP not in files:
        files[SPECIAL_TOKENS_MAP] = _json_bytes(
            {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        )
    return files


def require_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise CheckpointError(
            "export needs the backbone's tokenizer: without it no pad token can be guaranteed to occur in no text"
        )


def with_dedicated_pad(config: dict, sources: dict[str, TensorSource], tokenizer) -> tuple[Any, int, int]:
    """(tokenizer with a dedicated pad, its id, vocabulary size) for an export of the backbone
    `config` + `sources` (backbone_sources): the tokenizer's own pad when it is dedicated, else a
    copy with an added `[PAD]`, the embedding source grown to hold it. The copy's
    model_max_length is the smaller of the tokenizer's and the model's (as import reads it).
    Refuses a missing tokenizer, a missing embedding and a config that disagrees with it."""
    require_tokenizer(tokenizer)
    if EMBEDDING_KEY not in sources:
        raise CheckpointError(f"backbone has no {EMBEDDING_KEY}")
    rows = int(sources[EMBEDDING_KEY].shape()[0])
    if rows != int(config.get("vocab_size", rows)):
        raise CheckpointError(f"backbone config vocab_size {config.get('vocab_size')} ≠ {rows} embedding rows")
    tokenizer, pad, vocab_size = tokenizer_with_pad(copy.deepcopy(tokenizer), rows)
    # the longest input is the model's as much as the tokenizer's: record the smaller, as import reads it
    limits = [int(x) for x in (config.get("max_position_embeddings"), tokenizer.model_max_length) if x]
    tokenizer.model_max_length = min(limits)
    if vocab_size > rows:
        sources[EMBEDDING_KEY].rows = vocab_size
    return tokenizer, pad, vocab_size


def write_checkpoint(
    out_dir: str,
    items: list[tuple[str, TensorSource]],
    config: dict,
    tokenizer,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    storage_options: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> str:
    """Write a safetensors checkpoint (local or remote `out_dir`): the tensors in the given order,
    packed greedily into shards `model-0000i-of-0000n.safetensors` of at most `shard_size` bytes (a
    bigger tensor gets a shard of its own), `model.safetensors.index.json`, the tokenizer's files,
    `extra_files` (name -> bytes), and config.json last: a directory with config.json is complete.
    `dtype` casts floating tensors (None keeps them); each shard is read and written on its own."""
    shards = pack_shards([source.stored_size(dtype) for _, source in items], shard_size)
    weight_map, total = {}, 0
    with tempfile.TemporaryDirectory(prefix="armolabel-export-") as tmp:
        for i, shard in enumerate(shards, start=1):
            fname = shard_file_name(i, len(shards))
            tensors = {items[j][0]: items[j][1].load(dtype) for j in shard}
            local = os.path.join(tmp, fname)
            save_file(tensors, local, metadata={"format": "pt"})
            with open(local, "rb") as src:
                storage.write_atomic(
                    storage.join(out_dir, fname), lambda f: shutil.copyfileobj(src, f, 1 << 24), storage_options
                )
            os.remove(local)
            for name, t in tensors.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
            del tensors
        _write(
            out_dir,
            INDEX_FILE,
            _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map}),
            storage_options,
        )
        for name, blob in tokenizer_files(tokenizer, os.path.join(tmp, "tokenizer")).items():
            _write(out_dir, name, blob, storage_options)
    for name, blob in sorted((extra_files or {}).items()):
        _write(out_dir, name, blob, storage_options)
    _write(out_dir, CONFIG_FILE, _json_bytes(config), storage_options)  # last: with config.json it is complete
    return out_dir


def export_armorm_checkpoint(
    heads: ArmoHeads,
    backbone,
    out_dir: str,
    tokenizer,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    storage_options: dict | None = None,
) -> str:
    """Write backbone + heads in the released layout (local or remote `out_dir`): config.json (the
    backbone's Llama config plus the ArmoRM keys, our objective names / verbosity index, the
    dedicated pad token), shards `model-0000i-of-0000n.safetensors` of at most `shard_size` bytes
    (a bigger tensor gets a shard of its own), `model.safetensors.index.json`, and the tokenizer.

    `backbone`: a transformers Llama model (LlamaModel or LlamaForCausalLM; lm_head is dropped) or a
    directory with config.json + safetensors (an ArmoRM checkpoint too: its heads are replaced).
    `tokenizer`: the backbone's, with its chat template; required, because the pad token must be
    chosen (and, if needed, added) with it. No generation_config is written: a reward model does
    not generate. `dtype` casts floating tensors (None keeps them).
    The released repository also ships modeling code for trust_remote_code; we ship none.
    """
    require_tokenizer(tokenizer)  # before the backbone is read
    config, sources = backbone_sources(backbone, storage_options)
    tokenizer, pad, vocab_size = with_dedicated_pad(config, sources, tokenizer)
    config = armorm_config(config, heads, pad, vocab_size)
    items = list(sources.items()) + [(n, TensorSource(tensor=t)) for n, t in heads.tensors().items()]
    return write_checkpoint(out_dir, items, config, tokenizer, shard_size, dtype, storage_options)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def _write(directory: str, name: str, blob: bytes, storage_options: dict | None) -> None:
    storage.write_atomic(storage.join(directory, name), blob, storage_options)
