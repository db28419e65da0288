"""File formats: turn one input (a file or a `save_to_disk` folder) into a stream of records.

Every format streams: JSON Lines line by line, JSON arrays element by element, Parquet and
Arrow by record batches, so no input is held in memory whole. A record is either a parsed value
or the reason it could not be read; an unreadable part of a file (a truncated gzip tail, broken
JSON after which the array cannot be resynchronised) becomes one error record, so the rows read
before it are kept and nothing is lost without a trace.
"""

from __future__ import annotations

import codecs
import json
import posixpath
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

CHUNK_BYTES = 1 << 20
INFLATE_STEP_BYTES = 1 << 14
PARQUET_BATCH_ROWS = 1024


@dataclass
class Record:
    index: int                 # 0-based line (JSONL), element (JSON array) or row (Parquet/Arrow)
    value: Any = None          # the parsed record when readable
    raw: str | None = None     # its raw text, when the format has one
    error: str | None = None   # why it could not be read (then value is None)

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
            piece = view[offset: offset + INFLATE_STEP_BYTES]
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


def _cut(text: str, limit: int = 4096) -> str:
    return text if len(text) <= limit else text[:limit]


def iter_jsonl(f, uri: str) -> Iterator[Record]:
    """One record per non-blank line; blank lines are layout, not rows (they still count in line numbers)."""
    line_no = 0
    pending = b""
    try:
        for chunk in _byte_chunks(f, _is_gzip(uri)):
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
        return Record(line_no, raw=_cut(line.decode("utf-8", "replace")),
                      error=f"undecodable bytes (invalid UTF-8) on line {line_no + 1} at byte {e.start}")
    if not text.strip():
        return None
    try:
        return Record(line_no, value=json.loads(text), raw=text)
    except json.JSONDecodeError as e:
        return Record(line_no, raw=_cut(text), error=f"malformed JSON on line {line_no + 1}: {e.msg} (column {e.colno})")
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
    stream = _TextStream(_byte_chunks(f, _is_gzip(uri)))
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
    return Record(index, raw=_cut(stream.buf[pos:]),
                  error=f"malformed JSON in element {index} ({why}); the rest of the array cannot be parsed")


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


def iter_parquet(f, uri: str) -> Iterator[Record]:
    index = 0
    try:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield Record(index, value=row)
                index += 1
    except (OSError, pa.ArrowException) as e:
        yield Record(index, raw="", error=f"corrupt Parquet file: rows from {index} on could not be read ({e})")


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
                    for row in batch.to_pylist():
                        yield Record(index, value=row)
                        index += 1
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        yield Record(index, raw="", error=f"corrupt datasets folder: rows from {index} on could not be read ({e})")


def iter_records(uri: str, file_format: str, storage_options: dict | None = None,
                 options: dict | None = None) -> Iterator[Record]:
    """Records of one input. Raises OSError (or another exception) only when the input cannot be
    opened at all; the caller turns that into one quarantined row."""
    fs, path = storage.filesystem(uri, storage_options)
    if file_format == "hf_dataset":
        yield from iter_hf_dataset(fs, path, (options or {}).get("split"))
        return
    readers = {"jsonl": iter_jsonl, "json": iter_json, "parquet": iter_parquet}
    if file_format not in readers:
        raise ValueError(f"unknown file format {file_format!r} for {uri} (set file_format in the input spec)")
    with fs.open(path, "rb") as f:
        yield from readers[file_format](f, uri)
