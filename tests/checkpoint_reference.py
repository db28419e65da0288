"""An independent reader of exported ArmoRM checkpoints, and the labeling job's own path, for the
checkpoint tests (test_embed_checkpoint*.py).

The reference scores a directory the way the released class does (docs/armorm.md, "The released
checkpoint"): transformers' own `LlamaModel.from_pretrained` (not our loader), right-padded batches
filled with config.json's pad id, the reward at the token before the FIRST pad (the last position
when a row has none), the gating MLP written out by hand from the stored tensors."""

import json

import numpy as np
import torch
from transformers import LlamaModel

from pipeline.embed.checkpoint import checkpoint_backbone
from pipeline.embed.engine import EmbeddingEngine


def first_pad_reference(directory, seqs, prompt_end, rows_per_batch):
    """Independent scoring of an exported directory, the way the released class reads it."""
    config = json.loads((directory / "config.json").read_text())
    pad = config["pad_token_id"]
    model = LlamaModel.from_pretrained(str(directory)).eval()  # transformers' loader, not ours
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    head = {}
    for shard in sorted(set(index["weight_map"].values())):
        head.update({k: v for k, v in load_file(str(directory / shard)).items() if not k.startswith("model.")})
    out = {"score": [], "rewards": [], "gate": [], "position": []}
    for start in range(0, len(seqs), rows_per_batch):
        batch, ends = seqs[start : start + rows_per_batch], prompt_end[start : start + rows_per_batch]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
        is_pad = ids == pad
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=(~is_pad).long()).last_hidden_state
        # the token before the first pad, or the last position when there is none
        pos = torch.where(is_pad.any(1), is_pad.int().argmax(1) - 1, torch.full((len(batch),), width - 1))
        rows = torch.arange(len(batch))
        h_resp, h_prompt = hidden[rows, pos], hidden[rows, torch.tensor(ends)]
        rewards = h_resp @ head["regression_layer.weight"].T
        x = h_prompt
        n_linear = config["gating_n_hidden"] + 1
        for i in range(n_linear - 1):
            x = torch.relu(x @ head[f"gating.layers.{i}.weight"].T + head[f"gating.layers.{i}.bias"])
        logits = x @ head[f"gating.layers.{n_linear - 1}.weight"].T + head[f"gating.layers.{n_linear - 1}.bias"]
        gate = torch.softmax(logits / config["gating_temperature"], dim=1) * head["gating.logit_scale"]
        score = (gate * (rewards @ head["reward_transform_matrix"])).sum(1)
        for key, value in (("score", score), ("rewards", rewards), ("gate", gate), ("position", pos)):
            out[key].append(value.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def labeling_path(path, seqs, prompt_end, token_budget, **kwargs):
    """What the labeling job's scoring stage does with `model.armorm_checkpoint`."""
    backbone, heads = checkpoint_backbone(str(path), device="cpu", dtype="float32", **kwargs)
    # constructed as EmbedScoreStage does; on CPU the engine pads (right) rather than packs
    e = EmbeddingEngine(backbone, token_budget=token_budget).embed(seqs, prompt_end)
    return backbone, heads, heads.score(e.response, e.prompt)
