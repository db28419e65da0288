"""The curation job's configuration: parsed from YAML and validated up front, with clear errors.

task: sft | dpo | rerank | calibrate
run: runs/labels/demo              # a labeled run: <run>/data/*.parquet (+ manifest.json)
output: runs/curated/demo-sft      # a directory (calibrate: the JSON file to write)
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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from pipeline import storage
from pipeline.curation import calibration as cal
from pipeline.curation.pairs import PairRules
from pipeline.curation.thresholds import FilterError, parse_filters
from pipeline.schema import KINDS
from pipeline.secrets import lift_config_uris, redact, scrub, without_credentials

TASKS = ("sft", "dpo", "rerank", "calibrate")


class ConfigError(ValueError):
    pass


def _take(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


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
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(data: dict) -> CurateConfig:
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    data = dict(data)
    for key in ("task", "run", "output"):
        if not data.get(key):
            raise ConfigError(f"config: missing required key {key!r}")
    sections = {"sft": SftConfig, "pairs": PairsConfig, "rerank": RerankConfig, "calibrate": CalibrateConfig}
    parsed = {name: _take(cls, data.pop(name, None), name) for name, cls in sections.items()}
    try:
        data = lift_config_uris(data, ("run", "output", "calibration"))  # s3://KEY:SECRET@... -> storage_options
    except ValueError as e:
        raise ConfigError(str(e)) from e
    cfg = _take(CurateConfig, {**data, **parsed}, "config")
    _validate(cfg)
    return cfg


def _validate(cfg: CurateConfig) -> None:
    if cfg.task not in TASKS:
        raise ConfigError(f"task: must be one of {list(TASKS)}, got {cfg.task!r}")
    if not isinstance(cfg.filters, list):
        raise ConfigError("filters: expected a list of filter mappings")
    try:
        parse_filters(cfg.filters)
    except FilterError as e:
        raise ConfigError(f"filters: {e}") from e
    if cfg.output_files is not None and (
        not isinstance(cfg.output_files, int)
        or isinstance(cfg.output_files, bool)
        or not 1 <= cfg.output_files <= 100_000
    ):
        raise ConfigError(f"output_files: expected null or an integer >= 1, got {cfg.output_files!r}")
    if not isinstance(cfg.partition_rows, int) or isinstance(cfg.partition_rows, bool) or cfg.partition_rows < 1:
        raise ConfigError(f"partition_rows: expected an integer >= 1, got {cfg.partition_rows!r}")
    if not isinstance(cfg.pairs.reward_margin, bool):
        raise ConfigError("pairs.reward_margin: expected true or false")
    if cfg.pairs.reward_margin and not cfg.calibration:
        raise ConfigError(
            "pairs.reward_margin: needs `calibration` (the margin is score_margin / T, T fitted "
            "by the calibrate task); a raw score gap would set RewardTrainer's loss margin"
        )
    for where, kinds in (
        ("sft.kinds", cfg.sft.kinds),
        ("rerank.kinds", cfg.rerank.kinds),
        ("pairs.group_kinds", cfg.pairs.group_kinds),
    ):
        if kinds is not None and (not isinstance(kinds, list) or not set(kinds) <= set(KINDS)):
            raise ConfigError(f"{where}: expected a list of kinds from {list(KINDS)}, got {kinds!r}")
    try:
        cfg.pairs.rules()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pairs: {e}") from e
    if not isinstance(cfg.rerank.top_k, int) or cfg.rerank.top_k < 1:
        raise ConfigError(f"rerank.top_k: expected an integer >= 1, got {cfg.rerank.top_k!r}")
    if cfg.calibrate.method not in cal.METHODS:
        raise ConfigError(f"calibrate.method: must be one of {list(cal.METHODS)}, got {cfg.calibrate.method!r}")
    if not isinstance(cfg.calibrate.n_quantiles, int) or cfg.calibrate.n_quantiles < 2:
        raise ConfigError("calibrate.n_quantiles: expected an integer >= 2")
    if cfg.task == "calibrate" and not cfg.output.endswith(".json"):
        raise ConfigError(
            f"output: the calibrate task writes one JSON file; expected a path ending in .json, got {cfg.output!r}"
        )

    so = cfg.storage_options or None
    if not storage.parquet_files(storage.join(cfg.run, "data"), so):
        raise ConfigError(f"run: no Parquet files under {storage.join(cfg.run, 'data')} (is it a labeled run?)")
    if cfg.calibration and not storage.exists(cfg.calibration, so):
        raise ConfigError(f"calibration: no such file {cfg.calibration}")


def load_config(path: str, overrides: dict | None = None) -> CurateConfig:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:  # its message quotes the offending line, which may hold a secret
        raise ConfigError(scrub(f"config {path} is not valid YAML: {e}")) from None
    return parse_config({**(data or {}), **(overrides or {})})
