"""Evaluate reward scores against human labels (pure: a units table in, a JSON-able report out).

What counts, per source:
- preference rows (not ties): pairwise accuracy, chosen vs rejected; equal scores count half;
- rated rows: Pearson and Spearman between each objective's predicted rating and the human rating
  (both on [0, 1]);
- best-of-N rows with human ranks: top-1 accuracy (the top-scored response is rank 0) and the
  mean Kendall tau-b between scores and human ranks over the prompts.

Any number of scoring methods are compared side by side: each is one score per unit (e.g. the
gated heads, a single Bradley-Terry head, the response length).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import metrics
from pipeline.units import embeddings_of, human_ratings, preference_pairs, ranked_groups, response_tokens

LENGTH_BASELINE = "length"


def length_scores(units: pa.Table) -> np.ndarray:
    """The length baseline: the longer response (in tokens) wins."""
    return response_tokens(units)


def evaluate(
    units: pa.Table, scores: dict[str, np.ndarray], predicted_ratings: dict[str, np.ndarray] | None = None
) -> dict:
    """Metrics per source and method. `scores`: method -> score per unit; `predicted_ratings`:
    objective -> predicted rating per unit (for the rated sets)."""
    report: dict = {"pairwise": {}, "best_of_n": {}, "rated": {}, "units": units.num_rows}
    pairs = preference_pairs(units)
    for source in sorted(set(pairs.source)):
        sel = pairs.select(pairs.source == source)
        report["pairwise"][source] = {
            "pairs": len(sel),
            **{m: metrics.pairwise_accuracy(s[sel.better], s[sel.worse]) for m, s in scores.items()},
        }
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


def evaluate_methods(units: pa.Table, heads, baseline=None) -> dict:
    """Gated heads vs the single Bradley-Terry head vs response length, on cached embeddings."""
    response, prompt = embeddings_of(units)
    out = heads.score(response, prompt)
    scores = {"gated": np.asarray(out.score, np.float64)}
    if baseline is not None:
        scores["single_bt"] = np.asarray(baseline.score(response), np.float64)
    scores[LENGTH_BASELINE] = length_scores(units)
    predicted = {name: np.asarray(out.rewards[:, k], np.float64) for k, name in enumerate(heads.objectives)}
    return evaluate(units, scores, predicted)


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
