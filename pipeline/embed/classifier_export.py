"""Our reward heads where a sequence classifier is expected.

transformers' decoder sequence classifiers (`LlamaForSequenceClassification`, Qwen2…, Mistral…,
Gemma2…) compute `score(h)`: one linear map, no bias, of the final-norm hidden state h at the last
non-pad token. That h is exactly the response embedding this project's EmbeddingEngine computes
(the state at the conversation's last token, pipeline/embed/engine.py), so a linear head w fitted on
our embeddings gives the same reward, w·h, in any loader of that class:
AutoModelForSequenceClassification without remote code, TRL's reward-model loading, classifier
serving. The gated ArmoRM score is not linear in h (its gate reads the prompt's state), so it
cannot travel in that class; jobs.export_armorm writes it in the released layout. What travels
here is one of two linear heads:

- `bradley_terry`: a linear Bradley-Terry head on the response embeddings of the human preference
  pairs: strict preference pairs and differently ranked best-of-N responses, the pairs the gate
  and the single-head baseline of jobs.train_heads learn from, with the same validation split (by
  row id) and L2 grid (pipeline.heads.train), so on a heads directory's training split it is that
  baseline. Its report gives the pairwise accuracy per source on the fit and validation pairs.
- `gated_fit`: ridge regression without intercept of trained heads' gated score on the response
  embedding (λ from the ridge grid by validation MSE, validation rows by row id). Its report gives,
  per source, how often it orders two responses to the same prompt as the gated score does
  (`agreement`, see `gated_agreement`), and both scores' accuracy on the human pairs.

The checkpoint: the backbone's own config with `architectures: ["<Arch>ForSequenceClassification"]`,
one label, the dedicated pad token of the ArmoRM export (pipeline/embed/checkpoint.py: the
tokenizer's own pad if no text can contain it, else an added `[PAD]` with the embedding grown by one
row; pad_token_id in config.json and the tokenizer files), the `model.*` backbone tensors plus
`score.weight` [1, H], safetensors only, no lm_head, no auto_map, no code. Before anything is written
the tensor names and shapes are checked against the class transformers builds from that config, so
a strict load finds no missing or unexpected key. `classifier_export.json` beside the weights says
which head it is, what it was fitted on, and with which backbone.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage
from pipeline.embed.backbone import Backbone
from pipeline.embed.checkpoint import (
    TensorSource,
    backbone_sources,
    require_tokenizer,
    with_dedicated_pad,
    write_checkpoint,
)
from pipeline.heads.bradley_terry import DEFAULT_L2_GRID
from pipeline.heads.checkpoint import ARMORM_CONFIG_KEYS, DEFAULT_SHARD_SIZE, EMBEDDING_KEY, CheckpointError
from pipeline.heads.model import ArmoHeads
from pipeline.heads.regression import DEFAULT_LAMBDA_GRID, RidgeStats, fit_ridge
from pipeline.heads.train import DEFAULTS as TRAIN_DEFAULTS
from pipeline.heads.train import fit_bradley_terry_weights, validation_mask
from pipeline.metrics import pairwise_accuracy
from pipeline.units import Pairs, concat_pairs, preference_pairs, ranked_pairs

REPORT_FILE = "classifier_export.json"
REPORT_FORMAT = "armolabel.classifier_export/1"
SCORE_KEY = "score.weight"
BRADLEY_TERRY = "bradley_terry"
GATED_FIT = "gated_fit"
HEAD_KINDS = (BRADLEY_TERRY, GATED_FIT)
VAL_FRACTION = float(cast(float, TRAIN_DEFAULTS["val_fraction"]))  # the validation share jobs.train_heads uses
_CONFIG_DROPPED = ("auto_map", "_name_or_path", "quantization_config", "torch_dtype")
_PAIR_CELLS = 1 << 22  # gated_agreement compares a prompt group's rows in chunks of this many pairs


@dataclass
class LinearHead:
    """reward = weight · h, h the response embedding (final-norm state at the conversation's last token)."""

    kind: str
    weight: np.ndarray  # [H] float32
    fit: dict  # what it was fitted on and how well: counts, regularisation, per-source metrics

    def __post_init__(self):
        self.weight = np.asarray(self.weight, dtype=np.float32).reshape(-1)
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, not {self.kind!r}")
        if not np.isfinite(self.weight).all():
            raise CheckpointError(f"{self.kind} head: non-finite weights")

    def score(self, embeddings) -> np.ndarray:
        return np.asarray(embeddings, dtype=np.float64) @ self.weight.astype(np.float64)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.kind.encode() + b"\0")
        h.update(np.ascontiguousarray(self.weight, dtype="<f4").tobytes())
        return h.hexdigest()


# --- fitting ------------------------------------------------------------------------------------


def _finite_embeddings(units: pa.Table, column: str = "embedding") -> np.ndarray:
    """[N×H] float32 of an embedding column (as pipeline.units.embeddings_of reads it), all finite."""
    if column not in units.column_names:
        raise CheckpointError(f"the units have no {column} column (label the run with `embeddings: true`)")
    if units.num_rows == 0:
        raise CheckpointError("no units to fit a head on")
    arr = units.column(column).combine_chunks()
    if arr.null_count:
        raise CheckpointError(f"{arr.null_count} units have no {column}")
    X = arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), -1).astype(np.float32)
    if not np.isfinite(X).all():
        raise CheckpointError(f"some units' {column} is not finite")
    return X


def _human_pairs(units: pa.Table) -> Pairs:
    """Strict preference pairs and differently ranked best-of-N responses (what the gate trains on)."""
    return concat_pairs(preference_pairs(units), ranked_pairs(units))


def _accuracy(scores: np.ndarray, pairs: Pairs) -> float | None:
    return _number(pairwise_accuracy(scores[pairs.better], scores[pairs.worse])) if len(pairs) else None


def fit_bradley_terry_head(units: pa.Table, val_fraction: float = VAL_FRACTION, l2_grid=DEFAULT_L2_GRID) -> LinearHead:
    """A linear BT head on the units' response embeddings, from their human pairs (see the module
    doc); L2 from `l2_grid` by the validation pairs' loss (1e-3 when there are none)."""
    X = _finite_embeddings(units)
    pairs = _human_pairs(units)
    if len(pairs) == 0:
        raise CheckpointError(
            "the units hold no preference pairs and no ranked best-of-N responses: nothing to fit a "
            "Bradley-Terry head on"
        )
    held_mask = validation_mask(pairs.row_id, val_fraction)
    fit, held = pairs.select(~held_mask), pairs.select(held_mask)
    if len(fit) == 0:
        raise CheckpointError(f"all {len(pairs)} pairs fell in the validation split: nothing to fit on")
    w, l2, val_loss = fit_bradley_terry_weights(X, fit, held, list(l2_grid))
    scores = X.astype(np.float64) @ w
    per_source = {}
    for source in sorted(set(pairs.source)):
        f, v = fit.select(fit.source == source), held.select(held.source == source)
        per_source[source] = {
            "train_pairs": len(f),
            "train_accuracy": _accuracy(scores, f),
            "validation_pairs": len(v),
            "validation_accuracy": _accuracy(scores, v),
        }
    return LinearHead(
        BRADLEY_TERRY,
        w,
        {
            "units": int(len(X)),
            "pairs": len(pairs),
            "train_pairs": len(fit),
            "validation_pairs": len(held),
            "val_fraction": val_fraction,
            "l2": l2,
            "val_loss": _number(val_loss),
            "train_accuracy": _accuracy(scores, fit),
            "validation_accuracy": _accuracy(scores, held),
            "per_source": per_source,
        },
    )


def fit_gated_head(
    units: pa.Table, heads: ArmoHeads, val_fraction: float = VAL_FRACTION, ridge_grid=DEFAULT_LAMBDA_GRID
) -> LinearHead:
    """The linear head closest (ridge, no intercept) to the gated score of `heads` on the units'
    response embeddings; λ from `ridge_grid` by validation MSE (validation units by row id)."""
    X = _finite_embeddings(units)
    if X.shape[1] != heads.hidden_size:
        raise CheckpointError(f"the heads take {heads.hidden_size}-dim embeddings, the units hold {X.shape[1]}-dim")
    P = _finite_embeddings(units, "prompt_embedding")  # the gate reads it
    gated = heads.score(X, P).score.astype(np.float64)
    val = validation_mask(units.column("row_id").to_pylist(), val_fraction)
    if val.all():
        raise CheckpointError(f"all {len(X)} units fell in the validation split: nothing to fit on")
    train_stats = RidgeStats(X.shape[1], 1).add(X[~val], gated[~val, None])
    val_stats = RidgeStats(X.shape[1], 1).add(X[val], gated[val, None])
    ridge = fit_ridge(train_stats, val_stats, ridge_grid)
    w = ridge.weight[0]
    linear = X.astype(np.float64) @ w
    agreement = gated_agreement(units, linear, gated)
    held_agreement = gated_agreement(units.filter(pa.array(val)), linear[val], gated[val])
    pairs = _human_pairs(units)
    per_source = {}
    for source, entry in agreement.items():
        p = pairs.select(pairs.source == source)
        per_source[source] = {
            **entry,
            "validation_agreement": held_agreement.get(source, {}).get("agreement"),
            "human_pairs": len(p),
            "human_accuracy": _accuracy(linear, p),
            "gated_human_accuracy": _accuracy(gated, p),
        }
    return LinearHead(
        GATED_FIT,
        w,
        {
            "units": int(len(X)),
            "train_units": int((~val).sum()),
            "validation_units": int(val.sum()),
            "val_fraction": val_fraction,
            "lambda": float(ridge.lambdas[0]),
            "val_mse": _number(ridge.val_mse[0]),
            "validation_r2": _r2(ridge.val_mse[0], gated[val]),
            "heads_fingerprint": heads.fingerprint,
            "objectives": list(heads.objectives),
            "per_source": per_source,
        },
    )


def gated_agreement(units: pa.Table, linear, gated) -> dict[str, dict]:
    """Per source: over every unordered pair of units of one prompt (same source and prompt_id)
    that the gated score orders (pairs it ties are counted apart, as `gated_ties`), the share the
    linear score orders the same way, a linear tie counting half: {pairs, gated_ties, agreement}
    (agreement None without such a pair)."""
    linear, gated = np.asarray(linear, dtype=np.float64), np.asarray(gated, dtype=np.float64)
    if len(linear) != units.num_rows or len(gated) != units.num_rows:
        raise ValueError("gated_agreement: one linear and one gated score per unit")
    sources = units.column("source").to_pylist()
    prompts = units.column("prompt_id").to_pylist()
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(sources, prompts)):
        groups.setdefault(key, []).append(i)
    totals: dict[str, list[float]] = {s: [0.0, 0, 0] for s in sorted(set(sources))}
    for (source, _), members in groups.items():
        if len(members) < 2:
            continue
        credit, ordered, tied = _pair_credit(linear[members], gated[members])
        t = totals[source]
        t[0] += credit
        t[1] += ordered
        t[2] += tied
    return {
        source: {"pairs": int(ordered), "gated_ties": int(tied), "agreement": credit / ordered if ordered else None}
        for source, (credit, ordered, tied) in totals.items()
    }


def _pair_credit(x: np.ndarray, y: np.ndarray) -> tuple[float, int, int]:
    """(credit, pairs y orders, pairs y ties) over the unordered pairs of one group, in row chunks."""
    n = len(x)
    chunk = max(1, _PAIR_CELLS // n)
    credit, ordered, tied = 0.0, 0, 0
    for i0 in range(0, n, chunk):
        rows = np.arange(i0, min(i0 + chunk, n))
        later = np.arange(n)[None, :] > rows[:, None]  # each unordered pair once
        dx = np.sign(x[rows, None] - x[None, :])
        dy = np.sign(y[rows, None] - y[None, :])
        counted = later & (dy != 0)
        credit += float(((dx * dy > 0) + 0.5 * (dx == 0))[counted].sum())
        ordered += int(counted.sum())
        tied += int((later & (dy == 0)).sum())
    return credit, ordered, tied


def _r2(mse, target: np.ndarray) -> float | None:
    """1 − MSE / variance of the target (None without validation rows or variance)."""
    var = float(np.var(target)) if len(target) else 0.0
    return _number(1.0 - float(mse) / var) if var > 0 else None


def _number(x) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --- the checkpoint -----------------------------------------------------------------------------


def classifier_class(config: dict):
    """The transformers sequence-classification class of a backbone config (its model_type), and
    the config object it is built from (one label)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    model_type = str(config.get("model_type"))
    try:
        cfg = AutoConfig.for_model(model_type, **kwargs)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"backbone model_type {model_type!r}: transformers has no config for it ({e})") from e
    try:
        cls = AutoModelForSequenceClassification._model_mapping[type(cfg)]
    except KeyError as e:
        raise CheckpointError(f"backbone model_type {model_type!r}: transformers has no sequence classifier") from e
    return cls, cfg


def classifier_config(backbone_config: dict, pad_token_id: int, vocab_size: int, dtype: str) -> dict:
    """config.json of the export (its `architectures` set once the class is known): the backbone's
    config, one label, the dedicated pad, the grown vocabulary, the written dtype; no auto_map (no
    remote code), no source path."""
    if not 0 <= pad_token_id < vocab_size:
        raise CheckpointError(f"pad_token_id {pad_token_id} outside the vocabulary of {vocab_size}")
    dropped = (*_CONFIG_DROPPED, *ARMORM_CONFIG_KEYS, "num_labels")  # an ArmoRM checkpoint's heads stay behind
    config = {k: v for k, v in backbone_config.items() if k not in dropped}
    config.update(
        {
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
            "pad_token_id": int(pad_token_id),
            "vocab_size": int(vocab_size),
            "dtype": dtype,
        }
    )
    return config


def _check_against_class(config: dict, shapes: dict[str, list[int]]) -> str:
    """The class transformers builds from `config` (on the meta device: no memory) must hold exactly
    these tensors: a strict load then has no missing or unexpected key. Returns its name."""
    cls, cfg = classifier_class(config)
    if cfg.num_labels != 1:
        raise CheckpointError(f"the classifier config has {cfg.num_labels} labels, not 1")
    with torch.device("meta"):
        model = cls(cfg)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{cls.__name__} expects other tensors than a backbone (`model.*`) plus {SCORE_KEY}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = sorted(n for n in expected if expected[n] != shapes[n])
    if wrong:
        n = wrong[0]
        raise CheckpointError(f"{cls.__name__}: tensor {n} has shape {shapes[n]}, the class {expected[n]}")
    return cls.__name__


def export_sequence_classifier(
    weight,
    backbone,
    out_dir: str,
    tokenizer,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    storage_options: dict | None = None,
    report: dict | None = None,
) -> str:
    """Write a decoder backbone with a linear reward head `weight` [H] (reward = weight · h) as the
    backbone's own `<Arch>ForSequenceClassification` checkpoint (see the module doc) to `out_dir`
    (local or remote), with `report` (a dict) as classifier_export.json. `backbone`: a transformers
    model (a base model, or a causal LM whose lm_head is dropped) or a directory with config.json +
    safetensors (an ArmoRM checkpoint too: its heads are dropped). `tokenizer`: the backbone's, with
    its chat template. `dtype` casts floating tensors (None keeps them). Returns `out_dir`."""
    require_tokenizer(tokenizer)
    w = torch.as_tensor(np.asarray(weight, dtype=np.float32)).reshape(1, -1)
    if not torch.isfinite(w).all():
        raise CheckpointError("the reward head has non-finite weights")
    config, sources = backbone_sources(backbone, storage_options)
    if int(config.get("hidden_size", -1)) != w.shape[1]:
        raise CheckpointError(f"backbone hidden_size {config.get('hidden_size')} ≠ head size {w.shape[1]}")
    tokenizer, pad, vocab_size = with_dedicated_pad(config, sources, tokenizer)
    items = list(sources.items()) + [(SCORE_KEY, TensorSource(tensor=w))]
    written = str(dtype).removeprefix("torch.") if dtype is not None else sources[EMBEDDING_KEY].dtype_name()
    config = classifier_config(config, pad, vocab_size, written)
    architecture = _check_against_class(config, {name: source.shape() for name, source in items})
    config["architectures"] = [architecture]
    out_report = {
        "format": REPORT_FORMAT,
        **(report or {}),
        "architecture": architecture,
        "model_type": config.get("model_type"),
        "hidden_size": int(w.shape[1]),
        "pad_token_id": pad,
        "pad_token": tokenizer.convert_ids_to_tokens(pad),
        "vocab_size": vocab_size,
        "dtype": written,
        "score_weight_sha256": hashlib.sha256(w.numpy().astype("<f4").tobytes()).hexdigest(),
    }
    blob = json.dumps(out_report, indent=2, sort_keys=True, default=_jsonable).encode()
    return write_checkpoint(
        out_dir, items, config, tokenizer, shard_size, dtype, storage_options, extra_files={REPORT_FILE: blob}
    )


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def read_report(out_dir: str, storage_options: dict | None = None) -> dict:
    return json.loads(storage.read_bytes(storage.join(out_dir, REPORT_FILE), storage_options))


# --- fit + export -------------------------------------------------------------------------------


def check_units_backbone(units: pa.Table, backbone: Backbone) -> None:
    """The units' embeddings must come from this backbone (its fingerprint) and be its size."""
    if "backbone_fingerprint" not in units.column_names:
        raise CheckpointError("the units carry no backbone_fingerprint: cannot tell which backbone embedded them")
    found = sorted({str(f) for f in units.column("backbone_fingerprint").to_pylist()})
    if found != [backbone.fingerprint]:
        raise CheckpointError(
            f"the embeddings were computed by backbone {', '.join(found)}, not {backbone.name} "
            f"({backbone.fingerprint}): a head fitted on them would score another model's states"
        )
    X = _finite_embeddings(units)
    if X.shape[1] != backbone.hidden_size:
        raise CheckpointError(f"the units hold {X.shape[1]}-dim embeddings, {backbone.name} {backbone.hidden_size}")


def export_classifier(
    kind: str,
    units: pa.Table,
    backbone: Backbone,
    out_dir: str,
    heads: ArmoHeads | None = None,
    val_fraction: float = VAL_FRACTION,
    l2_grid=DEFAULT_L2_GRID,
    ridge_grid=DEFAULT_LAMBDA_GRID,
    weights=None,
    dtype: torch.dtype | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    storage_options: dict | None = None,
    provenance: dict | None = None,
) -> dict:
    """Fit a `kind` head (bradley_terry, or gated_fit of `heads`; validation share and grids as
    pipeline.heads.train's options) on the units' embeddings, check they come from `backbone`,
    export both as a sequence classifier to `out_dir`; returns the report written beside it.
    `weights`: where the backbone tensors are read from (default the loaded model; a directory
    streams them). `provenance` joins the report (where the units and heads came from)."""
    if kind not in HEAD_KINDS:
        raise CheckpointError(f"head kind must be one of {HEAD_KINDS}, not {kind!r}")
    if backbone.kind != "decoder":
        raise CheckpointError(
            f"{backbone.name} is an encoder: its embeddings here are mean-pooled, while a sequence classifier "
            "reads one token's state, so no head fitted on them gives the same number there"
        )
    require_tokenizer(backbone.tokenizer)
    check_units_backbone(units, backbone)
    if kind == GATED_FIT:
        if heads is None:
            raise CheckpointError("a gated_fit head needs the trained heads whose gated score it fits")
        head = fit_gated_head(units, heads, val_fraction, ridge_grid)
    else:
        head = fit_bradley_terry_head(units, val_fraction, l2_grid)
    report = {
        **(provenance or {}),
        "head": kind,
        "head_fingerprint": head.fingerprint,
        "fit": head.fit,
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint, "loaded_from": backbone.loaded_from},
    }
    export_sequence_classifier(
        head.weight,
        backbone.model if weights is None else weights,
        out_dir,
        backbone.tokenizer,
        shard_size=shard_size,
        dtype=dtype,
        storage_options=storage_options,
        report=report,
    )
    return read_report(out_dir, storage_options)
