"""Reward models in the layouts other tools load, for tests: pure functions of a directory.

- `smollm2_classifier(dir)`: the real SmolLM2-135M-Instruct with a real linear Bradley-Terry head
  fitted here on its own embeddings of real preference pairs (LLMBar + PandaLM from the shared
  data), exported by pipeline/embed/classifier_export.py as `LlamaForSequenceClassification`
  (dedicated `[PAD]`, classifier_export.json beside it). The embeddings (the slow part, ~1 min on
  2 cores) are cached under `<repo>/.cache/reward-model-fixtures/`, keyed by the backbone, the data
  files and the code that computes them; the fit and the export run on every call (seconds).
- `minilm_classifier(dir)`: all-MiniLM-L6-v2's real weights (its pooler included: the package
  ships `pooler.dense.*`) as `BertForSequenceClassification` (one label), its classifier fitted here
  (Bradley-Terry) on that class's own pooled output of the (prompt text, response) pairs, saved with
  save_pretrained (safetensors) and the MiniLM tokenizer: an encoder reward model called as
  `model(**tokenizer(prompt_text, response))`, as the OpenAssistant DeBERTa reward models are.
- `tiny_random_classifier(dir, arch)`: a small random `*ForSequenceClassification` (one label,
  2 layers, hidden 64) for each of TINY_ARCHS, deterministic. Decoders carry SmolLM2's real
  tokenizer and chat template and are exported exactly as the SmolLM2 classifier (a dedicated
  `[PAD]`, id 49152, vocab_size 49153 = the tokenizer's length); encoders carry the MiniLM tokenizer
  (pad id 0). gemma2 / gemma3 have sliding_window 8, gemma2 attention soft-capping that bites (a
  path that ignores either scores otherwise: see SLIDING_WINDOW and SOFTCAP).

Each returns the directory it wrote (the checkpoint itself; created when missing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.corpus import InputSpec, read_units
from pipeline.embed.backbone import BackboneSpec, file_sha256, load_backbone, load_tokenizer, resolve_source
from pipeline.embed.classifier_export import (
    BRADLEY_TERRY,
    REPORT_FILE,
    export_classifier,
    export_sequence_classifier,
    fit_bradley_terry_head,
)
from pipeline.embed.engine import EmbeddingEngine
from pipeline.embed.templating import TemplateError, TemplatePolicy, tokenize_many

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "data").resolve()
CACHE = REPO / ".cache" / "reward-model-fixtures"
SMOLLM2 = BackboneSpec(path="smollm2", device="cpu", dtype="float32")
MINILM = BackboneSpec(path="minilm", device="cpu", dtype="float32")

# The pairs: the first strict preference pairs of each file whose two conversations (SmolLM2's chat
# template, its default system prompt included) are at most MAX_TOKENS long: cheap to embed on a CPU.
PAIR_SOURCES = (("llmbar", "llmbar/LLMBar_Natural.json"), ("pandalm", "pandalm/testset-v1.json"))
PAIRS_PER_SOURCE = 30
MAX_TOKENS = 128

DECODER_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
ENCODER_ARCHS = ("deberta-v2", "bert", "roberta")
TINY_ARCHS = DECODER_ARCHS + ENCODER_ARCHS
TINY_HIDDEN = 64
SLIDING_WINDOW = 8  # gemma2 / gemma3: tokens a sliding-attention layer (the first of the two) sees
# gemma2: attention logits soft-capped at ±SOFTCAP (tanh; Gemma2's own default, kept on). The tiny
# gemma weights are drawn large enough (TINY_GEMMA_INIT) for the logits to reach the cap: on a
# 60-token conversation the reward moves by ~10 % without it, and more without the window. Gemma3
# replaced the cap by QK-norm: transformers' Gemma3 attention never reads attn_logit_softcapping,
# so the gemma3 model leaves it at its default (None) rather than carry a setting nothing applies.
SOFTCAP = 50.0
TINY_GEMMA_INIT = 0.5
_CODE = ("pipeline/embed/engine.py", "pipeline/embed/templating.py", "pipeline/embed/shared_attention.py")


# --- real pairs -------------------------------------------------------------------------------


def real_pair_units(per_source: int = PAIRS_PER_SOURCE, max_tokens: int = MAX_TOKENS) -> pa.Table:
    """Units (pipeline.corpus schema) of `per_source` strict preference pairs from each of
    PAIR_SOURCES, both conversations at most `max_tokens` SmolLM2 tokens, in file order."""
    tokenizer = load_tokenizer(SMOLLM2)
    policy = TemplatePolicy(max_tokens=max_tokens, overflow="quarantine")
    parts = []
    for _, path in PAIR_SOURCES:
        units = read_units(InputSpec(str(SHARED / path)))
        rows = units.to_pylist()
        ok = [i for i, u in enumerate(rows) if u["quarantine_reason"] is None and u["kind"] == "preference"]
        fits = tokenize_many(tokenizer, [rows[i]["prompt"] for i in ok], [rows[i]["response"] for i in ok], policy)
        by_row: dict[str, list[int]] = {}
        for i, t in zip(ok, fits):
            if not isinstance(t, TemplateError) and not rows[i]["tie"]:
                by_row.setdefault(rows[i]["row_id"], []).append(i)
        keep = sorted(i for members in list(v for v in by_row.values() if len(v) == 2)[:per_source] for i in members)
        if len(keep) != 2 * per_source:
            raise AssertionError(f"{path}: only {len(keep) // 2} pairs of at most {max_tokens} tokens")
        parts.append(units.take(pa.array(keep)))
    return pa.concat_tables(parts)


def prompt_text(messages: list[dict]) -> str:
    """The prompt as an encoder reward model takes it: the user's text for one user turn, else
    `role: content` lines (the project's encoder rendering)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _cache_key(*parts) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for name in (*_CODE, "tests/reward_model_fixtures.py"):
        h.update((REPO / name).read_bytes())
    for _, path in PAIR_SOURCES:
        h.update(file_sha256(SHARED / path).encode())
    return h.hexdigest()[:16]


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def smollm2_pair_units(per_source: int = PAIRS_PER_SOURCE, max_tokens: int = MAX_TOKENS) -> pa.Table:
    """real_pair_units with SmolLM2's embeddings (EmbeddingEngine, fp32, the labeling job's
    tokenization) and its backbone fingerprint, as a run with `embeddings: true` stores them."""
    backbone = load_backbone(SMOLLM2)
    units = real_pair_units(per_source, max_tokens)
    cached = CACHE / f"smollm2-pairs-{_cache_key(backbone.fingerprint, per_source, max_tokens)}.parquet"
    if cached.is_file():
        emb = pq.read_table(cached)
        if emb.column("unit_id").to_pylist() != units.column("unit_id").to_pylist():
            raise AssertionError(f"{cached}: cached for other units (delete it)")
    else:
        rows = units.to_pylist()
        policy = TemplatePolicy(max_tokens=max_tokens, overflow="quarantine")
        tokenized = tokenize_many(
            backbone.tokenizer, [u["prompt"] for u in rows], [u["response"] for u in rows], policy
        )
        if any(isinstance(t, TemplateError) for t in tokenized):
            raise AssertionError("a selected conversation no longer tokenizes")
        e = EmbeddingEngine(backbone).embed([t.input_ids for t in tokenized], [t.prompt_end for t in tokenized])
        emb = pa.table(
            {
                "unit_id": units.column("unit_id"),
                "embedding": pa.array(list(e.response), type=pa.list_(pa.float32())),
                "prompt_embedding": pa.array(list(e.prompt), type=pa.list_(pa.float32())),
            }
        )
        _write_parquet_atomic(emb, cached)
    return (
        units.append_column("embedding", emb.column("embedding"))
        .append_column("prompt_embedding", emb.column("prompt_embedding"))
        .append_column("backbone_fingerprint", pa.array([backbone.fingerprint] * units.num_rows))
    )


# --- the fixtures -----------------------------------------------------------------------------


def smollm2_classifier(directory: Path) -> Path:
    """SmolLM2-135M-Instruct + a Bradley-Terry head fitted on its embeddings of 60 real pairs, as
    LlamaForSequenceClassification in `directory` (pad [PAD] = 49152, classifier_export.json)."""
    directory = Path(directory)
    export_classifier(
        BRADLEY_TERRY,
        smollm2_pair_units(),
        load_backbone(SMOLLM2),
        str(directory),
        provenance={
            "fixture": "tests/reward_model_fixtures.py:smollm2_classifier",
            "embeddings": {
                "sources": [path for _, path in PAIR_SOURCES],
                "pairs_per_source": PAIRS_PER_SOURCE,
                "max_tokens": MAX_TOKENS,
            },
        },
    )
    return directory


def build_minilm_classifier():
    """(BertForSequenceClassification, tokenizer, fit report) in memory: all-MiniLM-L6-v2's weights,
    its classifier a Bradley-Terry head on the class's pooled output of (prompt text, response)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    directory = resolve_source(MINILM).directory
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model, info = BertForSequenceClassification.from_pretrained(directory, num_labels=1, output_loading_info=True)
    model.eval()
    # everything but the new classifier comes from the package (its pooler included)
    if set(info["missing_keys"]) != {"classifier.weight", "classifier.bias"}:
        raise AssertionError(f"MiniLM loaded with missing keys {sorted(info['missing_keys'])}")
    units = real_pair_units()
    rows = units.to_pylist()
    pooled = np.empty((len(rows), model.config.hidden_size), np.float32)
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = rows[start : start + 16]
            enc = tokenizer(
                [prompt_text(u["prompt"]) for u in batch],
                [u["response"] for u in batch],
                padding=True,
                truncation=True,
                return_tensors="pt",
            )
            pooled[start : start + len(batch)] = model.bert(**enc).pooler_output.numpy()
    head = fit_bradley_terry_head(units.append_column("embedding", pa.array(list(pooled), pa.list_(pa.float32()))))
    with torch.no_grad():
        model.classifier.weight.copy_(torch.as_tensor(head.weight)[None, :])
        model.classifier.bias.zero_()
    report = {
        "head": head.kind,
        "head_fingerprint": head.fingerprint,
        "fit": head.fit,
        "embedding": "BertModel pooler_output of tokenizer(prompt_text, response)",
        "backbone": {"name": "all-MiniLM-L6-v2", "directory": directory},
    }
    return model, tokenizer, report


def minilm_classifier(directory: Path) -> Path:
    """build_minilm_classifier saved to `directory` (save_pretrained: safetensors; tokenizer; the
    fit report as classifier_export.json)."""
    directory = Path(directory)
    model, tokenizer, report = build_minilm_classifier()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return directory


def _decoder_config(arch: str, vocab_size: int, tokenizer):
    from transformers import AutoConfig

    common = {
        "vocab_size": vocab_size,
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": 2 * TINY_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": TINY_HIDDEN // 4,
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    if arch in ("gemma2", "gemma3"):
        common.update(
            sliding_window=SLIDING_WINDOW,
            query_pre_attn_scalar=TINY_HIDDEN // 4,
            layer_types=["sliding_attention", "full_attention"],
            initializer_range=TINY_GEMMA_INIT,
        )
    if arch == "gemma2":
        common.update(attn_logit_softcapping=SOFTCAP)
    return AutoConfig.for_model({"gemma3": "gemma3_text"}.get(arch, arch), **common)


def _encoder_config(arch: str, vocab_size: int, tokenizer):
    from transformers import AutoConfig

    common = {
        "vocab_size": vocab_size,
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": 2 * TINY_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "type_vocab_size": 2,  # the MiniLM tokenizer gives a (prompt, response) pair token_type_ids 0 / 1
        "num_labels": 1,
    }
    if arch == "roberta":
        # positions count from pad_token_id + 1, so 512 tokens need 514 position rows
        common.update(
            max_position_embeddings=514, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id
        )
    if arch == "deberta-v2":  # as the DeBERTa-v3 reward models: relative attention only, no token types
        common.update(
            type_vocab_size=0,
            relative_attention=True,
            position_biased_input=False,
            pos_att_type=["p2c", "c2p"],
            max_relative_positions=-1,
            position_buckets=256,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pooler_hidden_size=TINY_HIDDEN,
        )
    return AutoConfig.for_model(arch, **common)


def tiny_random_classifier(directory: Path, arch: str) -> Path:
    """A small random `*ForSequenceClassification` of `arch` (one of TINY_ARCHS) in `directory`,
    with a real tokenizer; its reward head is drawn so that rewards are of order 1."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    directory = Path(directory)
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, not {arch!r}")
    seed = TINY_ARCHS.index(arch)
    torch.manual_seed(seed)
    if arch in DECODER_ARCHS:
        tokenizer = load_tokenizer(SMOLLM2)
        base = AutoModel.from_config(_decoder_config(arch, len(tokenizer), tokenizer)).eval()
        weight = torch.randn(TINY_HIDDEN, generator=torch.Generator().manual_seed(seed)) / math.sqrt(TINY_HIDDEN)
        export_sequence_classifier(
            weight.numpy(),
            base,
            str(directory),
            tokenizer,
            report={"fixture": "tests/reward_model_fixtures.py:tiny_random_classifier", "arch": arch, "seed": seed},
        )
        return directory
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(MINILM).directory)
    model = AutoModelForSequenceClassification.from_config(_encoder_config(arch, len(tokenizer), tokenizer)).eval()
    final = model.classifier.out_proj if arch == "roberta" else model.classifier
    with torch.no_grad():
        final.weight.normal_(0.0, 1.0 / math.sqrt(final.in_features))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
