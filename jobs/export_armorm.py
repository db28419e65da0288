"""Export trained heads with their backbone into the released ArmoRM checkpoint layout.

    python -m jobs.export_armorm --heads runs/heads/smollm2 --backbone smollm2 --out runs/armorm-smollm2

The result (config.json with the ArmoRM keys, sharded safetensors, the tokenizer with a dedicated
pad token) loads wherever the released checkpoint loads, and a labeling job scores with it through
`model.armorm_checkpoint`. Only Llama-architecture backbones fit that layout. `--out` may be an
s3:// URI (credentials and endpoint from the usual AWS environment variables).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from pipeline import storage
from pipeline.embed.backbone import BackboneSpec, load_backbone
from pipeline.embed.checkpoint import export_armorm_checkpoint
from pipeline.heads.checkpoint import CheckpointError
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
    except CheckpointError as e:
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
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
