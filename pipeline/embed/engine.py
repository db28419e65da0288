"""The embedding pass: token ids in, response and prompt embeddings out.

Decoders (ArmoRM): ONE forward pass per conversation through the base model (final norm applied,
no LM head). The response embedding is the last hidden state at the conversation's last token,
the prompt embedding the state at `prompt_end` (the prompt's last token) of the same pass.

Encoders (e.g. all-MiniLM-L6-v2): mean of the last hidden states over the real tokens, then
L2-normalised when the model's sentence-transformers recipe ends with Normalize (all-MiniLM-L6-v2
does, see Backbone.normalize); the prompt embedding comes from a separate pass over the prompt.

Decoders share prompts by default (share_prompts="auto"): units whose prompt token ids are
identical are computed as ONE packed segment [prompt | response_1 | ... | response_k], each
response attending to the prompt and causally to itself only, positions continuing from the
prompt's end (pipeline/embed/packing.py plans it, pipeline/embed/shared_attention.py computes
it). The prompt is computed once per group instead of once per unit, rows hold several groups up
to the token budget, and nothing is padded. The states are those of the per-unit passes
(causal attention: a response never sees a sibling, the prompt never sees a response), equal
within fp32 rounding (tests/test_embed_packing.py).

Per-unit paths (share_prompts="never", or a model the shared attention does not support):
results must not depend on batching: rows are grouped by `plan_batches`, padded (right or left),
and every pass gets an attention mask AND explicit position ids (cumsum(mask) - 1), so a row gets
the same positions wherever its padding is. With flash-attention (CUDA) rows are packed into one
sequence without padding instead; position ids restarting at 0 mark where each row begins.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.embed.backbone import Backbone
from pipeline.embed.batching import check_permutation, plan_batches, plan_packs
from pipeline.embed.packing import layout_row, plan_shared_rows, prompt_groups, useful_tokens

PADDING_SIDES = ("right", "left")
PACKING = ("auto", "never", "always")
SHARE_PROMPTS = ("auto", "never", "always")


@dataclass
class Embeddings:
    response: np.ndarray  # [N, H] float32
    prompt: np.ndarray  # [N, H] float32 (NaN rows when a decoder was given no prompt_end)
    tokens: int  # real (unpadded) tokens of the units, each unit counted whole
    computed: np.ndarray | None = None  # [N] int64: token positions the backbone ran, charged per unit
    useful: np.ndarray | None = None  # [N] int64: tokens that must be run when each prompt runs once

    @property
    def computed_tokens(self) -> int:
        return int(self.computed.sum()) if self.computed is not None else self.tokens

    @property
    def useful_tokens(self) -> int:
        return int(self.useful.sum()) if self.useful is not None else self.tokens

    def __len__(self) -> int:
        return int(self.response.shape[0])


def default_threads() -> int:
    """Intra-op threads for CPU inference: the cores this process may use (Ray sets
    OMP_NUM_THREADS to an actor's num_cpus; respect it)."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


# Padded tokens per forward pass when none is configured. On CPU the forward pass is compute-bound
# already for one conversation (~60 % of the measured fp32 matmul peak on the 2-core dev machine)
# and big batches only spill activations out of cache: 1,024 tokens measured fastest there
# (BENCHMARKS.md); 16,384 was 1.8x slower. Accelerators want big batches.
CPU_TOKEN_BUDGET = 1024
ACCELERATOR_TOKEN_BUDGET = 16384


def default_token_budget(device: str) -> int:
    return CPU_TOKEN_BUDGET if str(device).startswith("cpu") else ACCELERATOR_TOKEN_BUDGET


class EmbeddingEngine:
    """Runs a frozen backbone over many tokenised conversations under a token budget.

    token_budget: padded tokens (rows x longest row) per forward pass; with packing, real tokens
    per pass. padding_side only matters for padded batches (results are the same either way).
    packing: "auto" packs when the backbone uses flash-attention (varlen kernels, no padding);
    "always" packs with any attention (SDPA builds a block-diagonal mask from the position ids:
    correct but quadratic in the pack length, so only for checks); "never" pads. These apply to
    the per-unit path only.
    share_prompts: "auto" computes each distinct prompt once (shared-prompt packed rows, token_budget
    real tokens per row) for decoders whose model supports it, else the per-unit path; "always"
    raises where unsupported; "never" keeps the per-unit path. groups_per_row caps the pieces per
    shared row (None: as many as fit).
    """

    def __init__(
        self,
        backbone: Backbone,
        token_budget: int | None = None,
        padding_side: str = "right",
        packing: str = "auto",
        num_threads: int | None = None,
        share_prompts: str = "auto",
        groups_per_row: int | None = None,
    ):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, not {padding_side!r}")
        if packing not in PACKING:
            raise ValueError(f"packing must be one of {PACKING}, not {packing!r}")
        if token_budget is None:
            token_budget = default_token_budget(backbone.device)
        if token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        self.backbone = backbone
        self.token_budget = int(token_budget)
        self.padding_side = padding_side
        flash = str(backbone.attn_implementation).startswith("flash_attention")
        self.packed = backbone.kind == "decoder" and (packing == "always" or (packing == "auto" and flash))
        if share_prompts not in SHARE_PROMPTS:
            raise ValueError(f"share_prompts must be one of {SHARE_PROMPTS}, not {share_prompts!r}")
        self.shared = False
        if backbone.kind == "decoder" and share_prompts != "never":
            # shared_attention imports torch at module level; this module loads torch only when it runs.
            from pipeline.embed.shared_attention import supports

            why_not = supports(backbone.model)
            if why_not and share_prompts == "always":
                raise ValueError(f"share_prompts='always' but {backbone.name} cannot: {why_not}")
            self.shared = why_not is None
        self.groups_per_row = groups_per_row
        pad = getattr(backbone.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0  # any id works: padded positions are masked out
        if str(backbone.device).startswith("cpu"):
            import torch

            threads = num_threads or default_threads()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    # --- public ------------------------------------------------------------------------------

    def embed(
        self,
        input_ids: Sequence[Sequence[int]],
        prompt_end: Sequence[int] | None = None,
        prompt_input_ids: Sequence[Sequence[int]] | None = None,
    ) -> Embeddings:
        n = len(input_ids)
        h = self.backbone.hidden_size
        if n == 0:
            empty = np.zeros((0, h), np.float32)
            return Embeddings(empty, empty.copy(), 0)
        for i, ids in enumerate(input_ids):
            if len(ids) == 0:
                raise ValueError(f"row {i} has no tokens")
            if len(ids) > self.backbone.max_length:
                raise ValueError(f"row {i} has {len(ids)} tokens, more than the backbone's {self.backbone.max_length}")
        if self.backbone.kind == "decoder":
            return self._embed_decoder(input_ids, prompt_end)
        if prompt_input_ids is None:
            raise ValueError("encoder backbones need prompt_input_ids (the prompt tokenised alone)")
        if len(prompt_input_ids) != n:
            raise ValueError(f"{n} conversations but {len(prompt_input_ids)} prompts")
        response, tokens = self._embed_encoder(input_ids)
        prompt, prompt_tokens = self._embed_encoder(prompt_input_ids)
        return Embeddings(response, prompt, tokens + prompt_tokens)

    # --- decoders ----------------------------------------------------------------------------

    def _embed_decoder(self, input_ids, prompt_end) -> Embeddings:
        n = len(input_ids)
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=n)
        if prompt_end is not None:
            ends = np.asarray(prompt_end, dtype=np.int64).reshape(-1)
            if ends.size != n:
                raise ValueError(f"{n} conversations but {ends.size} prompt_end values")
            if (ends < 0).any() or (ends >= lengths).any():
                bad = int(np.flatnonzero((ends < 0) | (ends >= lengths))[0])
                raise ValueError(f"row {bad}: prompt_end {int(ends[bad])} outside its {int(lengths[bad])} tokens")
        else:
            ends = None
        # Prompt identity: the prompt's token ids (a unit without prompt_end is all prompt).
        prompt_len = ends + 1 if ends is not None else lengths
        groups = prompt_groups([ids[:k] for ids, k in zip(input_ids, prompt_len.tolist())])
        useful = useful_tokens(groups, prompt_len, lengths - prompt_len)
        if self.shared:
            response, prompt, computed = self._embed_shared(input_ids, groups, prompt_len, lengths)
            if ends is None:
                prompt[:] = np.nan
            return Embeddings(response, prompt, int(lengths.sum()), computed, useful)
        response = np.empty((n, self.backbone.hidden_size), np.float32)
        prompt = np.full((n, self.backbone.hidden_size), np.nan, np.float32)
        computed = lengths.copy()
        plan = plan_packs(lengths, self.token_budget) if self.packed else plan_batches(lengths, self.token_budget)
        check_permutation(plan, n)
        run = self._packed_pass if self.packed else self._padded_pass
        for rows in plan:
            seqs = [input_ids[i] for i in rows]
            last = lengths[rows] - 1
            positions = np.concatenate([last, ends[rows]]) if ends is not None else last
            states = run(seqs, positions)
            response[rows] = states[: len(rows)]
            if ends is not None:
                prompt[rows] = states[len(rows) :]
            if not self.packed:
                computed[rows] = lengths[rows].max()  # every row of a padded batch runs its width
        return Embeddings(response, prompt, int(lengths.sum()), computed, useful)

    def _embed_shared(self, input_ids, groups, prompt_len, lengths):
        """Shared-prompt packed rows; returns (response, prompt, computed tokens per unit)."""
        import torch

        from pipeline.embed.shared_attention import KWARG, build_pieces, shared_prompt_attention_on

        n = len(input_ids)
        h = self.backbone.hidden_size
        response = np.empty((n, h), np.float32)
        prompt = np.empty((n, h), np.float32)
        computed = np.zeros(n, np.int64)
        response_len = lengths - prompt_len
        rows = plan_shared_rows(groups, prompt_len, response_len, self.token_budget, self.groups_per_row)
        check_permutation([np.concatenate(r) for r in rows], n)
        model, device = self.backbone.model, self.backbone.device
        with shared_prompt_attention_on(model), torch.inference_mode():
            for row in rows:
                lay = layout_row(row, prompt_len, response_len)
                flat = np.concatenate([np.asarray(input_ids[u][b:e], dtype=np.int64) for u, b, e in lay.spans])
                out = model(
                    input_ids=torch.as_tensor(flat, device=device)[None],
                    position_ids=torch.as_tensor(lay.positions, device=device)[None],
                    use_cache=False,
                    **{KWARG: build_pieces(lay.pieces, device)},
                )
                hidden = out.last_hidden_state[0]
                picked = hidden[torch.as_tensor(np.concatenate([lay.response_at, lay.prompt_at]), device=device)]
                picked = picked.float().cpu().numpy()
                k = lay.units.size
                response[lay.units], prompt[lay.units] = picked[:k], picked[k:]
                computed[lay.units] = lay.computed
        return response, prompt, computed

    def _padded_pass(self, seqs: list[Sequence[int]], positions: np.ndarray) -> np.ndarray:
        """Forward over a padded batch; returns the hidden states at `positions`, which hold
        len(seqs) token indices per block (row r's index at positions[k * len(seqs) + r])."""
        import torch

        ids, mask, offsets = self._pad(seqs)
        rows = len(seqs)
        row_index = np.tile(np.arange(rows), len(positions) // rows)
        col_index = np.asarray(positions) + np.tile(offsets, len(positions) // rows)
        hidden = self._forward(ids, mask)
        picked = hidden[torch.as_tensor(row_index), torch.as_tensor(col_index)]
        return picked.float().cpu().numpy()

    def _packed_pass(self, seqs: list[Sequence[int]], positions: np.ndarray) -> np.ndarray:
        """Forward over the rows concatenated into one sequence, no padding. Position ids restart
        at 0 at each row start; transformers turns that into varlen flash-attention (or a
        block-diagonal mask for SDPA), so rows never attend to each other."""
        import torch

        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lengths.sum()))
        pos = np.concatenate([np.arange(n) for n in lengths])
        device = self.backbone.device
        with torch.inference_mode():
            out = self.backbone.model(
                input_ids=torch.as_tensor(flat, device=device)[None],
                position_ids=torch.as_tensor(pos, device=device)[None],
                use_cache=False,
            )
        hidden = out.last_hidden_state[0]
        index = np.asarray(positions) + np.tile(starts, len(positions) // len(seqs))
        return hidden[torch.as_tensor(index, device=hidden.device)].float().cpu().numpy()

    # --- encoders ----------------------------------------------------------------------------

    def _embed_encoder(self, input_ids) -> tuple[np.ndarray, int]:
        import torch

        n = len(input_ids)
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=n)
        out = np.empty((n, self.backbone.hidden_size), np.float32)
        plan = plan_batches(lengths, self.token_budget)
        check_permutation(plan, n)
        for rows in plan:
            ids, mask, _ = self._pad([input_ids[i] for i in rows])
            hidden = self._forward(ids, mask).float()
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            if self.backbone.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[rows] = pooled.cpu().numpy()
        return out, int(lengths.sum())

    # --- shared ------------------------------------------------------------------------------

    def _pad(self, seqs: list[Sequence[int]]):
        """(ids [B, L], mask [B, L], offset of each row's first real token)."""
        import torch

        lengths = [len(s) for s in seqs]
        width = max(lengths)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        offsets = np.zeros(len(seqs), dtype=np.int64)
        for r, (s, n) in enumerate(zip(seqs, lengths)):
            start = width - n if self.padding_side == "left" else 0
            ids[r, start : start + n] = s
            mask[r, start : start + n] = 1
            offsets[r] = start
        device = self.backbone.device
        return torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device), offsets

    def _forward(self, ids, mask):
        import torch

        # Positions count real tokens only, so a left-padded row sees the positions it would
        # see unpadded; pads get 0 (any value works, they are masked).
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        if self.backbone.kind == "decoder":
            kwargs["use_cache"] = False
            if self.padding_side == "right":
                # Right padding needs no mask in a causal model: every pad comes after the real
                # tokens, which never attend to later positions, so their states are those of the
                # unpadded row. Without a mask SDPA takes its fused causal kernel instead of
                # materialising a [batch, heads, L, L] mask (measured: bench/bench_embed.py).
                del kwargs["attention_mask"]
        else:
            kwargs["token_type_ids"] = torch.zeros_like(ids)
        with torch.inference_mode():
            return self.backbone.model(**kwargs).last_hidden_state
