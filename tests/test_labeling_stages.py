"""The labeling stages' declared columns are the columns they produce, for each configuration the
job has (embed-only, backbone + heads, ArmoRM checkpoint), and a checkpoint on s3:// labels like
the local one.

The stages run in-process (no Ray) on real LLMBar rows, shard tables exactly as the read task makes
them (iter_shards + units_table). Heads: random ArmoHeads on SmolLM2's hidden size (a format test;
the job tests score with trained ones). Checkpoint: a tiny random Llama with SmolLM2's tokenizer,
exported in the released layout (as in test_embed_checkpoint)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_embed_checkpoint import make_heads, tiny_llama_config
from transformers import LlamaModel

from pipeline import schema
from pipeline.corpus import InputSpec, iter_shards, units_table
from pipeline.embed.backbone import BackboneSpec, load_tokenizer
from pipeline.embed.checkpoint import export_armorm_checkpoint
from pipeline.heads.gating import GatingNetwork
from pipeline.heads.model import ArmoHeads
from pipeline.labeling.commit import RANGE_SCHEMA, summaries_of
from pipeline.labeling.config import ConfigError, LabelConfig, ModelConfig, parse_config
from pipeline.labeling.plan import job_objectives
from pipeline.labeling.stages import EmbedScoreStage, ScoringModel, TokenizeStage, WriteStage
from pipeline.stage import Resources

# 256: the tiny checkpoint's positions. Longer pairs are quarantined whole, which the write stage
# must report too.
TEMPLATE = {"max_tokens": 256, "overflow": "truncate_prompt"}
SMOL = {"path": "smollm2", "dtype": "float32", "device": "cpu"}


@pytest.fixture(scope="module")
def shard(shared_data) -> pa.Table:
    """One shard of 3 LLMBar pairs (6 units), with the reader's field-use column."""
    spec = InputSpec.from_dict({"path": str(shared_data / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar"})
    units = next(iter_shards(spec, spec.paths()[0], rows_per_shard=3, limit_rows=3))
    return units_table(units, field_use=True)


@pytest.fixture(scope="module")
def smol_heads(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    k, hidden = 3, 576  # SmolLM2-135M's hidden size
    heads = ArmoHeads(
        [f"t.obj{i}" for i in range(k)], rng.normal(size=(k, hidden)) * 0.05, np.eye(k), GatingNetwork(hidden, k)
    )
    out = tmp_path_factory.mktemp("heads") / "h"
    heads.save(str(out))
    return str(out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "armo"
    tokenizer = load_tokenizer(BackboneSpec(path="smollm2"))
    export_armorm_checkpoint(
        make_heads(), LlamaModel(tiny_llama_config()).eval(), str(out), tokenizer=tokenizer, shard_size=2_000_000
    )
    return str(out)


def _check_contract(stage, before: pa.Table, after: pa.Table) -> None:
    """What a stage adds or overwrites is exactly what it declares: every declared column is in its
    output, and every output column it did not declare came in with the input."""
    declared = set(stage.writes)
    assert len(declared) == len(stage.writes), f"{stage.name}: a column declared twice"
    assert set(stage.reads) <= set(before.column_names)
    assert declared <= set(after.column_names), f"{stage.name}: declared but not produced"
    assert set(after.column_names) - set(before.column_names) <= declared, f"{stage.name}: produced, not declared"


def _label(shard, tmp_path, *, backbone=None, heads=None, armorm_checkpoint=None, embeddings=False, so=None):
    """Tokenize -> embed + score -> write on one shard, each stage's contract checked."""
    tokenize = TokenizeStage(backbone, TEMPLATE, armorm_checkpoint=armorm_checkpoint, storage_options=so)
    tokenize.setup()
    tokenized = tokenize(shard)
    _check_contract(tokenize, shard, tokenized)
    objectives = _objectives(heads, armorm_checkpoint, so)
    model = ScoringModel(backbone, heads, armorm_checkpoint, 4096, embeddings, 1, "auto", so)
    score = EmbedScoreStage(model, objectives, Resources())
    score.setup()
    scored = score(tokenized)
    _check_contract(score, tokenized, scored)
    write = WriteStage(str(tmp_path), "r1", objectives, embeddings, None)
    summaries = write(scored)
    assert summaries.column_names == list(write.writes) == RANGE_SCHEMA.names  # a new table: exactly these
    return objectives, scored, summaries


def _objectives(heads, checkpoint, so):
    return job_objectives(
        LabelConfig(
            inputs=[],
            output="x",
            model=ModelConfig(heads=heads, armorm_checkpoint=checkpoint),
            storage_options=so or {},
        )
    )


def test_embed_only_declares_embeddings_and_no_objective_columns(shard, tmp_path):
    objectives, scored, summaries = _label(shard, tmp_path, backbone=SMOL, embeddings=True)
    assert objectives == []
    assert not any(c.startswith((schema.RATING_PREFIX, schema.GATE_PREFIX)) for c in scored.column_names)
    assert {"embedding", "prompt_embedding"} <= set(scored.column_names)
    (s,) = summaries_of(summaries)
    assert s.units == 6 == s.labeled_units + s.quarantined_units and s.first == 0 and s.last == 5
    data = pq.read_table(s.files[0])
    assert data.schema == schema.output_schema([], with_embeddings=True)  # the Parquet contract, unchanged


def test_heads_declare_every_objective_column(shard, tmp_path, smol_heads):
    objectives, scored, summaries = _label(shard, tmp_path, backbone=SMOL, heads=smol_heads)
    assert objectives == ["t.obj0", "t.obj1", "t.obj2"]
    for prefix in (schema.RATING_PREFIX, schema.DEBIASED_PREFIX, schema.GATE_PREFIX):
        assert all(schema.objective_column(prefix, o) in scored.column_names for o in objectives)
    assert "embedding" not in scored.column_names
    (s,) = summaries_of(summaries)
    assert s.labeled_units >= 2 and s.labeled_units + s.quarantined_units == 6, s.reasons
    assert all("more than max_tokens" in r for r in s.reasons) and s.computed_tokens >= s.useful_tokens > 0
    assert s.fields_read and s.fields_present  # the reader's field use, typed
    assert pq.read_table(s.files[0]).schema == schema.output_schema(objectives)


def test_checkpoint_declares_its_objectives(shard, tmp_path, checkpoint):
    objectives, scored, summaries = _label(shard, tmp_path, armorm_checkpoint=checkpoint)
    assert len(objectives) == 5
    (s,) = summaries_of(summaries)
    assert s.labeled_units >= 2 and s.labeled_units + s.quarantined_units == 6, s.reasons
    assert pq.read_table(s.files[0]).schema == schema.output_schema(objectives)


def test_checkpoint_on_s3_validates_and_labels_like_the_local_one(
    shard, tmp_path, checkpoint, s3_server, monkeypatch, shared_data
):
    monkeypatch.setenv("ARMOLABEL_CACHE", str(tmp_path / "cache"))
    so = s3_server.storage_options
    uri = s3_server.upload(checkpoint, s3_server.make_bucket("ckpt") + "/armo")
    inputs = [{"path": str(shared_data / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar"}]
    cfg = parse_config(
        {"inputs": inputs, "output": str(tmp_path / "out"), "model": {"armorm_checkpoint": uri}, "storage_options": so}
    )
    assert cfg.model.armorm_checkpoint == uri
    with pytest.raises(ConfigError, match="no config.json"):
        parse_config(
            {"inputs": inputs, "output": "o", "model": {"armorm_checkpoint": uri + "-missing"}, "storage_options": so}
        )
    _, remote, _ = _label(shard, tmp_path / "remote", armorm_checkpoint=uri, so=so)
    _, local, _ = _label(shard, tmp_path / "local", armorm_checkpoint=checkpoint)
    assert remote.column("input_ids").to_pylist() == local.column("input_ids").to_pylist()
    np.testing.assert_array_equal(remote.column("score").to_numpy(), local.column("score").to_numpy())
    assert remote.column("heads_fingerprint").to_pylist() == local.column("heads_fingerprint").to_pylist()
