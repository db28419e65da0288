"""Embedding throughput: the same rows, the same model, one process, three ways side by side.

  1. model card:  one conversation at a time (the released ArmoRM model card's usage), no padding.
  2. rewardbench: fixed batches of 8 in input order, right-padded to the batch maximum, 2,048-token
                  truncation (reward-bench's ArmoRM pipeline).
  3. ours:        EmbeddingEngine: rows sorted by length, token-budget batches, order restored.

Rows: a realistic length mix of HH-RLHF (multi-turn), PandaLM (instruction + input) and OASST
(best-of-N replies) conversations from the shared data, read here with plain json/gzip. Rows longer
than 2,048 tokens are left out so that all three ways see identical token ids.

Reports real (unpadded) tokens/s per way, the ratios, and how far (3) and (2) are from (1)
numerically. On CUDA also MFU: (2 x non-embedding params x real tokens + causal attention FLOPs)
/ time / a measured bf16 matmul peak. The last line of output is ONE JSON object with the headline
figures.

  .venv/bin/python bench/bench_embed.py                      # CPU, SmolLM2-135M, 300 rows
  .venv/bin/python bench/bench_embed.py --device cuda        # Llama-3-8B shape, random bf16 weights
  .venv/bin/python bench/bench_embed.py --sweep              # CPU tuning: dtype x threads x budget (ours only)
  .venv/bin/python bench/bench_embed.py --measure-load       # GGUF direct vs materialised load time
  .venv/bin/python bench/bench_embed.py --prompt-sharing     # per-unit batches vs shared-prompt packing

--prompt-sharing: per shared set (units read by the corpus readers, SmolLM2 template, the first
--set-rows rows of each file) and a best-of-16 set (real Open Assistant prompts, each with 16 real
replies: its own, then replies to other prompts), on the same token ids, rounds interleaved:
  per_unit:   today's path, one full pass per unit in sorted token-budget batches (share_prompts=never);
  shared:     shared-prompt packing, several groups per row (the default);
  shared_1g:  shared-prompt packing, one group (piece) per row.
It prints useful tokens/s (useful = each distinct prompt once + every response, the same count for
every way), the speedup over per_unit, computed/useful tokens per way, the token-count bound
(units' tokens / useful tokens: the speedup if time were proportional to tokens) and the max
relative difference from per_unit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.embed import (
    BackboneSpec,
    EmbeddingEngine,
    TemplatePolicy,
    load_backbone,
    load_tokenizer,  # noqa: E402
    tokenize_many,
)
from pipeline.embed.backbone import Backbone  # noqa: E402

DATA = REPO / ".." / "shared" / "data"
REWARDBENCH_BATCH = 8
REWARDBENCH_MAX_TOKENS = 2048


# --- rows ----------------------------------------------------------------------------------------


def hh_rows(limit: int) -> list[tuple[list[dict], str]]:
    out = []
    with gzip.open(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            parts = re.split(r"\n\n(Human|Assistant): ", json.loads(line)["chosen"])
            msgs = [
                {"role": "user" if r == "Human" else "assistant", "content": t}
                for r, t in zip(parts[1::2], parts[2::2])
            ]
            if len(msgs) >= 2 and msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user":
                out.append((msgs[:-1], msgs[-1]["content"]))
            if len(out) == limit:
                break
    return out


def pandalm_rows(limit: int) -> list[tuple[list[dict], str]]:
    out = []
    for row in json.loads((DATA / "pandalm" / "testset-v1.json").read_text(encoding="utf-8")):
        text = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        for key in ("response1", "response2"):
            out.append(([{"role": "user", "content": text}], row[key]))
        if len(out) >= limit:
            break
    return out[:limit]


def oasst_rows(limit: int) -> list[tuple[list[dict], str]]:
    out = []
    with open(DATA / "oasst" / "en_100_message.jsonl", encoding="utf-8") as f:
        for line in f:
            tree = json.loads(line)
            prompt = [{"role": "user", "content": tree["text"]}]
            for reply in tree.get("replies") or []:
                if reply.get("role") == "assistant":
                    out.append((prompt, reply["text"]))
            if len(out) >= limit:
                break
    return out[:limit]


def bench_rows(n: int) -> list[tuple[list[dict], str]]:
    third = n // 3
    return hh_rows(third) + pandalm_rows(third) + oasst_rows(n - 2 * third)


# --- the three ways ------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def way_model_card(backbone: Backbone, ids: list[list[int]], ends: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One conversation per forward pass, no padding, no mask."""
    model, dev = backbone.model, backbone.device
    response, prompt = [], []
    with torch.inference_mode():
        for seq, end in zip(ids, ends):
            hidden = model(input_ids=torch.tensor([seq], device=dev), use_cache=False).last_hidden_state[0]
            response.append(hidden[-1].float().cpu().numpy())
            prompt.append(hidden[end].float().cpu().numpy())
    return np.stack(response), np.stack(prompt)


def way_rewardbench(backbone: Backbone, ids: list[list[int]], ends: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Fixed batches of 8 in input order, right-padded to the batch maximum, truncated at 2,048."""
    model, dev = backbone.model, backbone.device
    pad = backbone.tokenizer.pad_token_id or 0
    response, prompt = [], []
    with torch.inference_mode():
        for start in range(0, len(ids), REWARDBENCH_BATCH):
            seqs = [s[:REWARDBENCH_MAX_TOKENS] for s in ids[start : start + REWARDBENCH_BATCH]]
            width = max(len(s) for s in seqs)
            batch = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                batch[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            hidden = model(input_ids=batch.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state
            rows = torch.arange(len(seqs))
            last = torch.tensor([len(s) - 1 for s in seqs])
            response.append(hidden[rows, last].float().cpu().numpy())
            prompt.append(hidden[rows, torch.tensor(ends[start : start + len(seqs)])].float().cpu().numpy())
    return np.concatenate(response), np.concatenate(prompt)


def way_ours(backbone: Backbone, ids, ends, token_budget: int) -> tuple[np.ndarray, np.ndarray]:
    threads = torch.get_num_threads() if backbone.device == "cpu" else None  # keep --threads
    out = EmbeddingEngine(backbone, token_budget=token_budget, num_threads=threads).embed(ids, ends)
    return out.response, out.prompt


def timed(fn, device: str):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def max_rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


# --- FLOPs ---------------------------------------------------------------------------------------


def model_flops(backbone: Backbone, lengths: list[int]) -> float:
    """Useful FLOPs for the real tokens: 2 x non-embedding params per token, plus causal attention
    (QK^T and AV, 2 FLOPs per multiply-add, L(L+1)/2 query-key pairs per head and layer)."""
    cfg = backbone.model.config
    params = sum(p.numel() for name, p in backbone.model.named_parameters() if "embed" not in name)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    pairs = sum(n * (n + 1) / 2 for n in lengths)
    return 2.0 * params * sum(lengths) + cfg.num_hidden_layers * heads * head_dim * 2 * 2 * pairs


def matmul_peak(device: str, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Measured FLOP/s of a square matmul, the practical peak to compare against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2.0 * size**3 * repeats / (time.perf_counter() - start)


# --- backbones -----------------------------------------------------------------------------------


def llama3_8b_random(device: str) -> Backbone:
    """A Llama-3-8B-shaped base model with random bf16 weights (FLOPs do not depend on values);
    the SmolLM2 tokenizer renders the conversations (its ids fit the larger vocabulary)."""
    from transformers import AutoModel, LlamaConfig

    from pipeline.embed.backbone import _resolve_attention

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    )
    attn = _resolve_attention("auto", device, "decoder")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(BackboneSpec("smollm2"))
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        kind="decoder",
        hidden_size=4096,
        device=device,
        dtype="bfloat16",
        max_length=8192,
        fingerprint="random-llama3-8b",
        name="llama3-8b-shape (random)",
        attn_implementation=attn,
    )


def get_backbone(args) -> Backbone:
    if args.backbone == "llama3-8b-random":
        return llama3_8b_random(args.device)
    return load_backbone(BackboneSpec(args.backbone, device=args.device, dtype=args.dtype))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --- modes ---------------------------------------------------------------------------------------


def tokenized_rows(backbone: Backbone, n: int):
    rows = bench_rows(n)
    policy = TemplatePolicy(max_tokens=backbone.max_length)
    results = tokenize_many(backbone.tokenizer, [r[0] for r in rows], [r[1] for r in rows], policy)
    good = [r for r in results if not isinstance(r, Exception) and r.total_tokens <= REWARDBENCH_MAX_TOKENS]
    return good, len(rows)


def run_compare(args) -> dict:
    backbone = get_backbone(args)
    good, asked = tokenized_rows(backbone, args.rows)
    ids = [r.input_ids for r in good]
    ends = [r.prompt_end for r in good]
    lengths = [len(s) for s in ids]
    tokens = sum(lengths)
    print(
        f"backbone {backbone.name} on {backbone.device} ({backbone.dtype}, {backbone.attn_implementation}), "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    print(
        f"rows: {len(good)} of {asked} (<= {REWARDBENCH_MAX_TOKENS} tokens), real tokens {tokens}, "
        f"lengths min/median/p90/max {min(lengths)}/{int(np.median(lengths))}/{int(np.percentile(lengths, 90))}/"
        f"{max(lengths)}",
        flush=True,
    )
    way_model_card(backbone, ids[:2], ends[:2])  # warm-up (allocator, kernels)
    ways = {
        "model_card": lambda: way_model_card(backbone, ids, ends),
        "rewardbench": lambda: way_rewardbench(backbone, ids, ends),
        "ours": lambda: way_ours(backbone, ids, ends, args.token_budget),
    }
    # Rounds interleave the ways so that a noisy neighbour slows all of them alike; the median
    # round counts.
    results, runs = {}, {name: [] for name in args.ways}
    for round_ in range(args.repeats):
        for name in args.ways:
            results[name], secs = timed(ways[name], backbone.device)
            runs[name].append(secs)
            print(f"round {round_}  {name:12s} {secs:8.2f} s  {tokens / secs:10.1f} tokens/s", flush=True)
    seconds = {name: float(np.median(v)) for name, v in runs.items()}
    headline = {
        "bench": "embed",
        "device": backbone.device,
        "device_name": (torch.cuda.get_device_name() if backbone.device.startswith("cuda") else cpu_model()),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "backbone": backbone.name,
        "dtype": backbone.dtype,
        "attn": backbone.attn_implementation,
        "rows": len(good),
        "real_tokens": tokens,
        "token_budget": args.token_budget,
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in seconds.items()},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "repeats": args.repeats,
        "tokens_per_s_all_rounds": {k: [round(tokens / x, 1) for x in v] for k, v in runs.items()},
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if "model_card" in seconds:
        headline["speedup_vs_model_card"] = {k: round(seconds["model_card"] / v, 2) for k, v in seconds.items()}
        ref = results["model_card"]
        headline["max_rel_err_vs_model_card"] = {
            k: {"response": max_rel_err(v[0], ref[0]), "prompt": max_rel_err(v[1], ref[1])}
            for k, v in results.items()
            if k != "model_card"
        }
    if "rewardbench" in seconds and "ours" in seconds:
        headline["speedup_ours_vs_rewardbench"] = round(seconds["rewardbench"] / seconds["ours"], 2)
    flops = model_flops(backbone, lengths)
    headline["model_tflop"] = round(flops / 1e12, 3)
    if backbone.device.startswith("cuda"):
        peak = matmul_peak(backbone.device, torch.bfloat16, 8192, 50)
        headline["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
        headline["mfu"] = {k: round(flops / v / peak, 4) for k, v in seconds.items()}
    else:
        # CPU: the same ratio against a measured matmul of the model's dtype (not a vendor peak).
        peak = matmul_peak("cpu", getattr(torch, backbone.dtype), 2048, 10)
        headline[f"cpu_{backbone.dtype}_matmul_peak_gflops"] = round(peak / 1e9, 1)
        headline["flops_utilisation"] = {k: round(flops / v / peak, 4) for k, v in seconds.items()}
    return headline


def run_sweep(args) -> dict:
    """Ours only, on the same rows: dtype x token budget at all cores, then 1 thread vs all
    cores at the best fp32 budget."""
    figures = []
    nproc = os.cpu_count() or 1

    def measure(backbone, ids, ends, tokens, budget, threads):
        engine = EmbeddingEngine(backbone, token_budget=budget, num_threads=threads)
        _, secs = timed(lambda: engine.embed(ids, ends), backbone.device)
        figures.append(
            {
                "dtype": backbone.dtype,
                "threads": threads,
                "token_budget": budget,
                "tokens_per_s": round(tokens / secs, 1),
            }
        )
        print(json.dumps(figures[-1]), flush=True)

    for dtype in ("float32", "bfloat16"):
        backbone = load_backbone(BackboneSpec(args.backbone, device=args.device, dtype=dtype))
        good, _ = tokenized_rows(backbone, args.rows)
        ids, ends = [r.input_ids for r in good], [r.prompt_end for r in good]
        tokens = sum(len(s) for s in ids)
        EmbeddingEngine(backbone, num_threads=nproc).embed(ids[:2], ends[:2])  # warm-up
        for budget in (512, 1024, 2048, 4096, 16384):
            measure(backbone, ids, ends, tokens, budget, nproc)
        if dtype == "float32" and nproc > 1:
            best_fp32 = max(figures, key=lambda f: f["tokens_per_s"])["token_budget"]
            measure(backbone, ids, ends, tokens, best_fp32, 1)
    best = {
        d: max((f for f in figures if f["dtype"] == d), key=lambda f: f["tokens_per_s"])
        for d in ("float32", "bfloat16")
    }
    return {
        "bench": "embed-sweep",
        "rows": len(good),
        "real_tokens": tokens,
        "cpu": cpu_model(),
        "nproc": nproc,
        "best": best,
        "figures": figures,
    }


def prompt_sharing_sets(backbone: Backbone, set_rows: int, bo16_prompts: int, max_tokens: int):
    """{name: (input_ids, prompt_end)} for every shared set and a best-of-16 set."""
    from pipeline.corpus import InputSpec, read_units

    files = [
        ("hh_rlhf", "hh-rlhf/harmless-base-test.jsonl.gz", "auto"),
        ("llmbar", "llmbar/LLMBar_Natural.json", "auto"),
        ("pandalm", "pandalm/testset-v1.json", "auto"),
        ("oasst", "oasst/en_100_message.jsonl", "oasst_best_of_n"),
        ("topical_chat", "unieval/topical_chat.json", "auto"),
        ("sfres", "unieval/sfres.json", "auto"),
    ]
    policy = TemplatePolicy(max_tokens=max_tokens)
    sets = {}
    for name, path, fmt in files:
        table = read_units([InputSpec(str(DATA / path), format=fmt)], limit_rows=set_rows)
        table = table.filter(table.column("quarantine_reason").is_null())
        toks = tokenize_many(
            backbone.tokenizer, table.column("prompt").to_pylist(), table.column("response").to_pylist(), policy
        )
        toks = [t for t in toks if not isinstance(t, Exception)]
        sets[name] = ([t.input_ids for t in toks], [t.prompt_end for t in toks])
    trees = [json.loads(line) for line in open(DATA / "oasst" / "en_100_message.jsonl", encoding="utf-8")]
    replies = [[r["text"] for r in t.get("replies") or [] if r.get("role") == "assistant"] for t in trees]
    pool = [r for rs in replies for r in rs]
    prompts, responses = [], []
    for k, tree in enumerate(trees[:bo16_prompts]):
        own = replies[k]
        others = [pool[(7 * k + j) % len(pool)] for j in range(3 * 16)]
        picked = (own + [r for r in others if r not in own])[:16]
        prompts += [[{"role": "user", "content": tree["text"]}]] * 16
        responses += picked
    toks = [t for t in tokenize_many(backbone.tokenizer, prompts, responses, policy) if not isinstance(t, Exception)]
    sets["oasst_best_of_16"] = ([t.input_ids for t in toks], [t.prompt_end for t in toks])
    return sets


def run_prompt_sharing(args) -> dict:
    backbone = get_backbone(args)
    threads = torch.get_num_threads() if backbone.device == "cpu" else None
    engines = {
        "per_unit": EmbeddingEngine(
            backbone, token_budget=args.token_budget, num_threads=threads, share_prompts="never"
        ),
        "shared": EmbeddingEngine(
            backbone, token_budget=args.token_budget, num_threads=threads, share_prompts="always"
        ),
        "shared_1g": EmbeddingEngine(
            backbone, token_budget=args.token_budget, num_threads=threads, share_prompts="always", groups_per_row=1
        ),
    }
    ways = [w for w in args.ways if w in engines] or list(engines)
    sets = prompt_sharing_sets(backbone, args.set_rows, args.bo16_prompts, args.max_tokens)
    print(
        f"backbone {backbone.name} on {backbone.device} ({backbone.dtype}), torch threads {torch.get_num_threads()}, "
        f"token budget {args.token_budget}",
        flush=True,
    )
    first = next(iter(sets.values()))
    engines["shared"].embed(first[0][:4], first[1][:4])  # warm-up
    figures = {}
    for name, (ids, ends) in sets.items():
        results, runs = {}, {w: [] for w in ways}
        for _ in range(args.repeats):
            for w in ways:
                results[w], secs = timed(lambda w=w, ids=ids, ends=ends: engines[w].embed(ids, ends), backbone.device)
                runs[w].append(secs)
        ref = results.get("per_unit")
        any_out = results[ways[0]]
        useful, tokens = any_out.useful_tokens, any_out.tokens
        secs = {w: float(np.median(v)) for w, v in runs.items()}
        fig = {
            "units": len(ids),
            "unit_tokens": tokens,
            "useful_tokens": useful,
            "token_count_bound": round(tokens / useful, 3),
            "useful_tokens_per_s": {w: round(useful / v, 1) for w, v in secs.items()},
            "computed_per_useful": {w: round(results[w].computed_tokens / useful, 3) for w in ways},
            "seconds_all_rounds": {w: [round(x, 2) for x in v] for w, v in runs.items()},
        }
        if ref is not None:
            fig["speedup_vs_per_unit"] = {w: round(secs["per_unit"] / v, 3) for w, v in secs.items() if w != "per_unit"}
            fig["share_of_bound"] = {
                w: round(x / fig["token_count_bound"], 3) for w, x in fig["speedup_vs_per_unit"].items()
            }
            fig["max_rel_err_vs_per_unit"] = {
                w: {
                    "response": max_rel_err(results[w].response, ref.response),
                    "prompt": max_rel_err(results[w].prompt, ref.prompt),
                }
                for w in ways
                if w != "per_unit"
            }
        figures[name] = fig
        print(name, json.dumps(fig), flush=True)
    return {
        "bench": "embed-prompt-sharing",
        "device": backbone.device,
        "device_name": torch.cuda.get_device_name() if backbone.device.startswith("cuda") else cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "backbone": backbone.name,
        "dtype": backbone.dtype,
        "token_budget": args.token_budget,
        "repeats": args.repeats,
        "set_rows": args.set_rows,
        "max_tokens": args.max_tokens,
        "sets": figures,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


LOAD_PROBE = """
import sys, time
sys.path.insert(0, {repo!r})
import torch, transformers
from pipeline.embed import backbone as bb
start = time.perf_counter()
b = bb.build_backbone(bb.BackboneSpec({path!r}), materialise={materialise})
print(time.perf_counter() - start, b.loaded_from)
"""


def run_measure_load(args) -> dict:
    """Fresh processes (as Ray actors are): tokenizer + model load straight from the GGUF file vs
    from the materialised HF copy (made first if missing)."""
    load_backbone(BackboneSpec(args.backbone))  # ensure the materialised copy exists
    figures: dict[str, list[float]] = {"gguf": [], "materialised": []}
    for _ in range(args.repeats):
        for mode in figures:
            code = LOAD_PROBE.format(repo=str(REPO), path=args.backbone, materialise=mode == "materialised")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            figures[mode].append(round(float(out.stdout.split()[0]), 2))
            print(mode, figures[mode][-1], "s", flush=True)
    med = {k: float(np.median(v)) for k, v in figures.items()}
    return {
        "bench": "embed-load",
        "backbone": args.backbone,
        "load_seconds": figures,
        "median_speedup": round(med["gguf"] / med["materialised"], 1),
    }  # noqa: E501


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--backbone",
        default=None,
        help="smollm2 (CPU default) | llama3-8b-random (CUDA default) | a decoder path or alias",
    )
    parser.add_argument("--rows", type=int, default=None, help="units (default 300 on CPU, 3000 on CUDA)")
    parser.add_argument("--token-budget", type=int, default=None, help="ours: padded tokens per pass")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU torch threads (default: all cores)")
    parser.add_argument("--ways", default="model_card,rewardbench,ours")
    parser.add_argument("--sweep", action="store_true", help="CPU tuning sweep (ours only)")
    parser.add_argument("--measure-load", action="store_true", help="GGUF vs materialised load time")
    parser.add_argument("--prompt-sharing", action="store_true", help="per-unit batches vs shared-prompt packing")
    parser.add_argument("--set-rows", type=int, default=24, help="--prompt-sharing: rows read from each shared set")
    parser.add_argument("--bo16-prompts", type=int, default=6, help="--prompt-sharing: prompts in the best-of-16 set")
    parser.add_argument("--max-tokens", type=int, default=1024, help="--prompt-sharing: template max_tokens")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (compare) or load probes (--measure-load)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.backbone = args.backbone or ("llama3-8b-random" if cuda else "smollm2")
    args.rows = args.rows or (3000 if cuda else 300)
    args.token_budget = args.token_budget or (65536 if cuda else 1024)
    args.ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not cuda:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.prompt_sharing:
        if args.ways == ["model_card", "rewardbench", "ours"]:
            args.ways = ["per_unit", "shared", "shared_1g"]
        headline = run_prompt_sharing(args)
    elif args.measure_load:
        headline = run_measure_load(args)
    elif args.sweep:
        headline = run_sweep(args)
    else:
        headline = run_compare(args)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
