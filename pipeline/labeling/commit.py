"""Exactly-once output, as pure bookkeeping.

Output files are named after the input shard and the range of units they hold
(`<shard_id>-<first>-<last>.parquet`), so a retried write task rewrites the same file instead
of adding one. The write stage returns one RangeSummary per written range (as Arrow rows of RANGE_SCHEMA: typed
columns, counts as maps, no JSON); the driver feeds them to the ShardLedger. A shard is complete when its
ranges cover 0 .. shard_units-1 exactly once, and only then is its marker written (markers follow
data). Readers take only parts of shards with a marker (pipeline.storage.run_data_files). On
resume, shards with a marker are skipped, and every part file no marker names, temporary file and
unfinished multipart upload under the run is removed first (pipeline.labeling.run).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa

from pipeline.corpus.field_use import FieldUse

# The part-file naming is the run layout's, which every reader shares (pipeline.storage).
from pipeline.storage import PART_SUFFIX, part_name, shard_of_part  # noqa: F401 - re-exported


def contiguous_runs(indices: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """Split unit indices into maximal runs of consecutive values.

    Returns (first, last, positions) with positions into `indices`, each run sorted by index.
    """
    if len(indices) == 0:
        return []
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    if np.any(np.diff(sorted_idx) == 0):
        dup = int(sorted_idx[np.nonzero(np.diff(sorted_idx) == 0)[0][0]])
        raise ValueError(f"unit {dup} appears twice in one batch")
    breaks = np.nonzero(np.diff(sorted_idx) != 1)[0] + 1
    runs = []
    for chunk in np.split(np.arange(len(sorted_idx)), breaks):
        runs.append((int(sorted_idx[chunk[0]]), int(sorted_idx[chunk[-1]]), order[chunk]))
    return runs


@dataclass
class RangeSummary:
    """What the write stage reports for one written range of a shard's units: the contract between
    the write stage (which builds them) and the driver's ledger (which sums them per shard)."""

    shard_id: str
    first: int  # first and last unit index (within the shard) of the range
    last: int
    source: str
    source_uri: str
    shard_units: int  # the shard's totals, repeated on each of its ranges
    shard_rows: int
    units: int
    labeled_units: int
    quarantined_units: int
    rows_labeled: int
    rows_quarantined: int
    tokens: int  # the labeled units' own token counts
    computed_tokens: int  # scoring-pass accounting (see manifest.token_accounting)
    useful_tokens: int
    storage_retries: int  # storage requests retried while this range was read and written
    reasons: dict[str, int]  # quarantine reason -> units
    scored_on: dict[str, int]  # node -> units (the run's first scoring stage)
    # "<stage>@<node>" -> units, for every scoring stage (the backbone's `embed_score`, each reward
    # model's `rm_<name>`): which model scored where, when several pools run on different nodes
    scored_by_stage: dict[str, int]
    scored_from: float | None  # the range's scoring calls: earliest start, latest end (unix s)
    scored_until: float | None
    fields_present: dict[str, int] | None  # the reader's field use of the shard (on its first range)
    fields_read: list[str] | None
    files: list[str]

    def field_use(self) -> FieldUse:
        if self.fields_present is None and self.fields_read is None:
            return FieldUse()
        return FieldUse(Counter(self.fields_present or {}), set(self.fields_read or ()))

    def to_row(self) -> dict:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in MAP_FIELDS:  # Arrow maps are lists of (key, value) pairs
            row[k] = None if row[k] is None else sorted(row[k].items())
        return row

    @classmethod
    def from_row(cls, row: dict) -> RangeSummary:
        d = dict(row)
        for k in MAP_FIELDS:
            d[k] = None if d[k] is None else dict(d[k])
        return cls(**d)


_COUNTS = pa.map_(pa.string(), pa.int64())
MAP_FIELDS = ("reasons", "scored_on", "scored_by_stage", "fields_present")
RANGE_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("first", pa.int64()),
        ("last", pa.int64()),
        ("source", pa.string()),
        ("source_uri", pa.string()),
        ("shard_units", pa.int64()),
        ("shard_rows", pa.int64()),
        ("units", pa.int64()),
        ("labeled_units", pa.int64()),
        ("quarantined_units", pa.int64()),
        ("rows_labeled", pa.int64()),
        ("rows_quarantined", pa.int64()),
        ("tokens", pa.int64()),
        ("computed_tokens", pa.int64()),
        ("useful_tokens", pa.int64()),
        ("storage_retries", pa.int64()),
        ("reasons", _COUNTS),
        ("scored_on", _COUNTS),
        ("scored_by_stage", _COUNTS),
        ("scored_from", pa.float64()),
        ("scored_until", pa.float64()),
        ("fields_present", _COUNTS),
        ("fields_read", pa.list_(pa.string())),
        ("files", pa.list_(pa.string())),
    ]
)


def summaries_table(summaries: list[RangeSummary]) -> pa.Table:
    return pa.Table.from_pylist([s.to_row() for s in summaries], schema=RANGE_SCHEMA)


def summaries_of(table: pa.Table) -> list[RangeSummary]:
    return [RangeSummary.from_row(row) for row in table.to_pylist()]


class ExactlyOnceViolation(RuntimeError):
    pass


def widen_window(window: list[float], start: float | None, end: float | None) -> list[float]:
    """[earliest start, latest end] of scoring calls, widened by one more call's (a range without
    scored units, start and end None, leaves it as it is); [] is no call yet."""
    if start is None or end is None:
        return window
    return [min(window[0], start), max(window[1], end)] if window else [start, end]


@dataclass
class ShardProgress:
    shard_units: int
    ranges: list[tuple[int, int]] = field(default_factory=list)
    covered: int = 0
    totals: dict = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    scored_on: Counter = field(default_factory=Counter)
    scored_by_stage: Counter = field(default_factory=Counter)
    window: list[float] = field(default_factory=list)  # its scoring calls (widen_window)
    fields: FieldUse = field(default_factory=FieldUse)

    def add(self, first: int, last: int) -> None:
        if not 0 <= first <= last < self.shard_units:
            # a range outside the shard would count as coverage while units inside stay missing
            raise ExactlyOnceViolation(f"units {first}-{last} are not a range of a {self.shard_units}-unit shard")
        for a, b in self.ranges:
            if first <= b and a <= last:
                raise ExactlyOnceViolation(f"units {first}-{last} overlap units {a}-{b} already written")
        self.ranges.append((first, last))
        self.covered += last - first + 1

    @property
    def complete(self) -> bool:
        return self.covered == self.shard_units

    def marker(self) -> dict:
        """The shard's commit marker (JSON): its totals, quarantine reasons, scoring nodes and the
        reader's field use."""
        return {
            **self.totals,
            "reasons": dict(self.reasons),
            "scored_on": dict(self.scored_on),
            "scored_by_stage": dict(self.scored_by_stage),
            "scored_from": self.window[0] if self.window else None,
            "scored_until": self.window[1] if self.window else None,
            "record_fields": self.fields.to_dict(),
        }


class ShardLedger:
    """Collects written ranges per shard and says when a shard is complete."""

    COUNTERS = (
        "units",
        "labeled_units",
        "quarantined_units",
        "rows_labeled",
        "rows_quarantined",
        "tokens",
        "computed_tokens",
        "useful_tokens",
        "storage_retries",
    )

    def __init__(self) -> None:
        self.shards: dict[str, ShardProgress] = {}

    def add(self, summary: RangeSummary) -> ShardProgress | None:
        """Record one written range; returns the shard's progress when this completed it."""
        sid = summary.shard_id
        prog = self.shards.get(sid)
        if prog is None:
            prog = self.shards[sid] = ShardProgress(summary.shard_units)
            prog.totals = {
                "shard_id": sid,
                "source": summary.source,
                "source_uri": summary.source_uri,
                "shard_rows": summary.shard_rows,
                "shard_units": summary.shard_units,
                "files": [],
                **{k: 0 for k in self.COUNTERS},
            }
        prog.add(summary.first, summary.last)
        for k in self.COUNTERS:
            prog.totals[k] += int(getattr(summary, k))
        prog.totals["files"].extend(summary.files)
        prog.reasons.update(summary.reasons)
        prog.scored_on.update(summary.scored_on)
        prog.scored_by_stage.update(summary.scored_by_stage)
        prog.window = widen_window(prog.window, summary.scored_from, summary.scored_until)
        prog.fields.merge(summary.field_use())
        if prog.covered > prog.shard_units:
            raise ExactlyOnceViolation(f"shard {sid}: {prog.covered} units written, only {prog.shard_units} exist")
        return prog if prog.complete else None

    def incomplete(self) -> list[str]:
        return sorted(s for s, p in self.shards.items() if not p.complete)
