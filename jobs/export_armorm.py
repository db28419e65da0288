"""Export trained heads with their backbone into the released ArmoRM checkpoint layout.

    python -m jobs.export_armorm --heads runs/heads/smollm2 --backbone smollm2 --out runs/armorm-smollm2

The result (config.json with the ArmoRM keys, sharded safetensors, the tokenizer with a dedicated
pad token) loads wherever the released checkpoint loads, and a labeling job scores with it through
`model.armorm_checkpoint`. An ensemble trained beside the heads (`heads.ensemble: K`) travels in
`<out>/ensemble/`. Only Llama-architecture backbones fit that layout. `--out` may be an
s3:// URI (credentials and endpoint from the usual AWS environment variables).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from pipeline import storage
from pipeline.embed.backbone import BackboneSpec, load_backbone
from pipeline.embed.checkpoint import checkpoint_fingerprint, export_armorm_checkpoint, load_armorm_checkpoint
from pipeline.heads.checkpoint import CheckpointError
from pipeline.heads.ensemble import DIRECTORY as ENSEMBLE_DIRECTORY
from pipeline.heads.ensemble import EnsembleError, load_beside
from pipeline.heads.model import ArmoHeads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.export_armorm", description=__doc__.splitlines()[0])
    ap.add_argument("--heads", required=True, help="heads directory written by jobs.train_heads")
    ap.add_argument("--backbone", default="smollm2", help="backbone the heads were trained on (name or path)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: keep)")
    ap.add_argument("--shard-size-mb", type=int, default=5 * 1024, help="largest safetensors shard")
    args = ap.parse_args(argv)

    heads = ArmoHeads.load(args.heads)
    backbone = load_backbone(BackboneSpec(path=args.backbone, device="cpu", dtype="float32"))
    try:
        out = export_armorm_checkpoint(
            heads,
            backbone.model,
            args.out,
            tokenizer=backbone.tokenizer,
            shard_size=args.shard_size_mb * 1024**2,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
        )
        carried = carry_ensemble(args.heads, heads, backbone.fingerprint, out)
    except (CheckpointError, EnsembleError) as e:
        print(f"cannot export: {e}", file=sys.stderr)
        return 2
    config = json.loads(storage.read_bytes(storage.join(out, "config.json")))
    print(
        json.dumps(
            {
                "checkpoint": out,
                "objectives": heads.objectives,
                "heads_fingerprint": heads.fingerprint,
                "pad_token_id": config["pad_token_id"],
                "vocab_size": config["vocab_size"],
                "ensemble": carried,
            }
        )
    )
    return 0


def carry_ensemble(heads_dir: str, heads: ArmoHeads, backbone_fingerprint: str, out: str) -> dict | None:
    """An ensemble trained beside the heads goes into `<out>/ensemble/`, bound to the checkpoint's
    ids (its heads' fingerprint and the checkpoint fingerprint a labeling run reports), so a run on
    `model.armorm_checkpoint` writes score_mean / score_std / score_min as the heads' run did."""
    ensemble = load_beside(heads_dir)
    if ensemble is None:
        return None
    # trained beside these heads, on this backbone's embeddings (else the spread means nothing here)
    ensemble.check(heads.fingerprint, backbone_fingerprint, f"{heads_dir}/{ENSEMBLE_DIRECTORY}")
    _, weights, exported = load_armorm_checkpoint(out)
    bound = ensemble.bound_to(
        exported.fingerprint, checkpoint_fingerprint(weights.directory, exported), why="jobs.export_armorm"
    )
    return {"size": bound.size, "fingerprint": bound.save(storage.join(out, ENSEMBLE_DIRECTORY))}


if __name__ == "__main__":
    sys.exit(main())
