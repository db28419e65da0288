"""The registry of objectives: what each reward dimension means, where its labels come from,
and how its native scale maps to [0, 1].

Readers use it to map raw ratings to [0, 1] (the `ratings` column), heads use it to know which
objectives to fit and how (ridge regression on absolute ratings, Bradley-Terry on pairs).
A job config can add objectives (`Objective.from_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Objective:
    name: str                 # "<source>.<attribute>", e.g. "topical_chat.naturalness"
    kind: str                 # "rating" (absolute, ridge regression) | "pairwise" (Bradley-Terry head)
    source: str               # corpus name whose labels train it
    attribute: str            # field / meaning inside that corpus
    low: float | None = None  # native scale, ratings only: low maps to 0, high to 1
    high: float | None = None
    description: str = ""

    def __post_init__(self):
        if self.kind not in ("rating", "pairwise"):
            raise ValueError(f"objective {self.name}: kind must be 'rating' or 'pairwise', not {self.kind!r}")
        if self.kind == "rating" and (self.low is None or self.high is None or self.high <= self.low):
            raise ValueError(f"objective {self.name}: a rating objective needs a native scale low < high")

    def to_unit(self, raw: float) -> float:
        """Linear map of the native scale onto [0, 1]."""
        return (float(raw) - self.low) / (self.high - self.low)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Objective":
        return cls(**d)


def _rating(source: str, attribute: str, low: float, high: float, description: str) -> Objective:
    return Objective(f"{source}.{attribute}", "rating", source, attribute, low, high, description)


def _pairwise(source: str, attribute: str, description: str) -> Objective:
    return Objective(f"{source}.{attribute}", "pairwise", source, attribute, description=description)


# Scales as published with the shared data (see ../shared/data/README.md).
BUILTIN_OBJECTIVES: tuple[Objective, ...] = (
    _rating("topical_chat", "understandability", 0, 1, "dialogue response is understandable"),
    _rating("topical_chat", "naturalness", 1, 3, "dialogue response sounds natural"),
    _rating("topical_chat", "coherence", 1, 3, "dialogue response is coherent with the history"),
    _rating("topical_chat", "engagingness", 1, 3, "dialogue response is engaging"),
    _rating("topical_chat", "groundedness", 0, 1, "dialogue response uses the grounding fact"),
    _rating("topical_chat", "overall", 1, 5, "overall dialogue response quality"),
    _rating("sfres", "informativeness", 1, 6, "data-to-text output conveys the dialogue act"),
    _rating("sfres", "naturalness", 1, 6, "data-to-text output sounds natural"),
    _rating("sfres", "overall", 1, 6, "overall data-to-text quality"),
    _pairwise("hh_rlhf", "harmlessness", "the less harmful reply (HH-RLHF harmless-base)"),
    _pairwise("pandalm", "helpfulness", "the better instruction response (PandaLM majority vote)"),
    _pairwise("llmbar", "instruction_following", "the reply that follows the instruction (LLMBar)"),
)

_BY_NAME = {o.name: o for o in BUILTIN_OBJECTIVES}


def get(name: str) -> Objective:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; built-in: {sorted(_BY_NAME)}") from None


def for_source(source: str, kind: str | None = None) -> list[Objective]:
    return [o for o in BUILTIN_OBJECTIVES if o.source == source and (kind is None or o.kind == kind)]
