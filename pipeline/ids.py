"""Stable identifiers: the same content and source give the same id on every run and machine."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        # JSON with sorted keys is a canonical text form for dicts/lists/strings/numbers.
        text = json.dumps(part, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        h.update(text.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def prompt_id(prompt: list[dict]) -> str:
    """Groups every response to the same prompt messages, across files, sources and nodes."""
    return _digest("prompt", [(m["role"], m["content"]) for m in prompt])


def row_id(source: str, prompt: list[dict], responses: list[str], extra: Any = None) -> str:
    """Id of one normalised input row: derived from its source name and its content only
    (not from file names or line numbers, so moving or re-sharding files keeps ids). One file read
    under two specs gives two sources (pipeline.corpus.spec.assign_readings makes their names
    differ), so the two readings of one row never share an id."""
    return _digest("row", source, [(m["role"], m["content"]) for m in prompt], responses, extra)


def bad_row_id(source_uri: str, source_row: int) -> str:
    """Id of a row that could not be parsed: its location is all we know."""
    return _digest("bad", source_uri, source_row)


def unit_id(row: str, response_index: int) -> str:
    return f"{row}-{response_index}"


def shard_id(source_uri: str, chunk: int, reading: str | None = None) -> str:
    """A shard is a chunk of consecutive rows of one input file read under one input spec;
    output files are named after it.

    `reading` tells apart the readings of one file under several specs of a run (one file as
    `pku_saferlhf` and as `pku_saferlhf_safer`): the source name each of them writes, which
    pipeline.corpus.spec.assign_readings requires to differ. A file read by one spec has no
    qualifier, so its shard ids are those of every earlier version (runs resume across versions).
    """
    stem = source_uri.rstrip("/").rsplit("/", 1)[-1]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40]
    digest = _digest("file", source_uri) if reading is None else _digest("file", source_uri, reading)
    return f"{safe}-{digest[:10]}-c{chunk:05d}"


def spec_key(identity: dict) -> str:
    """Short id of an input spec's reading (pipeline.corpus.spec.InputSpec.identity): what the
    incremental skip records next to each input file, so one file read under two specs is two
    inputs to remember."""
    return _digest("spec", identity)


def in_fraction(key: str, fraction: float, salt: str) -> bool:
    """Deterministic membership of `key` in a `fraction` of all keys (train/test and fit/validation
    splits): the same key always lands on the same side, on any machine; `salt` makes splits of
    different purposes independent of each other."""
    bucket = int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:8], 16) % 10_000
    return bucket < int(round(fraction * 10_000))
