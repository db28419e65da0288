"""Fit ArmoHeads on cached embeddings (docs/armorm.md): a units table with `embedding` and
`prompt_embedding` columns in, heads and the single-head baseline out. Pure math, no Ray.

1. Objectives: every rated objective found in the rows' `ratings`, then the pairwise objectives of
   each preference source (the registry's, a config's extra ones, or `<source>.preferred` for a
   source nothing names), then the length pseudo-objective when verbosity is "length".
2. Stage 1: ridge without intercept per rated objective (λ by validation MSE, from summed sufficient
   statistics); a linear Bradley-Terry head per pairwise objective (L2 by validation loss; ties as ½).
3. Debiasing: T from the stage-1 ratings of the training responses.
4. Stage 2: the gating network on every non-tie preference pair and every pair of differently
   ranked best-of-N responses, with r·T computed by ArmoHeads.score itself (what inference does).
5. Baseline: one Bradley-Terry head on the response embedding, trained on exactly those pairs.
6. Ensemble (`ensemble: K`, off by default): steps 2-4 again for each of K members, on a bootstrap
   resample of the training prompts (multiplicities weight the ridge statistics and repeat the pairs);
   the primary heads above are untouched by it.

Fit/validation split: by row id (`ids.in_fraction`), so a pair or a best-of-N group never straddles it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import ids
from pipeline import objectives as registry
from pipeline.metrics import pairwise_accuracy
from pipeline.units import (
    Pairs,
    concat_pairs,
    embeddings_of,
    human_ratings,
    preference_pairs,
    ranked_pairs,
    response_tokens,
)

from .bradley_terry import DEFAULT_L2_GRID, BradleyTerryHead, fit_bradley_terry, fit_bradley_terry_cv
from .debias import DEFAULT_DEBIAS_GRID, LENGTH_OBJECTIVE, fit_verbosity_debias, length_target
from .ensemble import (
    EnsembleError,
    HeadsEnsemble,
    backbone_fingerprint_of,
    bootstrap_multiplicities,
    check_distinct_resamples,
    check_ensemble_size,
    member_seed,
)
from .gating import (
    RELEASE_DROPOUT,
    RELEASE_HIDDEN_DIM,
    RELEASE_N_HIDDEN,
    RELEASE_TEMPERATURE,
    GatingNetwork,
    train_gating,
)
from .model import ArmoHeads
from .regression import DEFAULT_LAMBDA_GRID, RidgeStats, fit_ridge

GATING_DEFAULTS = {
    "steps": 1000,
    "batch_size": 512,
    "lr": 1e-3,
    "seed": 0,
    "eval_every": 25,
    "hidden_dim": RELEASE_HIDDEN_DIM,
    "n_hidden": RELEASE_N_HIDDEN,
    "temperature": RELEASE_TEMPERATURE,
    "dropout": RELEASE_DROPOUT,
}
DEFAULTS = {
    "val_fraction": 0.1,  # of training rows, for λ / L2 selection and the gating checkpoint
    "ridge_grid": list(DEFAULT_LAMBDA_GRID),
    "bt_l2_grid": list(DEFAULT_L2_GRID),
    "verbosity": "length",  # "length" (pseudo-objective), an objective name, or "none"
    "debias_threshold": 0.03,
    "debias_grid": list(DEFAULT_DEBIAS_GRID),
    "objectives": [],  # declared objectives (Objective fields): a pairwise one names a source's BT head
    "baseline": True,
    "threads": None,  # torch threads for gating training (None: torch's default)
    "gating": {},
    # K heads on bootstrap resamples of the training prompts, saved beside the primary heads for
    # the uncertainty columns (0: off, the primary heads alone; 1 is refused: one member has no spread)
    "ensemble": 0,
    "ensemble_seed": 0,  # member i resamples with seed (ensemble_seed, i); its gate trains with gating.seed + 1 + i
}


@dataclass
class TrainResult:
    heads: ArmoHeads
    baseline: BradleyTerryHead | None
    summary: dict
    ensemble: HeadsEnsemble | None = None  # heads.ensemble: K members on bootstrap resamples (None: off)


def resolve_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"heads options: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    gating = dict(options.get("gating") or {})
    unknown = set(gating) - set(GATING_DEFAULTS)
    if unknown:
        raise ValueError(f"heads.gating options: unknown keys {sorted(unknown)}; known: {sorted(GATING_DEFAULTS)}")
    out = {**DEFAULTS, **options, "gating": {**GATING_DEFAULTS, **gating}}
    k = out["ensemble"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1:
        raise ValueError(f"heads.ensemble: expected 0 (off) or an integer >= 2 members, got {k!r}")
    if isinstance(out["ensemble_seed"], bool) or not isinstance(out["ensemble_seed"], int):
        raise ValueError(f"heads.ensemble_seed: expected an integer, got {out['ensemble_seed']!r}")
    return out


def choose_objectives(units: pa.Table, extra: list[dict]) -> tuple[list[str], list[registry.Objective]]:
    """(rated objective names in the data, pairwise objectives for the preference sources present)."""
    rated = sorted(human_ratings(units))
    registry.register_all(list(extra or []))  # declared ones join the registry; a conflicting redefinition is an error
    pairwise: list[registry.Objective] = []
    for source in sorted(set(preference_pairs(units, include_ties=True).source)):
        named = registry.for_source(source, "pairwise")
        pairwise += named or [
            registry.Objective(
                f"{source}.preferred", "pairwise", source, "preferred", description=f"the preferred reply in {source}"
            )
        ]
    return rated, pairwise


def validation_mask(row_ids, fraction: float) -> np.ndarray:
    """Which rows are held out for validation: a stable share `fraction` by row id, so every head
    fitted on the same rows (the heads, a classifier export) holds out the same ones."""
    return np.array([ids.in_fraction(r, fraction, "heads-validation") for r in row_ids], dtype=bool)


def fit_bradley_terry_weights(X: np.ndarray, fit: Pairs, held: Pairs, grid) -> tuple[np.ndarray, float, float | None]:
    """A linear BT head on the response embeddings of `fit` (ties as ½): (w, l2, validation loss),
    L2 chosen from `grid` by the loss on `held` when there are held-out pairs, else 1e-3."""
    if len(held):
        return fit_bradley_terry_cv(
            X[fit.better], X[fit.worse], X[held.better], X[held.worse], fit.tie, held.tie, grid=grid
        )
    l2 = 1e-3
    return fit_bradley_terry(X[fit.better], X[fit.worse], fit.tie, l2=l2), l2, None


def _fit_pairwise(
    X: np.ndarray, pairs: Pairs, val: np.ndarray, grid, mult: np.ndarray | None = None
) -> tuple[np.ndarray, dict]:
    """A pairwise objective's BT head, with its validation accuracy on the held-out non-tie pairs.
    `mult`: per-unit resample multiplicities of the fit pairs (None: each pair once)."""
    fit, held = _repeat(pairs.select(~val), mult), pairs.select(val)
    if len(fit) == 0:
        raise ValueError("a pairwise objective has no training pairs")
    w, l2, val_loss = fit_bradley_terry_weights(X, fit, held, grid)
    strict = ~held.tie
    acc = pairwise_accuracy(X[held.better[strict]] @ w, X[held.worse[strict]] @ w) if strict.any() else None
    return w, {"pairs": len(pairs), "ties": int(pairs.tie.sum()), "l2": l2, "val_loss": val_loss, "val_accuracy": acc}


def _fit(
    prep: _Prepared, opts: dict, mult: np.ndarray | None = None, gating_seed: int | None = None
) -> tuple[ArmoHeads, dict, Pairs, Pairs]:
    """Stage 1, debiasing and stage 2 on the prepared data. `mult` [units] (integers): a resample's
    multiplicity of each unit (None: every unit once, the primary heads). Fit rows and pairs count
    that many times; the validation rows and pairs that choose λ, L2 and the gating checkpoint are
    used as they are. Returns (heads, summary, the gating fit pairs, the held-out pairs)."""
    X, P, val_unit, rated, pairwise = prep.X, prep.P, prep.val_unit, prep.rated, prep.pairwise
    ridge_names, Y, verbosity = prep.ridge_names, prep.Y, opts["verbosity"]

    # --- stage 1: ridge (rated objectives + length pseudo-objective) ---------------------------
    summary_objectives: dict[str, dict] = {}
    ridge_rows = np.zeros((0, X.shape[1]))
    if ridge_names:
        fit_stats = RidgeStats(X.shape[1], len(ridge_names)).add(
            X[~val_unit], Y[~val_unit], None if mult is None else mult[~val_unit]
        )
        val_stats = RidgeStats(X.shape[1], len(ridge_names)).add(X[val_unit], Y[val_unit])
        ridge = fit_ridge(fit_stats, val_stats, opts["ridge_grid"])
        ridge_rows = ridge.weight
        for k, name in enumerate(ridge_names):
            summary_objectives[name] = {
                "kind": "rating",
                "rows": int(fit_stats.count[k] + val_stats.count[k]),
                "lambda": float(ridge.lambdas[k]),
                "val_mse": float(ridge.val_mse[k]),
            }

    # --- stage 1: Bradley-Terry heads for pairwise-only objectives ------------------------------
    all_pref, val_pair = prep.all_pref, prep.val_pair
    bt_rows = []
    for obj in pairwise:
        sel = all_pref.source == obj.source
        w, info = _fit_pairwise(X, all_pref.select(sel), val_pair[sel], opts["bt_l2_grid"], mult)
        bt_rows.append(w)
        summary_objectives[obj.name] = {"kind": "pairwise", **info}
    names = rated + [o.name for o in pairwise] + ([LENGTH_OBJECTIVE] if verbosity == "length" else [])
    W = np.vstack(
        [ridge_rows[: len(rated)]] + [np.asarray(bt_rows).reshape(-1, X.shape[1])] + [ridge_rows[len(rated) :]]
    )
    if not names:
        raise ValueError("train_heads: the units carry no ratings and no preference pairs: nothing to learn")

    # --- debiasing -------------------------------------------------------------------------------
    if verbosity == "none":
        v = None
    elif verbosity == "length":
        v = len(names) - 1
    elif verbosity in names:
        v = names.index(verbosity)
    else:
        raise ValueError(f"heads option verbosity={verbosity!r}: not 'length', 'none' or a trained objective {names}")
    g = opts["gating"]
    gating_net = GatingNetwork(X.shape[1], len(names), g["hidden_dim"], g["n_hidden"], g["temperature"], g["dropout"])
    heads = ArmoHeads(names, W, np.eye(len(names)), gating_net, verbosity_index=v)
    rewards = heads.score(X, P).rewards
    reference = rewards[~val_unit] if mult is None else np.repeat(rewards[~val_unit], mult[~val_unit], axis=0)
    T, debias_lambdas = fit_verbosity_debias(
        reference, verbosity_index=v, grid=opts["debias_grid"], threshold=opts["debias_threshold"]
    )
    heads = ArmoHeads(names, W, T, gating_net, verbosity_index=v)
    debiased = heads.score(X, P).debiased  # exactly what inference computes

    # --- stage 2: gating on every strict preference pair and ranked best-of-N pair -------------
    pairs, pv = prep.pairs, prep.pv
    summary: dict = {
        "objectives": summary_objectives,
        "objective_names": names,
        "verbosity_index": v,
        "debias_lambdas": dict(zip(names, map(float, debias_lambdas))),
    }
    if len(pairs) == 0:
        raise ValueError("train_heads: the gating network needs preference pairs or ranked best-of-N rows")
    fit, held = _repeat(pairs.select(~pv), mult), pairs.select(pv)
    if len(fit) == 0:
        raise ValueError("train_heads: no gating pairs outside the validation split")
    trained = train_gating(
        P[fit.better],
        debiased[fit.better],
        debiased[fit.worse],
        val_prompt_emb=P[held.better],
        val_debiased_chosen=debiased[held.better],
        val_debiased_rejected=debiased[held.worse],
        threads=opts["threads"],
        seed=g["seed"] if gating_seed is None else gating_seed,
        **{
            k: g[k]
            for k in (
                "steps",
                "batch_size",
                "lr",
                "eval_every",
                "hidden_dim",
                "n_hidden",
                "temperature",
                "dropout",
            )
        },
    )
    heads = ArmoHeads(names, W, T, trained.network, verbosity_index=v)
    summary["gating"] = {
        "pairs": {
            "train": len(fit),
            "validation": len(held),
            "by_source": {s: int((pairs.source == s).sum()) for s in sorted(set(pairs.source))},
        },
        "best_step": trained.best_step,
        "val_accuracy": trained.best_val_accuracy,
        "options": g,
    }
    return heads, summary, fit, held


@dataclass
class _Prepared:
    """What every fit (the primary heads and each ensemble member) reads from the units, once."""

    X: np.ndarray
    P: np.ndarray
    val_unit: np.ndarray
    rated: list[str]
    pairwise: list[registry.Objective]
    ridge_names: list[str]
    Y: np.ndarray
    all_pref: Pairs
    val_pair: np.ndarray
    pairs: Pairs
    pv: np.ndarray


def _prepare(units: pa.Table, opts: dict) -> _Prepared:
    X, P = embeddings_of(units)
    if not len(X):
        raise ValueError("train_heads: no units")
    row_ids = np.array(units.column("row_id").to_pylist(), dtype=object)
    val_unit = validation_mask(row_ids, opts["val_fraction"])
    rated, pairwise = choose_objectives(units, opts["objectives"])
    verbosity = opts["verbosity"]
    ridge_names = rated + ([LENGTH_OBJECTIVE] if verbosity == "length" else [])
    truth = human_ratings(units)
    Y = (
        np.column_stack(
            [truth[n] for n in rated] + ([length_target(response_tokens(units))] if verbosity == "length" else [])
        )
        if ridge_names
        else np.zeros((len(X), 0))
    )
    all_pref = preference_pairs(units, include_ties=True)
    pairs = concat_pairs(preference_pairs(units), ranked_pairs(units))
    return _Prepared(
        X,
        P,
        val_unit,
        rated,
        pairwise,
        ridge_names,
        Y,
        all_pref,
        validation_mask(all_pref.row_id, opts["val_fraction"]),
        pairs,
        validation_mask(pairs.row_id, opts["val_fraction"]),
    )


def _repeat(pairs: Pairs, mult: np.ndarray | None) -> Pairs:
    """The pairs, each repeated by the multiplicity of its (better) unit: a resample of the pairs."""
    if mult is None:
        return pairs
    return pairs.select(np.repeat(np.arange(len(pairs)), mult[pairs.better]))


def train_heads(units: pa.Table, options: dict | None = None) -> TrainResult:
    opts = resolve_options(options)
    prep = _prepare(units, opts)
    if opts["ensemble"]:  # before any fit: a too-small training set fails fast
        check_ensemble_size(int(opts["ensemble"]), _prompt_ids(units)[~prep.val_unit])
    heads, summary, fit, held = _fit(prep, opts)
    X, rated, pairwise = prep.X, prep.rated, prep.pairwise
    # --- the single-head baseline on the same pairs --------------------------------------------
    baseline = None
    if opts["baseline"]:
        w, l2, val_loss = fit_bradley_terry_weights(X, fit, held, opts["bt_l2_grid"])  # these pairs have no ties
        baseline = BradleyTerryHead(
            weight=w.astype(np.float32), name="single_bt", metadata={"l2": l2, "pairs": len(fit)}
        )
        summary["baseline"] = {
            "l2": l2,
            "val_accuracy": pairwise_accuracy(baseline.score(X[held.better]), baseline.score(X[held.worse]))
            if len(held)
            else None,
            "val_loss": val_loss,
        }
    heads.metadata = {
        "training": {k: summary[k] for k in ("objectives", "debias_lambdas")},
        "objective_definitions": {
            **{n: registry.get(n).to_dict() for n in rated if n in registry.known()},
            **{o.name: o.to_dict() for o in pairwise},
        },
    }
    ensemble = None
    if opts["ensemble"]:
        ensemble = train_ensemble(prep, opts, heads, units)
        summary["ensemble"] = ensemble.summary()
    return TrainResult(heads=heads, baseline=baseline, summary=summary, ensemble=ensemble)


def _prompt_ids(units: pa.Table) -> np.ndarray:
    if "prompt_id" not in units.column_names:
        raise EnsembleError("heads.ensemble: the units have no prompt_id column to resample prompts by")
    return np.array(units.column("prompt_id").to_pylist(), dtype=object)


def train_ensemble(prep: _Prepared, opts: dict, primary: ArmoHeads, units: pa.Table) -> HeadsEnsemble:
    """K members, each the whole fit (ridge, BT heads, T, gate) on a bootstrap resample of the
    training prompts (pipeline.heads.ensemble.bootstrap_multiplicities), one at a time: memory is one
    member's fit (its weighted sufficient statistics and repeated pair indices) plus the members."""
    K = int(opts["ensemble"])
    prompt_ids = _prompt_ids(units)
    draws = [
        bootstrap_multiplicities(prompt_ids, ~prep.val_unit, member_seed(opts["ensemble_seed"], i)) for i in range(K)
    ]
    check_distinct_resamples(draws)
    members, records = [], []
    primary_objectives = primary.metadata.get("training", {}).get("objectives", {})
    fitted = {n for n, o in primary_objectives.items() if o["kind"] == "rating" and np.isfinite(o["lambda"])}
    for i, mult in enumerate(draws):
        gating_seed = int(opts["gating"]["seed"]) + 1 + i
        try:
            member, member_summary, _, _ = _fit(prep, opts, mult, gating_seed)
            empty = [
                n
                for n, o in member_summary["objectives"].items()
                if o["kind"] == "rating" and not np.isfinite(o["lambda"]) and n in fitted
            ]
            if empty:
                raise ValueError(f"its resample has no training rows for {empty}")
        except Exception as e:  # noqa: BLE001 - every failure is reported, never a smaller ensemble
            seed = member_seed(opts["ensemble_seed"], i)
            raise EnsembleError(f"ensemble member {i} of {K} (bootstrap seed {seed}) failed to train: {e}") from e
        if not np.isfinite(member.regression_weight).all():
            raise EnsembleError(f"ensemble member {i} of {K}: non-finite regression weights")
        members.append(member)
        drawn = mult[~prep.val_unit]
        records.append(
            {
                "bootstrap_seed": member_seed(opts["ensemble_seed"], i),
                "gating_seed": gating_seed,
                "distinct_prompts": int(len(set(prompt_ids[~prep.val_unit][drawn > 0]))),
                "units_drawn": int(drawn.sum()),
            }
        )
    return HeadsEnsemble(
        members=members,
        records=records,
        primary_fingerprint=primary.fingerprint,
        backbone_fingerprint=backbone_fingerprint_of(units),
        ensemble_seed=int(opts["ensemble_seed"]),
    )
