"""Exactly-once output, as pure bookkeeping.

Output files are named after the input shard and the range of units they hold
(`<shard_id>-<first>-<last>.parquet`), so a retried write task rewrites the same file instead
of adding one. The driver collects one summary per written range; a shard is complete when its
ranges cover 0 .. shard_units-1 exactly once, and only then is its marker written. On resume,
shards with a marker are skipped and every part file of a shard without one is deleted first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PART_SUFFIX = ".parquet"


def part_name(shard_id: str, first: int, last: int) -> str:
    return f"{shard_id}-{first:07d}-{last:07d}{PART_SUFFIX}"


def shard_of_part(file_name: str) -> str:
    """Inverse of part_name for the shard id (shard ids themselves contain dashes)."""
    stem = file_name[: -len(PART_SUFFIX)] if file_name.endswith(PART_SUFFIX) else file_name
    return stem.rsplit("-", 2)[0]


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


class ExactlyOnceViolation(RuntimeError):
    pass


@dataclass
class ShardProgress:
    shard_units: int
    ranges: list[tuple[int, int]] = field(default_factory=list)
    covered: int = 0
    totals: dict = field(default_factory=dict)

    def add(self, first: int, last: int) -> None:
        for a, b in self.ranges:
            if first <= b and a <= last:
                raise ExactlyOnceViolation(f"units {first}-{last} overlap units {a}-{b} already written")
        self.ranges.append((first, last))
        self.covered += last - first + 1

    @property
    def complete(self) -> bool:
        return self.covered == self.shard_units


class ShardLedger:
    """Collects written ranges per shard and says when a shard is complete."""

    COUNTERS = ("units", "labeled_units", "quarantined_units", "rows_labeled", "rows_quarantined", "tokens")
    OPTIONAL_COUNTERS = ("computed_tokens", "useful_tokens")  # scoring-pass accounting (0 when absent)

    def __init__(self) -> None:
        self.shards: dict[str, ShardProgress] = {}

    def add(self, summary: dict) -> ShardProgress | None:
        """Record one written range; returns the shard's progress when this completed it."""
        sid = summary["shard_id"]
        prog = self.shards.get(sid)
        if prog is None:
            prog = self.shards[sid] = ShardProgress(int(summary["shard_units"]))
            prog.totals = {
                "shard_id": sid,
                "source": summary["source"],
                "source_uri": summary["source_uri"],
                "shard_rows": int(summary["shard_rows"]),
                "shard_units": int(summary["shard_units"]),
                "files": [],
                **{k: 0 for k in self.COUNTERS + self.OPTIONAL_COUNTERS},
            }
        prog.add(int(summary["first"]), int(summary["last"]))
        for k in self.COUNTERS:
            prog.totals[k] += int(summary[k])
        for k in self.OPTIONAL_COUNTERS:
            prog.totals[k] += int(summary.get(k) or 0)
        prog.totals["files"].extend(summary["files"])
        if prog.covered > prog.shard_units:
            raise ExactlyOnceViolation(f"shard {sid}: {prog.covered} units written, only {prog.shard_units} exist")
        return prog if prog.complete else None

    def incomplete(self) -> list[str]:
        return sorted(s for s, p in self.shards.items() if not p.complete)
