"""Linear Bradley-Terry heads: P(a preferred over b) = σ(w·(x_a − x_b)), no bias (it cancels in the
difference), L2-regularised, fitted full-batch with L-BFGS in float64 (deterministic).

Uses: (a) objectives taught only by pairwise data (a row of W in BT logit units, so only
differences between ratings are meaningful); (b) the single-score baseline reward model.

Ties: a tied pair gets target ½ (the model is pushed towards equal scores) rather than being
dropped — ties carry information that the two are close. Pass `tie=None` to treat all as strict.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .. import storage

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _targets(n: int, tie) -> torch.Tensor:
    t = torch.ones(n, dtype=torch.float64)
    if tie is not None:
        t[torch.as_tensor(np.asarray(tie, dtype=bool))] = 0.5
    return t


def bt_loss(weight, diff, tie=None, l2: float = 0.0) -> float:
    """Mean BT cross-entropy on pairs (chosen − rejected embedding differences) plus (l2/2)|w|²."""
    w = torch.as_tensor(np.asarray(weight, dtype=np.float64))
    d = torch.as_tensor(np.asarray(diff, dtype=np.float64))
    t = _targets(len(d), tie)
    z = d @ w
    nll = -(t * torch.nn.functional.logsigmoid(z) + (1 - t) * torch.nn.functional.logsigmoid(-z)).mean()
    return float(nll + 0.5 * l2 * (w @ w))


def fit_bradley_terry(chosen, rejected, tie=None, l2: float = 1e-3, max_iter: int = 500) -> np.ndarray:
    """Weight vector w [H] minimising mean BT cross-entropy + (l2/2)|w|² on pairs of embeddings
    chosen [N×H], rejected [N×H]. The objective is strictly convex for l2 > 0, so L-BFGS reaches
    the unique optimum from w = 0."""
    d = torch.as_tensor(np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64))
    if d.ndim != 2 or len(d) == 0:
        raise ValueError("fit_bradley_terry: need N ≥ 1 pairs of H-dim embeddings")
    t = _targets(len(d), tie)
    w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        z = d @ w
        loss = -(t * torch.nn.functional.logsigmoid(z) + (1 - t) * torch.nn.functional.logsigmoid(-z)).mean()
        loss = loss + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().copy()


def fit_bradley_terry_cv(
    train_chosen, train_rejected, val_chosen, val_rejected, train_tie=None, val_tie=None, grid=DEFAULT_L2_GRID
) -> tuple[np.ndarray, float, float]:
    """Pick l2 from `grid` by validation BT loss (unregularised); returns (w, l2, val_loss)."""
    val_diff = np.asarray(val_chosen, dtype=np.float64) - np.asarray(val_rejected, dtype=np.float64)
    if not grid:
        raise ValueError("fit_bradley_terry_cv: an empty l2 grid")
    best: tuple[np.ndarray, float, float] | None = None
    for l2 in grid:
        w = fit_bradley_terry(train_chosen, train_rejected, train_tie, l2=l2)
        loss = bt_loss(w, val_diff, val_tie)
        if best is None or loss < best[2]:
            best = (w, float(l2), loss)
    assert best is not None  # the grid is not empty
    return best


@dataclass
class BradleyTerryHead:
    """Single-score baseline reward model: score = w·x. Saved like ArmoHeads (safetensors + JSON)."""

    weight: np.ndarray  # H
    name: str = "bradley_terry"
    metadata: dict | None = None

    def score(self, embeddings) -> np.ndarray:
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        w = torch.as_tensor(np.asarray(self.weight, dtype=np.float32))
        return (x @ w).numpy()

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"type": "bradley_terry", "name": self.name}, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.weight, dtype="<f4").tobytes())
        return h.hexdigest()

    def save(self, directory: str, storage_options=None) -> None:
        blob = save_tensors({"bt_head.weight": torch.as_tensor(np.asarray(self.weight, dtype=np.float32))})
        storage.write_atomic(storage.join(directory, "bt_head.safetensors"), blob, storage_options)
        meta = {
            "format": "armolabel.bradley_terry/1",
            "name": self.name,
            "hidden_size": int(len(self.weight)),
            "fingerprint": self.fingerprint,
            "metadata": self.metadata or {},
        }
        storage.write_atomic(
            storage.join(directory, "bt_head.json"), json.dumps(meta, indent=2).encode(), storage_options
        )

    @classmethod
    def load(cls, directory: str, storage_options=None) -> BradleyTerryHead:
        meta = json.loads(storage.read_bytes(storage.join(directory, "bt_head.json"), storage_options))
        tensors = load_tensors(storage.read_bytes(storage.join(directory, "bt_head.safetensors"), storage_options))
        head = cls(weight=tensors["bt_head.weight"].numpy(), name=meta["name"], metadata=meta.get("metadata"))
        if head.fingerprint != meta["fingerprint"]:
            raise ValueError(f"{directory}: BT head fingerprint mismatch (corrupt or edited files)")
        return head
