"""The labeling job's configuration: parsed from YAML and validated up front, with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any

import yaml
from pydantic import Field

from pipeline import secrets, storage
from pipeline.config_schema import ConfigErrors, Loc, Schema, at_least, list_of, one_of, under
from pipeline.corpus import InputSpec, expand_files
from pipeline.corpus.spec import FILE_FORMATS, InputSpecError, assign_readings
from pipeline.embed.backbone import DTYPES, BackboneSpec, resolve_source
from pipeline.embed.backbone import KINDS as BACKBONE_KINDS
from pipeline.embed.templating import OVERFLOW_POLICIES, TemplatePolicy
from pipeline.objectives import KIND_ALIASES, SCALES, Objective
from pipeline.reward_models.spec import (
    NAME_PATTERN,
    RewardModelError,
    RewardModelResources,
    RewardModelSpec,
    inspect_reward_model,
)
from pipeline.reward_models.spec import fingerprint as reward_model_fingerprint
from pipeline.schema import KINDS as UNIT_KINDS


class ConfigError(ConfigErrors):
    """A bad config: `errors` lists every problem, each naming its key path; str() is all of them."""


def _take(cls, data: Any, where: str):
    """Build a dataclass from a mapping, refusing unknown keys (no type checks: see SCHEMA)."""
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
    # Sequence-classifier reward models scored in the same run, each its own actor pool: column rm_<name>
    reward_models: list[dict] = field(default_factory=list)  # RewardModelSpec fields

    def scores_with_backbone(self) -> bool:
        """Whether the backbone pass runs: for heads, a checkpoint or embeddings, or when no reward
        model is named (an embed-only run)."""
        return bool(self.heads or self.armorm_checkpoint or not self.reward_models)


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
class QuarantineLimits:
    """A run whose quarantined share of input rows is above a limit fails (after committing what it
    labeled, its manifest saying `status: failed_quarantine`): a mapping error or a corrupt export
    should not pass as a night's labels. null turns a limit off."""

    per_source: float | None = 0.5  # rows_quarantined / rows_in of any one source
    overall: float | None = 0.25  # the same over every source of the run


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
    # One live driver per run: a lease under the run's prefix, renewed every lease_ttl_s / 4
    # seconds; a killed driver blocks the run for at most this long (pipeline/labeling/lease.py).
    # null: no lease (stores without conditional writes); then never start two drivers on a run id.
    lease_ttl_s: float | None = 120.0
    # Fail the run (with what it waits for) when nothing was committed for this long; null: never.
    stall_timeout_s: float | None = 900.0
    max_quarantine_fraction: QuarantineLimits = field(default_factory=QuarantineLimits)

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
        identity = {
            "backbone": m.backbone if not m.armorm_checkpoint else None,
            "armorm_checkpoint": m.armorm_checkpoint,
            "heads": m.heads,
            "heads_fingerprint": heads_fp,
            "template": m.template,
            "embeddings": self.embeddings,
        }
        if m.reward_models:  # absent otherwise, so runs recorded before reward models resume as they were
            specs = [RewardModelSpec.from_dict(r) for r in m.reward_models]
            identity["reward_models"] = [reward_model_identity(spec, so) for spec in specs]
        return identity

    def hash(self) -> str:
        """Identity of what the run computes (not where it runs, nor with which credentials): used in
        manifests and submission ids."""
        d = secrets.without_credentials(self.to_dict())
        operational = ("lease_ttl_s", "stall_timeout_s", "max_quarantine_fraction")
        for k in ("ray_address", "progress_interval_s", "count_units", *operational):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# What the schema checks beyond the dataclasses' own annotations (pipeline/config_schema.py).
# An input spec, as in the labeling and the training config.
INPUT_OVERRIDES: dict[tuple[type, str], Any] = {
    (InputSpec, "file_format"): one_of(*FILE_FORMATS),
    (InputSpec, "kind"): one_of(*UNIT_KINDS) | None,
    (InputSpec, "objectives"): list[Objective] | None,
    (Objective, "kind"): one_of(*KIND_ALIASES),
    (Objective, "scale"): one_of(*SCALES),
}
MODEL_OVERRIDES: dict[tuple[type, str], Any] = {
    (BackboneSpec, "kind"): one_of(*BACKBONE_KINDS),
    (BackboneSpec, "dtype"): one_of(*DTYPES),
    (TemplatePolicy, "overflow"): one_of(*OVERFLOW_POLICIES),
    (TemplatePolicy, "max_tokens"): at_least(2),
}
REWARD_MODEL_OVERRIDES: dict[tuple[type, str], Any] = {
    (ModelConfig, "reward_models"): list[RewardModelSpec],
    (RewardModelSpec, "logit_index"): at_least(0) | None,
    (RewardModelSpec, "template"): TemplatePolicy,
    (RewardModelSpec, "dtype"): one_of(*DTYPES),
    (RewardModelSpec, "share_prompts"): one_of("auto", "never"),
    (RewardModelSpec, "resources"): RewardModelResources,
    (RewardModelResources, "actors"): at_least(1) | list_of(at_least(1)) | None,
    (RewardModelResources, "num_gpus_per_actor"): at_least(0, float) | None,
    (RewardModelResources, "num_cpus_per_actor"): at_least(0, float) | None,
    (RewardModelResources, "threads_per_actor"): at_least(1) | None,
    (RewardModelResources, "custom_resources_per_actor"): dict[str, float] | None,
    (RewardModelResources, "token_budget"): at_least(16) | None,
    (RewardModelResources, "units_per_call"): at_least(1) | None,
}
RESOURCES_OVERRIDES: dict[tuple[type, str], Any] = {
    (ResourcesConfig, "actors"): at_least(1) | list_of(at_least(1)),
    (ResourcesConfig, "num_gpus_per_actor"): at_least(0, float),
    (ResourcesConfig, "num_cpus_per_actor"): at_least(0, float),
    (ResourcesConfig, "threads_per_actor"): at_least(1) | None,
    (ResourcesConfig, "token_budget"): at_least(16) | None,
    (ResourcesConfig, "units_per_call"): at_least(1),
    (ResourcesConfig, "share_prompts"): one_of("auto", "never", "always"),
    (ResourcesConfig, "rows_per_shard"): at_least(1),
    (ResourcesConfig, "cpus_per_cpu_task"): Annotated[float, Field(gt=0)],
}
SCHEMA = Schema(
    "labeling",
    LabelConfig,
    {
        **INPUT_OVERRIDES,
        **MODEL_OVERRIDES,
        **REWARD_MODEL_OVERRIDES,
        **RESOURCES_OVERRIDES,
        (LabelConfig, "inputs"): Annotated[list[InputSpec], Field(min_length=1)],
        (ModelConfig, "backbone"): BackboneSpec | str,  # a path string, or BackboneSpec fields
        (ModelConfig, "template"): TemplatePolicy,
        (LabelConfig, "limit_rows_per_input"): at_least(1) | None,
        (LabelConfig, "progress_interval_s"): Annotated[float, Field(ge=0)],
        (LabelConfig, "lease_ttl_s"): Annotated[float, Field(gt=0)] | None,
        (LabelConfig, "stall_timeout_s"): Annotated[float, Field(gt=0)] | None,
        (QuarantineLimits, "per_source"): Annotated[float, Field(ge=0, le=1)] | None,
        (QuarantineLimits, "overall"): Annotated[float, Field(ge=0, le=1)] | None,
    },
)


def parse_config(data: dict) -> LabelConfig:
    """Relative local paths are relative to the working directory (the repo root, also under
    `ray job submit --working-dir .`). Every problem is reported at once (ConfigError.errors)."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    errors: list[str] = []
    try:
        data = _lift_uri_credentials(dict(data))
    except ConfigError as e:
        errors += e.errors
    type_errors, bad = SCHEMA.type_errors(data)
    errors += type_errors
    cfg = SCHEMA.build(data, bad)
    errors += _validate(cfg, data, bad)
    if errors:
        raise ConfigError(errors)
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
        if "inputs" in data:
            options = data.get("storage_options") if isinstance(data.get("storage_options"), dict) else None
            data["inputs"] = secrets.lift_input_uris(data["inputs"], options)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return data


def input_errors(inputs: Any, storage_options: Any, bad: list[Loc], where: str = "inputs") -> list[str]:
    """Each input spec that passed the type checks: its own checks (adapter, columns) and whether
    its paths match files. One message per bad input, naming it."""
    if not isinstance(inputs, list):
        return []
    top = storage_options if isinstance(storage_options, dict) else {}
    out = []
    specs, files = [], []
    for i, spec in enumerate(inputs):
        if under(bad, where, i) or not isinstance(spec, dict):
            continue
        try:
            parsed = InputSpec.from_dict({"storage_options": top, **spec})
            files.append(expand_files(parsed))
            specs.append(parsed)
        except Exception as e:  # noqa: BLE001 - reported with the input's position
            out.append(_at(f"{where}[{i}]", secrets.scrub(str(e)), InputSpec))
    if not out and len(specs) == len(inputs):
        try:
            assign_readings(specs, files)  # one file under two specs: distinct sources, not one spec twice
        except InputSpecError as e:
            out.append(f"{where}: {e}")
    return out


def _at(where: str, message: str, cls: type) -> str:
    """`inputs[0]` + `format: unknown adapter ...` -> `inputs[0].format: unknown adapter ...`."""
    head, sep, rest = message.partition(": ")
    if sep and head in {f.name for f in fields(cls)}:
        return f"{where}.{head}: {rest}"
    return f"{where}: {message}"


def _validate(cfg: LabelConfig | None, data: dict, bad: list[Loc]) -> list[str]:
    """The checks beyond types: files exist, the backbone resolves, exclusive settings. `cfg` is
    the best-effort config (keys with type errors at their defaults); None when a required key is
    missing, and then only the inputs are checked."""
    errors = input_errors(data.get("inputs"), data.get("storage_options"), bad)
    if cfg is None:
        return errors
    r = cfg.resources
    if isinstance(r.actors, list) and not under(bad, "resources", "actors"):
        if len(r.actors) != 2 or not all(a >= 1 for a in r.actors) or r.actors[0] > r.actors[1]:
            errors.append(f"resources.actors: expected a positive number or [min, max], got {r.actors!r}")
    elif isinstance(r.actors, int) and r.actors < 1:
        errors.append(f"resources.actors: expected a positive number or [min, max], got {r.actors!r}")
    m, so = cfg.model, cfg.storage_options or None
    if m.heads and m.armorm_checkpoint:
        errors.append("model: give either heads or armorm_checkpoint, not both")
    try:
        if m.armorm_checkpoint and not _exists(storage.join(m.armorm_checkpoint, "config.json"), so):
            errors.append(f"model.armorm_checkpoint: no config.json in {m.armorm_checkpoint}")
    except ConfigError as e:
        errors.append(f"model.armorm_checkpoint: {e}")
    try:
        if m.heads and not m.train_if_missing and not _exists(m.heads, so):
            errors.append(f"model.heads: {m.heads} does not exist (set model.train_if_missing to train it first)")
    except ConfigError as e:
        errors.append(f"model.heads: {e}")
    if m.train_if_missing and not os.path.exists(m.train_if_missing):
        errors.append(f"model.train_if_missing: no such config file {m.train_if_missing}")
    if not under(bad, "model", "template"):
        try:
            TemplatePolicy.from_dict(m.template or {})
        except (TypeError, ValueError) as e:
            errors.append(f"model.template: {e}")
    if not m.armorm_checkpoint and not under(bad, "model", "backbone"):
        try:
            resolve_source(BackboneSpec.from_dict(m.backbone))
        except Exception as e:  # noqa: BLE001
            errors.append(f"model.backbone: {secrets.scrub(str(e))}")
    if isinstance(m.reward_models, list):
        errors += reward_model_errors(
            m.reward_models,
            so,
            tuple(i for i in range(len(m.reward_models)) if under(bad, "model", "reward_models", i)),
        )
    if not under(bad, "run_id") and (not cfg.run_id or any(c in cfg.run_id for c in "/\\ ")):
        errors.append(f"run_id: must be a non-empty name without slashes or spaces, got {cfg.run_id!r}")
    return errors


def reward_model_errors(models: list[dict], storage_options: dict | None, skip: tuple[int, ...] = ()) -> list[str]:
    """Names (a column each, rm_<name>, none twice) and each checkpoint's inspection, one message per
    model naming it and the file (pipeline.reward_models.spec.inspect_reward_model). `skip`: models
    whose settings had type errors (reported already); their names still count as taken."""
    from pipeline.schema import OUTPUT_FIXED_FIELDS

    errors: list[str] = []
    taken = {name for name, _ in OUTPUT_FIXED_FIELDS}
    seen: set[str] = set()
    for i, raw in enumerate(models):
        where = f"model.reward_models[{i}]"
        try:
            spec = RewardModelSpec.from_dict(raw)
        except (RewardModelError, TypeError) as e:
            errors.append(f"{where}: {e}")
            continue
        if not NAME_PATTERN.match(spec.name):
            errors.append(f"{where}.name: {spec.name!r}: use lower-case letters, digits and _ (column rm_<name>)")
            continue
        if spec.name in seen:
            errors.append(f"{where}.name: {spec.name!r} is used twice (each model writes its own column rm_<name>)")
            continue
        seen.add(spec.name)
        if i in skip:
            continue
        if spec.column in taken:
            errors.append(f"{where}.name: column {spec.column!r} collides with an output column")
        try:
            TemplatePolicy.from_dict(spec.template or {})
            inspect_reward_model(spec, storage_options)
        except (RewardModelError, TypeError, ValueError) as e:
            errors.append(f"{where}: {secrets.scrub(str(e))}")
        except Exception as e:  # noqa: BLE001 - an unreachable store or unreadable file: say which model
            errors.append(f"{where}: reward model {spec.name!r} ({spec.path}): cannot read: {secrets.scrub(str(e))}")
    return errors


def reward_model_identity(spec: RewardModelSpec, storage_options: dict | None) -> dict:
    """What decides a reward model's column: its weights and config (fingerprint), the logit read
    and the template. Its path and resources are not part of it."""
    return {
        "name": spec.name,
        "fingerprint": reward_model_fingerprint(spec, storage_options),
        "logit_index": spec.logit_index,
        "template": spec.template,
    }


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
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(data).__name__}")
    return parse_config({**(data or {}), **(overrides or {})})
