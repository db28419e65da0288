"""Shared-prompt packing: the plan (pure) and its parity with today's per-unit passes on real data.

Parity: real SmolLM2-135M-Instruct in fp32 on CPU; units from every shared set read by the corpus
readers and rendered with the SmolLM2 template; the reference is the engine's per-unit path
(share_prompts="never": one full pass per unit, sorted padded batches). Response and prompt
embeddings must agree within 1e-4 (max relative difference per row) whatever the packing, order
or split across calls. Rows are subsampled deterministically (the first rows of each file) to keep
this affordable on 2 cores; bench/bench_embed.py checks the same on whole sets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.corpus import InputSpec, read_units
from pipeline.embed import BackboneSpec, EmbeddingEngine, TemplatePolicy, load_backbone, tokenize_many
from pipeline.embed.packing import layout_row, plan_shared_rows, prompt_groups, useful_tokens

TOL = 1e-4

# (file under shared data, reader format, rows read): enough rows that groups form (PandaLM repeats
# an instruction over consecutive rows, Topical-Chat has 6 rated responses per dialogue). None: the
# whole file, keeping the units of the first prompts that occur more than once.
SETS = [
    ("hh-rlhf/harmless-base-test.jsonl.gz", "auto", 6),
    ("llmbar/LLMBar_Natural.json", "auto", 5),
    ("pandalm/testset-v1.json", "auto", 8),
    ("oasst/en_100_message.jsonl", "oasst_best_of_n", 3),
    ("unieval/topical_chat.json", "auto", 12),
    ("unieval/sfres.json", "auto", None),  # repeats are not adjacent: see repeated_prompts
]
MAX_TOKENS = 512  # template truncation (prompts cut by it are simply different groups)


def max_rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


# --- the plan (pure) -----------------------------------------------------------------------------


def random_units(seed: int):
    rng = np.random.default_rng(seed)
    n_groups = int(rng.integers(1, 40))
    sizes = rng.integers(1, 17, n_groups)
    groups = np.repeat(np.arange(n_groups), sizes)
    rng.shuffle(groups)  # a group's units need not be adjacent (PandaLM: several input rows)
    prompt = rng.integers(1, 400, n_groups)[groups]
    response = rng.integers(0, 300, groups.size)
    return groups, prompt, response


@pytest.mark.parametrize("seed", range(20))
def test_plan_holds_every_unit_once_within_budget(seed):
    groups, prompt, response = random_units(seed)
    budget = [256, 1024, 4096][seed % 3]
    per_row = [None, 1, 3][seed % 3]
    rows = plan_shared_rows(groups, prompt, response, budget, groups_per_row=per_row)
    units = np.concatenate([np.concatenate(r) for r in rows])
    assert np.array_equal(np.sort(units), np.arange(groups.size))
    total = 0
    for row in rows:
        lay = layout_row(row, prompt, response)
        assert len(row) == 1 or lay.length <= budget
        assert per_row is None or len(row) <= per_row
        for piece in row:
            assert len(set(groups[piece])) == 1  # a piece holds one prompt
            # Split only when needed: a single-unit piece may exceed the budget, nothing else does.
            assert piece.size == 1 or prompt[piece[0]] + response[piece].sum() <= budget
        assert lay.computed.sum() == lay.length
        total += lay.length
    # Each piece computes its prompt once: computed = responses + prompt per piece.
    pieces = [p for r in rows for p in r]
    assert total == response.sum() + sum(int(prompt[p[0]]) for p in pieces)
    useful = useful_tokens(groups, prompt, response)
    assert useful.sum() == response.sum() + sum(int(prompt[groups == g][0]) for g in np.unique(groups))
    assert total >= useful.sum()
    if budget >= 4096:  # nothing needs splitting: every prompt computed exactly once
        assert total == useful.sum()


def test_layout_is_prompt_then_responses_with_continued_positions():
    #            unit: 0  1  2  3
    groups = np.array([0, 1, 0, 0])
    prompt = np.array([3, 2, 3, 3])
    response = np.array([2, 4, 0, 1])
    rows = plan_shared_rows(groups, prompt, response, token_budget=100)
    assert len(rows) == 1
    lay = layout_row(rows[0], prompt, response)
    # Group 0 (6 tokens, prompt + responses of units 0, 3; unit 2's response is empty) is the
    # larger piece, so it comes first; then group 1.
    assert [p.tolist() for p in rows[0]] == [[0, 3, 2], [1]]
    assert lay.spans.tolist() == [[0, 0, 3], [0, 3, 5], [3, 3, 4], [1, 0, 2], [1, 2, 6]]
    assert lay.positions.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4, 5]
    assert lay.units.tolist() == [0, 3, 2, 1]
    assert lay.response_at.tolist() == [4, 5, 2, 11]  # unit 2: no response -> the prompt's last token
    assert lay.prompt_at.tolist() == [2, 2, 2, 7]
    assert lay.computed.tolist() == [5, 1, 0, 6]
    assert [(s, p, r.tolist()) for s, p, r in lay.pieces] == [(0, 3, [2, 1, 0]), (6, 2, [4])]


def test_big_group_is_split_into_pieces_repeating_the_prompt():
    groups = np.zeros(5, np.int64)
    rows = plan_shared_rows(groups, np.full(5, 10), np.array([30, 30, 30, 30, 30]), token_budget=75)
    pieces = [p for r in rows for p in r]
    assert sorted(len(p) for p in pieces) == [1, 2, 2]  # 10 + 2 x 30 = 70 <= 75 < 100
    assert sum(layout_row(r, np.full(5, 10), np.full(5, 30)).length for r in rows) == 150 + 3 * 10


def test_prompt_groups_are_by_token_ids():
    assert prompt_groups([[1, 2], [1, 2, 3], [1, 2], (1, 2, 3), [9]]).tolist() == [0, 1, 0, 1, 2]


def test_plan_refuses_inconsistent_input():
    with pytest.raises(ValueError, match="differs from its group"):
        plan_shared_rows([0, 0], [3, 4], [1, 1], 100)
    with pytest.raises(ValueError):
        plan_shared_rows([0], [0], [1], 100)
    with pytest.raises(ValueError):
        plan_shared_rows([0], [1], [1], 0)
    assert plan_shared_rows([], [], [], 10) == []


# --- parity on real SmolLM2 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_backbone(BackboneSpec("smollm2", dtype="float32"))


def repeated_prompts(table, n_prompts: int):
    """The units (file order) of the first n_prompts prompts that occur more than once."""
    import pyarrow as pa

    ids = table.column("prompt_id").to_pylist()
    counts: dict[str, int] = {}
    for p in ids:
        counts[p] = counts.get(p, 0) + 1
    keep = list(dict.fromkeys(p for p in ids if counts[p] > 1))[:n_prompts]
    return table.take(pa.array([i for i, p in enumerate(ids) if p in set(keep)]))


@pytest.fixture(scope="module")
def shared_units(smollm2, shared_data):
    """Tokenised units of every shared set: (set name per unit, input_ids, prompt_end)."""
    names, ids, ends = [], [], []
    for path, fmt, rows in SETS:
        table = read_units([InputSpec(str(shared_data / path), format=fmt)], limit_rows=rows)
        table = table.filter(table.column("quarantine_reason").is_null())
        if rows is None:
            table = repeated_prompts(table, 5)
        toks = tokenize_many(
            smollm2.tokenizer,
            table.column("prompt").to_pylist(),
            table.column("response").to_pylist(),
            TemplatePolicy(max_tokens=MAX_TOKENS),
        )
        toks = [t for t in toks if not isinstance(t, Exception)]
        names += [path.split("/")[0]] * len(toks)
        ids += [t.input_ids for t in toks]
        ends += [t.prompt_end for t in toks]
    return np.array(names), ids, np.array(ends)


@pytest.fixture(scope="module")
def per_unit(smollm2, shared_units):
    _, ids, ends = shared_units
    return EmbeddingEngine(smollm2, share_prompts="never").embed(ids, ends)


def test_every_set_has_shared_prompts(shared_units):
    names, ids, ends = shared_units
    groups = prompt_groups([s[: e + 1] for s, e in zip(ids, ends)])
    for name in np.unique(names):
        g = groups[names == name]
        assert len(np.unique(g)) < g.size, f"{name}: no two units share a prompt"
    # Groups span input rows: Topical-Chat and SF-RES rows are single units.
    assert np.bincount(groups[names == "unieval"]).max() >= 3


def check_parity(names, got, ref):
    for name in np.unique(names):
        sel = names == name
        assert max_rel_err(got.response[sel], ref.response[sel]) <= TOL, name
        assert max_rel_err(got.prompt[sel], ref.prompt[sel]) <= TOL, name


@pytest.mark.parametrize(
    "settings",
    [
        dict(),  # CPU default: 1,024-token rows, several groups per row
        dict(token_budget=300, groups_per_row=1),  # groups split into pieces, one piece per row
        dict(token_budget=4096),
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "default",
)
def test_shared_prompt_packing_equals_per_unit(smollm2, shared_units, per_unit, settings):
    names, ids, ends = shared_units
    engine = EmbeddingEngine(smollm2, **settings)
    assert engine.shared
    out = engine.embed(ids, ends)
    check_parity(names, out, per_unit)
    assert out.tokens == per_unit.tokens == sum(len(s) for s in ids)
    # Fewer tokens computed than units' tokens, and never fewer than the distinct-prompt bound.
    assert out.useful_tokens <= out.computed_tokens < out.tokens
    assert per_unit.computed_tokens >= per_unit.tokens  # padded batches compute the padding too


def test_order_and_call_splits_do_not_matter(smollm2, shared_units, per_unit):
    names, ids, ends = shared_units
    perm = np.random.default_rng(11).permutation(len(ids))
    engine = EmbeddingEngine(smollm2, token_budget=512)
    parts = np.array_split(perm, 3)  # a group's units land in different calls
    response = np.empty_like(per_unit.response)
    prompt = np.empty_like(per_unit.prompt)
    for part in parts:
        out = engine.embed([ids[i] for i in part], ends[part])
        response[part], prompt[part] = out.response, out.prompt
    for name in np.unique(names):
        sel = names == name
        assert max_rel_err(response[sel], per_unit.response[sel]) <= TOL, name
        assert max_rel_err(prompt[sel], per_unit.prompt[sel]) <= TOL, name


def test_siblings_do_not_leak(smollm2, shared_units, per_unit):
    """Guard against a mask that lets a response see its siblings: alone in its call, a unit's
    embeddings are those it gets packed with its group."""
    names, ids, ends = shared_units
    groups = prompt_groups([s[: e + 1] for s, e in zip(ids, ends)])
    big = int(np.bincount(groups).argmax())
    members = np.flatnonzero(groups == big)
    engine = EmbeddingEngine(smollm2)
    for i in members[-2:]:
        alone = engine.embed([ids[i]], [ends[i]])
        assert max_rel_err(alone.response, per_unit.response[[i]]) <= TOL
    assert not np.allclose(per_unit.response[members[0]], per_unit.response[members[1]], atol=1e-3)


def test_units_without_prompt_end(smollm2, shared_units, per_unit):
    _, ids, _ = shared_units
    out = EmbeddingEngine(smollm2).embed(ids[:4])
    assert np.isnan(out.prompt).all()
    assert max_rel_err(out.response, per_unit.response[:4]) <= TOL


# --- an ArmoRM-layout checkpoint through the same engine ----------------------------------------


def test_armorm_checkpoint_scores_equal(smollm2, shared_units, tmp_path):
    """A tiny random Llama exported in the released ArmoRM layout with the SmolLM2 tokenizer
    (as tests/test_heads_checkpoint.py builds one): ratings, gates and scores from shared-prompt
    packing equal the per-unit path's."""
    from transformers import LlamaConfig, LlamaModel

    from pipeline.embed.checkpoint import checkpoint_backbone, export_armorm_checkpoint
    from pipeline.heads.gating import GatingNetwork
    from pipeline.heads.model import ArmoHeads

    hidden, k = 64, 4
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(smollm2.tokenizer),
        max_position_embeddings=2048,
        pad_token_id=smollm2.tokenizer.pad_token_id,
    )
    model = LlamaModel(config).eval()
    rng = np.random.default_rng(0)
    gating = GatingNetwork(hidden, k, hidden_dim=32, n_hidden=2)
    heads = ArmoHeads(
        [f"obj{i}" for i in range(k)], rng.normal(size=(k, hidden)) * 0.3, np.eye(k), gating, verbosity_index=0
    )
    path = export_armorm_checkpoint(heads, model, str(tmp_path / "armo"), tokenizer=smollm2.tokenizer)
    backbone, loaded = checkpoint_backbone(path, device="cpu", dtype="float32")
    names, ids, ends = shared_units
    shared = EmbeddingEngine(backbone)
    assert shared.shared
    got = shared.embed(ids, ends)
    ref = EmbeddingEngine(backbone, share_prompts="never").embed(ids, ends)
    check_parity(names, got, ref)
    a, b = loaded.score(got.response, got.prompt), loaded.score(ref.response, ref.prompt)
    for field in ("rewards", "gate", "score"):
        x, y = np.atleast_2d(getattr(a, field)), np.atleast_2d(getattr(b, field))
        assert np.abs(x - y).max() <= TOL * np.abs(y).max(), field
    assert got.computed_tokens < ref.computed_tokens


def test_share_prompts_setting(smollm2):
    with pytest.raises(ValueError, match="share_prompts"):
        EmbeddingEngine(smollm2, share_prompts="sometimes")
    assert not EmbeddingEngine(smollm2, share_prompts="never").shared
    minilm = load_backbone(BackboneSpec("minilm"))
    assert not EmbeddingEngine(minilm).shared  # encoders keep their own path


# --- the scoring stage and the manifest report what was computed --------------------------------


def test_scoring_stage_reports_computed_and_useful_tokens(shared_units, per_unit):
    """EmbedScoreStage (called directly, no Ray) charges every unit its computed and useful
    tokens; they sum to the engine's, a quarantined unit is charged nothing, and the manifest
    turns the shard totals into padding waste."""
    import pyarrow as pa

    from pipeline.labeling import manifest
    from pipeline.labeling.stages import COMPUTED_TOKENS, USEFUL_TOKENS, EmbedScoreStage, ScoringModel
    from pipeline.stage import Resources

    _, ids, ends = shared_units
    take = list(range(12))
    stage = EmbedScoreStage(
        ScoringModel({"path": "smollm2", "dtype": "float32"}, None, None, None, True), [], Resources()
    )
    stage.setup()
    reasons = [None] * len(take)
    reasons[5] = "earlier stage said no"
    batch = pa.table(
        {
            "input_ids": [ids[i] for i in take],
            "prompt_end": [int(ends[i]) for i in take],
            "prompt_input_ids": pa.array([None] * len(take), pa.list_(pa.int64())),
            "quarantine_reason": pa.array(reasons, pa.string()),
        }
    )
    out = stage.process(batch)
    good = [i for i in take if i != 5]
    expect = EmbeddingEngine(stage.engine.backbone).embed([ids[i] for i in good], ends[good])
    computed = out.column(COMPUTED_TOKENS).to_numpy()
    useful = out.column(USEFUL_TOKENS).to_numpy()
    assert computed[5] == useful[5] == 0
    assert computed.sum() == expect.computed_tokens and useful.sum() == expect.useful_tokens
    assert useful.sum() < sum(len(ids[i]) for i in good)  # prompts shared within the call
    emb = np.stack(out.column("embedding").to_pylist()[:5])
    assert max_rel_err(emb, per_unit.response[:5]) <= TOL
    acc = manifest.token_accounting(
        [{"computed_tokens": 30, "useful_tokens": 20}, {"computed_tokens": 10, "useful_tokens": 12}, {}]
    )
    assert acc == {"computed_tokens": 40, "useful_tokens": 32, "padding_waste": 1.25}
    assert manifest.token_accounting([])["padding_waste"] is None
