"""Run manifests and shard markers: small JSON files next to the output, written atomically."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pyarrow.compute as pc

from pipeline import schema, storage
from pipeline.corpus.field_use import FieldUse

MANIFEST = "manifest.json"
SHARDS_DIR = storage.SHARDS_DIR
RUN_IDENTITY = storage.RUN_IDENTITY  # what the committed shards were scored with; a resume must match it


def marker_uri(run_dir: str, shard_id: str) -> str:
    return storage.join(run_dir, SHARDS_DIR, f"{shard_id}.json")


def completed_shards(run_dir: str, storage_options: dict | None) -> dict[str, dict]:
    """Shard id -> its marker, for every shard committed by earlier attempts of this run."""
    out = {}
    for uri in storage.list_files(storage.join(run_dir, SHARDS_DIR), storage_options):
        if uri.endswith(".json"):
            marker = storage.read_json(uri, storage_options)
            out[marker["shard_id"]] = marker
    return out


def earlier_input_files(
    output_root: str, run_id: str, storage_options: dict | None
) -> dict[tuple[str, str | None], dict]:
    """Input files recorded by earlier completed runs under the same output root, keyed by
    (uri, spec key): one file read under two specs is two inputs (None: a manifest from before
    spec keys were recorded)."""
    seen: dict[tuple[str, str | None], dict] = {}
    for uri in storage.list_files(output_root, storage_options):
        parts = uri.rstrip("/").split("/")
        if parts[-1] != MANIFEST or parts[-2] == run_id:
            continue
        try:
            m = storage.read_json(uri, storage_options)
        except (OSError, ValueError):
            continue
        if m.get("status") == "complete":
            for f in m.get("input_files", []):
                seen[(f["uri"], f.get("spec"))] = f
    return seen


def reason_category(reason: str) -> str:
    """Reasons carry specifics (token counts, line numbers); the manifest counts them by kind,
    the quarantine files keep the full text."""
    return re.sub(r"\d+", "N", re.sub(r"\s*\([^)]*\)", "", reason))


def summarize_sources(markers: list[dict]) -> dict[str, dict]:
    """Per-source counts; rows_in = rows_labeled + rows_quarantined holds for every source.
    Also the record fields no labeled row's adapter read (`unused_fields`) and those of them that
    look like labels (`unused_label_fields`), from the markers' `record_fields`."""
    out: dict[str, dict] = {}
    use: dict[str, FieldUse] = {}
    for m in markers:
        use.setdefault(m["source"], FieldUse()).merge(FieldUse.from_dict(m.get("record_fields")))
        s = out.setdefault(
            m["source"],
            {
                "rows_in": 0,
                "rows_labeled": 0,
                "rows_quarantined": 0,
                "units_in": 0,
                "units_labeled": 0,
                "units_quarantined": 0,
                "tokens": 0,
                "quarantine_reasons": Counter(),
            },
        )
        s["rows_in"] += m["shard_rows"]
        s["rows_labeled"] += m["rows_labeled"]
        s["rows_quarantined"] += m["rows_quarantined"]
        s["units_in"] += m["shard_units"]
        s["units_labeled"] += m["labeled_units"]
        s["units_quarantined"] += m["quarantined_units"]
        s["tokens"] += m["tokens"]
        for reason, count in m.get("reasons", {}).items():
            s["quarantine_reasons"][reason_category(reason)] += count
    for source, s in out.items():
        s["quarantine_reasons"] = dict(s["quarantine_reasons"])
        s.update(use[source].report())
    return out


def unused_label_warnings(sources: dict[str, dict]) -> list[str]:
    """One warning per source whose records carry label-like fields no adapter read."""
    return [
        f"warning: source {source!r}: record fields that look like labels were never read: "
        f"{', '.join(s['unused_label_fields'])} (map them in the input spec; check a mapping with "
        f"python -m jobs.inspect --config FILE)"
        for source, s in sorted(sources.items())
        if s.get("unused_label_fields")
    ]


def token_accounting(markers: list[dict]) -> dict:
    """What the scoring passes computed: computed_tokens (token positions the backbone ran,
    padding and prompts repeated across packed pieces included), useful_tokens (each distinct
    prompt of a scoring call once, plus every response) and padding_waste = computed / useful
    (1.0: nothing computed twice or padded). Units' own token counts are in sources[*].tokens."""
    computed = sum(int(m.get("computed_tokens") or 0) for m in markers)
    useful = sum(int(m.get("useful_tokens") or 0) for m in markers)
    return {
        "computed_tokens": computed,
        "useful_tokens": useful,
        "padding_waste": round(computed / useful, 4) if useful else None,
    }


def check_run_identity(run_dir: str, identity: dict, storage_options: dict | None) -> None:
    """Refuse to resume a run with a different model, heads or template: its shards would mix
    scores from two models under one run id. The first attempt records the identity."""
    uri = storage.join(run_dir, RUN_IDENTITY)
    if storage.exists(uri, storage_options):
        recorded = storage.read_json(uri, storage_options)
        if recorded != identity:
            changed = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
            raise RuntimeError(
                f"run {run_dir} was started with a different {', '.join(changed)}; "
                f"resuming would mix two models' scores: use a new run_id"
            )
    else:
        storage.write_json(uri, identity, storage_options)


def score_summary(run_dir: str, objectives: list[str], storage_options: dict | None) -> dict[str, dict]:
    """Per source: labeled units, mean / 10th / 90th percentile score and the objective with the
    largest mean gate weight: the short summary a finished run prints. Reads only those columns."""
    gates = {schema.objective_column(schema.GATE_PREFIX, o): o for o in objectives}
    table = storage.read_run_table(run_dir, storage_options, columns=["source", "score", *gates])
    out = {}
    for source in sorted(set(table.column("source").to_pylist())):
        part = table.filter(pc.equal(table.column("source"), source))
        score = part.column("score").to_numpy(zero_copy_only=False).astype(float)
        score = score[np.isfinite(score)]
        entry: dict = {"units": part.num_rows}
        if len(score):
            entry.update(
                mean_score=round(float(score.mean()), 4),
                p10_score=round(float(np.quantile(score, 0.1)), 4),
                p90_score=round(float(np.quantile(score, 0.9)), 4),
            )
        if gates:
            means = {
                o: float(np.nanmean(part.column(c).to_numpy(zero_copy_only=False).astype(float)))
                for c, o in gates.items()
            }
            entry["top_gate"] = max(means, key=means.__getitem__)
        out[source] = entry
    return out


# ---- runs that fail loudly: max_quarantine_fraction ------------------------------------------

EXIT_QUARANTINE = 4  # jobs.label / jobs.train_heads exit code of a run over the quarantine limit
FAILED_QUARANTINE = "failed_quarantine"  # the manifest's status of such a run


class QuarantineLimitExceeded(RuntimeError):
    """The run quarantined more input rows than `max_quarantine_fraction` allows. What it labeled
    is committed (a rerun with the same run id resumes); the manifest says why."""


def quarantine_verdict(sources: dict[str, dict], per_source: float | None, overall: float | None) -> dict | None:
    """None when the run is within its limits; else why not: the sources over `per_source`
    (rows_quarantined / rows_in, each), and the whole run's fraction when it is over `overall`.
    Sources without input rows are left out; a limit of None is off; a fraction equal to its limit
    passes."""
    names = sorted(s for s in sources if sources[s]["rows_in"])
    fractions = {s: sources[s]["rows_quarantined"] / sources[s]["rows_in"] for s in names}
    over = {s: round(f, 4) for s, f in fractions.items() if per_source is not None and f > per_source}
    rows_in = sum(sources[s]["rows_in"] for s in names)
    total = sum(sources[s]["rows_quarantined"] for s in names) / rows_in if rows_in else 0.0
    overall_over = overall is not None and total > overall
    if not over and not overall_over:
        return None
    parts = [
        f"source {s!r}: {sources[s]['rows_quarantined']} of {sources[s]['rows_in']} rows quarantined "
        f"({fractions[s]:.1%} > per_source {per_source})"
        for s in over
    ]
    if overall_over:
        parts.append(f"the run: {total:.1%} of {rows_in} rows quarantined (> overall {overall})")
    return {
        "reason": "max_quarantine_fraction",
        "limits": {"per_source": per_source, "overall": overall},
        "sources_over": over,
        "overall_fraction": round(total, 4),
        "message": "quarantined too much input (max_quarantine_fraction): "
        + "; ".join(parts)
        + "; see the quarantine/ files and manifest quarantine_reasons, fix the inputs (or raise the limit)",
    }


def judge_quarantine(man: dict, limits) -> dict | None:
    """At the end of a run, before its manifest is written: when it is over `limits` (a
    QuarantineLimits), mark it `status: failed_quarantine` with the verdict under `failure`;
    returns the verdict (None: within the limits). The caller writes the manifest once, then
    raises QuarantineLimitExceeded, so a reader never sees such a run `complete`. The committed
    shards stay (a resume keeps them)."""
    verdict = quarantine_verdict(man["sources"], limits.per_source, limits.overall)
    if verdict is not None:
        man["status"] = FAILED_QUARANTINE
        man["failure"] = verdict
    return verdict
