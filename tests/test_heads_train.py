"""train_heads on synthetic embeddings with a known linear truth: the rated objectives, the pairwise
objective, the gated score and the baseline must recover it; ties, ranks and options behave."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.heads.debias import LENGTH_OBJECTIVE
from pipeline.heads.train import train_heads
from pipeline.metrics import pearson
from pipeline.units import preference_pairs, ranked_pairs

H = 16
RNG = np.random.default_rng(0)
W_RATED = RNG.normal(size=H)
W_PREF = RNG.normal(size=H)


def _unit(row, kind, source, emb, prompt, *, pref=None, tie=False, rank=None, ratings=None, tokens=10):
    return {
        "row_id": row,
        "kind": kind,
        "source": source,
        "preference": pref,
        "tie": tie,
        "human_rank": rank,
        "ratings": ratings,
        "response_tokens": tokens,
        "embedding": emb.tolist(),
        "prompt_embedding": prompt.tolist(),
    }


def _emb(rng, n=None):
    """Embeddings with a constant component, as real ones have: ridge has no intercept."""
    x = rng.normal(size=(n or 1, H))
    x[:, 0] = 1.0
    return x if n else x[0]


def synthetic_units(n_rated=400, n_pairs=400, n_groups=60, seed=1) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rated):
        x = _emb(rng)
        y = float(np.clip(0.5 + 0.1 * x[1:] @ W_RATED[1:], 0, 1))
        rows.append(
            _unit(
                f"r{i}",
                "rated",
                "sfres",
                x,
                rng.normal(size=H),
                ratings=[{"name": "sfres.overall", "raw": y, "value": y}],
                tokens=int(rng.integers(5, 200)),
            )
        )
    for i in range(n_pairs):
        p = rng.normal(size=H)
        a, b = _emb(rng), _emb(rng)
        if a @ W_PREF < b @ W_PREF:
            a, b = b, a
        tie = i % 25 == 0
        rows.append(_unit(f"p{i}", "preference", "pandalm", a, p, pref="chosen", tie=tie))
        rows.append(_unit(f"p{i}", "preference", "pandalm", b, p, pref="rejected", tie=tie))
    for i in range(n_groups):
        p = rng.normal(size=H)
        xs = _emb(rng, 4)
        order = np.argsort(-(xs @ W_PREF))
        for rank, j in enumerate(order):
            rows.append(_unit(f"g{i}", "best_of_n", "oasst", xs[j], p, rank=rank))
    return pa.Table.from_pylist(rows)


SMALL_GATING = {"steps": 150, "batch_size": 128, "hidden_dim": 32, "eval_every": 10}


@pytest.fixture(scope="module")
def trained():
    return train_heads(synthetic_units(), {"gating": SMALL_GATING})


def test_objectives_and_shapes(trained):
    h = trained.heads
    assert h.objectives == ["sfres.overall", "pandalm.helpfulness", LENGTH_OBJECTIVE]
    assert h.regression_weight.shape == (3, H) and h.verbosity_index == 2
    # T zeroes the length pseudo-objective and leaves the others' own coefficient at 1
    assert np.allclose(h.transform[:, 2], 0) and np.allclose(np.diag(h.transform)[:2], 1)
    s = trained.summary
    assert s["objectives"]["sfres.overall"]["rows"] == 400
    assert s["objectives"]["pandalm.helpfulness"]["ties"] == 16
    assert s["gating"]["pairs"]["by_source"] == {"oasst": 60 * 6, "pandalm": 400 - 16}


def test_recovers_the_linear_truth(trained):
    fresh = synthetic_units(seed=7)
    from pipeline.units import embeddings_of

    X, P = embeddings_of(fresh)
    out = trained.heads.score(X, P)
    rated = np.array([r is not None for r in fresh.column("ratings").to_pylist()])
    truth = np.array([r[0]["value"] for r in fresh.column("ratings").to_pylist() if r])
    assert pearson(out.rewards[rated, 0], truth) > 0.95
    pairs = preference_pairs(fresh)
    k = trained.heads.objectives.index("pandalm.helpfulness")
    assert np.mean(out.rewards[pairs.better, k] > out.rewards[pairs.worse, k]) > 0.9
    assert np.mean(out.score[pairs.better] > out.score[pairs.worse]) > 0.85
    base = trained.baseline.score(X)
    assert np.mean(base[pairs.better] > base[pairs.worse]) > 0.9
    ranked = ranked_pairs(fresh)
    assert len(ranked) == 60 * 6 and np.mean(out.score[ranked.better] > out.score[ranked.worse]) > 0.85


def test_deterministic_and_seeded():
    units = synthetic_units(n_rated=100, n_pairs=100, n_groups=10)
    a = train_heads(units, {"gating": SMALL_GATING})
    b = train_heads(units, {"gating": SMALL_GATING})
    assert a.heads.fingerprint == b.heads.fingerprint and a.baseline.fingerprint == b.baseline.fingerprint
    c = train_heads(units, {"gating": {**SMALL_GATING, "seed": 1}})
    assert c.heads.fingerprint != a.heads.fingerprint


def test_options_are_checked_and_unnamed_sources_get_an_objective():
    units = synthetic_units(n_rated=50, n_pairs=60, n_groups=0)
    with pytest.raises(ValueError, match="unknown keys"):
        train_heads(units, {"gatin": {}})
    renamed = units.set_column(
        units.schema.get_field_index("source"),
        "source",
        pa.array(["sfres" if k == "rated" else "my_corpus" for k in units.column("kind").to_pylist()]),
    )
    r = train_heads(renamed, {"gating": SMALL_GATING, "verbosity": "none", "baseline": False})
    assert r.heads.objectives == ["sfres.overall", "my_corpus.preferred"]
    assert r.heads.verbosity_index is None and np.allclose(r.heads.transform, np.eye(2)) and r.baseline is None
