"""A labeled run (and optionally a curation manifest) as ONE self-contained HTML file.

Sections: units and scores per source, score distribution per source, per-objective ratings per
source, mean gate weights per source, correlations between objectives, what each curation threshold
removed and what happened to pairs, and best-of-N agreement with human ranks where the run has them.
Charts are inline SVG (pipeline.curation.svg); the page loads nothing from anywhere.

`report_stats` is the pure part (a pandas frame of units in, numbers out); `render_html` turns
numbers into the page; `build_report` reads the run through pipeline.storage and does both.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline import metrics, schema, storage
from pipeline.curation import svg
from pipeline.secrets import redact, scrub

BASE_COLUMNS = ["unit_id", "prompt_id", "source", "kind", "score", "human_rank"]
# Read when the run has them: the selective-accuracy curves of a run labeled with an ensemble.
UNCERTAINTY_COLUMNS = ["row_id", "preference", "tie", "score_std"]
COVERAGE_STEPS = tuple(range(5, 101, 5))  # percent of pairs, most confident first


def read_run_columns(run_dir: str, storage_options: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """The columns the report needs (no text) from every data file of a run, and the run manifest."""
    so = storage_options or None
    frames = []
    for uri in storage.run_data_files(run_dir, so):
        fs, path = storage.filesystem(uri, so)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            cols = [
                c
                for c in names
                if c in BASE_COLUMNS
                or c in UNCERTAINTY_COLUMNS
                or c.startswith((schema.RATING_PREFIX, schema.GATE_PREFIX))
            ]
            frames.append(pf.read(columns=cols).to_pandas())
    manifest_uri = storage.join(run_dir, "manifest.json")
    manifest = json.loads(storage.read_bytes(manifest_uri, so)) if storage.exists(manifest_uri, so) else {}
    return pd.concat(frames, ignore_index=True), manifest


def objective_names(columns, manifest: dict) -> dict[str, str]:
    """Objective name per objective suffix (rating_<suffix> / gate_<suffix>), from the manifest where
    it lists them, else the column suffix itself."""
    suffixes = sorted(c[len(schema.RATING_PREFIX) :] for c in columns if c.startswith(schema.RATING_PREFIX))
    named = {schema.objective_column("", o): o for o in manifest.get("objectives", []) or []}
    return {s: named.get(s, s) for s in suffixes}


def report_stats(units: pd.DataFrame, manifest: dict | None = None) -> dict:
    """Every number the report shows, computed from a frame of units."""
    manifest = manifest or {}
    objectives = objective_names(units.columns, manifest)
    sources = sorted(units["source"].dropna().unique())
    score = units["score"].astype("float64")
    per_source = {}
    for src in sources:
        sub = units[units["source"] == src]
        s = sub["score"].astype("float64")
        per_source[src] = {
            "units": int(len(sub)),
            "kinds": sorted(sub["kind"].dropna().unique()),
            "prompts": int(sub["prompt_id"].nunique()),
            "score_mean": float(s.mean()),
            "score_median": float(s.median()),
            "score_std": float(s.std(ddof=0)),
            "scores": s.to_numpy(),
            "ratings": {
                o: sub[schema.RATING_PREFIX + suf].astype("float64").to_numpy() for suf, o in objectives.items()
            },
            "mean_gates": {
                o: float(sub[schema.GATE_PREFIX + suf].astype("float64").mean())
                for suf, o in objectives.items()
                if schema.GATE_PREFIX + suf in sub.columns
            },
        }
    rating_cols = [schema.RATING_PREFIX + s for s in objectives]
    corr = units[rating_cols].astype("float64").corr().to_numpy() if rating_cols else np.zeros((0, 0))
    return {
        "run_id": manifest.get("run_id") or (units["run_id"].iloc[0] if "run_id" in units else None),
        "units": int(len(units)),
        "prompts": int(units["prompt_id"].nunique()),
        "sources": sources,
        "objectives": list(objectives.values()),
        "score_range": (float(score.min()), float(score.max())),
        "per_source": per_source,
        "correlation": corr,
        "agreement": best_of_n_agreement(units),
        "selective": selective_curves(units),
    }


def selective_curves(units: pd.DataFrame) -> dict[str, dict]:
    """Per preference source of a run labeled with an ensemble: pairwise accuracy of the most
    confident X % of human pairs (X in COVERAGE_STEPS), confidence |margin| / sqrt(std_c² + std_r²)
    and |margin| alone (pipeline.metrics, the definitions jobs.evaluate reports). {} without score_std."""
    need = {"row_id", "preference", "tie", "score_std"}
    if not need <= set(units.columns) or units["score_std"].notna().sum() == 0:
        return {}
    u = units[units["kind"] == "preference"].drop_duplicates("unit_id")
    u = u[u["preference"].isin(["chosen", "rejected"]) & ~u["tie"].fillna(False).astype(bool)]
    # whole pairs only: exactly one chosen and one rejected unit in the row
    per_row = u.groupby("row_id")["preference"].agg(lambda p: tuple(sorted(p)))
    u = u[u["row_id"].map(per_row) == ("chosen", "rejected")]
    wide = u.pivot_table(
        index=["source", "row_id"], columns="preference", values=["score", "score_std"], aggfunc="first"
    ).dropna()
    out = {}
    for src in sorted(set(wide.index.get_level_values(0))):
        w = wide.loc[src]
        margin = (w[("score", "chosen")] - w[("score", "rejected")]).to_numpy(np.float64)
        unc = metrics.pair_uncertainty(w[("score_std", "chosen")], w[("score_std", "rejected")])
        curves = {}
        for name, conf in (
            ("by margin / uncertainty", metrics.pair_confidence(margin, unc)),
            ("by margin", metrics.pair_confidence(margin)),
        ):
            acc = metrics.selective_accuracy(margin, conf, COVERAGE_STEPS)
            curves[name] = [(float(x), acc[str(x)]) for x in COVERAGE_STEPS]
        out[src] = {"pairs": int(len(margin)), "curves": curves}
    return out


def best_of_n_agreement(units: pd.DataFrame) -> dict[str, dict]:
    """Per source with human ranks: prompts with >= 2 ranked responses, top-1 agreement against its
    chance level (expected hit rate of a random pick), and mean / per-prompt Kendall tau-b, all by
    pipeline.metrics (the definitions the curation manifests and evaluation use)."""
    out = {}
    ranked = units[units["human_rank"].notna() & units["score"].notna()].drop_duplicates("unit_id")
    for src, sub in ranked.groupby("source", sort=True):
        codes, n = metrics.group_codes(sub["prompt_id"].to_numpy())
        summary = metrics.ranking_summary(
            codes, sub["score"].to_numpy(dtype=np.float64), sub["human_rank"].to_numpy(dtype=np.float64), n
        )
        if summary["groups"]:
            out[src] = {
                "groups": summary["groups"],
                "top1_hits": summary["top1_hits"],
                "top1_agreement": summary["top1"],
                "top1_chance": summary["top1_chance"],
                "tau_groups": summary["tau_groups"],
                "mean_kendall_tau_b": summary["kendall_tau_b"],
                "taus": summary["taus"],
            }
    return out


CSS = """
body { font-family: 'DejaVu Sans', Arial, sans-serif; margin: 24px; color: #222; max-width: 1240px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.note { color: #555; font-size: 12px; }
"""


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    def cell(v, tag):
        left = isinstance(v, str) and not v.replace(".", "", 1).replace("-", "", 1).isdigit()
        text = svg.fmt(v) if isinstance(v, float) else ("" if v is None else str(v))
        cls_attr = ' class="l"' if left else ""
        return f"<{tag}{cls_attr}>{svg.esc(text)}</{tag}>"

    out = [f'<table class="{cls}"><tr>' + "".join(cell(h, "th") for h in header) + "</tr>"]
    out += ["<tr>" + "".join(cell(v, "td") for v in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


def _curation_section(cm: dict) -> str:
    parts = [
        f'<section id="curation"><h2>Curation: {svg.esc(cm.get("task", "?"))}</h2>',
        f'<p class="note">Manifest of <code>{svg.esc(cm.get("config", {}).get("output", ""))}</code>: '
        f"{cm.get('rows_in', '?')} units in, {cm.get('rows_out', '?')} rows out.</p>",
    ]
    if cm.get("score_column", "score") != "score":  # every score of this section is that column's
        parts.append(f'<p class="note">Scored by <code>{svg.esc(cm["score_column"])}</code> (read as score).</p>')
    steps = [(s["label"], s) for s in cm.get("selection", [])] + [(f["label"], f) for f in cm.get("filters", [])]
    removed = {label: float(s["removed"]) for label, s in steps}
    if "one_per_prompt_removed" in cm:
        removed["one response per prompt"] = float(cm["one_per_prompt_removed"])
    if removed:
        rows = [[label, s.get("cutoff"), s["removed"], s["failed"]] for label, s in steps]
        if "one_per_prompt_removed" in cm:
            rows.append(["one response per prompt", None, cm["one_per_prompt_removed"], None])
        parts.append(_table(["step", "cut-off", "removed", "fails alone"], rows, "thresholds"))
        parts.append(
            svg.bars(
                removed,
                title="Rows removed by each step (in order)",
                x_label="rows removed",
                attrs={"id": "thresholds-removed"},
                value_format=lambda v: f"{int(v)}",
            )
        )
    for origin, c in (cm.get("pairs") or {}).items():
        if not c["pairs_in"]:
            continue
        parts.append(f"<h3>{svg.esc(origin)} pairs</h3>")
        rows = [["in", c["pairs_in"]], ["kept", c["kept"]], ["flipped", c["flipped"]]]
        rows += [[f"dropped: {r}", n] for r, n in c["dropped"].items()]
        if c.get("duplicate_units"):
            rows.append(["repeated units set aside", c["duplicate_units"]])
        parts.append(_table(["outcome", "pairs"], rows, f"pairs pairs-{origin}"))
        outcome = {
            "kept": float(c["kept"]),
            "flipped": float(c["flipped"]),
            **{f"dropped: {r}": float(n) for r, n in c["dropped"].items()},
        }
        parts.append(
            svg.bars(
                outcome,
                title=f"{origin} pairs: kept / flipped / dropped",
                x_label="pairs",
                attrs={"class": "chart bars pair-outcomes", "data-origin": origin},
                color=svg.PALETTE[0],
                value_format=lambda v: f"{int(v)}",
            )
        )
    if cm.get("agreement"):
        a = cm["agreement"]
        parts.append(
            _table(
                ["prompts ranked", "top-1 agreement", "mean Kendall tau-b"],
                [[a["groups_ranked"], a["top1_agreement"], a["mean_kendall_tau_b"]]],
                "rerank-agreement",
            )
        )
    if "temperature" in cm:
        parts.append(
            f"<p>Fitted temperature T = {svg.fmt(cm['temperature'])} from {cm.get('temperature_pairs')} "
            f"human pairs: P(a beats b) = sigmoid((s_a - s_b) / T).</p>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def render_html(stats: dict, curation_manifests: list[dict] | None = None, title: str | None = None) -> str:
    title = title or f"armolabel report: run {stats['run_id']}"
    lo, hi = stats["score_range"]
    per = stats["per_source"]
    body = [
        f"<h1>{svg.esc(title)}</h1>",
        f'<p class="note">{stats["units"]} units, {stats["prompts"]} prompts, {len(stats["sources"])} source(s), '
        f"{len(stats['objectives'])} objective(s). Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.</p>",
        '<section id="overview"><h2>Sources</h2>',
        _table(
            ["source", "kinds", "units", "prompts", "mean score", "median score", "std"],
            [
                [s, ", ".join(p["kinds"]), p["units"], p["prompts"], p["score_mean"], p["score_median"], p["score_std"]]
                for s, p in per.items()
            ],
            "sources",
        ),
        "</section>",
        '<section id="scores"><h2>Score distribution per source</h2><div class="grid">',
    ]
    for i, (src, p) in enumerate(per.items()):
        body.append(
            svg.histogram(
                p["scores"],
                title=f"{src}: score (n={p['units']})",
                x_label="score",
                y_label="units",
                value_range=(lo, hi),
                color=svg.PALETTE[i % len(svg.PALETTE)],
                attrs={"class": "chart histogram score-hist", "data-source": src},
            )
        )
    body.append("</div></section>")
    body.append('<section id="objectives"><h2>Per-objective ratings per source</h2><div class="grid">')
    for obj in stats["objectives"]:
        body.append(
            svg.box_rows(
                {src: p["ratings"][obj] for src, p in per.items()},
                title=f"rating: {obj}",
                x_label=f"{obj} rating",
                attrs={"class": "chart boxes objective-box", "data-objective": obj},
            )
        )
    body.append("</div></section>")
    if stats["objectives"]:
        body.append('<section id="gates"><h2>Mean gate weights per source</h2>')
        body.append(
            svg.stacked_bars(
                {src: [p["mean_gates"].get(o, 0.0) for o in stats["objectives"]] for src, p in per.items()},
                stats["objectives"],
                title="Mean gate weight per objective",
                x_label="mean gate weight (sums to beta)",
                attrs={"id": "gates-chart"},
            )
        )
        body.append(
            _table(
                ["source", *stats["objectives"]],
                [[src, *[p["mean_gates"].get(o) for o in stats["objectives"]]] for src, p in per.items()],
                "gates",
            )
        )
        body.append("</section>")
        body.append('<section id="correlations"><h2>Correlations between objectives (Pearson, ratings)</h2>')
        body.append(
            svg.heatmap(
                stats["correlation"],
                stats["objectives"],
                title="Objective rating correlations",
                attrs={"id": "correlation-chart"},
            )
        )
        body.append("</section>")
    agreement = stats["agreement"]
    body.append('<section id="agreement"><h2>Best-of-N agreement with human ranks</h2>')
    if agreement:
        body.append(
            _table(
                ["source", "prompts ranked", "top-1 agreement", "chance", "mean Kendall tau-b"],
                [
                    [s, a["groups"], a["top1_agreement"], a["top1_chance"], a["mean_kendall_tau_b"]]
                    for s, a in agreement.items()
                ],
                "agreement",
            )
        )
        bars = {}
        for s, a in agreement.items():
            bars[f"{s}: model"] = a["top1_agreement"]
            bars[f"{s}: chance"] = a["top1_chance"]
        body.append('<div class="grid">')
        body.append(
            svg.bars(
                bars,
                title="Top-1 agreement with the human best",
                x_label="share of prompts",
                attrs={"id": "agreement-chart"},
                color=svg.PALETTE[4],
            )
        )
        for s, a in agreement.items():
            if a["taus"]:
                body.append(
                    svg.histogram(
                        a["taus"],
                        title=f"{s}: Kendall tau-b per prompt",
                        x_label="tau-b",
                        y_label="prompts",
                        value_range=(-1.0, 1.0),
                        bins=10,
                        attrs={"class": "chart histogram tau-hist", "data-source": s},
                    )
                )
        body.append("</div>")
    else:
        body.append('<p class="note">No human ranks in this run.</p>')
    body.append("</section>")
    if stats.get("selective"):
        body.append('<section id="selective"><h2>Selective accuracy: human pairs, most confident first</h2>')
        body.append(
            '<p class="note">Pairwise accuracy of the most confident share of human preference pairs; confidence '
            "= |margin| / sqrt(std_chosen² + std_rejected²) (ensemble spread) against |margin| alone.</p>"
        )
        body.append('<div class="grid">')
        for src, entry in stats["selective"].items():
            body.append(
                svg.lines(
                    entry["curves"],
                    title=f"{src}: accuracy vs coverage ({entry['pairs']} pairs)",
                    x_label="coverage (% of pairs, most confident first)",
                    y_label="pairwise accuracy",
                    x_range=(0.0, 100.0),
                    y_range=(0.0, 1.0),
                    attrs={"class": "chart lines selective", "data-source": src},
                )
            )
        body.append("</div></section>")
    for cm in curation_manifests or []:
        body.append(_curation_section(cm))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{svg.esc(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def build_report(
    run_dir: str, out_uri: str, curation_manifests: list[str] | None = None, storage_options: dict | None = None
) -> dict:
    """Read the run (and curation manifests), write the HTML atomically; returns the stats shown."""
    so = storage_options or None
    units, manifest = read_run_columns(run_dir, so)
    stats = report_stats(units, manifest)

    # redacted again: manifests of older versions held credentials in clear
    manifests = [redact(json.loads(storage.read_bytes(u, so))) for u in curation_manifests or []]
    storage.write_atomic(out_uri, scrub(render_html(stats, manifests)).encode("utf-8"), so)
    return stats
