"""The registry of objectives: what each reward dimension is called, what kind of label trains it,
and how a raw label maps onto [0, 1].

What the registry does, and only this:
- Readers look an objective up by name to turn a raw label into an entry of the `ratings` column
  (`rating_entry`: raw value and its value on [0, 1]). A raw value outside a native scale, or a
  category missing from a value map, is an error the reader turns into a quarantine reason.
- Heads training (pipeline.heads.train) fits a ridge head for every rated objective that appears
  in the data's `ratings` (registered or not: the name is what the reader wrote) and a
  Bradley-Terry head for each preference source, named by the registry's pairwise objective for
  that source when there is one, else `<source>.preferred`.
- Nothing else reads it: scoring uses the objective names stored with the heads.

Objectives are data: built-ins below, plus any declared in an input spec (`objectives: [...]`,
registered when the spec is built, so also on every Ray worker that rebuilds it) or in a train
config (`objectives:` at the top level, or `heads.objectives`). Declaring a name again with the same
definition is a no-op; with a different one it is an error, so one name always means one scale.

Scales. `scale: linear` (default) maps low -> 0 and high -> 1. `scale: bin_center` maps an integer
scale of n = high - low + 1 points to the centres of n equal bins: (x - low + 0.5) / n; this is what
the released ArmoRM did for HelpSteer's 0-4 scale ((x + 0.5) / 5: 0 -> 0.1, 4 -> 0.9,
docs/armorm.md "Stage 1"). A `values` map (booleans, categories) gives the [0, 1] value of each
raw value directly; its keys are compared as canonical strings (`canonical_key`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.schema import objective_column

KINDS = ("rating", "pairwise")
KIND_ALIASES = {"rated": "rating", "rating": "rating", "pairwise": "pairwise", "preference": "pairwise"}
SCALES = ("linear", "bin_center")


def canonical_key(v: Any) -> str | None:
    """One spelling per label value, so that YAML keys (1, true, "Tie") and record values
    ("1", True, 1.0, "tie ") meet: booleans -> "true"/"false", integral numbers -> "3",
    other numbers -> repr, strings stripped and lower-cased. None for null."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isfinite(v) and v == int(v):
            return str(int(v))
        return repr(v)
    s = str(v).strip().lower()
    try:
        f = float(s)
    except ValueError:
        return s
    if math.isfinite(f) and f == int(f) and s.lstrip("+-").replace(".", "", 1).isdigit():
        return str(int(f))  # "2.0" -> "2"
    return s


@dataclass(frozen=True)
class Objective:
    name: str  # unique; built-ins use "<source>-<attribute>" (ArmoRM) or "<source>.<attribute>"
    kind: str  # "rating" (absolute, ridge regression) | "pairwise" (Bradley-Terry head)
    source: str = ""  # corpus whose labels train it
    attribute: str = ""  # field / meaning inside that corpus
    low: float | None = None  # native scale of a rating: low and high
    high: float | None = None
    scale: str = "linear"  # "linear" | "bin_center" (see the module docstring)
    values: dict | None = None  # raw value -> value on [0, 1], for booleans and categories
    description: str = ""

    def __post_init__(self):
        kind = KIND_ALIASES.get(self.kind)
        if kind is None:
            raise ValueError(
                f"objective {self.name}: kind must be 'rating' (or 'rated') or 'pairwise', not {self.kind!r}"
            )
        object.__setattr__(self, "kind", kind)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"objective: name must be a non-empty string, got {self.name!r}")
        if not self.source or not self.attribute:
            src, _, attr = self.name.replace("-", ".", 1).partition(".")
            object.__setattr__(self, "source", self.source or src)
            object.__setattr__(self, "attribute", self.attribute or attr or self.name)
        if self.scale not in SCALES:
            raise ValueError(f"objective {self.name}: scale must be one of {SCALES}, not {self.scale!r}")
        if kind == "pairwise":
            if self.values is not None or self.low is not None or self.high is not None:
                raise ValueError(f"objective {self.name}: a pairwise objective has no scale or value map")
            return
        if self.values is not None:
            if not isinstance(self.values, dict) or not self.values:
                raise ValueError(f"objective {self.name}: values must be a non-empty mapping raw value -> [0, 1]")
            canon = {}
            for k, v in self.values.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                    raise ValueError(f"objective {self.name}: values[{k!r}] = {v!r} must be a number in [0, 1]")
                canon[canonical_key(k)] = float(v)
            object.__setattr__(self, "values", canon)
            if self.low is not None or self.high is not None:
                raise ValueError(f"objective {self.name}: give either a native scale (low, high) or values, not both")
            return
        if self.low is None or self.high is None or not float(self.high) > float(self.low):
            raise ValueError(
                f"objective {self.name}: a rating objective needs a native scale low < high (or a values map)"
            )

    def to_unit(self, raw: Any) -> float:
        """The value on [0, 1] of a raw label (a number on the native scale, or a key of `values`)."""
        if self.values is not None:
            key = canonical_key(raw)
            if key not in self.values and set(self.values) <= {"true", "false"} and key in ("1", "0"):
                key = "true" if key == "1" else "false"  # a boolean map also reads 1/0
            if key not in self.values:
                raise ValueError(f"{raw!r} is not one of {sorted(self.values)}")
            return self.values[key]
        low, high = self.low, self.high
        if low is None or high is None:  # a pairwise objective: labels are preferences, not ratings
            raise ValueError(f"objective {self.name}: a {self.kind} objective has no scale to put {raw!r} on")
        x = float(raw)
        if not low <= x <= high:
            raise ValueError(f"{raw} is outside its scale [{low:g}, {high:g}]")
        if self.scale == "bin_center":
            return (x - low + 0.5) / (high - low + 1)
        return (x - low) / (high - low)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | Objective) -> Objective:
        if isinstance(d, Objective):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"objective: expected a mapping, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"objective {d.get('name')!r}: unknown key(s) {unknown}; known: {sorted(known)}")
        if "name" not in d or "kind" not in d:
            raise ValueError(f"objective: needs at least 'name' and 'kind', got {sorted(d)}")
        return cls(**d)


def _rating(name: str, low: float, high: float, description: str, scale: str = "linear") -> Objective:
    return Objective(name, "rating", low=low, high=high, scale=scale, description=description)


def _pairwise(source: str, attribute: str, description: str) -> Objective:
    return Objective(f"{source}.{attribute}", "pairwise", source, attribute, description=description)


# The released ArmoRM's 19 objectives, in its order and with its names (docs/armorm.md "Stage 1";
# the names of RLHFlow/RLHF-Reward-Modeling armo-rm/stage-1_prepare.py). Scales: HelpSteer 0-4
# (bin centres, as the release maps them), UltraFeedback fine-grained aspects 1-5 and overall 1-10
# (openbmb/UltraFeedback card), BeaverTails is_safe a boolean (PKU-Alignment/BeaverTails card).
# The release's labels for the other seven come pre-scaled in RLHFlow/ArmoRM-Multi-Objective-Data;
# their native scales are not stated in docs/armorm.md: 1-5 is the rating range of the Prometheus
# feedback collection, the Argilla preference sets and CodeUltraFeedback, but check it against your
# data before training them from raw labels.
ARMORM_OBJECTIVES: tuple[Objective, ...] = (
    _rating("helpsteer-helpfulness", 0, 4, "HelpSteer: overall helpfulness of the response", "bin_center"),
    _rating("helpsteer-correctness", 0, 4, "HelpSteer: pertinent facts without errors", "bin_center"),
    _rating("helpsteer-coherence", 0, 4, "HelpSteer: consistency and clarity of expression", "bin_center"),
    _rating("helpsteer-complexity", 0, 4, "HelpSteer: intellectual depth needed to write it", "bin_center"),
    _rating("helpsteer-verbosity", 0, 4, "HelpSteer: amount of detail relative to what was asked", "bin_center"),
    _rating("ultrafeedback-overall_score", 1, 10, "UltraFeedback: GPT-4 critique's overall score"),
    _rating("ultrafeedback-instruction_following", 1, 5, "UltraFeedback: follows the instruction"),
    _rating("ultrafeedback-truthfulness", 1, 5, "UltraFeedback: free of hallucination"),
    _rating("ultrafeedback-honesty", 1, 5, "UltraFeedback: honest, expresses uncertainty"),
    _rating("ultrafeedback-helpfulness", 1, 5, "UltraFeedback: informative and helpful"),
    Objective(
        "beavertails-is_safe",
        "rating",
        values={True: 1.0, False: 0.0},
        description="BeaverTails: the QA pair is judged harmless (true -> 1, false -> 0)",
    ),
    _rating("prometheus-score", 1, 5, "Prometheus feedback collection: rubric score (scale assumed 1-5)"),
    _rating("argilla-overall_quality", 1, 5, "Argilla preference sets: overall quality (scale assumed 1-5)"),
    _rating("argilla-judge_lm", 1, 5, "Argilla preference sets: LLM-judge rating (scale assumed 1-5)"),
    _rating("code-complexity", 1, 5, "CodeUltraFeedback: complexity/efficiency (scale assumed 1-5)"),
    _rating("code-style", 1, 5, "CodeUltraFeedback: coding style (scale assumed 1-5)"),
    _rating("code-explanation", 1, 5, "CodeUltraFeedback: explanation (scale assumed 1-5)"),
    _rating("code-instruction-following", 1, 5, "CodeUltraFeedback: instruction following (scale assumed 1-5)"),
    _rating("code-readability", 1, 5, "CodeUltraFeedback: readability (scale assumed 1-5)"),
)
ARMORM_NAMES: tuple[str, ...] = tuple(o.name for o in ARMORM_OBJECTIVES)
ARMORM_VERBOSITY = "helpsteer-verbosity"

# HelpSteer2 (nvidia/HelpSteer2 card): the same five attributes, integers 0-4, scaled as the release
# scaled HelpSteer. `format: helpsteer` writes the ArmoRM names above; `format: helpsteer2` these.
HELPSTEER2_OBJECTIVES: tuple[Objective, ...] = tuple(
    _rating(f"helpsteer2-{a}", 0, 4, f"HelpSteer2: {a} (0-4)", "bin_center")
    for a in ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
)

# Scales as published with the shared data (see ../shared/data/README.md).
SHARED_DATA_OBJECTIVES: tuple[Objective, ...] = (
    _rating("topical_chat.understandability", 0, 1, "dialogue response is understandable"),
    _rating("topical_chat.naturalness", 1, 3, "dialogue response sounds natural"),
    _rating("topical_chat.coherence", 1, 3, "dialogue response is coherent with the history"),
    _rating("topical_chat.engagingness", 1, 3, "dialogue response is engaging"),
    _rating("topical_chat.groundedness", 0, 1, "dialogue response uses the grounding fact"),
    _rating("topical_chat.overall", 1, 5, "overall dialogue response quality"),
    _rating("sfres.informativeness", 1, 6, "data-to-text output conveys the dialogue act"),
    _rating("sfres.naturalness", 1, 6, "data-to-text output sounds natural"),
    _rating("sfres.overall", 1, 6, "overall data-to-text quality"),
    _pairwise("hh_rlhf", "harmlessness", "the less harmful reply (HH-RLHF harmless-base)"),
    _pairwise("pandalm", "helpfulness", "the better instruction response (PandaLM majority vote)"),
    _pairwise("llmbar", "instruction_following", "the reply that follows the instruction (LLMBar)"),
)

BUILTIN_OBJECTIVES: tuple[Objective, ...] = ARMORM_OBJECTIVES + HELPSTEER2_OBJECTIVES + SHARED_DATA_OBJECTIVES

_BY_NAME: dict[str, Objective] = {o.name: o for o in BUILTIN_OBJECTIVES}
_BUILTIN_NAMES = frozenset(_BY_NAME)


def register(obj: Objective | dict) -> Objective:
    """Add a declared objective (idempotent for an identical definition)."""
    obj = Objective.from_dict(obj)
    known = _BY_NAME.get(obj.name)
    if known is not None and known != obj:
        where = "a built-in" if obj.name in _BUILTIN_NAMES else "already declared"
        raise ValueError(
            f"objective {obj.name!r} is {where} with a different definition "
            f"({_differences(known, obj)}); pick another name"
        )
    if known is None:
        # Output columns are named by a column-safe spelling (schema.objective_column): two names
        # that spell the same there would write one column.
        clash = [n for n in _BY_NAME if _column_safe(n) == _column_safe(obj.name)]
        if clash:
            raise ValueError(
                f"objective {obj.name!r} would share its output columns with {clash[0]!r}; "
                f"pick a name that differs in letters or digits"
            )
    _BY_NAME[obj.name] = obj
    return obj


def _column_safe(name: str) -> str:
    return objective_column("", name)  # the one rule for output column names


def register_all(declared) -> list[Objective]:
    if declared is None:
        return []
    if not isinstance(declared, list):
        raise ValueError(f"objectives: expected a list of objective definitions, got {type(declared).__name__}")
    return [register(d) for d in declared]


def _differences(a: Objective, b: Objective) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k])


def get(name: str) -> Objective:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown objective {name!r}: declare it (input spec or train config `objectives`, "
            f"e.g. {{name: {name}, kind: rating, low: 1, high: 5}}); known: {sorted(_BY_NAME)}"
        ) from None


def known() -> list[str]:
    return sorted(_BY_NAME)


def for_source(source: str, kind: str | None = None) -> list[Objective]:
    kind = KIND_ALIASES.get(kind, kind) if kind else None
    return [o for o in _BY_NAME.values() if o.source == source and (kind is None or o.kind == kind)]
