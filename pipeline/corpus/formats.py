"""File formats: turn one input (a file or a `save_to_disk` folder) into a stream of records.

Every format streams: JSON Lines line by line, JSON arrays element by element, CSV/TSV record
by record, Parquet and Arrow by record batches, so no input is held in memory whole. A record is
either a parsed value or the reason it could not be read; an unreadable part of a file (a
truncated gzip tail, broken JSON after which the array cannot be resynchronised) becomes one
error record, so the rows read before it are kept and nothing is lost without a trace.
A UTF-8 byte-order mark at the start of a text file is skipped; invalid UTF-8 (and, in Parquet
and Arrow, string columns holding it) is one error record per row.
"""

from __future__ import annotations

import codecs
import csv
import json
import posixpath
import re
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

CHUNK_BYTES = 1 << 20
INFLATE_STEP_BYTES = 1 << 14
PARQUET_BATCH_ROWS = 1024


@dataclass
class Record:
    index: int  # 0-based line (JSONL), element (JSON array) or row (Parquet/Arrow)
    value: Any = None  # the parsed record when readable
    raw: str | None = None  # its raw text, when the format has one
    error: str | None = None  # why it could not be read (then value is None)

    def raw_text(self) -> str:
        if self.raw is not None:
            return self.raw
        try:
            return json.dumps(self.value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return repr(self.value)


class CorruptStream(Exception):
    """The byte stream cannot be read past this point (truncated or corrupt compression, I/O error)."""


def _byte_chunks(f, compressed: bool) -> Iterator[bytes]:
    """Raw or gunzipped bytes in chunks; raises CorruptStream where the stream breaks, after
    yielding everything that could be decompressed before that point."""
    if not compressed:
        while True:
            try:
                chunk = f.read(CHUNK_BYTES)
            except OSError as e:
                raise CorruptStream(f"unreadable file: read error ({e})") from e
            if not chunk:
                return
            yield chunk
    # Manual inflate (instead of gzip.GzipFile) so that every byte before a truncation is kept,
    # and concatenated gzip members are read in turn.
    inflater = zlib.decompressobj(wbits=31)
    started = False
    while True:
        try:
            chunk = f.read(CHUNK_BYTES)
        except OSError as e:
            raise CorruptStream(f"unreadable file: read error ({e})") from e
        if not chunk:
            if started and not inflater.eof:
                raise CorruptStream("truncated compressed file: the gzip stream ends before its end marker")
            return
        view, offset = memoryview(chunk), 0
        while offset < len(view):
            started = True
            # Inflate in small steps: when corrupt data raises, only the current step's output is lost.
            piece = view[offset : offset + INFLATE_STEP_BYTES]
            offset += len(piece)
            try:
                out = inflater.decompress(piece)
            except zlib.error as e:
                raise CorruptStream(f"corrupt compressed file: {e}") from e
            if out:
                yield out
            if inflater.eof:
                # The next gzip member, if any, starts in the unused bytes (zero padding allowed).
                rest = (inflater.unused_data + bytes(view[offset:])).lstrip(b"\x00")
                view, offset = memoryview(rest), 0
                inflater = zlib.decompressobj(wbits=31)
                started = False


def _is_gzip(uri: str) -> bool:
    return uri.lower().endswith(".gz")


UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _without_bom(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The bytes of a text file without a leading UTF-8 byte-order mark (editors and Excel write
    one; json.loads and the CSV header would otherwise see it as data). A UTF-16 mark means the
    whole file is in another encoding: one clear error instead of a quarantine per line."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= len(UTF8_BOM):
            break
    if head.startswith(UTF8_BOM):
        head = head[len(UTF8_BOM) :]
    elif head.startswith(_UTF16_BOMS):
        raise CorruptStream(
            "unreadable file: it is UTF-16 encoded (byte-order mark at its start); only UTF-8 is read, convert it first"
        )
    if head:
        yield head
    yield from chunks


def _cut(text: str, limit: int = 4096) -> str:
    return text if len(text) <= limit else text[:limit]


def iter_jsonl(f, uri: str) -> Iterator[Record]:
    """One record per non-blank line; blank lines are layout, not rows (they still count in line numbers)."""
    line_no = 0
    pending = b""
    try:
        for chunk in _without_bom(_byte_chunks(f, _is_gzip(uri))):
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop()
            for line in lines:
                rec = _jsonl_record(line, line_no)
                line_no += 1
                if rec is not None:
                    yield rec
    except CorruptStream as e:
        tail = pending.decode("utf-8", "replace")
        yield Record(line_no, raw=_cut(tail), error=f"{e}: rows from line {line_no + 1} on could not be read")
        return
    if pending:
        rec = _jsonl_record(pending, line_no)
        if rec is not None:
            yield rec


def _jsonl_record(line: bytes, line_no: int) -> Record | None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(
            line_no,
            raw=_cut(line.decode("utf-8", "replace")),
            error=f"undecodable bytes (invalid UTF-8) on line {line_no + 1} at byte {e.start}",
        )
    if not text.strip():
        return None
    try:
        return Record(line_no, value=json.loads(text), raw=text)
    except json.JSONDecodeError as e:
        return Record(
            line_no, raw=_cut(text), error=f"malformed JSON on line {line_no + 1}: {e.msg} (column {e.colno})"
        )
    except RecursionError:
        return Record(line_no, raw=_cut(text), error=f"malformed JSON on line {line_no + 1}: nested too deeply")


class _TextStream:
    """Decoded text of a byte stream, read on demand; invalid UTF-8 becomes lone surrogates so
    that it can be pinned to the element that holds it."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buf = ""
        self.eof = False

    def more(self, at_least: int = 0) -> bool:
        """Append at least one more chunk (and at least `at_least` characters when available)."""
        target = len(self.buf) + max(at_least, 1)
        while not self.eof and len(self.buf) < target:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.eof = True
                self.buf += self._decoder.decode(b"", final=True)
            else:
                self.buf += self._decoder.decode(chunk)
        return not self.eof or len(self.buf) >= target

    def drop(self, n: int) -> None:
        self.buf = self.buf[n:]


def _skip_ws(s: _TextStream, pos: int) -> int:
    """Position of the next non-blank character (reading more as needed; the consumed text before
    `pos` may be dropped, so use the returned position)."""
    while True:
        while pos < len(s.buf) and s.buf[pos] in " \t\r\n":
            pos += 1
        if pos < len(s.buf) or s.eof:
            return pos
        s.drop(pos)
        pos = 0
        s.more()


_UNDECODABLE_RE = re.compile("[\udc80-\udcff]")  # surrogateescape puts each invalid byte here


def iter_json(f, uri: str) -> Iterator[Record]:
    """Elements of a top-level JSON array, parsed one at a time. A file that does not start with
    '[' is read as JSON Lines (a common naming slip)."""
    stream = _TextStream(_without_bom(_byte_chunks(f, _is_gzip(uri))))
    decoder = json.JSONDecoder()
    index = 0
    pos = 0
    try:
        pos = _skip_ws(stream, 0)
        if pos >= len(stream.buf):
            return  # empty file: no rows
        if stream.buf[pos] != "[":
            yield from _json_text_as_lines(stream, pos)
            return
        pos += 1
        expect_value = True
        while True:
            pos = _skip_ws(stream, pos)
            if pos >= len(stream.buf):
                yield Record(index, raw="", error=f"malformed JSON: the array ends without ']' after element {index}")
                return
            c = stream.buf[pos]
            if c == "]" and (index == 0 or not expect_value):
                return
            if not expect_value:
                if c != ",":
                    yield _json_tail(stream, pos, index, f"expected ',' or ']' after element {index - 1}, found {c!r}")
                    return
                pos += 1
                expect_value = True
                continue
            while True:
                try:
                    value, end = decoder.raw_decode(stream.buf, pos)
                    # A number or literal cut at the buffer's edge parses as a shorter value: make sure
                    # the value is followed by something (or the file ends) before trusting it.
                    if end >= len(stream.buf) and not stream.eof:
                        raise ValueError("value at end of buffer")
                    break
                except (ValueError, RecursionError) as e:
                    if stream.eof:
                        yield _json_tail(stream, pos, index, str(e))
                        return
                    stream.drop(pos)  # consumed text goes only when the window must grow
                    pos = 0
                    stream.more(at_least=len(stream.buf))  # double the window: linear time on long elements
            if _UNDECODABLE_RE.search(stream.buf, pos, end):
                text = stream.buf[pos:end].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                yield Record(index, raw=_cut(text), error=f"undecodable bytes (invalid UTF-8) in element {index}")
            else:
                yield Record(index, value=value, raw=None)
            index += 1
            pos = end
            expect_value = False
    except CorruptStream as e:
        yield Record(index, raw=_cut(stream.buf[pos:]), error=f"{e}: elements from {index} on could not be read")


def _json_tail(stream: _TextStream, pos: int, index: int, why: str) -> Record:
    return Record(
        index,
        raw=_cut(stream.buf[pos:]),
        error=f"malformed JSON in element {index} ({why}); the rest of the array cannot be parsed",
    )


def _json_text_as_lines(stream: _TextStream, pos: int) -> Iterator[Record]:
    line_no = stream.buf.count("\n", 0, pos)  # blank lines before the first value still count
    pos = stream.buf.rfind("\n", 0, pos) + 1
    while True:
        nl = stream.buf.find("\n", pos)
        while nl < 0 and not stream.eof:
            stream.drop(pos)
            pos = 0
            stream.more()
            nl = stream.buf.find("\n", pos)
        end = len(stream.buf) if nl < 0 else nl
        rec = _jsonl_record(stream.buf[pos:end].encode("utf-8", "surrogateescape"), line_no)
        if rec is not None:
            yield rec
        line_no += 1
        if nl < 0:
            return
        pos = nl + 1


def _batch_records(batch: pa.RecordBatch, start: int) -> list[Record]:
    """A record batch's rows. Arrow does not validate UTF-8 when reading, so a string column may
    hold invalid bytes (written by another tool): only the rows holding them become error records."""
    try:
        return [Record(start + i, value=row) for i, row in enumerate(batch.to_pylist())]
    except UnicodeDecodeError:
        pass
    out = []
    for i in range(batch.num_rows):
        row, bad = {}, []
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                row[name] = column[i].as_py()
            except UnicodeDecodeError:
                bad.append(name)
        if bad:
            out.append(
                Record(
                    start + i,
                    raw=_cut(json.dumps({k: row[k] for k in row}, ensure_ascii=False, default=str)),
                    error=f"undecodable bytes (invalid UTF-8) in column(s) {bad} of row {start + i}",
                )
            )
        else:
            out.append(Record(start + i, value=row))
    return out


def iter_parquet(f, uri: str) -> Iterator[Record]:
    index = 0
    try:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from _batch_records(batch, index)
            index += batch.num_rows
    except (OSError, pa.ArrowException) as e:
        yield Record(index, raw="", error=f"corrupt Parquet file: rows from {index} on could not be read ({e})")


# --- CSV / TSV -------------------------------------------------------------------------------------
# Python's csv module rather than pyarrow.csv: what matters here is per-row quarantine. pyarrow
# reads whole blocks, types the columns (a cell "1" would no longer be the string the adapters
# expect) and on a broken quote either fails the block or swallows the rows after it; the csv
# module parses one record at a time with exact line numbers, so a broken record can be cut out
# and reading resumed on the next line. It is C code, not the bottleneck next to a model.
CSV_FIELD_LIMIT = 1 << 24  # characters per cell (the module's default, 128 Ki, is short for LLM text)


@dataclass
class _Line:
    number: int  # 0-based physical line
    text: str  # with its line ending (the csv module needs it)
    bad_byte: int | None  # offset of the first invalid UTF-8 byte, if any


def _byte_lines(f, uri: str) -> Iterator[bytes]:
    pending = b""
    for chunk in _without_bom(_byte_chunks(f, _is_gzip(uri))):
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


class _ReplayableLines:
    """Decoded physical lines fed to csv.reader. The lines of the record being parsed are kept,
    so that after a quoting error all but its first line can be fed again."""

    def __init__(self, raw: Iterator[bytes]):
        self.raw = raw
        self.replay: deque[_Line] = deque()
        self.current: list[_Line] = []
        self.next_number = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.replay:
            line = self.replay.popleft()
        else:
            data = next(self.raw)
            try:
                line = _Line(self.next_number, data.decode("utf-8"), None)
            except UnicodeDecodeError as e:
                line = _Line(self.next_number, data.decode("utf-8", "replace"), e.start)
            self.next_number += 1
        self.current.append(line)
        return line.text


def _header_names(fields: list[str]) -> list[str]:
    """Column names as pandas gives them: an empty name is "Unnamed: i", a repeated one "name.1"."""
    out: list[str] = []
    seen: Counter[str] = Counter()
    for i, name in enumerate(fields):
        name = name or f"Unnamed: {i}"
        base = name
        while name in seen:
            name = f"{base}.{seen[base]}"
            seen[base] += 1
        seen[name] += 1
        out.append(name)
    return out


def _iter_delimited(f, uri: str, delimiter: str) -> Iterator[Record]:
    """Records of a delimited text file: the first record is the header, every later one a dict of
    strings (column -> cell). Record.index counts data records (header and blank lines excluded).

    A record with broken quoting (text after a closing quote, a quote never closed) is one error
    record made of its first line only, and parsing resumes on the next line: a quote left open
    cannot swallow the rows after it. A record with the wrong number of fields, or invalid UTF-8,
    is one error record. A broken header leaves nothing readable: one error record for the file.
    """
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide; only ever raised
    lines = _ReplayableLines(_byte_lines(f, uri))

    def parser():
        return csv.reader(lines, delimiter=delimiter, quotechar='"', doublequote=True, strict=True)

    reader, header, index = parser(), None, 0
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        while True:
            lines.current = []
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                first, rest = lines.current[0], lines.current[1:]
                lines.replay.extendleft(reversed(rest))
                reader = parser()  # a fresh parser: no quoting state carried over
                if header is None:
                    yield Record(
                        0,
                        raw=_cut(first.text),
                        error=f"malformed {kind} header on line {first.number + 1}: "
                        f"{e}; the file cannot be read without it",
                    )
                    return
                yield Record(
                    index,
                    raw=_cut(first.text.rstrip("\r\n")),
                    error=f"malformed {kind} on line {first.number + 1}: {e} (broken quoting)",
                )
                index += 1
                continue
            consumed = lines.current
            if not fields or (len(fields) == 1 and not fields[0].strip() and len(consumed) == 1):
                continue  # blank lines are layout, not rows
            raw = "".join(line.text for line in consumed).rstrip("\r\n")
            bad = next((line for line in consumed if line.bad_byte is not None), None)
            where = f"line {consumed[0].number + 1}"
            if header is None:
                if bad is not None:
                    yield Record(0, raw=_cut(raw), error=f"undecodable bytes (invalid UTF-8) in the {kind} header")
                    return
                header = _header_names(fields)
                continue
            if bad is not None:
                yield Record(
                    index,
                    raw=_cut(raw),
                    error=f"undecodable bytes (invalid UTF-8) on line {bad.number + 1} at byte {bad.bad_byte}",
                )
            elif len(fields) != len(header):
                yield Record(
                    index,
                    raw=_cut(raw),
                    error=f"wrong field count on {where}: {len(fields)} fields, the header has {len(header)}",
                )
            else:
                yield Record(index, value=dict(zip(header, fields)), raw=raw)
            index += 1
    except CorruptStream as e:
        yield Record(index, raw="", error=f"{e}: rows from data row {index} on could not be read")


def iter_csv(f, uri: str) -> Iterator[Record]:
    return _iter_delimited(f, uri, ",")


def iter_tsv(f, uri: str) -> Iterator[Record]:
    return _iter_delimited(f, uri, "\t")


def hf_arrow_files(fs, path: str, split: str | list[str] | None = None) -> list[str]:
    """The Arrow files of a `save_to_disk` folder, in dataset order (splits in their saved order)."""
    if fs.exists(posixpath.join(path, "dataset_dict.json")):
        with fs.open(posixpath.join(path, "dataset_dict.json"), "rb") as fh:
            splits = json.loads(fh.read())["splits"]
        wanted = [split] if isinstance(split, str) else (split or splits)
        missing = [s for s in wanted if s not in splits]
        if missing:
            raise ValueError(f"split(s) {missing} not in this DatasetDict (has {splits})")
        return [f for s in wanted for f in hf_arrow_files(fs, posixpath.join(path, s))]
    with fs.open(posixpath.join(path, "state.json"), "rb") as fh:
        state = json.loads(fh.read())
    return [posixpath.join(path, d["filename"]) for d in state["_data_files"]]


def iter_hf_dataset(fs, path: str, split=None) -> Iterator[Record]:
    index = 0
    try:
        for arrow_path in hf_arrow_files(fs, path, split):
            with fs.open(arrow_path, "rb") as fh:
                reader = pa.ipc.open_stream(fh)
                for batch in reader:
                    yield from _batch_records(batch, index)
                    index += batch.num_rows
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        yield Record(index, raw="", error=f"corrupt datasets folder: rows from {index} on could not be read ({e})")


def iter_records(
    uri: str, file_format: str, storage_options: dict | None = None, options: dict | None = None
) -> Iterator[Record]:
    """Records of one input. Raises OSError (or another exception) only when the input cannot be
    opened at all; the caller turns that into one quarantined row."""
    fs, path = storage.filesystem(uri, storage_options)
    if file_format == "hf_dataset":
        yield from iter_hf_dataset(fs, path, (options or {}).get("split"))
        return
    readers = {"jsonl": iter_jsonl, "json": iter_json, "parquet": iter_parquet, "csv": iter_csv, "tsv": iter_tsv}
    if file_format not in readers:
        raise ValueError(f"unknown file format {file_format!r} for {uri} (set file_format in the input spec)")
    with fs.open(path, "rb") as f:
        yield from readers[file_format](f, uri)
