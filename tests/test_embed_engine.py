"""The decoder embedding pass on the real SmolLM2-135M-Instruct weights (fp32)."""

import gzip
import json
import re

import numpy as np
import pytest
import torch

from pipeline.embed import (
    BackboneSpec,
    EmbeddingEngine,
    TemplatePolicy,
    load_backbone,
    tokenize_conversation,
    tokenize_many,
)

TOL = 1e-4


def hh_conversation(transcript: str) -> tuple[list[dict], str]:
    """Split a raw HH-RLHF transcript into turns; the last Assistant turn is the response."""
    parts = re.split(r"\n\n(Human|Assistant): ", transcript)
    messages = [
        {"role": "user" if role == "Human" else "assistant", "content": text}
        for role, text in zip(parts[1::2], parts[2::2])
    ]
    assert messages[-1]["role"] == "assistant"
    return messages[:-1], messages[-1]["content"]


def mixed_conversations(shared_data, n_hh=6, n_panda=6):
    """Real conversations of mixed length: multi-turn HH-RLHF (short and long) and PandaLM instructions."""
    with gzip.open(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(200), f)]
    hh = [hh_conversation(r["chosen"]) for r in rows]
    hh.sort(key=lambda c: sum(len(m["content"]) for m in c[0]) + len(c[1]))
    picked = [hh[i] for i in np.linspace(0, len(hh) - 1, n_hh).astype(int)]  # shortest to longest
    panda = json.loads((shared_data / "pandalm" / "testset-v1.json").read_text(encoding="utf-8"))
    seen = set()
    for row in panda:  # consecutive rows often share an instruction and a response: take distinct ones
        text = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        if text in seen or row["response1"] in seen:
            continue
        seen.update((text, row["response1"]))
        picked.append(([{"role": "user", "content": text}], row["response1"]))
        if len(picked) == n_hh + n_panda:
            break
    return picked


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_backbone(BackboneSpec("smollm2", dtype="float32"))


@pytest.fixture(scope="module")
def tokenized(smollm2, shared_data):
    convs = mixed_conversations(shared_data)
    results = tokenize_many(smollm2.tokenizer, [c[0] for c in convs], [c[1] for c in convs], TemplatePolicy())
    assert all(not isinstance(r, Exception) for r in results)
    return convs, results


@pytest.fixture(scope="module")
def one_at_a_time(smollm2, tokenized):
    _, results = tokenized
    engine = EmbeddingEngine(smollm2, share_prompts="never")
    single = [engine.embed([r.input_ids], [r.prompt_end]) for r in results]
    return np.concatenate([s.response for s in single]), np.concatenate([s.prompt for s in single])


def max_rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest per-row relative error (inf-norm of the difference over inf-norm of the reference)."""
    return float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


def test_fixture_mixes_lengths(tokenized):
    _, results = tokenized
    lengths = sorted(r.total_tokens for r in results)
    assert len(lengths) == 12 and lengths[0] < 80 and lengths[-1] > 250  # padding really happens


def test_one_at_a_time_matches_plain_transformers(smollm2, tokenized, one_at_a_time):
    """Reference computed another way: the chat template rendered by transformers, one unpadded
    forward each, no mask, no position ids; prompt state from a separate prompt-only pass."""
    convs, results = tokenized
    tok, model = smollm2.tokenizer, smollm2.model
    response_ref, prompt_ref = [], []
    with torch.inference_mode():
        for (prompt, response), r in zip(convs, results):
            full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
            ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
            assert ids[0].tolist() == r.input_ids
            response_ref.append(model(input_ids=ids).last_hidden_state[0, -1].numpy())
            prompt_only = tok(
                tok.apply_chat_template(prompt, tokenize=False), add_special_tokens=False, return_tensors="pt"
            )["input_ids"]
            prompt_ref.append(model(input_ids=prompt_only).last_hidden_state[0, -1].numpy())
    response, prompt = one_at_a_time
    assert max_rel_err(response, np.stack(response_ref)) <= TOL
    assert max_rel_err(prompt, np.stack(prompt_ref)) <= TOL


NEVER = "never"  # the per-unit path (padded or packed batches); the default shares prompts


@pytest.mark.parametrize(
    "settings",
    [
        dict(token_budget=16384, share_prompts=NEVER),
        dict(token_budget=1024, share_prompts=NEVER),
        dict(token_budget=300, share_prompts=NEVER),
        dict(token_budget=16384, padding_side="left", share_prompts=NEVER),
        dict(token_budget=700, padding_side="left", share_prompts=NEVER),
        dict(token_budget=2048, packing="always", share_prompts=NEVER),
        dict(token_budget=1024),
        dict(token_budget=300),
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_batched_equals_one_at_a_time(smollm2, tokenized, one_at_a_time, settings):
    _, results = tokenized
    out = EmbeddingEngine(smollm2, **settings).embed([r.input_ids for r in results], [r.prompt_end for r in results])
    assert out.response.dtype == np.float32 and out.response.shape == (12, smollm2.hidden_size)
    assert out.tokens == sum(r.total_tokens for r in results)
    assert max_rel_err(out.response, one_at_a_time[0]) <= TOL
    assert max_rel_err(out.prompt, one_at_a_time[1]) <= TOL


def test_shuffled_order_gives_the_same_rows(smollm2, tokenized, one_at_a_time):
    _, results = tokenized
    perm = np.random.default_rng(7).permutation(len(results))
    out = EmbeddingEngine(smollm2, token_budget=2048).embed(
        [results[i].input_ids for i in perm], [results[i].prompt_end for i in perm]
    )
    assert max_rel_err(out.response, one_at_a_time[0][perm]) <= TOL
    assert max_rel_err(out.prompt, one_at_a_time[1][perm]) <= TOL


def test_rows_are_distinct(one_at_a_time):
    # Guards the invariance tests against a degenerate engine returning one vector for all rows.
    response, prompt = one_at_a_time
    assert len({tuple(np.round(r, 3)) for r in response}) == len(response)
    assert not np.allclose(response, prompt)


def test_prompt_end_is_the_end_of_the_last_user_turn(smollm2, tokenized):
    convs, results = tokenized
    tok = smollm2.tokenizer
    for (prompt, response), r in zip(convs, results):
        ids = r.input_ids
        # SmolLM2 closes a turn with "<|im_end|>\n": prompt_end is that newline, right before the
        # assistant turn opens.
        assert tok.convert_ids_to_tokens(ids[r.prompt_end - 1]) == "<|im_end|>"
        assert tok.decode(ids[r.prompt_end]) == "\n"
        assert tok.decode(ids[: r.prompt_end + 1]).endswith(prompt[-1]["content"] + "<|im_end|>\n")
        assert tok.decode(ids[r.prompt_end + 1 :]) == f"<|im_start|>assistant\n{response}<|im_end|>\n"
        assert r.prompt_tokens == r.prompt_end + 1 and r.prompt_tokens + r.response_tokens == r.total_tokens


def test_no_prompt_end_gives_nan_prompts(smollm2, tokenized, one_at_a_time):
    _, results = tokenized
    out = EmbeddingEngine(smollm2).embed([r.input_ids for r in results[:3]])
    assert np.isnan(out.prompt).all()
    assert max_rel_err(out.response, one_at_a_time[0][:3]) <= TOL


def test_bad_input_is_refused(smollm2):
    engine = EmbeddingEngine(smollm2)
    with pytest.raises(ValueError, match="no tokens"):
        engine.embed([[1, 2], []], [0, 0])
    with pytest.raises(ValueError, match="prompt_end 5 outside"):
        engine.embed([[1, 2, 3]], [5])
    with pytest.raises(ValueError, match="padding_side"):
        EmbeddingEngine(smollm2, padding_side="middle")
    assert engine.embed([], []).response.shape == (0, smollm2.hidden_size)


def test_single_conversation_helper_matches_batch(smollm2, tokenized):
    convs, results = tokenized
    prompt, response = convs[3]
    one = tokenize_conversation(smollm2.tokenizer, prompt, response, TemplatePolicy())
    assert one == results[3]
