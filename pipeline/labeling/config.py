"""The labeling job's configuration: parsed from YAML and validated up front, with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from pipeline import secrets, storage
from pipeline.corpus import InputSpec, expand_files
from pipeline.corpus.spec import InputSpecError, assign_readings
from pipeline.embed.backbone import BackboneSpec, resolve_source
from pipeline.embed.templating import TemplatePolicy


class ConfigError(ValueError):
    pass


def _take(cls, data: Any, where: str):
    """Build a dataclass from a mapping, refusing unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    return cls(**data)


@dataclass
class ModelConfig:
    backbone: dict = field(default_factory=lambda: {"path": "smollm2"})  # BackboneSpec fields
    heads: str | None = None  # directory written by ArmoHeads.save (or jobs.train_heads)
    armorm_checkpoint: str | None = None  # a released-format ArmoRM checkpoint (brings its own backbone)
    train_if_missing: str | None = None  # a train_heads config to run first when `heads` does not exist
    template: dict = field(default_factory=dict)  # TemplatePolicy fields


@dataclass
class ResourcesConfig:
    actors: int | list[int] = 1  # scoring actors: a number or [min, max]
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    threads_per_actor: int | None = None  # CPU inference threads; default: Ray's share (num_cpus_per_actor)
    custom_resources_per_actor: dict = field(default_factory=dict)
    token_budget: int | None = None  # padded tokens per forward pass (None: by device, see embed.engine)
    units_per_call: int = 256  # units handed to a scoring actor at once (sorted into batches there)
    share_prompts: str = "auto"  # decoders: compute each distinct prompt of a call once (auto | never)
    rows_per_shard: int = 256  # input rows per shard (the unit of exactly-once commit)
    cpus_per_cpu_task: float = 0.25  # read / tokenize / write tasks


@dataclass
class LabelConfig:
    inputs: list[dict]
    output: str  # root URI; the run writes under <output>/<run_id>/
    run_id: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage_options: dict = field(default_factory=dict)
    embeddings: bool = False  # also write the response and prompt embeddings
    incremental: bool = False  # skip input files recorded by earlier completed runs under `output`
    limit_rows_per_input: int | None = None  # for demos and smoke runs: stop each input after N rows
    ray_address: str | None = None
    progress_interval_s: float = 10.0
    # Parse every input once before labeling, for an exact unit total and an ETA in the progress
    # lines. Off by default: on a large corpus that pass costs as much reading as the run itself.
    count_units: bool = False

    @property
    def run_dir(self) -> str:
        return storage.join(self.output, self.run_id)

    def to_dict(self) -> dict:
        """Everything, credentials included: for the job itself. Artifacts get `secrets.redact` of it."""
        return asdict(self)

    def __repr__(self) -> str:  # a config may end up in a log line or a traceback
        return f"LabelConfig({secrets.redact(self.to_dict())})"

    def scoring_identity(self) -> dict:
        """What decides each output row's values (not which rows): a resumed run must match it."""
        m, so = self.model, self.storage_options or None
        heads_fp = None
        if m.heads and storage.exists(heads_json := storage.join(m.heads, "heads.json"), so):
            heads_fp = json.loads(storage.read_bytes(heads_json, so)).get("fingerprint")
        return {
            "backbone": m.backbone if not m.armorm_checkpoint else None,
            "armorm_checkpoint": m.armorm_checkpoint,
            "heads": m.heads,
            "heads_fingerprint": heads_fp,
            "template": m.template,
            "embeddings": self.embeddings,
        }

    def hash(self) -> str:
        """Identity of what the run computes (not where it runs, nor with which credentials): used in
        manifests and submission ids."""
        d = secrets.without_credentials(self.to_dict())
        for k in ("ray_address", "progress_interval_s", "count_units"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(data: dict) -> LabelConfig:
    """Relative local paths are relative to the working directory (the repo root, also under
    `ray job submit --working-dir .`)."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    data = dict(data)
    for key in ("inputs", "output"):
        if key not in data:
            raise ConfigError(f"config: missing required key {key!r}")
    data = _lift_uri_credentials(data)
    model = _take(ModelConfig, data.pop("model", None), "model")
    resources = _take(ResourcesConfig, data.pop("resources", None), "resources")
    cfg = _take(LabelConfig, {**data, "model": model, "resources": resources}, "config")
    if not isinstance(cfg.inputs, list) or not cfg.inputs:
        raise ConfigError("inputs: expected a non-empty list of input specs")
    _validate(cfg)
    return cfg


def _lift_uri_credentials(data: dict) -> dict:
    """Credentials written into URIs (s3://KEY:SECRET@bucket/...) move into storage_options, so
    that no recorded path (manifests, source_uri columns, logs) carries them."""
    try:
        model = data.get("model") if isinstance(data.get("model"), dict) else None
        # output, heads and a checkpoint share the top-level options
        lifted = ("heads", "armorm_checkpoint")
        data = secrets.lift_config_uris({**data, **{k: model and model.get(k) for k in lifted}}, ("output", *lifted))
        uris = {k: data.pop(k) for k in lifted}
        if model is not None:
            data["model"] = {**model, **uris}
        data["inputs"] = secrets.lift_input_uris(data["inputs"], data.get("storage_options"))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return data


def _validate(cfg: LabelConfig) -> None:
    specs, files = [], []
    for i, spec in enumerate(cfg.inputs):
        try:
            parsed = InputSpec.from_dict({"storage_options": cfg.storage_options, **spec})
            files.append(expand_files(parsed))
            specs.append(parsed)
        except Exception as e:  # noqa: BLE001 - re-raised with the input's position
            raise ConfigError(f"inputs[{i}] ({spec.get('path')}): {e}") from e
    try:
        assign_readings(specs, files)  # one file under two specs: distinct sources, not the same spec twice
    except InputSpecError as e:
        raise ConfigError(f"inputs: {e}") from e
    r = cfg.resources
    actors = r.actors if isinstance(r.actors, list) else [r.actors, r.actors]
    if len(actors) != 2 or not all(isinstance(a, int) and a >= 1 for a in actors) or actors[0] > actors[1]:
        raise ConfigError(f"resources.actors: expected a positive number or [min, max], got {r.actors!r}")
    if (r.token_budget is not None and r.token_budget < 16) or r.rows_per_shard < 1 or r.units_per_call < 1:
        raise ConfigError("resources: token_budget must be >= 16, rows_per_shard and units_per_call >= 1")
    if r.share_prompts not in ("auto", "never", "always"):
        raise ConfigError(f"resources.share_prompts: expected auto, never or always, got {r.share_prompts!r}")
    m, so = cfg.model, cfg.storage_options or None
    if m.heads and m.armorm_checkpoint:
        raise ConfigError("model: give either heads or armorm_checkpoint, not both")
    if m.armorm_checkpoint and not _exists(storage.join(m.armorm_checkpoint, "config.json"), so):
        raise ConfigError(f"model.armorm_checkpoint: no config.json in {m.armorm_checkpoint}")
    if m.heads and not m.train_if_missing and not _exists(m.heads, so):
        raise ConfigError(f"model.heads: {m.heads} does not exist (set model.train_if_missing to train it first)")
    if m.train_if_missing and not os.path.exists(m.train_if_missing):
        raise ConfigError(f"model.train_if_missing: no such config file {m.train_if_missing}")
    try:
        TemplatePolicy.from_dict(m.template or {})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.template: {e}") from e
    if not m.armorm_checkpoint:
        try:
            resolve_source(BackboneSpec.from_dict(m.backbone))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model.backbone: {e}") from e
    if not cfg.run_id or any(c in cfg.run_id for c in "/\\ "):
        raise ConfigError(f"run_id: must be a non-empty name without slashes or spaces, got {cfg.run_id!r}")


def _exists(uri: str, storage_options: dict | None) -> bool:
    """Through pipeline.storage, so that s3:// (any fsspec URI) is checked like a local path."""
    try:
        return storage.exists(uri, storage_options)
    except Exception as e:  # noqa: BLE001 - unreachable store, bad credentials: say which URI
        raise ConfigError(secrets.scrub(f"cannot check {uri}: {e}")) from None


def load_config(path: str, overrides: dict | None = None) -> LabelConfig:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:  # its message quotes the offending line, which may hold a secret
        raise ConfigError(secrets.scrub(f"config {path} is not valid YAML: {e}")) from None
    data = {**(data or {}), **(overrides or {})}
    return parse_config(data)
