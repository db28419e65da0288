"""The released ArmoRM checkpoint layout (docs/armorm.md, "The released checkpoint"): read it, score
with it, and write our own heads in it.

Reading uses only `json` and `safetensors`: no pickle (`*.bin`, `*.pt`, …) is ever opened, no
checkpoint code is imported, `trust_remote_code` is never involved. The backbone is rebuilt as a
plain `transformers.LlamaModel` from config.json and loaded strictly (a missing or unexpected tensor
is an error — a loader that silently drops part of the model scores garbage).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.objectives import ARMORM_NAMES

from .gating import RELEASE_DROPOUT, RELEASE_HIDDEN_DIM, RELEASE_N_HIDDEN, RELEASE_TEMPERATURE
from .model import GATING_PREFIX, REGRESSION_KEY, TRANSFORM_KEY, ArmoHeads

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BACKBONE_PREFIX = "model."
ARMORM_ARCHITECTURE = "LlamaForRewardModelWithGating"
# config keys ArmoRM adds on top of the Llama config (ours last: names and verbosity index)
ARMORM_CONFIG_KEYS = ("num_objectives", "gating_temperature", "gating_hidden_dim", "gating_n_hidden",
                      "objectives", "verbosity_index", "gating_dropout")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DEFAULT_SHARD_SIZE = 5 * 1024 ** 3

# The release's 19 objectives, in order (docs/armorm.md, "Stage 1"); its config does not name them.
# Defined once, with their scales, in the objective registry.
RELEASE_OBJECTIVES = ARMORM_NAMES


class CheckpointError(ValueError):
    pass


@dataclass
class BackboneWeights:
    """A reference to the backbone tensors (`model.*`) of a checkpoint; nothing is read until `load`."""
    directory: str
    shard_of: dict[str, str]  # tensor name (with "model.") -> shard file name

    def names(self) -> list[str]:
        return sorted(self.shard_of)

    def load(self, dtype: torch.dtype | None = None, strip_prefix: bool = True) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name, shard in self.shard_of.items():
            by_file.setdefault(shard, []).append(name)
        for shard, names in sorted(by_file.items()):
            with safe_open(os.path.join(self.directory, shard), framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    key = name[len(BACKBONE_PREFIX):] if strip_prefix else name
                    out[key] = t.to(dtype) if dtype is not None else t
        return out


def _safetensors_map(directory: str) -> dict[str, str]:
    """tensor name -> shard file, from the index (or the single-file layout). Refuses anything but
    plain .safetensors files inside the directory."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        for shard in set(weight_map.values()):
            if not shard.endswith(".safetensors") or os.path.basename(shard) != shard:
                raise CheckpointError(f"{index_path}: refusing shard {shard!r} (only .safetensors files in the "
                                      "checkpoint directory are read)")
            if not os.path.isfile(os.path.join(directory, shard)):
                raise CheckpointError(f"{index_path}: shard {shard} is missing")
        return dict(weight_map)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        from safetensors import safe_open
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    pickles = sorted(n for n in os.listdir(directory) if n.endswith(PICKLE_SUFFIXES))
    raise CheckpointError(f"{directory}: no safetensors weights ({INDEX_FILE} or {SINGLE_FILE})"
                          + (f"; pickle files {pickles} are never read" if pickles else ""))


def _read_tensors(directory: str, shard_of: dict[str, str], names) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    out = {}
    for name in names:
        with safe_open(os.path.join(directory, shard_of[name]), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _infer_verbosity_index(T: np.ndarray) -> int | None:
    """T = I with row v reduced: v is the only row differing from the identity."""
    rows = np.flatnonzero(np.abs(T - np.eye(len(T))).max(axis=1) > 0)
    return int(rows[0]) if len(rows) == 1 else None


def load_armorm_checkpoint(path: str) -> tuple[dict, BackboneWeights, ArmoHeads]:
    """Read a checkpoint in the released ArmoRM layout: (config dict, backbone tensor reference, heads)."""
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    if "num_objectives" not in config:
        raise CheckpointError(f"{path}/{CONFIG_FILE}: not an ArmoRM config (no num_objectives)")
    shard_of = _safetensors_map(path)
    gating_names = sorted(n for n in shard_of if n.startswith(GATING_PREFIX))
    for required in (REGRESSION_KEY, TRANSFORM_KEY, GATING_PREFIX + "logit_scale"):
        if required not in shard_of:
            raise CheckpointError(f"{path}: tensor {required} missing")
    head_tensors = _read_tensors(path, shard_of, [REGRESSION_KEY, TRANSFORM_KEY] + gating_names)
    K, H = head_tensors[REGRESSION_KEY].shape
    if K != config["num_objectives"]:
        raise CheckpointError(f"{path}: regression_layer has {K} rows, config says {config['num_objectives']}")
    n_linear = len([n for n in gating_names if n.endswith(".weight") and n.startswith(GATING_PREFIX + "layers.")])
    gating_config = {
        "in_features": H, "num_objectives": K,
        "hidden_dim": int(config.get("gating_hidden_dim", RELEASE_HIDDEN_DIM)),
        "n_hidden": int(config.get("gating_n_hidden", n_linear - 1 if n_linear else RELEASE_N_HIDDEN)),
        "temperature": float(config.get("gating_temperature", RELEASE_TEMPERATURE)),
        "dropout": float(config.get("gating_dropout", RELEASE_DROPOUT)),
    }
    if n_linear != gating_config["n_hidden"] + 1:
        raise CheckpointError(f"{path}: {n_linear} gating layers, config implies {gating_config['n_hidden'] + 1}")
    objectives = _objective_names(config, K)
    T = head_tensors[TRANSFORM_KEY].to(torch.float32).numpy()
    verbosity_index = config.get("verbosity_index", _infer_verbosity_index(T))
    heads = ArmoHeads.from_tensors(head_tensors, objectives, gating_config, verbosity_index,
                                   metadata={"source_checkpoint": os.path.abspath(path)})
    backbone = BackboneWeights(path, {n: s for n, s in shard_of.items() if n.startswith(BACKBONE_PREFIX)})
    unknown = sorted(set(shard_of) - set(backbone.shard_of) - set(head_tensors))
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors {unknown[:5]} (this loader would ignore them)")
    return config, backbone, heads


def llama_config_from(config: dict):
    from transformers import LlamaConfig
    plain = {k: v for k, v in config.items() if k not in ARMORM_CONFIG_KEYS and k not in ("auto_map", "architectures")}
    return LlamaConfig(**plain)


def build_llama_backbone(config: dict, weights: BackboneWeights, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu"):
    """A transformers LlamaModel with exactly the checkpoint's `model.*` tensors (strict)."""
    from transformers import LlamaModel
    llama_config = llama_config_from(config)
    with torch.device("meta"):
        model = LlamaModel(llama_config)  # no memory, no random init: every tensor comes from the file
    state = weights.load(dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    # rotary frequencies are computed buffers, not stored: rebuild them off the meta device
    model.rotary_emb = type(model.rotary_emb)(config=llama_config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"backbone tensors not loaded: {leftover[:5]}")
    return model.to(device=device).eval()


def checkpoint_backbone(path: str, device: str = "auto", dtype: str = "auto"):
    """(Backbone, ArmoHeads) from an ArmoRM-layout directory, for the EmbeddingEngine: the labeling
    job scores checkpoints with the same token-budget batching, device and dtype choice as any
    backbone. The tokenizer (and chat template) is read from the same directory."""
    import time

    from transformers import AutoTokenizer

    from pipeline.embed.backbone import Backbone, _resolve_device, _resolve_dtype

    start = time.perf_counter()
    config, weights, heads = load_armorm_checkpoint(path)
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    model = build_llama_backbone(config, weights, dtype=getattr(torch, dtype), device=device)
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = config.get("pad_token_id")
    backbone = Backbone(model=model, tokenizer=tokenizer, kind="decoder", hidden_size=int(config["hidden_size"]),
                        device=device, dtype=dtype, max_length=int(tokenizer.model_max_length),
                        fingerprint=checkpoint_fingerprint(path, heads), name=os.path.basename(os.path.normpath(path)),
                        attn_implementation=getattr(model.config, "_attn_implementation", None) or "sdpa",
                        load_seconds=time.perf_counter() - start, loaded_from="armorm_checkpoint")
    return backbone, heads


@dataclass
class ScorerOutputs:
    rewards: np.ndarray              # N×K raw ratings
    gating_output: np.ndarray        # N×K
    score: np.ndarray                # N
    response_embedding: np.ndarray   # N×H
    prompt_embedding: np.ndarray     # N×H
    debiased: np.ndarray             # N×K rewards·T

    @property
    def gate(self) -> np.ndarray:    # same name as HeadOutputs.gate
        return self.gating_output


def read_objective_names(path: str) -> list[str]:
    """Objective names of a checkpoint in the ArmoRM layout, from config.json alone."""
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    if "num_objectives" not in config:
        raise CheckpointError(f"{path}/{CONFIG_FILE}: not an ArmoRM config (no num_objectives)")
    return _objective_names(config, int(config["num_objectives"]))


def _objective_names(config: dict, k: int) -> list[str]:
    names = config.get("objectives")
    if names:
        if len(names) != k:
            raise CheckpointError(f"config lists {len(names)} objective names for {k} objectives")
        return list(names)
    return list(RELEASE_OBJECTIVES) if k == len(RELEASE_OBJECTIVES) else [f"objective_{i}" for i in range(k)]


def checkpoint_fingerprint(path: str, heads: ArmoHeads) -> str:
    """Identifies a checkpoint without hashing gigabytes: config.json, the index, every shard's name,
    size and safetensors header (tensor names, dtypes, shapes, offsets), and the heads' full-content
    fingerprint."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, INDEX_FILE):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    for shard in sorted(set(_safetensors_map(path).values())):
        p = os.path.join(path, shard)
        with open(p, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(shard.encode() + str(os.path.getsize(p)).encode() + f.read(min(header_len, 1 << 26)))
    h.update(heads.fingerprint.encode())
    return h.hexdigest()


class ArmoRMScorer:
    """Scores tokenized conversations with a checkpoint in the ArmoRM layout (released or exported)."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.config, weights, self.heads = load_armorm_checkpoint(path)
        self.pad_token_id = self.config.get("pad_token_id")
        if self.pad_token_id is None:
            raise CheckpointError(f"{path}: config has no pad_token_id")
        self.device = torch.device(device)
        self.model = build_llama_backbone(self.config, weights, dtype=dtype, device=self.device)
        self.fingerprint = checkpoint_fingerprint(path, self.heads)
        self.objectives = list(self.heads.objectives)

    def embed(self, input_ids: list[list[int]], prompt_end: list[int], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(response embeddings, prompt embeddings) [N×H] float32: final-layer hidden state at each
        sequence's last real token and at its `prompt_end` index. Sequences are right-padded with an
        attention mask, so a row's result does not depend on its batch mates."""
        if len(input_ids) != len(prompt_end):
            raise ValueError("embed: input_ids and prompt_end lengths differ")
        responses, prompts = [], []
        for start in range(0, len(input_ids), batch_size):
            seqs = [list(s) for s in input_ids[start:start + batch_size]]
            ends = [int(e) for e in prompt_end[start:start + batch_size]]
            lengths = [len(s) for s in seqs]
            for n, e in zip(lengths, ends):
                if n == 0 or not 0 <= e < n:
                    raise ValueError(f"embed: prompt_end {e} outside a sequence of {n} tokens")
            width = max(lengths)
            ids = torch.full((len(seqs), width), int(self.pad_token_id), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[row, :len(s)] = 1
            with torch.no_grad():
                hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            rows = torch.arange(len(seqs), device=hidden.device)
            responses.append(hidden[rows, torch.tensor(lengths, device=hidden.device) - 1].float().cpu())
            prompts.append(hidden[rows, torch.tensor(ends, device=hidden.device)].float().cpu())
        return torch.cat(responses).numpy(), torch.cat(prompts).numpy()

    def score(self, input_ids: list[list[int]], prompt_end: list[int], batch_size: int = 8) -> ScorerOutputs:
        response_emb, prompt_emb = self.embed(input_ids, prompt_end, batch_size)
        out = self.heads.score(response_emb, prompt_emb)
        return ScorerOutputs(rewards=out.rewards, gating_output=out.gate, score=out.score,
                             response_embedding=response_emb, prompt_embedding=prompt_emb, debiased=out.debiased)


# --- export -------------------------------------------------------------------------------------

def _backbone_sources(backbone) -> tuple[dict, list[tuple[str, object]]]:
    """(config dict, [(name in checkpoint, tensor or (dir, shard, source name))]) for a model object
    or a Hugging Face directory holding safetensors weights."""
    if isinstance(backbone, (str, os.PathLike)):
        directory = os.fspath(backbone)
        with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
        shard_of = _safetensors_map(directory)
        has_prefix = any(n.startswith(BACKBONE_PREFIX) for n in shard_of)
        items = []
        for name, shard in sorted(shard_of.items()):
            if has_prefix and not name.startswith(BACKBONE_PREFIX):
                continue  # lm_head and other non-backbone tensors
            out_name = name if has_prefix else BACKBONE_PREFIX + name
            items.append((out_name, (directory, shard, name)))
        return config, items
    model = backbone
    base = getattr(model, "model", None)
    if isinstance(base, torch.nn.Module) and hasattr(model, "lm_head"):
        model = base  # a causal LM: keep the decoder, drop lm_head
    config = model.config.to_dict()
    state = model.state_dict()
    return config, [(BACKBONE_PREFIX + name, t) for name, t in state.items()]


def _materialise(source, dtype) -> torch.Tensor:
    if isinstance(source, tuple):
        from safetensors import safe_open
        directory, shard, name = source
        with safe_open(os.path.join(directory, shard), framework="pt") as f:
            t = f.get_tensor(name)
    else:
        t = source.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous().clone()  # clone: tied tensors must not share storage in safetensors


_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                         "U8": 1, "BOOL": 1}


def _stored_size(source, dtype: torch.dtype | None) -> int:
    """Bytes the tensor will take in the shard (after the optional cast), without reading it."""
    if isinstance(source, tuple):
        from safetensors import safe_open
        directory, shard, name = source
        with safe_open(os.path.join(directory, shard), framework="pt") as f:
            sl = f.get_slice(name)
            numel, kind = int(np.prod(sl.get_shape())), sl.get_dtype()
        itemsize, floating = _SAFETENSORS_ITEMSIZE.get(kind, 4), kind in ("F64", "F32", "BF16", "F16")
    else:
        numel, itemsize, floating = source.numel(), source.element_size(), source.is_floating_point()
    if dtype is not None and floating:
        itemsize = torch.tensor([], dtype=dtype).element_size()
    return numel * itemsize


def export_armorm_checkpoint(heads: ArmoHeads, backbone, out_dir: str, shard_size: int = DEFAULT_SHARD_SIZE,
                             pad_token_id: int | None = None, dtype: torch.dtype | None = None,
                             tokenizer=None) -> str:
    """Write backbone + heads in the released layout: config.json (the backbone's Llama config plus
    the ArmoRM keys, and our objective names / verbosity index), shards `model-0000i-of-0000n.safetensors`
    of at most `shard_size` bytes (a bigger tensor gets a shard of its own) and `model.safetensors.index.json`.

    `backbone`: a transformers Llama model (LlamaModel or LlamaForCausalLM; lm_head is dropped) or a
    directory with config.json + safetensors. `dtype` casts floating tensors (None keeps them).
    `tokenizer` (with its chat template) is saved beside the weights, as in the release, so the
    directory is all a labeling job needs (`model.armorm_checkpoint`).
    The released repository also ships modeling code for trust_remote_code; we ship none — load the
    result with `load_armorm_checkpoint` / `ArmoRMScorer`.
    """
    config, items = _backbone_sources(backbone)
    if config.get("model_type") != "llama":
        raise CheckpointError(f"backbone model_type {config.get('model_type')!r}: the ArmoRM layout is a Llama model")
    if config.get("hidden_size") != heads.hidden_size:
        raise CheckpointError(f"backbone hidden_size {config.get('hidden_size')} ≠ heads hidden size {heads.hidden_size}")
    pad = pad_token_id if pad_token_id is not None else config.get("pad_token_id")
    if pad is None:
        raise CheckpointError("no pad_token_id in the backbone config: pass pad_token_id")
    g = heads.gating
    config = {k: v for k, v in config.items() if k not in ("auto_map", "_name_or_path")}
    config.update({
        "architectures": [ARMORM_ARCHITECTURE], "pad_token_id": int(pad),
        "num_objectives": heads.num_objectives, "gating_temperature": g.temperature,
        "gating_hidden_dim": g.hidden_dim, "gating_n_hidden": g.n_hidden, "gating_dropout": g.dropout,
        "objectives": list(heads.objectives), "verbosity_index": heads.verbosity_index,
    })
    items = items + list(heads.tensors().items())

    # greedy packing in a fixed order: the same inputs always give the same shards
    shards: list[list[tuple[str, object]]] = [[]]
    used = 0
    for name, source in items:
        size = _stored_size(source, dtype)
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        shards[-1].append((name, source))
        used += size

    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {name: _materialise(source, dtype) for name, source in shard}
        tmp = os.path.join(out_dir, f".tmp-{fname}")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out_dir, fname))
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    _write_json(os.path.join(out_dir, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    _write_json(os.path.join(out_dir, CONFIG_FILE), config)  # last: a directory with config.json is complete
    return out_dir


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
