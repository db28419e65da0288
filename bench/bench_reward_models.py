"""Reward-model scoring: the same units, the same sequence classifier, two ways side by side.

  peers: the class's own forward (`AutoModelForSequenceClassification`) on length-sorted batches,
         right-padded to each batch's longest row with an attention mask, as reward-bench and
         distilabel's RewardModelScore score: rows per batch such that rows x longest <= the token
         budget (the same budget as ours, so neither side is starved or spilled).
  ours:  pipeline.reward_models.scorer.RewardModelScorer: the class's base model through the
         EmbeddingEngine (each distinct prompt once per call, rows packed without padding, where
         the attention allows it exactly) and its head at the last token.

Units: real conversations read from ../shared/data by the project's pure reader, tokenized with the
classifier's own chat template. Four sets: preference PAIRS (LLMBar, PandaLM, HH-RLHF) and
best-of-N GROUPS of 4-6 responses (Topical-Chat's six systems per dialogue, OASST trees with 4-6
replies), each at two lengths: rows whose longest unit is <= 384 tokens (short), and rows whose
longest unit is in (384, 1536] tokens (long). Rounds interleave the two ways; the median time per
set gives the ratio peers / ours (> 1: ours faster). Also the largest relative difference between
the two ways' scores.

  .venv/bin/python bench/bench_reward_models.py                     # CPU, SmolLM2-135M classifier
  .venv/bin/python bench/bench_reward_models.py --model DIR         # any *ForSequenceClassification dir
  .venv/bin/python bench/bench_reward_models.py --device cuda --shape 8b   # 8B Llama shape, random bf16

The default model is SmolLM2-135M-Instruct's real weights with a linear score head (random, seed 0:
speed does not depend on its values), saved once under .cache/bench-rm/. The last line of output is
one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.corpus import InputSpec, read_units  # noqa: E402
from pipeline.embed.batching import plan_batches  # noqa: E402
from pipeline.embed.templating import TemplatePolicy  # noqa: E402
from pipeline.reward_models.inputs import reward_model_inputs  # noqa: E402
from pipeline.reward_models.scorer import RewardModelScorer  # noqa: E402
from pipeline.reward_models.spec import RewardModelSpec  # noqa: E402

DATA = (REPO / ".." / "shared" / "data").resolve()
SHORT, LONG = 384, 1536
PAIR_INPUTS = [
    {"path": str(DATA / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar"},
    {"path": str(DATA / "pandalm" / "testset-v1.json"), "format": "pandalm"},
    {"path": str(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh_rlhf"},
]
GROUP_INPUTS = [
    {"path": str(DATA / "unieval" / "topical_chat.json"), "format": "unieval_topical_chat"},
    {"path": str(DATA / "oasst" / "en_100_message.jsonl"), "format": "oasst_best_of_n"},
]


def bench_model(device: str, shape: str) -> str:
    """A real-weights SmolLM2 classifier (CPU) or an 8B-Llama-shaped random one (GPU), saved once."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.embed.backbone import BackboneSpec, load_tokenizer, materialise_gguf, resolve_source
    from pipeline.embed.backbone import weights_fingerprint as wfp

    out = REPO / ".cache" / "bench-rm" / shape
    if (out / "config.json").is_file():
        return str(out)
    tokenizer = load_tokenizer(BackboneSpec("smollm2"))
    torch.manual_seed(0)
    if shape == "smollm2":
        source = resolve_source(BackboneSpec("smollm2"))
        directory = materialise_gguf(source, wfp(source))
        model = LlamaForSequenceClassification.from_pretrained(directory, num_labels=1)
    else:  # Llama-3-8B's shape, SmolLM2's vocabulary
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            num_labels=1,
        )
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForSequenceClassification(cfg).to(torch.bfloat16)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def unit_sets(tokenizer, family, pad_id, per_set: int) -> dict[str, list]:
    """{set name: [(input ids, prompt end), ...]} with whole rows kept together, in file order."""
    policy = TemplatePolicy(max_tokens=LONG)
    out: dict[str, list] = {}
    for kind, inputs in (("pairs", PAIR_INPUTS), ("groups", GROUP_INPUTS)):
        rows: dict[str, list] = {}
        for spec in inputs:
            t = read_units([InputSpec.from_dict(spec)], limit_rows=400).to_pylist()
            t = [u for u in t if u["quarantine_reason"] is None]
            if kind == "groups":
                t = [u for u in t if 4 <= u["n_responses"] <= 6]
            res = reward_model_inputs(
                tokenizer, family, [u["prompt"] for u in t], [u["response"] for u in t], policy, pad_id
            )
            for u, r in zip(t, res):
                rows.setdefault(u["row_id"], []).append(r)
        for length, lo, hi in (("short", 0, SHORT), ("long", SHORT, LONG)):
            picked: list = []
            for units in rows.values():
                if any(not hasattr(r, "input_ids") for r in units):
                    continue
                longest = max(len(r.input_ids) for r in units)
                if lo < longest <= hi and len(picked) < per_set:
                    picked += [(r.input_ids, r.prompt_end) for r in units]
            out[f"{kind}_{length}"] = picked
    return out


def peers(model, units, budget: int, pad_id: int, device: str) -> np.ndarray:
    lengths = np.array([len(ids) for ids, _ in units])
    out = np.empty(len(units), np.float32)
    for rows in plan_batches(lengths, budget):
        width = int(lengths[rows].max())
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : lengths[i]] = torch.as_tensor(units[i][0])
            mask[r, : lengths[i]] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out[rows] = logits[:, 0].float().cpu().numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, choices=["smollm2", "8b"])
    ap.add_argument("--units", type=int, default=96, help="units per set (whole rows)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=None)
    args = ap.parse_args()
    shape = args.shape or ("8b" if args.device.startswith("cuda") else "smollm2")
    path = args.model or bench_model(args.device, shape)
    spec = RewardModelSpec(name="bench", path=path, device=args.device)
    ours = RewardModelScorer(spec, token_budget=args.budget)
    model, tok = ours.model, ours.tokenizer  # the same loaded class: same weights, same dtype
    pad = model.config.pad_token_id
    pad = int(pad) if pad is not None else 0
    budget = ours.engine.token_budget if ours.engine is not None else int(ours.token_budget or 1024)
    sets = unit_sets(tok, ours.family, ours.info.pad_token_id, args.units)
    report: dict = {
        "model": path,
        "device": args.device,
        "dtype": ours.dtype,
        "token_budget": budget,
        "shares_prompts": ours.shares_prompts,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu(s), torch {torch.__version__}",
        "sets": {},
    }
    for name, units in sets.items():
        if not units:
            continue
        times: dict[str, list[float]] = {"peers": [], "ours": []}
        for _ in range(args.rounds):
            for way in ("peers", "ours"):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                if way == "peers":
                    a = peers(model, units, budget, pad, args.device)
                else:
                    b = ours.score([u[0] for u in units], [u[1] for u in units]).rewards
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[way].append(time.perf_counter() - t0)
        tokens = sum(len(u[0]) for u in units)
        med = {k: float(np.median(v)) for k, v in times.items()}
        diff = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-3)))
        report["sets"][name] = {
            "units": len(units),
            "tokens": tokens,
            "peers_s": round(med["peers"], 3),
            "ours_s": round(med["ours"], 3),
            "ratio_peers_over_ours": round(med["peers"] / med["ours"], 3),
            "max_rel_diff": diff,
        }
        print(
            f"{name:13s} {len(units):4d} units {tokens:7d} tokens  peers {med['peers']:.2f}s  ours {med['ours']:.2f}s  "
            f"x{med['peers'] / med['ours']:.2f}  max rel diff {diff:.1e}",
            flush=True,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
