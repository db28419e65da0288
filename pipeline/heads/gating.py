"""Stage 2: the gating network and its training on preference pairs (docs/armorm.md, "Stage 2").

gate(p) = β · softmax(MLP(p) / temperature) over the OBJECTIVES axis; score = Σ_k gate_k · (r·T)_k.
Training minimises −log σ(s_chosen − s_rejected) with r·T frozen and computed exactly as inference
does (the reference script's two defects — softmax over the pair axis, T not applied — are not
repeated: `pair_scores` is the same function inference uses).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RELEASE_HIDDEN_DIM = 1024
RELEASE_N_HIDDEN = 3
RELEASE_TEMPERATURE = 10.0
RELEASE_DROPOUT = 0.2


class GatingNetwork(nn.Module):
    """Linear(H→d) → ReLU → [Linear(d→d) → ReLU]×(n_hidden−1) → Linear(d→K), dropout after each hidden
    ReLU in training only. Parameter names `layers.{i}.weight/bias` and `logit_scale` match the
    released tensors once prefixed with `gating.`."""

    def __init__(
        self,
        in_features: int,
        num_objectives: int,
        hidden_dim: int = RELEASE_HIDDEN_DIM,
        n_hidden: int = RELEASE_N_HIDDEN,
        temperature: float = RELEASE_TEMPERATURE,
        dropout: float = RELEASE_DROPOUT,
    ):
        super().__init__()
        self.in_features, self.num_objectives = int(in_features), int(num_objectives)
        self.hidden_dim, self.n_hidden = int(hidden_dim), int(n_hidden)
        self.temperature, self.dropout = float(temperature), float(dropout)
        dims = [self.in_features] + [self.hidden_dim] * self.n_hidden + [self.num_objectives]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=True) for a, b in zip(dims[:-1], dims[1:]))
        self.logit_scale = nn.Parameter(torch.ones(1))

    def forward(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        x = prompt_embedding
        for layer in self.layers[:-1]:
            x = F.dropout(F.relu(layer(x)), p=self.dropout, training=self.training)
        logits = self.layers[-1](x)
        return F.softmax(logits / self.temperature, dim=-1) * self.logit_scale

    def config(self) -> dict:
        return {
            "in_features": self.in_features,
            "num_objectives": self.num_objectives,
            "hidden_dim": self.hidden_dim,
            "n_hidden": self.n_hidden,
            "temperature": self.temperature,
            "dropout": self.dropout,
        }


def gated_score(gate: torch.Tensor, debiased: torch.Tensor) -> torch.Tensor:
    """s = Σ_k gate_k · (r·T)_k, row-wise."""
    return (gate * debiased).sum(dim=-1)


@dataclass
class GatingTrainResult:
    network: GatingNetwork  # best checkpoint (by validation accuracy), in eval mode
    best_step: int
    best_val_accuracy: float  # NaN when no validation pairs were given
    history: list[dict] = field(default_factory=list)  # {"step", "train_loss", "val_accuracy", "val_loss"}


def _pair_eval(net: GatingNetwork, prompt, chosen, rejected) -> tuple[float, float]:
    net.eval()
    with torch.no_grad():
        gate = net(prompt)
        margin = gated_score(gate, chosen) - gated_score(gate, rejected)
        acc = float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())
        loss = float(-F.logsigmoid(margin).mean())
    return acc, loss


def train_gating(
    prompt_emb,
    debiased_chosen,
    debiased_rejected,
    *,
    val_prompt_emb=None,
    val_debiased_chosen=None,
    val_debiased_rejected=None,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int = 50,
    hidden_dim: int = RELEASE_HIDDEN_DIM,
    n_hidden: int = RELEASE_N_HIDDEN,
    temperature: float = RELEASE_TEMPERATURE,
    dropout: float = RELEASE_DROPOUT,
    threads: int | None = None,
) -> GatingTrainResult:
    """Train the gating network on preference pairs (ties excluded by the caller).

    prompt_emb [N×H]: the pair's prompt embedding (chosen and rejected share the prompt);
    debiased_chosen / debiased_rejected [N×K]: r·T of each response, precomputed with the frozen
    regression weights and T — the same numbers inference produces. One gate per pair serves both
    responses, so dropout masks agree between them.
    AdamW (lr 1e-3, no weight decay), cosine schedule to 0 over `steps`, minibatches drawn from
    seeded epoch permutations; the state with the best validation accuracy (ties: lower val loss)
    is kept. Without validation pairs the final state is returned.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        P = torch.as_tensor(np.asarray(prompt_emb, dtype=np.float32))
        C = torch.as_tensor(np.asarray(debiased_chosen, dtype=np.float32))
        R = torch.as_tensor(np.asarray(debiased_rejected, dtype=np.float32))
        if not (len(P) == len(C) == len(R)) or len(P) == 0:
            raise ValueError("train_gating: need N ≥ 1 pairs with matching lengths")
        has_val = val_prompt_emb is not None and len(val_prompt_emb) > 0
        if has_val:
            VP = torch.as_tensor(np.asarray(val_prompt_emb, dtype=np.float32))
            VC = torch.as_tensor(np.asarray(val_debiased_chosen, dtype=np.float32))
            VR = torch.as_tensor(np.asarray(val_debiased_rejected, dtype=np.float32))

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = GatingNetwork(P.shape[1], C.shape[1], hidden_dim, n_hidden, temperature, dropout)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

        n = len(P)
        batch = min(batch_size, n)
        perm, cursor = torch.randperm(n, generator=gen), 0
        best_state, best_key, best_step, history = None, None, 0, []
        for step in range(1, steps + 1):
            if cursor + batch > n:
                perm, cursor = torch.randperm(n, generator=gen), 0
            idx = perm[cursor : cursor + batch]
            cursor += batch
            net.train()
            gate = net(P[idx])
            loss = -F.logsigmoid(gated_score(gate, C[idx]) - gated_score(gate, R[idx])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if has_val and (step % eval_every == 0 or step == steps):
                acc, vloss = _pair_eval(net, VP, VC, VR)
                history.append(
                    {"step": step, "train_loss": float(loss.detach()), "val_accuracy": acc, "val_loss": vloss}
                )
                key = (acc, -vloss)
                if best_key is None or key > best_key:
                    best_key, best_step, best_state = key, step, copy.deepcopy(net.state_dict())
        if best_state is not None:
            net.load_state_dict(best_state)
        else:
            best_step = steps
        net.eval()
        return GatingTrainResult(
            network=net,
            best_step=best_step,
            best_val_accuracy=best_key[0] if best_key else float("nan"),
            history=history,
        )
    finally:
        torch.set_num_threads(prev_threads)
