"""The curation job's configuration: parsed from YAML and validated up front, with clear errors.

task: sft | dpo | rerank | calibrate
run: runs/labels/demo              # a labeled run: <run>/data/*.parquet (+ manifest.json); or
                                   # <labels root>/latest, or a glob of runs (pipeline.curation.inputs)
output: runs/curated/demo-sft      # a directory (calibrate: the JSON file to write)
score_column: score                # the run's column to rank by (rm_<name>: a reward model's), shown
                                   # to the tasks as `score` (pipeline.curation.score_column)
storage_options: {}                # for s3:// (endpoint_url, key, secret, ...)
filters: [...]                     # unit filters, see pipeline/curation/thresholds.py
output_files: null                 # output Parquet files (null: one per partition)
partition_rows: 100000             # units per shuffle partition: bounds the memory of every task
scratch: null                      # shuffle fragments (default <output>/_shuffle; removed at the end)
sft:       {one_per_prompt: false, kinds: null, exclude_human_rejected: true}
pairs:     {best_of_n: best_worst, min_margin: 0.0, group_kinds: [best_of_n],
            preference: flip, tie_epsilon: 0.0, human_ties: drop, reward_margin: false}
rerank:    {top_k: 1, kinds: null}
calibrate: {method: zscore, columns: null, n_quantiles: 101, fit_temperature: true}
calibration: null                  # a calibration JSON: adds score_calibrated, and its temperature
                                   # sets p_chosen = sigmoid(margin / T) on DPO pairs
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Annotated, Any

import yaml
from pydantic import Field

from pipeline import storage
from pipeline.config_schema import ConfigErrors, Loc, Schema, at_least, list_of, one_of, under
from pipeline.curation import calibration as cal
from pipeline.curation import score_column as sc
from pipeline.curation.inputs import resolve_runs
from pipeline.curation.pairs import BEST_OF_N_MODES, HUMAN_TIE_RULES, PREFERENCE_POLICIES, PairRules
from pipeline.curation.thresholds import OBJECTIVE_FIELDS, RULES, FilterError, parse_filters
from pipeline.schema import KINDS
from pipeline.secrets import lift_config_uris, redact, scrub, without_credentials

TASKS = ("sft", "dpo", "rerank", "calibrate")


class ConfigError(ConfigErrors):
    """A bad config: `errors` lists every problem, each naming its key path."""


@dataclass
class SftConfig:
    one_per_prompt: bool = False  # keep only the best-scored surviving response per prompt
    kinds: list | None = None  # unit kinds to select from (None: all)
    exclude_human_rejected: bool = True  # never train on a response humans labelled "rejected"
    order: str = "score"  # one_per_prompt keeps the best by: score | conservative | ensemble_min


@dataclass
class PairsConfig:
    best_of_n: str = "best_worst"
    min_margin: float = 0.0
    group_kinds: list = field(default_factory=lambda: ["best_of_n"])
    preference: str = "flip"
    tie_epsilon: float = 0.0
    human_ties: str = "drop"
    # Add TRL's `margin` column (RewardTrainer subtracts it inside its loss): score_margin / T with T
    # from `calibration`, which is then required. Off by default so no trainer picks up a raw gap.
    reward_margin: bool = False
    # k: keep a pair only when its margin >= k * its ensemble uncertainty (0: off; needs score_std)
    min_margin_uncertainty: float = 0.0

    def rules(self) -> PairRules:
        return PairRules(
            self.best_of_n,
            float(self.min_margin),
            tuple(self.group_kinds),
            self.preference,
            float(self.tie_epsilon),
            self.human_ties,
            self.min_margin_uncertainty,
        )


@dataclass
class RerankConfig:
    top_k: int = 1
    kinds: list | None = None
    order: str = "score"  # rank by: score | conservative (score_mean - λ·score_std) | ensemble_min (score_min)


@dataclass
class CalibrateConfig:
    method: str = "zscore"
    columns: list | None = None  # None: score and every rating_* / debiased_* column of the run
    n_quantiles: int = 101
    fit_temperature: bool = True  # fit T of P(a beats b) on the run's human preference pairs


@dataclass
class CurateConfig:
    task: str
    run: str
    output: str
    # The run's column every task ranks by, read under the name `score` (pipeline.curation.score_column)
    score_column: str = sc.DEFAULT
    storage_options: dict = field(default_factory=dict)
    filters: list = field(default_factory=list)
    output_files: int | None = None
    partition_rows: int = 100_000
    scratch: str | None = None
    sft: SftConfig = field(default_factory=SftConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    calibration: str | None = None
    ray_address: str | None = None
    # λ of the conservative score `score_conservative` = score_mean - λ·score_std (runs labeled with
    # an ensemble): a column for filters and the `conservative` orders
    conservative_lambda: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __repr__(self) -> str:  # a config may end up in a log line or a traceback
        return f"CurateConfig({redact(self.to_dict())})"

    def hash(self) -> str:
        d = without_credentials(self.to_dict())
        d.pop("ray_address", None)
        if d.get("score_column") == sc.DEFAULT:  # configs written before the key hash as they did
            d.pop("score_column")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _filter_spec() -> type:
    """A filter as written (pipeline/curation/thresholds.py): a column or an objective, and one rule."""
    specs: list[tuple[str, Any, Any]] = [
        ("column", str | None, field(default=None)),
        ("objective", str | None, field(default=None)),
        ("field", one_of(*OBJECTIVE_FIELDS), field(default="rating")),
    ]
    specs += [(rule, float | None, field(default=None)) for rule in RULES]
    return make_dataclass("FilterSpec", specs)


FilterSpec = _filter_spec()
_KINDS = list_of(one_of(*KINDS))
SCHEMA = Schema(
    "curation",
    CurateConfig,
    {
        (CurateConfig, "task"): one_of(*TASKS),
        (CurateConfig, "run"): Annotated[str, Field(min_length=1)],
        (CurateConfig, "output"): Annotated[str, Field(min_length=1)],
        (CurateConfig, "score_column"): Annotated[str, Field(min_length=1)],
        (CurateConfig, "filters"): list[FilterSpec],  # type: ignore[valid-type]
        (CurateConfig, "output_files"): Annotated[int, Field(ge=1, le=100_000)] | None,
        (CurateConfig, "partition_rows"): at_least(1),
        (SftConfig, "kinds"): _KINDS | None,
        (PairsConfig, "best_of_n"): one_of(*BEST_OF_N_MODES),
        (PairsConfig, "min_margin"): at_least(0, float),
        (PairsConfig, "group_kinds"): _KINDS,
        (PairsConfig, "preference"): one_of(*PREFERENCE_POLICIES),
        (PairsConfig, "tie_epsilon"): at_least(0, float),
        (PairsConfig, "human_ties"): one_of(*HUMAN_TIE_RULES),
        (RerankConfig, "top_k"): at_least(1),
        (RerankConfig, "kinds"): _KINDS | None,
        (CalibrateConfig, "method"): one_of(*cal.METHODS),
        (CalibrateConfig, "columns"): list[str] | None,
        (CalibrateConfig, "n_quantiles"): at_least(2),
    },
)


def parse_config(data: dict) -> CurateConfig:
    """Every problem of the config reported at once (ConfigError.errors)."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    errors: list[str] = []
    try:
        data = lift_config_uris(dict(data), ("run", "output", "calibration"))  # s3://KEY:SECRET@... -> storage_options
    except ValueError as e:
        errors.append(str(e))
    type_errors, bad = SCHEMA.type_errors(data)
    errors += type_errors
    cfg = SCHEMA.build(data, bad)
    if cfg is not None:
        errors += _validate(cfg, bad)
    if errors:
        raise ConfigError(errors)
    return cfg


def _validate(cfg: CurateConfig, bad: list[Loc]) -> list[str]:
    """The checks beyond types, on the best-effort config (keys with type errors at their defaults)."""
    errors = []
    for i, spec in enumerate(cfg.filters if isinstance(cfg.filters, list) else []):
        if under(bad, "filters", i):
            continue
        try:
            parse_filters([spec])
        except FilterError as e:
            errors.append(f"filters[{i}]: {e}")
    if cfg.pairs.reward_margin and not cfg.calibration:
        errors.append(
            "pairs.reward_margin: needs `calibration` (the margin is score_margin / T, T fitted "
            "by the calibrate task); a raw score gap would set RewardTrainer's loss margin"
        )
    if not under(bad, "task") and cfg.task == "calibrate" and not cfg.output.endswith(".json"):
        errors.append(
            f"output: the calibrate task writes one JSON file; expected a path ending in .json, got {cfg.output!r}"
        )
    score_ok = not under(bad, "score_column") and not under(bad, "task")
    if score_ok:
        errors += sc.key_errors(cfg)
    so = cfg.storage_options or None
    try:
        runs = resolve_runs(cfg.run, so)  # a run dir, <root>/latest or a glob of runs (pipeline.curation.inputs)
    except FileNotFoundError as e:
        errors.append(f"run: {e}")
    except Exception as e:  # noqa: BLE001 - an unreachable store: say which key
        errors.append(scrub(f"run: cannot list {cfg.run}: {e}"))
    else:
        if score_ok:
            try:
                errors += sc.run_errors(cfg, runs, so)
            except Exception as e:  # noqa: BLE001 - a file that cannot be read: say which key
                errors.append(scrub(f"score_column: cannot read the run {cfg.run}: {type(e).__name__}: {e}"))
    found = None  # the calibration file, once it is known to exist
    try:
        if cfg.calibration and not storage.exists(cfg.calibration, so):
            errors.append(f"calibration: no such file {cfg.calibration}")
        else:
            found = cfg.calibration
    except Exception as e:  # noqa: BLE001
        errors.append(scrub(f"calibration: cannot check {cfg.calibration}: {e}"))
    if found and score_ok and cfg.task != "calibrate":
        try:
            errors += sc.calibration_errors(cfg, cal.load(found, so))
        except Exception as e:  # noqa: BLE001
            errors.append(scrub(f"calibration: cannot read {cfg.calibration}: {e}"))
    return errors


def load_config(path: str, overrides: dict | None = None) -> CurateConfig:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:  # its message quotes the offending line, which may hold a secret
        raise ConfigError(scrub(f"config {path} is not valid YAML: {e}")) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(data).__name__}")
    return parse_config({**(data or {}), **(overrides or {})})
