"""The real SmolLM2-135M-Instruct exported to the ArmoRM layout (synthetic heads of its hidden size):
its pad token occurs in no conversation of the shared data, loaders that read the reward before the
first pad (tests/checkpoint_reference.py) score it as the labeling job does, and export → import →
export gives the same files."""

import glob
import json
import pathlib

import numpy as np
import pytest
import torch
from checkpoint_reference import first_pad_reference, labeling_path

from pipeline.corpus import InputSpec, read_units
from pipeline.embed.backbone import BackboneSpec, build_tokenizer, load_backbone, load_tokenizer
from pipeline.embed.checkpoint import checkpoint_backbone, export_armorm_checkpoint
from pipeline.embed.engine import EmbeddingEngine
from pipeline.embed.templating import TemplateError, TemplatePolicy, tokenize_many
from pipeline.heads.gating import GatingNetwork
from pipeline.heads.model import ArmoHeads

pytestmark = pytest.mark.slow

IM_END = 2  # <|im_end|>: SmolLM2's eos and, before the dedicated pad, the export's pad
POLICY = TemplatePolicy()  # the labeling job's default: 2,048 tokens, oldest prompt turns dropped


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone(BackboneSpec(path="smollm2", device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smollm2):
    h, k = smollm2.hidden_size, 4
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    gating = GatingNetwork(h, k, hidden_dim=64, n_hidden=2)
    with torch.no_grad():
        for layer in gating.layers:
            layer.weight.mul_(4)
    heads = ArmoHeads([f"syn.obj{i}" for i in range(k)], rng.normal(size=(k, h)) * 0.05, np.eye(k), gating)
    out = tmp_path_factory.mktemp("smollm2") / "armorm-smollm2"
    export_armorm_checkpoint(heads, smollm2.model, str(out), tokenizer=smollm2.tokenizer)
    return out, heads


def test_the_pad_occurs_in_no_tokenized_conversation_of_the_shared_data(exported, shared_data):
    out, _ = exported
    config = json.loads((out / "config.json").read_text())
    pad = config["pad_token_id"]
    assert (pad, config["vocab_size"]) == (49152, 49153)
    ours = build_tokenizer(BackboneSpec(path=str(out)))  # what the job's tokenize stage loads for a checkpoint
    original = load_tokenizer(BackboneSpec(path="smollm2"))
    assert ours.pad_token_id == pad and ours.pad_token == "[PAD]"
    counts = {}
    for path in sorted(glob.glob(str(shared_data / "*" / "*.json*"))):
        units = [u for u in read_units(InputSpec(path)).to_pylist() if u["quarantine_reason"] is None]
        prompts, responses = [u["prompt"] for u in units], [u["response"] for u in units]
        got = tokenize_many(ours, prompts, responses, POLICY)
        want = tokenize_many(original, prompts, responses, POLICY)
        tokenized = [g for g in got if not isinstance(g, TemplateError)]
        counts[pathlib.Path(path).name] = len(tokenized)
        assert not any(pad in g.input_ids for g in tokenized), path
        # adding [PAD] changes no tokenization: same ids, same quarantines
        for g, w in zip(got, want):
            assert (g.reason == w.reason) if isinstance(g, TemplateError) else (g.input_ids == w.input_ids)
        # the old pad closes every turn: a first-pad reader cut every one of these rows short
        assert all(IM_END in g.input_ids[:-1] for g in tokenized)
    assert len(counts) == 6 and min(counts.values()) > 0 and sum(counts.values()) > 5000, counts


def test_first_pad_readers_score_the_export_as_the_labeling_job_does(exported, smollm2, shared_data):
    out, heads = exported
    units = read_units(InputSpec(str(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"))).to_pylist()
    units = [u for u in units if u["quarantine_reason"] is None][:12]
    results = tokenize_many(
        smollm2.tokenizer, [u["prompt"] for u in units], [u["response"] for u in units], TemplatePolicy(max_tokens=160)
    )
    tokenized = [r for r in results if not isinstance(r, TemplateError)]
    seqs, ends = [r.input_ids for r in tokenized], [r.prompt_end for r in tokenized]
    assert len(seqs) >= 8 and len(set(map(len, seqs))) > 4  # padded batches of different widths
    backbone, loaded, got = labeling_path(out, seqs, ends, token_budget=1024)
    ref = first_pad_reference(out, seqs, ends, rows_per_batch=5)
    np.testing.assert_array_equal(ref["position"], [len(s) - 1 for s in seqs])
    np.testing.assert_allclose(got.score, ref["score"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.rewards, ref["rewards"], atol=1e-4, rtol=0)
    assert np.std(got.score) > 10 * 1e-4  # scores that differ by more than the tolerance
    # and as the heads score on the backbone they were trained on
    e = EmbeddingEngine(smollm2, token_budget=1024).embed(seqs, ends)
    np.testing.assert_allclose(got.score, heads.score(e.response, e.prompt).score, atol=1e-5, rtol=0)
    assert loaded.fingerprint == heads.fingerprint


def test_export_import_export_gives_the_same_files(exported, tmp_path):
    out, _ = exported
    backbone, heads = checkpoint_backbone(str(out), device="cpu", dtype="float32")
    again = pathlib.Path(
        export_armorm_checkpoint(heads, str(out), str(tmp_path / "again"), tokenizer=backbone.tokenizer)
    )
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in out.iterdir())
    for p in sorted(out.iterdir()):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
