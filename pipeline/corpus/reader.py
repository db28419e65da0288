"""Records -> validated units, grouped into shards (pure Python, no Ray).

For each input the reader pairs a file format (formats.py) with an adapter (adapters.py), checks
every normalised row, and emits units as dicts matching schema.UNIT_SCHEMA. A record that cannot
be used becomes exactly one quarantine unit with its reason, so for every input
rows in = good rows + quarantined rows.

Shards: consecutive records of one input, `rows_per_shard` records at a time, numbered from 0.
A record gives all of its rows (an Open Assistant tree gives several) to one shard, and
`shard_rows` counts the rows (good + quarantined) the shard holds, which is what row totals sum.
Everything here is deterministic for a given file and rows_per_shard, so a later job can write
each shard exactly once.

Text that cannot be stored: a lone surrogate ("\\ud800" in JSON, common in scraped text) is a
valid JSON escape but not Unicode text, so UTF-8 (ids, Arrow, Parquet) cannot hold it; such a row
is quarantined with the place it was found, never raised. Reasons and raw text of quarantined
rows are stored with such characters written as "\\udXXX" escapes.

Field use: each record reaches its adapter as a field_use.TrackedRecord; the first unit of every
shard carries (under FIELD_USE, outside UNIT_SCHEMA) the shard's FieldUse (a FIELD_USE_TYPE struct), which the
labeling job sums per source to report record fields that were never read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import overload

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import ids, schema, storage
from pipeline.corpus import formats
from pipeline.corpus.adapters import ADAPTERS, QuarantineError, Row, adapt_mapping, detect
from pipeline.corpus.field_use import FIELD_USE_TYPE, FieldUse, TrackedRecord
from pipeline.corpus.spec import InputSpec, dataset_source, expand_all, file_format_of

PROMPT_ROLES = ("system", "user", "assistant")
_DETECT_LOOKAHEAD = 1000  # records buffered while looking for one whose fields name the format
FIELD_USE = "record_fields"  # per-shard FieldUse on the shard's first unit (see module docstring)


def validate_row(row: Row, allow_empty_response: bool = False, expected_kind: str | None = None) -> None:
    """Checks shared by every adapter; raises QuarantineError with the first problem found."""
    if expected_kind and row.kind != expected_kind:
        raise QuarantineError(f"kind mismatch: the row is {row.kind}, the input spec says {expected_kind}")
    prompt = row.prompt
    if not prompt:
        raise QuarantineError("empty prompt: no messages before the response")
    for i, m in enumerate(prompt):
        if m.get("role") not in PROMPT_ROLES or not isinstance(m.get("content"), str):
            raise QuarantineError(f"wrong type: prompt message {i} must have a role in {PROMPT_ROLES} and text content")
    if prompt[-1]["role"] != "user":
        raise QuarantineError(f"the prompt must end with a user turn, not {prompt[-1]['role']}")
    if not prompt[-1]["content"].strip():
        raise QuarantineError("empty prompt: the last user turn is empty")
    labels = row.response_labels or [f"response {i}" for i in range(len(row.responses))]
    for label, text in zip(labels, row.responses):
        if not isinstance(text, str):
            raise QuarantineError(f"wrong type: {label} is {type(text).__name__}, expected a string")
        if not allow_empty_response and not text.strip():
            raise QuarantineError(f"empty response: {label} is empty")
    n = len(row.responses)
    if row.kind == "preference" and n != 2:
        raise QuarantineError(f"a preference row needs 2 responses, got {n}")
    if row.kind in ("instruction", "rated") and n != 1:
        raise QuarantineError(f"an {row.kind} row needs 1 response, got {n}")
    if row.kind == "best_of_n" and n < 2:
        raise QuarantineError(f"a best-of-N row needs at least 2 responses, got {n}")
    if row.kind == "rated" and not row.ratings:
        raise QuarantineError("a rated row needs at least one rating")


def _storable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@overload
def storable_text(text: str) -> str: ...
@overload
def storable_text(text: None) -> None: ...
@overload
def storable_text(text: str | None) -> str | None: ...
def storable_text(text: str | None) -> str | None:
    """The text with anything UTF-8 cannot hold (lone surrogates) written as a "\\udXXX" escape."""
    if text is None or _storable(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unstorable_text(row: Row) -> str | None:
    """Where the row holds text that UTF-8 cannot encode, as a quarantine reason; None when all is well."""
    labels = row.response_labels or [f"response {i}" for i in range(len(row.responses))]
    places = [(f"prompt message {i}", m["content"]) for i, m in enumerate(row.prompt)]
    places += list(zip(labels, row.responses))
    places += [(f"rating name {r['name']!r}", r["name"]) for r in row.ratings or ()]
    for where, text in places:
        if isinstance(text, str) and not _storable(text):
            bad = next(c for c in text if 0xD800 <= ord(c) <= 0xDFFF)
            return (
                f'unencodable text: {where} holds a lone surrogate U+{ord(bad):04X} (a "\\u{ord(bad):04x}" '
                f"escape without its pair), which is not valid Unicode"
            )
    return None


def row_identity(row: Row, source: str) -> str:
    # Labels are part of what a row says: the same pair judged the other way is a different row.
    labels = {
        "kind": row.kind,
        "tie": row.tie,
        "ranks": row.ranks,
        "ratings": [(r["name"], r["raw"]) for r in row.ratings] if row.ratings else None,
    }
    return ids.row_id(source, row.prompt, row.responses, labels)


def row_units(row: Row, rid: str, source: str, uri: str, source_row: int) -> list[dict]:
    pid = ids.prompt_id(row.prompt)
    prompt = [{"role": m["role"], "content": m["content"]} for m in row.prompt]
    n = len(row.responses)
    units = []
    for i, text in enumerate(row.responses):
        preference = None
        if row.kind == "preference" and not row.tie:
            preference = "chosen" if i == 0 else "rejected"
        units.append(
            {
                "unit_id": ids.unit_id(rid, i),
                "row_id": rid,
                "prompt_id": pid,
                "kind": row.kind,
                "source": source,
                "source_uri": uri,
                "source_row": source_row,
                "prompt": prompt,
                "response": text,
                "response_index": i,
                "n_responses": n,
                "preference": preference,
                "tie": bool(row.tie) if row.kind == "preference" else None,
                "label_confidence": row.label_confidence,
                "human_rank": row.ranks[i] if row.ranks is not None else None,
                "ratings": row.ratings if row.kind == "rated" else None,
                "quarantine_reason": None,
                "raw": None,
            }
        )
    return units


def quarantine_unit(reason: str, raw: str, source: str, uri: str, source_row: int, locator: str | None = None) -> dict:
    # Several bad rows of one record (an Open Assistant tree) are told apart by their locator.
    reason, raw, locator = storable_text(reason), storable_text(raw), storable_text(locator)
    rid = ids.bad_row_id(uri if locator is None else f"{uri}#{locator}", source_row)
    return {
        "unit_id": ids.unit_id(rid, 0),
        "row_id": rid,
        "prompt_id": None,
        "kind": None,
        "source": source,
        "source_uri": uri,
        "source_row": source_row,
        "prompt": None,
        "response": None,
        "response_index": 0,
        "n_responses": 0,
        "preference": None,
        "tie": None,
        "label_confidence": None,
        "human_rank": None,
        "ratings": None,
        "quarantine_reason": reason,
        "raw": (raw or "")[: schema.RAW_MAX_CHARS],
    }


class FileReader:
    """Reads one input: records -> rows of units, with the file-wide duplicate check.
    Also notes what jobs.inspect reports: the file format, the adapter of each record and the
    field use (since the last take_field_use)."""

    def __init__(self, spec: InputSpec, uri: str):
        self.spec = spec
        self.uri = uri
        self.allow_empty = bool(spec.options.get("allow_empty_response", False))
        self.adapter = None if spec.format == "auto" else spec.format
        self.seen: dict[str, int] = {}  # row_id -> source_row of its first occurrence
        self.file_format: str | None = None
        self.adapters_used: Counter = Counter()  # adapter -> records read with it
        self.field_use = FieldUse()

    def take_field_use(self) -> FieldUse:
        out, self.field_use = self.field_use, FieldUse()
        return out

    def source(self) -> str:
        if self.spec.source:
            return self.spec.source
        adapter = ADAPTERS.get(self.adapter) if self.adapter else None
        return (adapter.default_source if adapter else None) or dataset_source(self.uri)

    def records(self, limit_rows: int | None) -> Iterator[formats.Record]:
        file_format = self.file_format = file_format_of(self.uri, self.spec, is_dir=self._is_dir())
        if file_format is None:
            raise ValueError(f"cannot tell the file format of {self.uri}; set file_format in the input spec")
        it = formats.iter_records(self.uri, file_format, self.spec.storage_options, self.spec.options)
        count = 0
        while limit_rows is None or count < limit_rows:
            try:
                rec = next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - an input failing midway must not stop the others
                if count == 0:
                    raise
                yield formats.Record(-1, raw="", error=f"unreadable file after {count} rows ({type(e).__name__}: {e})")
                return
            count += 1
            yield rec

    def _is_dir(self) -> bool:
        fs, path = storage.filesystem(self.uri, self.spec.storage_options)
        return fs.isdir(path)

    def rows(self, limit_rows: int | None = None) -> Iterator[list[list[dict]]]:
        """Per record, its rows; each row is its list of units (shard columns not yet set)."""
        try:
            records = self.records(limit_rows)
            first = next(records, None)
        except Exception as e:  # noqa: BLE001 - a single bad file among good ones must not stop the others
            yield [[quarantine_unit(f"unreadable file: {type(e).__name__}: {e}", "", self.source(), self.uri, 0)]]
            return
        if first is None:
            return
        records = chain([first], records)
        if self.adapter is None:
            records = self._detect(records)
        last_index = -1
        for rec in records:
            if rec.index < 0:  # a failure after the last record: place it just after
                rec.index = last_index + 1
            last_index = rec.index
            yield self._record_rows(rec)

    def _detect(self, records: Iterator[formats.Record]) -> Iterator[formats.Record]:
        buffered = []
        for rec in records:
            buffered.append(rec)
            name = detect(rec.value) if rec.error is None else None
            if name or len(buffered) >= _DETECT_LOOKAHEAD:
                self.adapter = name
                break
        return chain(buffered, records)

    def _record_rows(self, rec: formats.Record) -> list[list[dict]]:
        source = self.source()
        if rec.error is not None:
            return [[quarantine_unit(rec.error, rec.raw_text(), source, self.uri, rec.index)]]
        if not isinstance(rec.value, dict):
            reason = f"wrong type: the record is {type(rec.value).__name__}, expected an object"
            return [[quarantine_unit(reason, rec.raw_text(), source, self.uri, rec.index)]]
        # In auto mode each record may name its own format (mixed files); a record whose fields name
        # none is read with the file's format, which says what is missing.
        adapter = (detect(rec.value) or self.adapter) if self.spec.format == "auto" else self.adapter
        if adapter is None:
            reason = (
                f"cannot tell the record's format from its fields {sorted(rec.value)[:20]}; "
                f"set format (one of {sorted(ADAPTERS)}) in the input spec"
            )
            return [[quarantine_unit(reason, rec.raw_text(), source, self.uri, rec.index)]]
        self.adapters_used[adapter] += 1
        value = TrackedRecord(rec.value)
        try:
            adapt = ADAPTERS[adapter].fn
            if adapt is not None:
                results = adapt(value, self.spec.options)
            elif self.spec.columns is not None:  # "mapping"; InputSpec requires its columns
                results = adapt_mapping(value, self.spec.options, self.spec.columns)
            else:
                raise ValueError(f"format {adapter!r} needs a column mapping")
        except QuarantineError as e:
            results = [e]
        except Exception as e:  # noqa: BLE001 - odd data must quarantine the record, not kill the read
            results = [QuarantineError(f"could not convert the record ({type(e).__name__}: {e})")]
        if not results:
            results = [QuarantineError("the record gives no rows")]
        rows = [self._row_units(r, rec, source) for r in results]
        if any(row[0]["quarantine_reason"] is None for row in rows):
            self.field_use.add(value)  # only records that gave labeled rows can lose labels silently
        return rows

    def _row_units(self, result, rec: formats.Record, source: str) -> list[dict]:
        if isinstance(result, QuarantineError):
            return [quarantine_unit(result.reason, rec.raw_text(), source, self.uri, rec.index, result.locator)]
        try:
            validate_row(result, self.allow_empty, self.spec.kind)
        except QuarantineError as e:
            return [quarantine_unit(e.reason, rec.raw_text(), source, self.uri, rec.index, result.locator)]
        try:
            rid = row_identity(result, source)  # hashes every text the row stores: the first UTF-8 encode
        except UnicodeEncodeError:
            reason = unstorable_text(result) or "unencodable text: the row holds text that is not valid Unicode"
            return [quarantine_unit(reason, rec.raw_text(), source, self.uri, rec.index, result.locator)]
        if rid in self.seen:
            reason = f"duplicate row: same content as source_row {self.seen[rid]} of this file (row_id {rid})"
            return [quarantine_unit(reason, rec.raw_text(), source, self.uri, rec.index, result.locator)]
        self.seen[rid] = rec.index
        return row_units(result, rid, source, self.uri, rec.index)


def iter_shards(
    spec: InputSpec, file_uri: str, rows_per_shard: int = 1024, limit_rows: int | None = None
) -> Iterator[list[dict]]:
    """Each shard's units (dicts matching UNIT_SCHEMA, shard columns set), in file order.
    `limit_rows` stops after that many records of the file (demos, smoke runs)."""
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be >= 1")
    reader = FileReader(spec, file_uri)
    reading = getattr(spec, "readings", {}).get(file_uri)  # set when other specs read this file too
    chunk, shard_records = 0, []

    def finish(records: list[list[list[dict]]], chunk_index: int) -> list[dict]:
        units = [u for rows in records for row in rows for u in row]
        sid = ids.shard_id(file_uri, chunk_index, reading)
        n_rows = sum(len(rows) for rows in records)
        for i, u in enumerate(units):
            u.update(shard_id=sid, shard_unit=i, shard_units=len(units), shard_rows=n_rows)
        units[0][FIELD_USE] = reader.take_field_use().to_dict()
        return units

    for rows in reader.rows(limit_rows):
        shard_records.append(rows)
        if len(shard_records) == rows_per_shard:
            yield finish(shard_records, chunk)
            chunk, shard_records = chunk + 1, []
    if shard_records:
        yield finish(shard_records, chunk)


def units_table(units: list[dict], field_use: bool = False) -> pa.Table:
    """UNIT_SCHEMA columns; with field_use, also the FIELD_USE column (null but on shard starts)."""
    table = pa.Table.from_pylist(units, schema=schema.UNIT_SCHEMA)
    if field_use:
        table = table.append_column(FIELD_USE, pa.array([u.get(FIELD_USE) for u in units], FIELD_USE_TYPE))
    return table


def as_specs(specs) -> list[InputSpec]:
    if isinstance(specs, (InputSpec, dict)):
        specs = [specs]
    return [InputSpec.from_dict(s) for s in specs]


def read_units(
    specs: InputSpec | dict | Iterable[InputSpec | dict], rows_per_shard: int = 1024, limit_rows: int | None = None
) -> pa.Table:
    """All units of small inputs as one table, in spec, file and row order (no Ray)."""
    resolved = as_specs(specs)
    tables = [
        units_table(units)
        for spec, uris in zip(resolved, expand_all(resolved))
        for uri in uris
        for units in iter_shards(spec, uri, rows_per_shard, limit_rows)
    ]
    if not tables:
        return schema.UNIT_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def summarize(table: pa.Table) -> dict[str, dict]:
    """Per-source counts: rows_in = rows_ok + rows_quarantined; units counts every unit
    (a quarantined row is one unit), units_ok the good ones."""
    out: dict[str, dict] = {}
    if table.num_rows == 0:
        return out
    sources = table.column("source").to_pylist()
    bad = pc.is_valid(table.column("quarantine_reason")).to_pylist()
    first = pc.equal(table.column("response_index"), 0).to_pylist()
    reasons = table.column("quarantine_reason").to_pylist()
    for src, is_bad, is_first, reason in zip(sources, bad, first, reasons):
        s = out.setdefault(
            src,
            {
                "rows_in": 0,
                "rows_ok": 0,
                "rows_quarantined": 0,
                "units": 0,
                "units_ok": 0,
                "quarantine_reasons": Counter(),
            },
        )
        s["units"] += 1
        if is_bad:
            s["rows_in"] += 1
            s["rows_quarantined"] += 1
            s["quarantine_reasons"][_reason_kind(reason)] += 1
        else:
            s["units_ok"] += 1
            if is_first:
                s["rows_in"] += 1
                s["rows_ok"] += 1
    for s in out.values():
        s["quarantine_reasons"] = dict(s["quarantine_reasons"])
    return out


def _reason_kind(reason: str) -> str:
    """The reason's leading phrase ("malformed JSON", "missing field 'x'"), to group counts."""
    head = reason.split(":", 1)[0]
    return head.split(" on line ")[0].split(" in element ")[0]
