"""The encoder path on the real all-MiniLM-L6-v2 against sentence-transformers' recipe, recomputed
here with raw transformers: tokenise (truncate at 256), mean-pool over the attention mask, L2-normalise."""

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from pipeline.embed import BackboneSpec, EmbeddingEngine, TemplatePolicy, load_backbone, tokenize_many
from pipeline.embed.backbone import resolve_source

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
    (
        [
            {"role": "user", "content": "Tell me a joke"},
            {"role": "assistant", "content": "Why did the chicken..."},
            {"role": "user", "content": "Another one, about cats this time, please."},
        ],
        "A cat walks into a library and asks for a book about purring. " * 3,
    ),
    (
        [{"role": "user", "content": "Summarise: " + "the committee met and discussed the budget at length. " * 40}],
        "They discussed the budget.",
    ),  # longer than 256 tokens: the prompt loses its start
    ([{"role": "user", "content": "hi"}], ""),
]


def sentence_transformers_recipe(model_dir: str, texts: list[str | list[int]]) -> np.ndarray:
    """Texts, or token ids already cut to 256 (for the row whose prompt must lose its start)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    ids = [t if isinstance(t, list) else tok(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


@pytest.fixture(scope="module")
def minilm():
    return load_backbone(BackboneSpec("minilm"))


def test_minilm_is_an_encoder_that_normalises(minilm):
    assert (minilm.kind, minilm.normalize, minilm.max_length, minilm.hidden_size) == ("encoder", True, 256, 384)


@pytest.mark.parametrize("settings", [dict(), dict(token_budget=300), dict(padding_side="left")])
def test_encoder_embeddings_match_sentence_transformers_recipe(minilm, settings):
    results = tokenize_many(
        minilm.tokenizer, [c[0] for c in CONVERSATIONS], [c[1] for c in CONVERSATIONS], TemplatePolicy(), kind="encoder"
    )
    out = EmbeddingEngine(minilm, **settings).embed(
        [r.input_ids for r in results], prompt_input_ids=[r.prompt_input_ids for r in results]
    )
    full_texts = ["\n".join(f"{m['role']}: {m['content']}" for m in p) + f"\nassistant: {r}" for p, r in CONVERSATIONS]
    prompt_texts = ["\n".join(f"{m['role']}: {m['content']}" for m in p) for p, _ in CONVERSATIONS]
    model_dir = resolve_source(BackboneSpec("minilm")).directory
    # Row 2 is too long: the expected input is [CLS] + the prompt's last tokens + the whole answer + [SEP].
    tok = AutoTokenizer.from_pretrained(model_dir)
    answer = tok("assistant: " + CONVERSATIONS[2][1], add_special_tokens=False)["input_ids"]
    prompt = tok(prompt_texts[2], add_special_tokens=False)["input_ids"]
    full_texts[2] = [tok.cls_token_id] + prompt[-(254 - len(answer)) :] + answer + [tok.sep_token_id]
    prompt_texts[2] = [tok.cls_token_id] + prompt[-254:] + [tok.sep_token_id]
    np.testing.assert_allclose(out.response, sentence_transformers_recipe(model_dir, full_texts), atol=1e-5)
    np.testing.assert_allclose(out.prompt, sentence_transformers_recipe(model_dir, prompt_texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.response, axis=1), 1.0, atol=1e-5)
    assert results[2].truncated and results[2].total_tokens == 256 and results[2].response_tokens == len(answer)
    assert out.tokens == sum(r.total_tokens + len(r.prompt_input_ids) for r in results)  # both sequences run


def test_encoder_requires_prompt_ids(minilm):
    with pytest.raises(ValueError, match="prompt_input_ids"):
        EmbeddingEngine(minilm).embed([[101, 102]])
