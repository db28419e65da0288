"""Loading a sequence-classifier reward model strictly, and scoring many conversations with it.

Loading: transformers' own `AutoModelForSequenceClassification` on the checkpoint's safetensors,
`trust_remote_code=False`, and any missing, unexpected or mismatched tensor refused (transformers
would initialise a missing head at random and score garbage). A remote checkpoint is copied once
per machine (pipeline.embed.checkpoint.local_checkpoint).

Scoring, per family (pipeline/reward_models/families.py):
- decoders: the class's base model runs through the EmbeddingEngine (token budgets, padding-free
  rows, each distinct prompt once per call where the attention allows it exactly), and the reward
  is the class's linear head applied to the state at each row's last token, the position the class
  reads (inputs.py cuts trailing pads);
- encoders: the class's own forward (its pooler and classifier) on length-sorted, token-budget,
  right-padded batches with an attention mask.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.embed.backbone import Backbone, _resolve_device, _resolve_dtype
from pipeline.embed.batching import check_permutation, plan_batches
from pipeline.embed.engine import EmbeddingEngine, default_threads
from pipeline.reward_models.families import DECODER
from pipeline.reward_models.spec import RewardModelError, RewardModelInfo, RewardModelSpec, fingerprint
from pipeline.reward_models.spec import inspect_reward_model as inspect


@dataclass
class Scored:
    rewards: np.ndarray  # [N] float32
    computed: np.ndarray  # [N] int64: token positions run, charged per unit
    useful: np.ndarray  # [N] int64: tokens that had to run


def local_directory(path: str, storage_options: dict | None) -> str:
    if not storage.is_remote(path):
        return path
    from pipeline.embed.checkpoint import local_checkpoint

    return local_checkpoint(path, storage_options)


def load_tokenizer(spec: RewardModelSpec, storage_options: dict | None = None):
    from transformers import AutoTokenizer

    directory = local_directory(spec.path, storage_options)
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - named with the model
        raise RewardModelError(f"reward model {spec.name!r} ({spec.path}): cannot load its tokenizer: {e}") from e


def load_classifier(spec: RewardModelSpec, info: RewardModelInfo, storage_options: dict | None = None):
    """(model, directory): the checkpoint's own class, loaded strictly, frozen, in eval mode."""
    import torch
    from transformers import AutoModelForSequenceClassification

    directory = local_directory(spec.path, storage_options)
    device = _resolve_device(spec.device)
    dtype = _resolve_dtype(spec.dtype, device)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if spec.attn_implementation != "auto":
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            directory, trust_remote_code=False, use_safetensors=True, output_loading_info=True, **kwargs
        )
    except Exception as e:  # noqa: BLE001 - named with the model
        raise RewardModelError(f"reward model {spec.name!r} ({spec.path}): cannot load: {e}") from e
    problems = {k: sorted(loading.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        said = "; ".join(f"{k.replace('_', ' ')} {[str(x) for x in v[:5]]}" for k, v in problems.items())
        raise RewardModelError(f"reward model {spec.name!r} ({spec.path}): checkpoint and class differ: {said}")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, directory, device, dtype


class RewardModelScorer:
    """One reward model, loaded once per actor: `score(inputs)` -> a reward per conversation."""

    def __init__(
        self,
        spec: RewardModelSpec,
        storage_options: dict | None = None,
        token_budget: int | None = None,
        num_threads: int | None = None,
        known_fingerprint: str | None = None,
    ):
        """`known_fingerprint`: the model's fingerprint when the caller has it (the labeling driver
        computes it once for the run's identity); otherwise the weights are hashed here."""
        start = time.perf_counter()
        self.spec = spec
        self.info = inspect(spec, storage_options)
        self.family = self.info.family
        self.fingerprint = known_fingerprint or fingerprint(spec, storage_options)
        self.model, directory, self.device, self.dtype = load_classifier(spec, self.info, storage_options)
        self.tokenizer = load_tokenizer(spec, storage_options)
        self.token_budget = token_budget
        if str(self.device).startswith("cpu"):
            import torch

            threads = num_threads or default_threads()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        self.engine: EmbeddingEngine | None = None
        if self.family.kind == DECODER:
            self._setup_decoder()
        else:
            from pipeline.embed.engine import default_token_budget

            self.token_budget = token_budget or default_token_budget(self.device)
        self.load_seconds = time.perf_counter() - start

    def _setup_decoder(self) -> None:
        import torch

        base = getattr(self.model, self.model.base_model_prefix)
        head = getattr(self.model, self.family.head or "score")
        cfg = self.model.config
        backbone = Backbone(
            model=base,
            tokenizer=self.tokenizer,
            kind="decoder",
            hidden_size=int(cfg.hidden_size),
            device=self.device,
            dtype=self.dtype,
            max_length=int(getattr(cfg, "max_position_embeddings", None) or 1 << 30),
            fingerprint=self.fingerprint,
            name=self.spec.name,
            attn_implementation=str(getattr(cfg, "_attn_implementation", None) or "sdpa"),
        )
        share = self.spec.share_prompts if self.family.shares_prompts else "never"
        self.engine = EmbeddingEngine(backbone, token_budget=self.token_budget, share_prompts=share)
        # The chosen logit's row of the head, applied in fp32 to the state the class reads.
        with torch.no_grad():
            self.weight = head.weight[self.info.logit_index].float().cpu().numpy()
            bias = getattr(head, "bias", None)
            self.bias = float(bias[self.info.logit_index].float()) if bias is not None else 0.0

    @property
    def shares_prompts(self) -> bool:
        return bool(self.engine is not None and self.engine.shared)

    def score(
        self,
        input_ids: Sequence[Sequence[int]],
        prompt_end: Sequence[int] | None = None,
        token_type_ids: Sequence[Sequence[int] | None] | None = None,
    ) -> Scored:
        n = len(input_ids)
        if n == 0:
            z = np.zeros(0, np.int64)
            return Scored(np.zeros(0, np.float32), z, z.copy())
        if self.engine is not None:
            e = self.engine.embed(input_ids, prompt_end)
            rewards = (e.response.astype(np.float64) @ self.weight.astype(np.float64) + self.bias).astype(np.float32)
            lengths = np.fromiter((len(x) for x in input_ids), np.int64, n)
            computed = e.computed if e.computed is not None else lengths
            useful = e.useful if e.useful is not None else lengths
            return Scored(rewards, computed, useful)
        return self._score_encoder(input_ids, token_type_ids)

    def _score_encoder(self, input_ids, token_type_ids) -> Scored:
        import torch

        n = len(input_ids)
        lengths = np.fromiter((len(x) for x in input_ids), np.int64, n)
        rewards = np.empty(n, np.float32)
        computed = np.zeros(n, np.int64)
        plan = plan_batches(lengths, int(self.token_budget or 1024))
        check_permutation(plan, n)
        pad = self.model.config.pad_token_id
        pad = int(pad) if pad is not None else int(getattr(self.tokenizer, "pad_token_id", 0) or 0)
        with_types = token_type_ids is not None and any(t is not None for t in token_type_ids)
        for rows in plan:
            width = int(lengths[rows].max())
            ids = np.full((len(rows), width), pad, np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            types = np.zeros((len(rows), width), np.int64)
            for r, i in enumerate(rows):
                k = int(lengths[i])
                ids[r, :k], mask[r, :k] = input_ids[i], 1
                if with_types and token_type_ids is not None and token_type_ids[i] is not None:
                    types[r, :k] = token_type_ids[i]
            kwargs = {
                "input_ids": torch.as_tensor(ids, device=self.device),
                "attention_mask": torch.as_tensor(mask, device=self.device),
            }
            if with_types:
                kwargs["token_type_ids"] = torch.as_tensor(types, device=self.device)
            with torch.inference_mode():
                logits = self.model(**kwargs).logits
            rewards[rows] = logits[:, self.info.logit_index].float().cpu().numpy()
            computed[rows] = width
        return Scored(rewards, computed, lengths)
