"""What a labeling run will do, decided before anything runs: `plan_run(cfg) -> RunPlan`.

The plan expands the input specs into files (with their sizes) once; every later step (the
incremental skip, the read, the manifest) uses that list. It also holds the objectives, the
scoring identity a resumed run must match and the shards earlier attempts committed. Planning only
reads (listings, small JSON files); `run.execute(plan)` does the work. `RunPlan.manifest` turns the
plan and the shard markers into the run's manifest, as a pure function (tested without Ray).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.corpus.spec import InputSpec, assign_readings, expand_files
from pipeline.embed.checkpoint import read_objective_names
from pipeline.heads.model import ArmoHeads
from pipeline.labeling import manifest as mf
from pipeline.labeling.config import LabelConfig


@dataclass(frozen=True)
class InputFile:
    uri: str
    size: int | None  # bytes; None for a directory input (a datasets.save_to_disk folder)
    source: str | None  # the spec's source (None: named by the adapter, per row)
    spec: int  # index into RunPlan.specs
    spec_key: str | None = None  # InputSpec.key(): one file under two specs is two inputs

    def record(self) -> dict:
        """The manifest's entry (input_files, skipped_input_files)."""
        return {"uri": self.uri, "size": self.size, "source": self.source, "spec": self.spec_key}


@dataclass
class RunPlan:
    cfg: LabelConfig
    specs: list[InputSpec]
    files: list[InputFile]  # to read in this attempt
    skipped: list[InputFile]  # incremental: recorded (same size) by earlier completed runs
    objectives: list[str]  # the heads' (none in embed-only mode)
    identity: dict  # LabelConfig.scoring_identity(): a resumed run must match the recorded one
    committed: dict[str, dict] = field(default_factory=dict)  # shard id -> marker, earlier attempts

    @property
    def input_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def manifest(self, new_markers: list[dict], wall_s: float, steady: dict, versions: dict) -> dict:
        """The run's manifest from the plan and the shard markers (those committed by earlier
        attempts, `self.committed`, plus this attempt's `new_markers`)."""
        cfg = self.cfg
        markers = list(self.committed.values()) + list(new_markers)
        labeled = sum(m["labeled_units"] for m in new_markers)
        tokens = sum(m["tokens"] for m in new_markers)
        return {
            "run_id": cfg.run_id,
            "status": "complete",
            "config_hash": cfg.hash(),
            "config": cfg.to_dict(),
            "versions": versions,
            "objectives": self.objectives,
            # each reward model's column, fingerprint, logit and template (the run's identity records them)
            "reward_models": [{**rm, "column": f"rm_{rm['name']}"} for rm in self.identity.get("reward_models", [])],
            "input_files": [f.record() for f in self.files],
            "skipped_input_files": [f.record() for f in self.skipped],
            "sources": mf.summarize_sources(markers),
            "shards": len(markers),
            "shards_this_attempt": len(new_markers),
            "scored_on": dict(sum((Counter(m.get("scored_on", {})) for m in new_markers), Counter())),
            "scored_by_stage": dict(sum((Counter(m.get("scored_by_stage", {})) for m in new_markers), Counter())),
            "units_labeled_this_attempt": labeled,
            "wall_time_s": round(wall_s, 3),
            "units_per_s": round(labeled / wall_s, 3) if wall_s else None,
            "tokens_per_s": round(tokens / wall_s, 1) if wall_s else None,
            **mf.token_accounting(new_markers),
            **steady,
            "output": {
                "data": storage.join(cfg.run_dir, "data"),
                "quarantine": storage.join(cfg.run_dir, "quarantine"),
            },
        }


def job_objectives(cfg: LabelConfig) -> list[str]:
    """The objective columns this run writes: those of its heads (none in embed-only mode)."""
    m, so = cfg.model, cfg.storage_options or None
    if m.armorm_checkpoint:
        return read_objective_names(m.armorm_checkpoint, so)
    if m.heads:
        if not storage.exists(m.heads, so):
            hint = " (pipeline.training.ensure_heads trains them from model.train_if_missing)" * bool(
                m.train_if_missing
            )
            raise FileNotFoundError(f"model.heads: no heads at {m.heads}{hint}")
        return list(ArmoHeads.read_objectives(m.heads, so))
    return []


def input_files(specs: list[InputSpec], storage_options: dict | None) -> list[InputFile]:
    """Every input file of the specs, with its size: the one expansion of the run."""
    expanded = [expand_files(spec) for spec in specs]
    assign_readings(specs, expanded)  # one file under two specs: two sources, told apart in shard ids
    out = []
    for i, (spec, uris) in enumerate(zip(specs, expanded)):
        key = spec.key()
        for uri in uris:
            fs, path = storage.filesystem(uri, storage_options)
            out.append(InputFile(uri, fs.size(path) if fs.isfile(path) else None, spec.source, i, key))
    return out


def incremental_skip(files: list[InputFile], earlier: dict[tuple[str, str | None], dict]) -> list[InputFile]:
    """The files an earlier completed run recorded with the same size under the same spec.

    `earlier` is keyed by (uri, spec key) (manifest.earlier_input_files). Manifests written before
    spec keys were recorded have (uri, None): such an entry stands for the file only where one spec
    of this run reads it, as then (two specs of one file could not run together before)."""
    readers = Counter(f.uri for f in files)
    skipped = []
    for f in files:
        done = earlier.get((f.uri, f.spec_key))
        if done is None and readers[f.uri] == 1:
            done = earlier.get((f.uri, None))
        if done is not None and done.get("size") == f.size:
            skipped.append(f)
    return skipped


def plan_run(cfg: LabelConfig) -> RunPlan:
    so = cfg.storage_options or None
    specs = [InputSpec.from_dict({"storage_options": cfg.storage_options, **i}) for i in cfg.inputs]
    files = input_files(specs, so)
    skipped: list[InputFile] = []
    if cfg.incremental:
        earlier = mf.earlier_input_files(cfg.output, cfg.run_id, so)
        skipped = incremental_skip(files, earlier)
        files = [f for f in files if f not in skipped]
    return RunPlan(
        cfg=cfg,
        specs=specs,
        files=files,
        skipped=skipped,
        objectives=job_objectives(cfg),
        identity=cfg.scoring_identity(),
        committed=mf.completed_shards(cfg.run_dir, so),
    )
