"""Evaluate reward scores against human labels (pure: a units table in, a JSON-able report out).

What counts, per source:
- preference rows (not ties): pairwise accuracy, chosen vs rejected; equal scores count half;
- rated rows: Pearson and Spearman between each objective's predicted rating and the human rating
  (both on [0, 1]);
- best-of-N rows with human ranks: top-1 accuracy (the top-scored response is rank 0) and the
  mean Kendall tau-b between scores and human ranks over the prompts.

Any number of scoring methods are compared side by side: each is one score per unit (e.g. the
gated heads, a single Bradley-Terry head, the response length).

With an ensemble (an `Uncertainty`: the ensemble's standard deviation of the score per unit, and
its conservative score mean − λ·std and minimum), per preference source also:
- `selective_accuracy`: {"25", "50", "75", "100"} -> pairwise accuracy of the scored method's most
  confident X % of pairs, confidence = |margin| / sqrt(std_chosen² + std_rejected²), and
  `selective_accuracy_by_margin` (confidence = |margin|) for comparison; `selective_auc` and
  `selective_auc_by_margin`: the areas under those accuracy-coverage curves;
- `ece`: expected calibration error of the Bradley-Terry probabilities sigmoid(margin);
- `mean_score_std`: the mean ensemble spread of the source's units;
per best-of-N source: the conservative and ensemble-minimum orders' top-1 and Kendall tau-b against
human ranks (as methods `conservative` / `ensemble_min`), and `conservative_vs_plain`: the share of
prompts whose top response is the same and the mean Kendall tau-b between the two orders; and
`mean_score_std` per source for every source (rated ones too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import metrics
from pipeline.units import embeddings_of, human_ratings, preference_pairs, ranked_groups, response_tokens

LENGTH_BASELINE = "length"


def length_scores(units: pa.Table) -> np.ndarray:
    """The length baseline: the longer response (in tokens) wins."""
    return response_tokens(units)


@dataclass
class Uncertainty:
    """An ensemble's view of the units: `std` per unit (the spread of the members' scores), the
    method whose margins it qualifies (a key of the scores), and the conservative orders."""

    std: np.ndarray
    method: str  # the scored method the margins come from (e.g. "gated", "score")
    conservative: np.ndarray | None = None  # mean − λ·std per unit
    minimum: np.ndarray | None = None  # the members' minimum per unit
    lam: float = 1.0


def _opt(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def pair_uncertainty_metrics(margin: np.ndarray, uncertainty: np.ndarray) -> dict:
    """The selective-accuracy and calibration entries of one source's pairs (margin = chosen − rejected)."""
    by_ratio = metrics.pair_confidence(margin, uncertainty)
    by_margin = metrics.pair_confidence(margin)
    return {
        "selective_accuracy": metrics.selective_accuracy(margin, by_ratio),
        "selective_accuracy_by_margin": metrics.selective_accuracy(margin, by_margin),
        "selective_auc": metrics.selective_auc(margin, by_ratio),
        "selective_auc_by_margin": metrics.selective_auc(margin, by_margin),
        "ece": metrics.expected_calibration_error(margin),
    }


def evaluate(
    units: pa.Table,
    scores: dict[str, np.ndarray],
    predicted_ratings: dict[str, np.ndarray] | None = None,
    uncertainty: Uncertainty | None = None,
) -> dict:
    """Metrics per source and method. `scores`: method -> score per unit; `predicted_ratings`:
    objective -> predicted rating per unit (for the rated sets); `uncertainty`: an ensemble's spread
    (see the module doc)."""
    report: dict = {"pairwise": {}, "best_of_n": {}, "rated": {}, "units": units.num_rows}
    if uncertainty is not None:
        scores = dict(scores)
        if uncertainty.conservative is not None:
            scores["conservative"] = np.asarray(uncertainty.conservative, np.float64)
        if uncertainty.minimum is not None:
            scores["ensemble_min"] = np.asarray(uncertainty.minimum, np.float64)
        std = np.asarray(uncertainty.std, np.float64)
        src_all = np.array(units.column("source").to_pylist(), dtype=object)
        report["mean_score_std"] = {
            str(s): _opt(float(np.nanmean(std[src_all == s]))) if np.isfinite(std[src_all == s]).any() else None
            for s in sorted(set(src_all.tolist()))
        }
        report["uncertainty"] = {"method": uncertainty.method, "lambda": uncertainty.lam}
    pairs = preference_pairs(units)
    for source in sorted(set(pairs.source)):
        sel = pairs.select(pairs.source == source)
        report["pairwise"][source] = {
            "pairs": len(sel),
            **{m: metrics.pairwise_accuracy(s[sel.better], s[sel.worse]) for m, s in scores.items()},
        }
        if uncertainty is not None:
            s = scores[uncertainty.method]
            margin = s[sel.better] - s[sel.worse]
            u = metrics.pair_uncertainty(std[sel.better], std[sel.worse])
            ok = np.isfinite(margin) & np.isfinite(u)
            report["pairwise"][source].update(pair_uncertainty_metrics(margin[ok], u[ok]))
            report["pairwise"][source]["mean_score_std"] = report["mean_score_std"].get(str(source))
    groups_by_source = ranked_groups(units)
    if groups_by_source:
        ranks = units.column("human_rank").to_numpy(zero_copy_only=False).astype(np.float64)
    for source, groups in sorted(groups_by_source.items()):
        entry: dict[str, Any] = {"prompts": len(groups)}
        rows = np.concatenate(groups)
        codes = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        for m, s in scores.items():
            summary = metrics.ranking_summary(codes, s[rows], ranks[rows], len(groups))
            entry[m] = {"top1": summary["top1"], "kendall_tau": summary["kendall_tau_b"]}
        if uncertainty is not None and "conservative" in scores:
            plain, cons = scores[uncertainty.method][rows], scores["conservative"][rows]
            entry["conservative_vs_plain"] = order_agreement(codes, plain, cons, len(groups))
            entry["mean_score_std"] = report["mean_score_std"].get(str(source))
        report["best_of_n"][source] = entry
    if predicted_ratings:
        truth = human_ratings(units)
        src = np.array(units.column("source").to_pylist(), dtype=object)
        for name, y in sorted(truth.items()):
            if name not in predicted_ratings:
                continue
            have = np.isfinite(y)
            for source in sorted(set(src[have])):
                sel = have & (src == source)
                if sel.sum() < 3:
                    continue
                pred = predicted_ratings[name][sel]
                report["rated"].setdefault(source, {})[name] = {
                    "n": int(sel.sum()),
                    "pearson": metrics.pearson(pred, y[sel]),
                    "spearman": metrics.spearman(pred, y[sel]),
                }
    report["mean_pairwise_accuracy"] = {
        m: float(np.mean([v[m] for v in report["pairwise"].values()])) if report["pairwise"] else None for m in scores
    }
    return report


def order_agreement(codes: np.ndarray, plain: np.ndarray, other: np.ndarray, n_groups: int) -> dict:
    """How far another order of each group's units departs from the plain one: `top1_same`, the
    share of groups whose top unit is the same (ties at the top: the plain top-1 credit of the other
    order's best units, as in metrics.best_of_n_top1), and `kendall_tau_b`, the mean over groups of
    tau-b between the two scores."""
    # The plain order as a "human rank" (0 = best): dense ranks of -plain within each group.
    rank = np.zeros(len(plain))
    order = np.lexsort((-plain, codes))
    sc, sp = codes[order], -plain[order]
    new_group = np.concatenate(([True], sc[1:] != sc[:-1]))
    new_value = new_group | np.concatenate(([True], sp[1:] != sp[:-1]))
    dense = np.cumsum(new_value)
    rank[order] = dense - np.maximum.accumulate(np.where(new_group, dense, 0))
    summary = metrics.ranking_summary(codes, other, rank, n_groups)
    return {"groups": summary["groups"], "top1_same": summary["top1"], "kendall_tau_b": summary["kendall_tau_b"]}


def evaluate_methods(units: pa.Table, heads, baseline=None, ensemble=None, lam: float = 1.0) -> dict:
    """Gated heads vs the single Bradley-Terry head vs response length, on cached embeddings; with an
    ensemble (pipeline.heads.ensemble.HeadsEnsemble) also its mean and the uncertainty metrics."""
    response, prompt = embeddings_of(units)
    out = heads.score(response, prompt)
    scores = {"gated": np.asarray(out.score, np.float64)}
    if baseline is not None:
        scores["single_bt"] = np.asarray(baseline.score(response), np.float64)
    scores[LENGTH_BASELINE] = length_scores(units)
    predicted = {name: np.asarray(out.rewards[:, k], np.float64) for k, name in enumerate(heads.objectives)}
    uncertainty = None
    if ensemble is not None:
        spread = ensemble.score(response, prompt)
        scores["ensemble_mean"] = spread.mean
        uncertainty = Uncertainty(spread.std, "gated", spread.mean - lam * spread.std, spread.min, lam)
    return evaluate(units, scores, predicted, uncertainty)


def markdown_tables(reports: dict[str, dict]) -> str:
    """EVALUATION.md tables from reports keyed by a label (e.g. the backbone): pairwise accuracy per
    source and best-of-N agreement per method, then the rated objectives' correlations."""

    def fmt(x) -> str:
        return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"

    pair_sources = sorted({s for r in reports.values() for s in r["pairwise"]})
    bon_sources = sorted({s for r in reports.values() for s in r["best_of_n"]})
    head = ["backbone", "method"] + [f"{s} acc" for s in pair_sources] + ["mean pairwise acc"]
    head += [f"{s} {m}" for s in bon_sources for m in ("top-1", "Kendall τ")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in reports.items():
        for method in r["mean_pairwise_accuracy"]:
            cells = [label, method] + [fmt(r["pairwise"].get(s, {}).get(method)) for s in pair_sources]
            cells.append(fmt(r["mean_pairwise_accuracy"][method]))
            for s in bon_sources:
                entry = r["best_of_n"].get(s, {}).get(method) or {}
                cells += [fmt(entry.get("top1")), fmt(entry.get("kendall_tau"))]
            lines.append("| " + " | ".join(cells) + " |")
    counts = "; ".join(
        f"{label}: "
        + ", ".join(f"{s} {r['pairwise'][s]['pairs']} pairs" for s in sorted(r["pairwise"]))
        + "".join(f", {s} {r['best_of_n'][s]['prompts']} prompts" for s in sorted(r["best_of_n"]))
        for label, r in reports.items()
    )
    lines += ["", f"Test-split sizes: {counts}.", ""]
    lines += ["| backbone | objective (rated set) | n | Pearson | Spearman |", "|---|---|---|---|---|"]
    for label, r in reports.items():
        for source, objectives in sorted(r["rated"].items()):
            for name, m in sorted(objectives.items()):
                lines.append(f"| {label} | {name} ({source}) | {m['n']} | {fmt(m['pearson'])} | {fmt(m['spearman'])} |")
    return "\n".join(lines) + "\n"
