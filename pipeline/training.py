"""Train reward heads from a config, end to end: embed the training corpora with the labeling job
(embed-only, embeddings written: this is the embedding cache), split rows deterministically into
train and test, fit the heads (pipeline.heads.train), save them, and evaluate them on the test split.

The math lives in pipeline.heads; this module only orchestrates. It depends on the labeling job
(pipeline.labeling.run) and never the other way round: a labeling config's `train_if_missing` is
honoured here (`ensure_heads`, which jobs.label calls before the run), not inside the driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import yaml
from pydantic import Field

from pipeline import ids, objectives, storage
from pipeline.config_schema import Loc, Schema, at_least, under
from pipeline.corpus import InputSpec
from pipeline.embed.backbone import BackboneSpec, resolve_source
from pipeline.embed.templating import TemplatePolicy
from pipeline.evaluation import evaluate_methods
from pipeline.heads.ensemble import DIRECTORY as ENSEMBLE_DIRECTORY
from pipeline.heads.train import DEFAULTS as HEADS_DEFAULTS
from pipeline.heads.train import GATING_DEFAULTS, resolve_options, train_heads
from pipeline.labeling.config import (
    INPUT_OVERRIDES,
    MODEL_OVERRIDES,
    RESOURCES_OVERRIDES,
    ConfigError,
    LabelConfig,
    ModelConfig,
    ResourcesConfig,
    _take,
    input_errors,
)
from pipeline.objectives import Objective
from pipeline.secrets import lift_config_uris, lift_input_uris, redact, scrub, without_credentials


@dataclass
class TrainConfig:
    name: str
    inputs: list[dict]
    heads_out: str  # where ArmoHeads.save writes the trained heads
    embeddings_out: str = "runs/embeddings"  # embedding cache: an embed-only labeling run per backbone+inputs
    backbone: dict = field(default_factory=lambda: {"path": "smollm2"})
    template: dict = field(default_factory=dict)
    test_fraction: float = 0.2  # share of rows (by row-id hash) held out for evaluation
    limit_rows_per_input: int | None = None
    heads: dict = field(default_factory=dict)  # pipeline.heads.train options (gating steps, grids, ...)
    objectives: list = field(
        default_factory=list
    )  # declared objectives (Objective fields), for every input and the heads
    resources: dict = field(default_factory=dict)
    storage_options: dict = field(default_factory=dict)

    def hash(self) -> str:
        # credentials left out: a rotated key is the same training
        return hashlib.sha256(json.dumps(without_credentials(asdict(self)), sort_keys=True).encode()).hexdigest()[:12]

    def embedding_run(self, **overrides) -> LabelConfig:
        """The embed-only labeling run that fills the cache; its run id is keyed by what it embeds,
        so a rerun reuses (or resumes) it."""
        # Credentials left out: the cache survives a rotated key.
        # Declared objectives ride in the inputs: a changed scale changes the ratings, so the cache key.
        what = without_credentials(
            {
                "backbone": self.backbone,
                "template": self.template,
                "inputs": self.input_specs(),
                "limit": self.limit_rows_per_input,
            }
        )
        key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
        res = _take(ResourcesConfig, self.resources, "resources")
        return LabelConfig(
            inputs=self.input_specs(),
            output=self.embeddings_out,
            run_id=f"{self.name}-{key}",
            model=ModelConfig(backbone=self.backbone, template=self.template),
            resources=res,
            storage_options=self.storage_options,
            embeddings=True,
            limit_rows_per_input=self.limit_rows_per_input,
            **overrides,
        )

    def input_specs(self) -> list[dict]:
        """The inputs, each carrying the config's declared objectives (the read tasks register
        them from the spec, in whatever process they run)."""
        if not self.objectives:
            return self.inputs
        return [
            {**spec, "objectives": list(self.objectives) + list(spec.get("objectives") or [])} for spec in self.inputs
        ]

    def heads_options(self) -> dict:
        if not self.objectives:
            return self.heads
        return {**self.heads, "objectives": list(self.objectives) + list(self.heads.get("objectives") or [])}


def copy_of(value: list) -> Callable[[], list]:
    return lambda: list(value)


def _options_dataclass(name: str, defaults: dict, nested: dict[str, type] | None = None) -> type:
    """A dataclass of pipeline.heads.train's options, typed by their defaults, for the schema
    (a key added to those defaults is checked and documented without an edit here)."""
    kinds: dict[type, Any] = {bool: bool, int: int, float: float, str: str, list: list}
    specs: list[tuple[str, Any, Any]] = []
    for key, default in defaults.items():
        if nested and key in nested:
            specs.append((key, nested[key], field(default_factory=nested[key])))
        elif default is None:
            specs.append((key, int | None, field(default=None)))
        else:
            tp = kinds.get(type(default), Any)
            value: Any = field(default_factory=copy_of(default)) if tp is list else field(default=default)
            specs.append((key, tp, value))
    return make_dataclass(name, specs)


GatingOptions = _options_dataclass("GatingOptions", GATING_DEFAULTS)
HeadsOptions = _options_dataclass("HeadsOptions", HEADS_DEFAULTS, {"gating": GatingOptions})

SCHEMA = Schema(
    "training",
    TrainConfig,
    {
        **INPUT_OVERRIDES,
        **MODEL_OVERRIDES,
        **RESOURCES_OVERRIDES,
        (TrainConfig, "inputs"): Annotated[list[InputSpec], Field(min_length=1)],
        (TrainConfig, "backbone"): BackboneSpec | str,
        (TrainConfig, "template"): TemplatePolicy,
        (TrainConfig, "test_fraction"): Annotated[float, Field(ge=0, lt=1)],
        (TrainConfig, "limit_rows_per_input"): at_least(1) | None,
        (TrainConfig, "heads"): HeadsOptions,
        (TrainConfig, "objectives"): list[Objective],
        (TrainConfig, "resources"): ResourcesConfig,
        (HeadsOptions, "objectives"): list[Objective],
        (HeadsOptions, "val_fraction"): Annotated[float, Field(gt=0, lt=1)],
        (HeadsOptions, "verbosity"): str,
        (GatingOptions, "steps"): at_least(1),
        (GatingOptions, "batch_size"): at_least(1),
    },
)


def parse_train_config(data: Any, where: str = "train config", check_files: bool = False) -> TrainConfig:
    """The training config from a mapping; every problem reported at once (ConfigError.errors).
    `check_files`: also that every input matches files and the backbone resolves (what
    jobs.train_heads does before it starts; evaluating existing heads needs neither)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    errors: list[str] = []
    try:  # s3://KEY:SECRET@... -> storage_options
        data = lift_config_uris(data, ("heads_out", "embeddings_out"))
        if "inputs" in data:
            options = data.get("storage_options") if isinstance(data.get("storage_options"), dict) else None
            data["inputs"] = lift_input_uris(data["inputs"], options)
    except (TypeError, ValueError) as e:
        errors.append(f"{where}: {e}")
    type_errors, bad = SCHEMA.type_errors(data)
    errors += type_errors
    cfg = SCHEMA.build(data, bad)
    errors += _validate_train(cfg, data, bad, check_files)
    if errors:
        raise ConfigError(errors)
    return cfg


def _validate_train(cfg: TrainConfig | None, data: dict, bad: list[Loc], check_files: bool) -> list[str]:
    errors = []
    if not under(bad, "objectives") and isinstance(data.get("objectives"), list):
        try:
            objectives.register_all(data["objectives"])
        except ValueError as e:
            errors.append(f"objectives: {e}")
    if check_files:
        errors += input_errors(data.get("inputs"), data.get("storage_options"), bad)
    if cfg is None:
        return errors
    if check_files and not under(bad, "backbone"):
        try:
            resolve_source(BackboneSpec.from_dict(cfg.backbone))
        except Exception as e:  # noqa: BLE001
            errors.append(f"backbone: {scrub(str(e))}")
    if not under(bad, "template"):
        try:
            TemplatePolicy.from_dict(cfg.template or {})
        except (TypeError, ValueError) as e:
            errors.append(f"template: {e}")
    if not under(bad, "heads"):
        try:
            resolve_options(cfg.heads)
        except ValueError as e:
            errors.append(f"heads: {e}")
    return errors


def load_train_config(path: str, check_files: bool = False) -> TrainConfig:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:  # its message quotes the offending line, which may hold a secret
        raise ConfigError(scrub(f"config {path} is not valid YAML: {e}")) from None
    return parse_train_config(data, check_files=check_files)


def is_test_row(row_ids, test_fraction: float) -> np.ndarray:
    """Deterministic train/test split by row id: every unit of a row (a pair, a best-of-N group)
    goes to the same side, on any machine."""
    return np.array([ids.in_fraction(r, test_fraction, "split") for r in row_ids], dtype=bool)


def read_run_units(run_dir: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    """All labeled units of a run (its data/ parts), in a stable order."""
    return storage.read_run_table(run_dir, storage_options, columns).sort_by([("unit_id", "ascending")])


def embed_training_corpora(cfg: TrainConfig, ray_address: str | None = None) -> str:
    from pipeline.labeling.run import run  # Ray: imported only when a run starts (jobs.train_heads --check)

    label_cfg = cfg.embedding_run(ray_address=ray_address)
    run(label_cfg)
    return label_cfg.run_dir


def train_from_config(path: str, heads_out: str | None = None, ray_address: str | None = None) -> dict:
    """Embed (or reuse cached embeddings), fit, save and evaluate. Returns a summary dict that is
    also written next to the heads as training.json."""
    t0 = time.time()
    cfg = load_train_config(path, check_files=True)
    out = heads_out or cfg.heads_out
    run_dir = embed_training_corpora(cfg, ray_address)
    units = read_run_units(run_dir, cfg.storage_options or None)
    test = is_test_row(units.column("row_id").to_pylist(), cfg.test_fraction)
    train_units = units.filter(pa.array(~test))
    test_units = units.filter(pa.array(test))
    result = train_heads(train_units, cfg.heads_options())
    result.heads.save(out)
    if result.baseline is not None:
        result.baseline.save(os.path.join(out, "baseline"))
    if result.ensemble is not None:
        result.ensemble.save(os.path.join(out, ENSEMBLE_DIRECTORY))
    report = evaluate_methods(test_units, result.heads, result.baseline, ensemble=result.ensemble)
    summary = {
        "name": cfg.name,
        "config": redact(asdict(cfg)),
        "config_hash": cfg.hash(),
        "heads": out,
        "heads_fingerprint": result.heads.fingerprint,
        "ensemble_fingerprint": result.ensemble.fingerprint if result.ensemble is not None else None,
        "embedding_run": run_dir,
        "units": {"train": train_units.num_rows, "test": test_units.num_rows},
        "training": result.summary,
        "evaluation": report,
        "wall_time_s": round(time.time() - t0, 1),
    }
    storage.write_atomic(os.path.join(out, "training.json"), json.dumps(summary, indent=2, default=float).encode())
    return summary


def ensure_heads(cfg: LabelConfig) -> dict | None:
    """A labeling config's `model.train_if_missing`: when its heads do not exist yet, train them
    (with that train config, writing to `model.heads`) before the labeling run. Returns the
    training summary, or None when nothing was trained."""
    m = cfg.model
    if not (m.heads and m.train_if_missing) or storage.exists(m.heads, cfg.storage_options or None):
        return None
    print(scrub(f"[label] no heads at {m.heads}: training them first ({m.train_if_missing})"), flush=True)
    return train_from_config(m.train_if_missing, heads_out=m.heads, ray_address=cfg.ray_address)
