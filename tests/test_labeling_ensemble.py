"""The score stage with an ensemble saved beside the heads: score_mean / score_std / score_min and the
per-objective ensemble_rating_mean_* / ensemble_rating_std_* from the same embeddings in the same
backbone pass, declared like every other column; an ensemble of other heads or another backbone is
refused."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_labeling_stages import SMOL, _label, shard  # noqa: F401 - the module's shard fixture

from pipeline import schema
from pipeline.embed.engine import EmbeddingEngine
from pipeline.heads.ensemble import DIRECTORY, HeadsEnsemble
from pipeline.heads.gating import GatingNetwork
from pipeline.heads.model import ArmoHeads
from pipeline.stage import StageError

K, HIDDEN = 3, 576  # SmolLM2-135M's hidden size


def _heads(seed: int) -> ArmoHeads:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    return ArmoHeads(
        [f"t.obj{i}" for i in range(K)], rng.normal(size=(K, HIDDEN)) * 0.05, np.eye(K), GatingNetwork(HIDDEN, K, 32)
    )


def _heads_with_ensemble(root, backbone_fingerprint=None, primary=None) -> str:
    heads = _heads(0)
    heads.save(str(root))
    members = [_heads(s) for s in (1, 2, 3, 4)]
    records = [{"bootstrap_seed": s, "gating_seed": s} for s in (1, 2, 3, 4)]
    HeadsEnsemble(members, records, primary or heads.fingerprint, backbone_fingerprint).save(str(root / DIRECTORY))
    return str(root)


def test_ensemble_columns_come_from_the_same_pass(shard, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    real = EmbeddingEngine.embed

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(EmbeddingEngine, "embed", counting)
    heads_dir = _heads_with_ensemble(tmp_path / "h")
    objectives, scored, summaries = _label(shard, tmp_path / "out", backbone=SMOL, heads=heads_dir, embeddings=True)
    assert len(calls) == 1  # one backbone pass for the primary heads and every member
    good = [i for i, r in enumerate(scored.column("quarantine_reason").to_pylist()) if r is None]
    assert len(good) >= 2
    X = np.array([scored.column("embedding")[i].as_py() for i in good], np.float32)
    P = np.array([scored.column("prompt_embedding")[i].as_py() for i in good], np.float32)
    ens = HeadsEnsemble.load(f"{heads_dir}/{DIRECTORY}")
    member = np.column_stack([m.score(X, P).score for m in ens.members]).astype(np.float64)
    # each member's score of the bare prompt (the prompt embedding as the response, the same gate)
    at_prompt = np.column_stack([m.score(P, P).score for m in ens.members]).astype(np.float64)
    for row, i in enumerate(good):
        vals = list(member[row])
        mean = sum(vals) / len(vals)
        adv = [v - p for v, p in zip(vals, at_prompt[row])]
        adv_mean = sum(adv) / len(adv)
        std = (sum((v - adv_mean) ** 2 for v in adv) / (len(adv) - 1)) ** 0.5
        assert scored.column("score_mean")[i].as_py() == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert scored.column("score_std")[i].as_py() == pytest.approx(std, rel=1e-4, abs=1e-6)
        assert scored.column("score_min")[i].as_py() == pytest.approx(min(vals), rel=1e-5, abs=1e-6)
    # per objective, the members' ratings r (x · w_j of each member), by loops here
    for j, obj in enumerate(objectives):
        w = [np.asarray(m.regression_weight[j], np.float64) for m in ens.members]
        for row, i in enumerate(good):
            vals = [float(X[row].astype(np.float64) @ wm) for wm in w]
            mean = sum(vals) / len(vals)
            std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
            got_mean = scored.column(schema.objective_column(schema.ENSEMBLE_RATING_MEAN_PREFIX, obj))[i].as_py()
            got_std = scored.column(schema.objective_column(schema.ENSEMBLE_RATING_STD_PREFIX, obj))[i].as_py()
            assert got_mean == pytest.approx(mean, rel=1e-4, abs=1e-5)
            assert got_std == pytest.approx(std, rel=1e-3, abs=1e-5) and std > 0
    # the primary score is the primary heads' own, not the ensemble's
    primary = ArmoHeads.load(heads_dir).score(X, P).score
    np.testing.assert_allclose([scored.column("score")[i].as_py() for i in good], primary, rtol=1e-6)
    data = pq.read_table(f"{tmp_path}/out/data")
    assert data.schema == schema.output_schema(objectives, with_embeddings=True)
    assert data.column("score_std").null_count == 0


def test_heads_without_ensemble_write_null_uncertainty(shard, tmp_path):  # noqa: F811
    heads = _heads(0)
    heads.save(str(tmp_path / "h"))
    _, scored, _ = _label(shard, tmp_path / "out", backbone=SMOL, heads=str(tmp_path / "h"))
    ensemble_ratings = [c for c in scored.column_names if c.startswith("ensemble_rating_")]
    assert len(ensemble_ratings) == 2 * K
    for c in (*schema.ENSEMBLE_COLUMNS, *ensemble_ratings):
        assert scored.column(c).null_count == scored.num_rows


@pytest.mark.parametrize(
    "over, message",
    [({"backbone_fingerprint": "another-backbone"}, "backbone"), ({"primary": "f" * 64}, "beside heads")],
)
def test_a_foreign_ensemble_is_refused(shard, tmp_path, over, message):  # noqa: F811
    heads_dir = _heads_with_ensemble(tmp_path / "h", **over)
    with pytest.raises(StageError, match=message):
        _label(shard, tmp_path / "out", backbone=SMOL, heads=heads_dir)
