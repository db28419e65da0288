"""What the reader makes of an input's first rows, for checking a spec before a labeling run
(jobs/inspect.py prints it). Pure: no Ray, no model; the same reader code as the job."""

from __future__ import annotations

from collections import Counter

from pipeline.corpus.field_use import FieldUse
from pipeline.corpus.reader import FileReader, _reason_kind
from pipeline.corpus.spec import InputSpec, expand_files

QUARANTINE_EXAMPLES = 3  # reasons shown per kind of reason


def _row_view(units: list[dict]) -> dict:
    """One normalised row: its prompt and each response with the labels it ended up with."""
    u0 = units[0]
    return {
        "source_row": u0["source_row"],
        "source_uri": u0["source_uri"],
        "kind": u0["kind"],
        "prompt": u0["prompt"],
        "tie": u0["tie"],
        "label_confidence": u0["label_confidence"],
        "responses": [
            {
                "response": u["response"],
                "preference": u["preference"],
                "human_rank": u["human_rank"],
                "ratings": u["ratings"],
            }
            for u in units
        ],
    }


def _label_view(units: list[dict]) -> dict | None:
    """The label a row ended up with (None for instruction rows, which carry none)."""
    u0 = units[0]
    kind = u0["kind"]
    view: dict = {"source_row": u0["source_row"], "kind": kind}
    if kind == "preference":
        view.update(tie=bool(u0["tie"]), label_confidence=u0["label_confidence"])
        if u0["tie"]:
            view["responses"] = [u["response"] for u in units]
        else:
            by = {u["preference"]: u["response"] for u in units}
            view.update(chosen=by.get("chosen"), rejected=by.get("rejected"))
    elif kind == "rated":
        view["ratings"] = u0["ratings"]
    elif kind == "best_of_n":
        view["ranks"] = [u["human_rank"] for u in units]
        view["responses"] = [u["response"] for u in units]
    else:
        return None
    return view


def inspect_input(spec: InputSpec, rows: int = 20) -> dict:
    """The first `rows` records of the input (across its files, in order): per file its format and
    adapters, one example row per kind, every labeled row's label, the quarantine reasons, and
    the record fields never read (label-like ones apart)."""
    out: dict = {
        "path": spec.path,
        "format": spec.format,
        "files": [],
        "sources": [],
        "records_read": 0,
        "rows_ok": 0,
        "rows_quarantined": 0,
        "examples": {},
        "labels": [],
        "quarantine": {},
    }
    use = FieldUse()
    reasons: Counter = Counter()
    left = rows
    for uri in expand_files(spec):
        if left <= 0:
            break
        reader = FileReader(spec, uri)
        records = 0
        for record_rows in reader.rows(limit_rows=left):
            records += 1
            for units in record_rows:
                u0 = units[0]
                if u0["quarantine_reason"] is not None:
                    out["rows_quarantined"] += 1
                    kind = _reason_kind(u0["quarantine_reason"])
                    reasons[kind] += 1
                    examples = out["quarantine"].setdefault(kind, {"count": 0, "examples": []})
                    if len(examples["examples"]) < QUARANTINE_EXAMPLES:
                        examples["examples"].append(
                            {
                                "source_row": u0["source_row"],
                                "source_uri": u0["source_uri"],
                                "reason": u0["quarantine_reason"],
                            }
                        )
                    continue
                out["rows_ok"] += 1
                out["examples"].setdefault(u0["kind"], _row_view(units))
                label = _label_view(units)
                if label is not None:
                    out["labels"].append(label)
        left -= records
        out["records_read"] += records
        out["files"].append(
            {"uri": uri, "file_format": reader.file_format, "adapters": dict(reader.adapters_used), "records": records}
        )
        if reader.source() not in out["sources"]:
            out["sources"].append(reader.source())
        use.merge(reader.take_field_use())
    for kind, count in reasons.items():
        out["quarantine"][kind]["count"] = count
    out.update(use.report())
    return out
