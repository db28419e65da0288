"""ArmoHeads: everything on top of the backbone embedding — objective names, regression weight W
(K×H), debias matrix T (K×K), gating network — with one `score` used by the labeling job,
evaluation and checkpoint export alike.

Saved as `heads.safetensors` (tensor names as in the released checkpoint) + `heads.json`; no pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .. import storage
from .bradley_terry import BradleyTerryHead
from .gating import GatingNetwork, gated_score

FORMAT = "armolabel.heads/1"
TENSORS_FILE = "heads.safetensors"
META_FILE = "heads.json"
REGRESSION_KEY = "regression_layer.weight"
TRANSFORM_KEY = "reward_transform_matrix"
GATING_PREFIX = "gating."


@dataclass
class HeadOutputs:
    rewards: np.ndarray  # N×K raw objective ratings r
    debiased: np.ndarray  # N×K r·T
    gate: np.ndarray  # N×K gate weights (sum to β)
    score: np.ndarray  # N   Σ gate·(r·T)


@dataclass
class ArmoHeads:
    objectives: list[str]
    regression_weight: np.ndarray  # K×H
    transform: np.ndarray  # K×K (T)
    gating: GatingNetwork
    verbosity_index: int | None = None  # which objective T zeroes (None: no debiasing)
    metadata: dict = field(default_factory=dict)  # provenance: λs, metrics, backbone fingerprint …

    def __post_init__(self):
        self.regression_weight = np.asarray(self.regression_weight, dtype=np.float32)
        self.transform = np.asarray(self.transform, dtype=np.float32)
        K, H = self.regression_weight.shape
        if len(self.objectives) != K or self.transform.shape != (K, K):
            raise ValueError(
                f"ArmoHeads: {len(self.objectives)} objectives, W {self.regression_weight.shape}, "
                f"T {self.transform.shape} disagree"
            )
        if self.gating.num_objectives != K or self.gating.in_features != H:
            raise ValueError("ArmoHeads: gating network shape disagrees with W")
        self.gating.eval()

    @property
    def num_objectives(self) -> int:
        return self.regression_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.regression_weight.shape[1]

    def score(self, response_emb, prompt_emb) -> HeadOutputs:
        """Heads on embeddings [N×H] (response at the last token, prompt at the prompt's last token)."""
        x = torch.as_tensor(np.asarray(response_emb, dtype=np.float32))
        p = torch.as_tensor(np.asarray(prompt_emb, dtype=np.float32))
        if x.ndim != 2 or x.shape != p.shape or x.shape[1] != self.hidden_size:
            raise ValueError(f"score: expected two N×{self.hidden_size} arrays, got {tuple(x.shape)}, {tuple(p.shape)}")
        self.gating.eval()
        with torch.no_grad():
            gate = self.gating(p)
            rewards, debiased, score = self._under_gate(x, gate)
        return HeadOutputs(rewards.numpy(), debiased.numpy(), gate.numpy(), score.numpy())

    def score_under_gate(self, embeddings, gate) -> np.ndarray:
        """Σ gate·(r·T) of embeddings [N×H] under gate weights [N×K] already computed (the ensemble
        scores a unit's bare prompt under the gate its response was scored with)."""
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        with torch.no_grad():
            _, _, score = self._under_gate(x, torch.as_tensor(gate))
        return score.numpy()

    def _under_gate(self, x: torch.Tensor, gate: torch.Tensor):
        rewards = x @ torch.from_numpy(self.regression_weight).T
        debiased = rewards @ torch.from_numpy(self.transform)
        return rewards, debiased, gated_score(gate, debiased)

    def debias(self, rewards) -> np.ndarray:
        """r·T for ratings computed elsewhere (training uses this, so it equals inference)."""
        return (torch.as_tensor(np.asarray(rewards, dtype=np.float32)) @ torch.from_numpy(self.transform)).numpy()

    # --- tensors, fingerprint, persistence -------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Released-checkpoint tensor names → float32 tensors."""
        out = {
            REGRESSION_KEY: torch.from_numpy(self.regression_weight.copy()),
            TRANSFORM_KEY: torch.from_numpy(self.transform.copy()),
        }
        for name, value in self.gating.state_dict().items():
            out[GATING_PREFIX + name] = value.detach().to(torch.float32).clone().contiguous()
        return out

    def config(self) -> dict:
        return {
            "format": FORMAT,
            "objectives": list(self.objectives),
            "hidden_size": self.hidden_size,
            "verbosity_index": self.verbosity_index,
            "gating": self.gating.config(),
        }

    @property
    def fingerprint(self) -> str:
        """sha256 over the config (names, shapes, gating settings) and every tensor's bytes."""
        h = hashlib.sha256()
        h.update(json.dumps(self.config(), sort_keys=True).encode())
        for name, value in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(json.dumps(list(value.shape)).encode())
            h.update(value.numpy().astype("<f4").tobytes())
        return h.hexdigest()

    def save(self, directory: str, storage_options=None) -> str:
        blob = save_tensors(self.tensors(), metadata={"format": FORMAT})
        storage.write_atomic(storage.join(directory, TENSORS_FILE), blob, storage_options)
        meta = dict(self.config(), fingerprint=self.fingerprint, metadata=self.metadata)
        # JSON last: a directory with heads.json is complete
        storage.write_atomic(
            storage.join(directory, META_FILE),
            json.dumps(meta, indent=2, sort_keys=True, default=_jsonable).encode(),
            storage_options,
        )
        return self.fingerprint

    @classmethod
    def load(cls, directory: str, storage_options=None) -> ArmoHeads:
        meta = json.loads(storage.read_bytes(storage.join(directory, META_FILE), storage_options))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: not an armolabel heads directory (format {meta.get('format')!r})")
        tensors = load_tensors(storage.read_bytes(storage.join(directory, TENSORS_FILE), storage_options))
        heads = cls.from_tensors(
            tensors, meta["objectives"], meta["gating"], meta.get("verbosity_index"), meta.get("metadata") or {}
        )
        if heads.fingerprint != meta["fingerprint"]:
            raise ValueError(f"{directory}: heads fingerprint mismatch (corrupt or edited files)")
        return heads

    @staticmethod
    def read_objectives(directory: str, storage_options=None) -> list[str]:
        """Objective names of saved heads, from heads.json alone (no tensors read)."""
        meta = json.loads(storage.read_bytes(storage.join(directory, META_FILE), storage_options))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: not an armolabel heads directory (format {meta.get('format')!r})")
        return list(meta["objectives"])

    @classmethod
    def from_tensors(
        cls,
        tensors: dict,
        objectives: list[str],
        gating_config: dict,
        verbosity_index: int | None = None,
        metadata: dict | None = None,
    ) -> ArmoHeads:
        """Build from released-layout tensor names (extra tensors, e.g. `model.*`, are ignored here)."""
        W = tensors[REGRESSION_KEY].to(torch.float32)
        gating = GatingNetwork(**gating_config)
        gating_state = {
            k[len(GATING_PREFIX) :]: v.to(torch.float32) for k, v in tensors.items() if k.startswith(GATING_PREFIX)
        }
        gating.load_state_dict(gating_state, strict=True)  # every released gating tensor, nothing else
        return cls(
            objectives=list(objectives),
            regression_weight=W.numpy(),
            transform=tensors[TRANSFORM_KEY].to(torch.float32).numpy(),
            gating=gating,
            verbosity_index=verbosity_index,
            metadata=dict(metadata or {}),
        )


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def load_baseline(directory: str, storage_options=None):
    """The single-score Bradley-Terry baseline saved beside heads (see bradley_terry.BradleyTerryHead)."""
    return BradleyTerryHead.load(directory, storage_options)
