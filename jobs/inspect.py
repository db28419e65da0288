"""Check the inputs of a config before spending GPU hours: what the reader makes of their first rows.

    python -m jobs.inspect --config jobs/configs/demo.yaml [--rows 20] [--json]

Reads the first rows of each input of a labeling or train_heads config with the job's own reader,
without Ray or a model, and prints per input: the detected file format and adapter, one
normalised row per kind, the label every labeled row ended up with (chosen / rejected / tie /
confidence, ratings, ranks), the quarantine reasons seen, and the record fields that were never
read (those that look like labels flagged). --json prints the same as one JSON document.

The whole config is type-checked first (every wrong type and unknown key, exit 2); heads need not
exist yet. Exit 1 when an input cannot be read (the others are still reported).
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from pipeline.config_schema import ConfigErrors
from pipeline.corpus import InputSpec
from pipeline.corpus.inspection import inspect_input
from pipeline.secrets import scrub

CUT = 100  # characters of a text shown in the human-readable report


def _cut(text) -> str:
    if text is None:
        return "null"
    text = str(text).replace("\n", "\\n")
    return json.dumps(text if len(text) <= CUT else text[:CUT] + "…", ensure_ascii=False)


def load_inputs(path: str) -> tuple[list[dict], dict | None]:
    """The input specs of a config file and its storage options. The whole config is type-checked
    against its kind's schema (a train_heads config when it has `heads_out`, else a labeling one):
    every wrong type and unknown key is reported at once (ConfigErrors). Whether heads, checkpoints
    or input files exist is not (a config whose heads are not trained yet can still be inspected;
    an input that matches nothing is reported in its own entry)."""
    from pipeline.labeling.config import SCHEMA as LABEL_SCHEMA
    from pipeline.training import SCHEMA as TRAIN_SCHEMA

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    schema = TRAIN_SCHEMA if "heads_out" in data else LABEL_SCHEMA
    errors, _ = schema.type_errors(data)
    if errors:
        raise ConfigErrors(errors)
    return data["inputs"], data.get("storage_options") or None


def inspect_config(path: str, rows: int) -> list[dict]:
    inputs, storage_options = load_inputs(path)
    out = []
    for i, raw in enumerate(inputs):
        try:
            spec = InputSpec.from_dict({"storage_options": storage_options, **raw})
            report = inspect_input(spec, rows)
        except Exception as e:  # noqa: BLE001 - one bad spec must not hide the report on the others
            report = {"path": raw.get("path") if isinstance(raw, dict) else raw, "error": f"{type(e).__name__}: {e}"}
        out.append({"input": i, **report})
    return out


def _label_line(label: dict) -> str:
    row = f"row {label['source_row']}:"
    if label["kind"] == "preference":
        conf = f" (confidence {label['label_confidence']:.3g})" if label.get("label_confidence") is not None else ""
        if label["tie"]:
            return f"{row} tie{conf}: {_cut(label['responses'][0])} = {_cut(label['responses'][1])}"
        return f"{row} chosen {_cut(label['chosen'])} over rejected {_cut(label['rejected'])}{conf}"
    if label["kind"] == "rated":
        return f"{row} " + ", ".join(f"{r['name']} = {r['raw']:g} -> {r['value']:.3g}" for r in label["ratings"])
    return f"{row} ranks {label['ranks']}: " + " | ".join(_cut(t) for t in label["responses"])


def render(reports: list[dict]) -> str:
    lines: list[str] = []
    for r in reports:
        path = r["path"] if isinstance(r["path"], str) else ", ".join(map(str, r["path"] or []))
        lines.append(f"input {r['input']}: {path}")
        if "error" in r:
            lines += [f"  error: {r['error']}", ""]
            continue
        lines.append(f"  format: {r['format']}; source: {', '.join(r['sources']) or '-'}")
        for f in r["files"]:
            adapters = ", ".join(f"{a} ({n})" for a, n in f["adapters"].items()) or "none"
            lines.append(
                f"  file {f['uri']}: {f['file_format'] or 'unknown format'}, adapter {adapters}, "
                f"{f['records']} record(s)"
            )
        lines.append(
            f"  rows: {r['records_read']} record(s) read -> {r['rows_ok']} row(s) ok, "
            f"{r['rows_quarantined']} quarantined"
        )
        for kind, ex in r["examples"].items():
            lines.append(f"  example {kind} row (source_row {ex['source_row']}):")
            for m in ex["prompt"]:
                lines.append(f"    [{m['role']}] {_cut(m['content'])}")
            for resp in ex["responses"]:
                tags = [
                    t
                    for t in (resp["preference"], None if resp["human_rank"] is None else f"rank {resp['human_rank']}")
                    if t
                ]
                if resp["ratings"]:
                    tags += [f"{x['name']}={x['raw']:g}" for x in resp["ratings"]]
                lines.append(f"    -> {_cut(resp['response'])}" + (f"  [{', '.join(tags)}]" if tags else ""))
            if ex["tie"]:
                lines.append("    (a tie: no preference)")
        if r["labels"]:
            lines.append("  labels:")
            lines += [f"    {_label_line(label)}" for label in r["labels"]]
        if r["quarantine"]:
            lines.append("  quarantined:")
            for kind, q in r["quarantine"].items():
                lines.append(f"    {q['count']} x {kind}")
                lines += [f"      row {e['source_row']}: {e['reason']}" for e in q["examples"]]
        lines.append(f"  fields never read: {', '.join(r['unused_fields']) or 'none'}")
        if r["unused_label_fields"]:
            lines.append(
                f"  WARNING: fields that look like labels were never read: {', '.join(r['unused_label_fields'])}"
                " (map them in the input spec's columns, or they are lost)"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.inspect", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="labeling or train_heads YAML config")
    ap.add_argument("--rows", type=int, default=20, help="records read per input (default 20)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    args = ap.parse_args(argv)
    if args.rows < 1:
        ap.error("--rows must be >= 1")
    try:
        reports = inspect_config(args.config, args.rows)
    except (OSError, ValueError, yaml.YAMLError) as e:  # ConfigErrors: every problem, each naming its key
        print(scrub(f"config error: {e}"), file=sys.stderr)
        return 2
    print(json.dumps(reports, indent=2, ensure_ascii=False, default=str) if args.json else render(reports))
    return 1 if any("error" in r for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
