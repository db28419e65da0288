"""Which fields of a record the adapter read, so that labels a mapping leaves behind are reported.

A record that carries a rating or a winner column the adapter never looks at still gives good
rows, only without that label: nothing fails, the label is lost. The reader hands each record to
its adapter as a TrackedRecord, which notes the top-level keys whose values were read; per file
and shard it counts the fields that held a value, and the labeling job's manifest lists, per
source, the fields never read and those of them that look like labels (`looks_like_label`).

What counts as a read: r[k], r.get(k), r.pop(k), r.setdefault(k), and anything that reads every
value (items(), values(), copying the record with dict(r) or {**r}). A membership test (`k in r`)
or listing the keys is not a read: knowing a field exists does not put its value in a row.
Only top-level keys are tracked; reading "meta.score" reads "meta".
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

# Words that name a label in the published preference and rating sets (HelpSteer, UltraFeedback,
# SHP, PKU-SafeRLHF, BeaverTails, chatbot arena, MT-Bench, Nectar, Tulu/H4 mixtures, ...). A field
# looks like a label when one of the words of its name (split at '_', '-', '.', spaces, digits and
# camelCase; a plural 's' dropped) is one of these, e.g. "winner_model_a", "is_response_0_safe",
# "overall_preference", "score_A", "chosen-rating", "helpfulness".
LABEL_WORDS = frozenset(
    {
        "label",
        "rating",
        "rate",
        "rated",
        "score",
        "grade",
        "reward",
        "judgment",
        "judgement",
        "verdict",
        "vote",
        "winner",
        "win",
        "tie",
        "preference",
        "prefer",
        "preferred",
        "chosen",
        "rejected",
        "better",
        "worse",
        "rank",
        "ranking",
        "annotation",
        "annotator",
        "feedback",
        "critique",
        "safe",
        "safer",
        "unsafe",
        "safety",
        "harm",
        "harmful",
        "harmless",
        "harmlessness",
        "toxic",
        "toxicity",
        "severity",
        "moderation",
        "flagged",
        "helpful",
        "helpfulness",
        "correct",
        "correctness",
        "coherence",
        "coherent",
        "complexity",
        "verbosity",
        "honest",
        "honesty",
        "truthful",
        "truthfulness",
        "faithfulness",
        "relevance",
        "fluency",
        "quality",
        "overall",
    }
)
# Names whose words alone are not label words.
LABEL_NAMES = frozenset({"instruction_following", "good_natured"})


def name_words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1_\2", str(name))
    return re.findall(r"[a-z]+", spaced.lower())


def looks_like_label(name: str) -> bool:
    words = name_words(name)
    if "_".join(words) in LABEL_NAMES:
        return True
    return any(w in LABEL_WORDS or (w.endswith("s") and w[:-1] in LABEL_WORDS) for w in words)


class TrackedRecord(dict):
    """A record (a plain dict's contents) that notes which top-level keys' values were read."""

    __slots__ = ("read",)

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def pop(self, key, *default):
        self.read.add(key)
        return super().pop(key, *default)

    def setdefault(self, key, default=None):
        self.read.add(key)
        return super().setdefault(key, default)

    def items(self):
        self.read.update(self.keys())
        return super().items()

    def values(self):
        self.read.update(self.keys())
        return super().values()

    def copy(self):
        self.read.update(self.keys())
        return dict(super().items())

    def __iter__(self):
        # Overriding __iter__ makes dict(r) and {**r} fetch values through __getitem__ (CPython
        # copies a dict subclass directly only when its iterator is dict's own): a copy is a read.
        return super().__iter__()


# FieldUse as one Arrow cell: it travels in the unit stream from the read tasks to the write stage.
FIELD_USE_TYPE = pa.struct([("present", pa.map_(pa.string(), pa.int64())), ("read", pa.list_(pa.string()))])


@dataclass
class FieldUse:
    """Per field: records (that gave a good row) where it held a value; and the fields read."""

    present: Counter = field(default_factory=Counter)
    read: set = field(default_factory=set)

    def add(self, rec: TrackedRecord) -> None:
        self.present.update(k for k, v in dict.items(rec) if v is not None and isinstance(k, str))
        self.read.update(k for k in rec.read if isinstance(k, str))

    def merge(self, other: FieldUse) -> None:
        self.present.update(other.present)
        self.read |= other.read

    def to_dict(self) -> dict[str, Any]:
        """The plain form: a FIELD_USE_TYPE cell in the unit stream, `record_fields` in a shard marker."""
        return {"present": dict(sorted(self.present.items())), "read": sorted(self.read)}

    @classmethod
    def from_dict(cls, data: dict | None) -> FieldUse:
        """From to_dict()'s form, or an Arrow FIELD_USE_TYPE cell (whose map reads as (key, value) pairs)."""
        if not data:
            return cls()
        present = data.get("present") or {}
        return cls(Counter(dict(present)), set(data.get("read") or []))

    def unused(self) -> list[str]:
        """Fields that held a value in some record and were never read."""
        return sorted(f for f in self.present if f not in self.read)

    def unused_labels(self) -> list[str]:
        return [f for f in self.unused() if looks_like_label(f)]

    def report(self) -> dict[str, Any]:
        return {"unused_fields": self.unused(), "unused_label_fields": self.unused_labels()}
