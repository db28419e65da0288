"""Ensembles of heads: K sets of heads (stage-1 ridge and BT heads, T, gate) fitted on bootstrap
resamples of the training prompts, whose disagreement says how far to trust a score.

The backbone is frozen and its embeddings are cached, so a member costs one heads fit and scoring
it costs no backbone pass. The primary heads (fitted on all the data) stay the model that gives
`score`; the ensemble adds, per unit, the mean and the minimum of its members' scores and the spread
of their scores relative to the unit's prompt (`score_mean`, `score_min`, `score_std` in the labeling
output), and per objective the mean and standard deviation of their ratings (`ensemble_rating_mean_*`,
`ensemble_rating_std_*`).

Why `score_std` is taken relative to the prompt: the score is learned from comparisons only (the
Bradley-Terry heads and the gate see differences within a prompt), so each member is free to put a
prompt's responses at its own level. Member i's score of a response is its score of the bare
prompt embedding (same gate) plus an advantage a_i; every pair margin and best-of-N order within
the prompt depends on the a_i alone. So `score_std` is the members' spread of a_i. On the shared
sets the spread of the prompt level is most of the raw spread, is about the same on every source,
and hid the disagreement that matters (EVALUATION.md, "Does the ensemble know when it does not know?").

Resampling is by prompt: a resample draws as many prompts as the training split holds, with
replacement; every unit of a drawn prompt counts once per draw (its multiplicity). Units of one
prompt (a preference pair, a best-of-N group) so stay together, and a member's fit equals the fit
on its resample repeated out (RidgeStats.add takes the multiplicities as weights; pairs repeat).

Saved as `<heads>/ensemble/ensemble.safetensors` (member i's tensors under `member.{i}.`, the
released names after it) and `ensemble.json` (seeds, per-member fingerprints, the fingerprint of
the primary heads and of the backbone whose embeddings the members were fitted on).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .. import storage
from .model import ArmoHeads

FORMAT = "armolabel.ensemble/1"
DIRECTORY = "ensemble"  # beside the primary heads' files
TENSORS_FILE = "ensemble.safetensors"
META_FILE = "ensemble.json"
MEMBER_PREFIX = "member."
MIN_PROMPTS = 10  # fewer distinct training prompts than this give too few distinct resamples


class EnsembleError(ValueError):
    pass


def member_seed(ensemble_seed: int, i: int) -> int:
    """The bootstrap seed of member i (recorded in ensemble.json)."""
    return int(np.random.SeedSequence([int(ensemble_seed), int(i)]).generate_state(1)[0])


def bootstrap_multiplicities(prompt_ids, in_fit: np.ndarray, seed: int) -> np.ndarray:
    """Per unit, how many times a prompt bootstrap draws it: the distinct prompts of the `in_fit`
    units (sorted, so the draw does not depend on row order) are drawn as often as there are of
    them, with replacement; each unit gets its prompt's draw count. Units outside `in_fit` get 1
    (they are used unweighted, for validation)."""
    prompt_ids = np.asarray(prompt_ids, dtype=object)
    in_fit = np.asarray(in_fit, dtype=bool)
    distinct, codes = np.unique(prompt_ids[in_fit].astype(str), return_inverse=True)
    counts = np.bincount(np.random.default_rng(seed).integers(0, len(distinct), len(distinct)), minlength=len(distinct))
    out = np.ones(len(prompt_ids), dtype=np.int64)
    out[in_fit] = counts[codes.reshape(-1)]
    return out


def check_ensemble_size(k: int, fit_prompt_ids) -> None:
    n = len(set(np.asarray(fit_prompt_ids, dtype=object).tolist()))
    need = max(MIN_PROMPTS, k)
    if n < need:
        raise EnsembleError(
            f"heads.ensemble: {k} members need at least {need} distinct training prompts to resample; "
            f"the training split (outside validation) has {n}"
        )


def check_distinct_resamples(draws: list[np.ndarray]) -> None:
    seen: dict[bytes, int] = {}
    for i, d in enumerate(draws):
        key = np.ascontiguousarray(d).tobytes()
        if key in seen:
            raise EnsembleError(
                f"heads.ensemble: members {seen[key]} and {i} drew the same resample (too few prompts "
                "for this many members; lower heads.ensemble or add data)"
            )
        seen[key] = i


def backbone_fingerprint_of(units: pa.Table) -> str | None:
    """The one backbone fingerprint of the units the heads were fitted on (None: not recorded)."""
    if "backbone_fingerprint" not in units.column_names:
        return None
    values = pc.unique(pc.drop_null(units.column("backbone_fingerprint"))).to_pylist()
    if len(values) > 1:
        raise EnsembleError(f"training units come from {len(values)} backbones {sorted(values)}; expected one")
    return values[0] if values else None


@dataclass
class Spread:
    mean: np.ndarray  # N
    std: np.ndarray  # N, sample standard deviation (ddof 1) over the members
    min: np.ndarray  # N


def spread(member_scores, member_prompt_scores=None) -> Spread:
    """Mean and minimum over the members (axis 1) of an N×K matrix of scores, and the sample standard
    deviation (ddof = 1) of the scores, or, given each member's score of the unit's bare prompt
    (N×K), of each member's score minus that (its advantage over the prompt). NaN where a member's
    score is NaN."""
    s = np.asarray(member_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"spread: expected N×K member scores with K >= 2, got {s.shape}")
    if member_prompt_scores is None:
        relative = s
    else:
        at_prompt = np.asarray(member_prompt_scores, dtype=np.float64)
        if at_prompt.shape != s.shape:
            raise ValueError(f"spread: prompt scores {at_prompt.shape} do not match member scores {s.shape}")
        relative = s - at_prompt
    return Spread(s.mean(axis=1), relative.std(axis=1, ddof=1), s.min(axis=1))


@dataclass
class EnsembleOutputs:
    score: Spread
    rating_mean: np.ndarray  # N×O, per objective (the heads' order)
    rating_std: np.ndarray  # N×O, sample standard deviation (ddof 1) over the members


@dataclass
class HeadsEnsemble:
    members: list[ArmoHeads]
    records: list[dict]  # per member: bootstrap_seed, gating_seed, distinct_prompts, units_drawn
    primary_fingerprint: str  # the heads it was trained beside
    backbone_fingerprint: str | None  # the backbone whose embeddings it was fitted on
    ensemble_seed: int = 0
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.members) < 2:
            raise EnsembleError(f"an ensemble needs at least 2 members, got {len(self.members)}")
        if len(self.records) != len(self.members):
            raise EnsembleError("ensemble: one record per member expected")
        first = self.members[0]
        for i, m in enumerate(self.members[1:], 1):
            if m.objectives != first.objectives or m.gating.config() != first.gating.config():
                raise EnsembleError(f"ensemble member {i}: objectives or gating shape differ from member 0")

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def objectives(self) -> list[str]:
        return list(self.members[0].objectives)

    def member_scores(self, response_emb, prompt_emb) -> np.ndarray:
        """N×K: each member's score of the same embeddings (no backbone pass)."""
        return np.column_stack([m.score(response_emb, prompt_emb).score for m in self.members])

    def score(self, response_emb, prompt_emb) -> Spread:
        return self.outputs(response_emb, prompt_emb).score

    def outputs(self, response_emb, prompt_emb) -> EnsembleOutputs:
        """The score's spread (its std relative to the prompt, module docstring) and, per objective,
        the mean and sample standard deviation of the members' ratings (the regression heads' r),
        from one run of each member: the prompt's score reuses the member's gate."""
        outs = [m.score(response_emb, prompt_emb) for m in self.members]
        at_prompt = np.column_stack([m.score_under_gate(prompt_emb, o.gate) for m, o in zip(self.members, outs)])
        ratings = np.stack([np.asarray(o.rewards, np.float64) for o in outs], axis=1)  # N×K×O
        return EnsembleOutputs(
            spread(np.column_stack([o.score for o in outs]), at_prompt),
            ratings.mean(axis=1),
            ratings.std(axis=1, ddof=1),
        )

    def check(self, heads_fingerprint: str | None, backbone_fingerprint: str | None, where: str = "ensemble") -> None:
        """Refuse an ensemble trained beside other heads or on another backbone's embeddings."""
        if heads_fingerprint is not None and heads_fingerprint != self.primary_fingerprint:
            raise EnsembleError(
                f"{where}: trained beside heads {self.primary_fingerprint[:12]}, not these heads "
                f"{heads_fingerprint[:12]}"
            )
        if self.backbone_fingerprint is not None and backbone_fingerprint != self.backbone_fingerprint:
            raise EnsembleError(
                f"{where}: fitted on embeddings of backbone {self.backbone_fingerprint[:12]}, but this run's "
                f"backbone is {str(backbone_fingerprint)[:12]}"
            )

    def bound_to(self, primary_fingerprint: str, backbone_fingerprint: str | None, why: str) -> HeadsEnsemble:
        """The same members, bound to other ids of the same heads and embeddings: an ArmoRM export
        of the heads it was trained beside (the checkpoint's heads and weights get new fingerprints).
        The ids it was trained under are kept in its metadata."""
        was = {"primary_fingerprint": self.primary_fingerprint, "backbone_fingerprint": self.backbone_fingerprint}
        metadata = dict(self.metadata, bound_from=dict(was, why=why))
        return HeadsEnsemble(
            self.members, self.records, primary_fingerprint, backbone_fingerprint, self.ensemble_seed, metadata
        )

    # --- persistence -----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{MEMBER_PREFIX}{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.tensors().items()}

    def config(self) -> dict:
        return {
            "format": FORMAT,
            "size": self.size,
            "objectives": self.objectives,
            "gating": self.members[0].gating.config(),
            "verbosity_index": [m.verbosity_index for m in self.members],
            "primary_fingerprint": self.primary_fingerprint,
            "backbone_fingerprint": self.backbone_fingerprint,
            "ensemble_seed": self.ensemble_seed,
            "members": [dict(r, fingerprint=m.fingerprint) for m, r in zip(self.members, self.records)],
        }

    @property
    def fingerprint(self) -> str:
        """sha256 over the config (seeds, member fingerprints, primary and backbone fingerprints)."""
        return hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict:
        return {
            "size": self.size,
            "ensemble_seed": self.ensemble_seed,
            "fingerprint": self.fingerprint,
            "members": self.config()["members"],
        }

    def save(self, directory: str, storage_options=None) -> str:
        blob = save_tensors({k: v.contiguous() for k, v in self.tensors().items()}, metadata={"format": FORMAT})
        storage.write_atomic(storage.join(directory, TENSORS_FILE), blob, storage_options)
        meta = dict(self.config(), fingerprint=self.fingerprint, metadata=self.metadata)
        storage.write_atomic(  # JSON last: a directory with ensemble.json is complete
            storage.join(directory, META_FILE), json.dumps(meta, indent=2, sort_keys=True).encode(), storage_options
        )
        return self.fingerprint

    @staticmethod
    def exists(heads_directory: str, storage_options=None) -> bool:
        return storage.exists(storage.join(heads_directory, DIRECTORY, META_FILE), storage_options)

    @classmethod
    def load(cls, directory: str, storage_options=None) -> HeadsEnsemble:
        meta = json.loads(storage.read_bytes(storage.join(directory, META_FILE), storage_options))
        if meta.get("format") != FORMAT:
            raise EnsembleError(f"{directory}: not an armolabel ensemble (format {meta.get('format')!r})")
        tensors = load_tensors(storage.read_bytes(storage.join(directory, TENSORS_FILE), storage_options))
        members = []
        for i in range(int(meta["size"])):
            prefix = f"{MEMBER_PREFIX}{i}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not own:
                raise EnsembleError(f"{directory}: member {i} has no tensors")
            members.append(ArmoHeads.from_tensors(own, meta["objectives"], meta["gating"], meta["verbosity_index"][i]))
        records = [{k: v for k, v in r.items() if k != "fingerprint"} for r in meta["members"]]
        ens = cls(
            members,
            records,
            meta["primary_fingerprint"],
            meta.get("backbone_fingerprint"),
            int(meta.get("ensemble_seed", 0)),
            meta.get("metadata") or {},
        )
        for i, (m, r) in enumerate(zip(members, meta["members"])):
            if m.fingerprint != r["fingerprint"]:
                raise EnsembleError(f"{directory}: member {i} fingerprint mismatch (corrupt or edited files)")
        if ens.fingerprint != meta["fingerprint"]:
            raise EnsembleError(f"{directory}: ensemble fingerprint mismatch (corrupt or edited files)")
        return ens


def load_beside(heads_directory: str, storage_options=None) -> HeadsEnsemble | None:
    """The ensemble saved beside heads (`<heads>/ensemble/`), or None when there is none."""
    if not HeadsEnsemble.exists(heads_directory, storage_options):
        return None
    return HeadsEnsemble.load(storage.join(heads_directory, DIRECTORY), storage_options)
