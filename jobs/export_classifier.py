"""Export a linear reward head with its backbone as the backbone's own sequence classifier.

    # the Bradley-Terry head, fitted on the training split of the embeddings jobs.train_heads cached:
    python -m jobs.export_classifier --head bt --heads runs/heads/smollm2 --out runs/classifier-bt
    # the linear head closest to the heads' gated score, fitted there too:
    python -m jobs.export_classifier --head gated --heads runs/heads/smollm2 --out runs/classifier-gated
    # fitted on every unit of any run with embeddings (embed-only, or labeled with `embeddings: true`):
    python -m jobs.export_classifier --head bt --run runs/embeddings/<run_id> --out runs/classifier-bt
    python -m jobs.export_classifier --head gated --heads runs/heads/smollm2 --run runs/labels/<run_id> --out OUT

The result (`LlamaForSequenceClassification` for a Llama backbone; one label, `score.weight` [1, H],
a dedicated pad token, safetensors, no remote code) loads with
`AutoModelForSequenceClassification.from_pretrained(OUT)` and in TRL, and gives reward = w·h, the
head on this project's response embedding h. `OUT/classifier_export.json` reports the head (kind,
fit counts, per-source accuracy or agreement with the gated score) and the backbone. The gated
ArmoRM score itself does not fit that class: jobs.export_armorm writes it.

The backbone is the one the embeddings were computed with: the run's (its `_run.json`), else the
heads' training config (`training.json`); `--backbone` names it otherwise, and must then be the same
weights (the units' backbone fingerprint is checked). Only decoder backbones export. `--out` may be
an s3:// URI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import pyarrow as pa
import torch

from pipeline import storage
from pipeline.embed.backbone import Backbone, BackboneSpec, load_backbone
from pipeline.embed.checkpoint import checkpoint_backbone
from pipeline.embed.classifier_export import BRADLEY_TERRY, GATED_FIT, VAL_FRACTION, export_classifier
from pipeline.heads.bradley_terry import DEFAULT_L2_GRID
from pipeline.heads.checkpoint import CheckpointError
from pipeline.heads.model import META_FILE, ArmoHeads
from pipeline.heads.regression import DEFAULT_LAMBDA_GRID
from pipeline.training import is_test_row, read_run_units

HEADS = {"bt": BRADLEY_TERRY, "gated": GATED_FIT}
TRAINING_FILE = "training.json"  # written beside the heads by jobs.train_heads


class ExportError(Exception):
    """What the user asked cannot be done; the message says why (exit code 2)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.export_classifier", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--head", required=True, choices=sorted(HEADS), help="bt: Bradley-Terry; gated: fit to the gated score"
    )
    ap.add_argument(
        "--heads",
        help="heads directory written by jobs.train_heads: the gated score (--head gated); without --run, "
        "its cached embeddings (training split) are fitted on",
    )
    ap.add_argument("--run", help="run directory with embeddings: every unit is fitted on")
    ap.add_argument("--backbone", help="the embeddings' backbone (name or path), if not the one recorded")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--all-rows", action="store_true", help="with --heads and no --run: the test split too")
    ap.add_argument(
        "--val-fraction",
        type=float,
        help=f"held out to choose L2 / λ (default: the heads' training option, else {VAL_FRACTION})",
    )
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: keep)")
    ap.add_argument("--shard-size-mb", type=int, default=5 * 1024, help="largest safetensors shard")
    args = ap.parse_args(argv)
    if not (args.heads or args.run):
        ap.error("give --heads (its cached embeddings) or --run (a run with embeddings)")
    if args.head == "gated" and not args.heads:
        ap.error("--head gated needs --heads: the gated score it fits")
    if args.all_rows and args.run:
        ap.error("--all-rows applies to the heads' cached embeddings, not to --run (every unit is used)")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        ap.error("--val-fraction must be in [0, 1)")
    from pipeline.secrets import install_excepthook, scrub

    install_excepthook()
    try:
        report = export(args)
    except (ExportError, CheckpointError) as e:
        print(scrub(f"cannot export: {e}"), file=sys.stderr)
        return 2
    fit = report["fit"]
    summary = {
        "checkpoint": args.out,
        "architecture": report["architecture"],
        "head": report["head"],
        "pad_token_id": report["pad_token_id"],
        "units": fit["units"],
        "per_source": fit["per_source"],
    }
    print(scrub(json.dumps(summary, default=float)))
    return 0


def export(args: argparse.Namespace) -> dict:
    training = _training_record(args.heads) if args.heads else None
    heads = None
    if args.head == "gated":
        try:
            heads = ArmoHeads.load(args.heads)
        except ValueError as e:  # not heads, or corrupt (fingerprint mismatch)
            raise ExportError(str(e)) from e
    if args.run:
        run_dir, split = args.run, "all"
    else:
        assert training is not None
        run_dir = training.get("embedding_run")
        if not run_dir:
            raise ExportError(f"{args.heads}/{TRAINING_FILE} names no embedding_run; give --run")
        split = "all" if args.all_rows else "train"
    units = _units(run_dir)
    if split == "train":
        test_fraction = float(training["config"]["test_fraction"])  # type: ignore[index]
        units = units.filter(pa.array(~is_test_row(units.column("row_id").to_pylist(), test_fraction)))
    backbone, spec = _backbone(args.backbone, run_dir, training)
    provenance = {
        "embeddings": {"run": run_dir, "split": split, "units": units.num_rows},
        "backbone_spec": spec,
    }
    if args.heads:
        recorded = storage.read_json(storage.join(args.heads, META_FILE)).get("fingerprint")
        provenance["heads"] = {"path": args.heads, "fingerprint": heads.fingerprint if heads else recorded}
    # the heads' own training options, so that on their training split `bt` is their baseline
    options = ((training or {}).get("config") or {}).get("heads") or {}
    val_fraction = args.val_fraction if args.val_fraction is not None else options.get("val_fraction", VAL_FRACTION)
    return export_classifier(
        HEADS[args.head],
        units,
        backbone,
        args.out,
        heads=heads,
        val_fraction=float(val_fraction),
        l2_grid=options.get("bt_l2_grid") or DEFAULT_L2_GRID,
        ridge_grid=options.get("ridge_grid") or DEFAULT_LAMBDA_GRID,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        shard_size=args.shard_size_mb * 1024**2,
        provenance=provenance,
    )


def _training_record(heads_dir: str) -> dict:
    """jobs.train_heads' record beside the heads ({} when there is none); the heads must exist."""
    if not storage.exists(storage.join(heads_dir, META_FILE)):
        raise ExportError(
            f"heads directory {heads_dir} not found (no {META_FILE}): train heads with jobs.train_heads first"
        )
    uri = storage.join(heads_dir, TRAINING_FILE)
    return storage.read_json(uri) if storage.exists(uri) else {}


def _units(run_dir: str) -> pa.Table:
    try:
        units = read_run_units(run_dir)
    except FileNotFoundError as e:
        raise ExportError(f"run {run_dir}: {e}") from e
    if "embedding" not in units.column_names:
        raise ExportError(f"run {run_dir} stored no embeddings: label it with `embeddings: true`")
    return units


def _backbone(name: str | None, run_dir: str, training: dict | None) -> tuple[Backbone, object]:
    """(the backbone, loaded on CPU in float32, and the spec it came from): --backbone, else the run's
    recorded backbone or ArmoRM checkpoint, else the heads' training config."""
    if name:
        spec: object = name
    else:
        identity_uri = storage.join(run_dir, storage.RUN_IDENTITY)
        identity = storage.read_json(identity_uri) if storage.exists(identity_uri) else {}
        if identity.get("armorm_checkpoint"):
            path = identity["armorm_checkpoint"]
            backbone, _ = checkpoint_backbone(path, device="cpu", dtype="float32")
            return backbone, {"armorm_checkpoint": path}
        spec = identity.get("backbone") or ((training or {}).get("config") or {}).get("backbone")
        if not spec:
            raise ExportError(f"run {run_dir} records no backbone: name it with --backbone")
    try:
        parsed = BackboneSpec.from_dict(spec)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ExportError(f"backbone {spec!r}: {e}") from e
    try:
        backbone = load_backbone(dataclasses.replace(parsed, device="cpu", dtype="float32"))
    except FileNotFoundError as e:
        raise ExportError(f"backbone {spec!r}: {e}") from e
    return backbone, spec


if __name__ == "__main__":
    sys.exit(main())
