"""Attention for shared-prompt packed rows (see pipeline/embed/packing.py for the layout).

Registered with transformers' AttentionInterface, so any decoder built on it (Llama, the
ArmoRM checkpoint's backbone, Mistral, Qwen, ...) runs its own projections, rotary embeddings and
MLPs unchanged; only the attention product is replaced, for the duration of one forward pass.
Per piece (one prompt and its responses) and layer it makes at most a few SDPA calls:

  prompt:     queries and keys of the prompt, causal (SDPA's fused causal kernel, no mask);
  responses:  queries of a chunk of responses, keys [prompt | those responses], with a boolean mask
              that is all-true over the prompt and block-causal over the responses (each sees
              itself only, never a sibling); a chunk of one response uses SDPA's lower-right
              causal bias instead, which needs no mask at all.

No L x L mask over the packed row is ever built: the largest mask is a chunk's
R x (prompt + R), capped at MASK_ELEMENTS (responses are chunked to fit), so mask memory stays
bounded at any token budget. Siblings' blocks are computed and discarded only inside a chunk.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.attention.bias import causal_lower_right

NAME = "armolabel_shared_prompt"
KWARG = "armolabel_pieces"
# Largest response-chunk mask (elements of bool): 4 Mi, i.e. 4 MiB, at any budget.
MASK_ELEMENTS = 1 << 22


@dataclass
class Chunk:
    start: int  # first response token (row index)
    end: int  # one past the last
    mask: torch.Tensor  # bool [R, prompt + R], or a lower-right causal bias (one response; a Tensor subclass)


@dataclass
class Piece:
    start: int  # the prompt's first token (row index)
    prompt: int  # prompt length
    chunks: list[Chunk]


def _chunk(pos: int, p: int, group: list[int], device) -> Chunk:
    """Responses of lengths `group` packed after a prompt of length p: each sees the prompt and itself."""
    total = sum(group)
    mask: torch.Tensor
    if len(group) == 1:
        mask = causal_lower_right(total, p + total)
    else:
        seg = torch.repeat_interleave(torch.arange(len(group), device=device), torch.as_tensor(group, device=device))
        idx = torch.arange(total, device=device)
        block = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
        mask = torch.cat([torch.ones(total, p, dtype=torch.bool, device=device), block], dim=1)
    return Chunk(pos, pos + total, mask)


def build_pieces(pieces, device, mask_elements: int = MASK_ELEMENTS) -> list[Piece]:
    """Attention plan for one row from RowLayout.pieces [(start, prompt length, response lengths)]."""
    out = []
    for start, p, lengths in pieces:
        chunks: list[Chunk] = []
        pos = start + p
        group: list[int] = []
        for n in (int(x) for x in lengths):
            if n == 0:
                continue
            total = sum(group) + n
            if group and total * (p + total) > mask_elements:
                chunks.append(_chunk(pos, p, group, device))
                pos, group = pos + sum(group), []
            group.append(n)
        if group:
            chunks.append(_chunk(pos, p, group, device))
        out.append(Piece(start, p, chunks))
    return out


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n, length, d).reshape(b, h * n, length, d)


def shared_prompt_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
):
    """query [1, H, L, D], key/value [1, Hkv, L, D] of one packed row -> [1, L, H, D]."""
    pieces: list[Piece] | None = kwargs.get(KWARG)
    if pieces is None:
        raise RuntimeError(f"{NAME} attention needs the {KWARG} plan (use EmbeddingEngine)")
    if query.shape[0] != 1:
        raise ValueError("shared-prompt rows are packed into a batch of one")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    outs = []
    for piece in pieces:
        a, b = piece.start, piece.start + piece.prompt
        outs.append(sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling))
        for c in piece.chunks:
            if c.start == b:  # first chunk: [prompt | chunk] is one contiguous slice
                k, v = key[:, :, a : c.end], value[:, :, a : c.end]
            else:
                k = torch.cat([key[:, :, a:b], key[:, :, c.start : c.end]], dim=2)
                v = torch.cat([value[:, :, a:b], value[:, :, c.start : c.end]], dim=2)
            outs.append(sdpa(query[:, :, c.start : c.end], k, v, attn_mask=c.mask, scale=scaling))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    if out.shape[2] != query.shape[2]:
        raise AssertionError(f"pieces cover {out.shape[2]} of the row's {query.shape[2]} tokens")
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, shared_prompt_attention)
        _registered = True


def supports(model) -> str | None:
    """None when the model can run shared-prompt rows, else why not."""
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is None or not can():
        return f"{type(model).__name__} does not use transformers' AttentionInterface"
    cfg = model.config
    if (
        getattr(cfg, "sliding_window", None)
        or getattr(cfg, "layer_types", None)
        and any(t != "full_attention" for t in cfg.layer_types)
    ):
        return "sliding-window or hybrid attention layers"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    return None


@contextlib.contextmanager
def shared_prompt_attention_on(model):
    """Switch the model to the shared-prompt attention for one forward pass, then back (the
    backbone object is shared with padded passes, which need their own implementation)."""
    register()
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
