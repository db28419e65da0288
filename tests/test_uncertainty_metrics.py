"""Selective accuracy, its area, ECE and the conservative-vs-plain order agreement against
brute-force references written here (Python loops over the same numbers)."""

import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline import metrics
from pipeline.evaluation import Uncertainty, evaluate, order_agreement


def _right(m: float) -> float:
    return 1.0 if m > 0 else 0.5 if m == 0 else 0.0


def _brute_top(margin, conf, k):
    idx = sorted(range(len(margin)), key=lambda i: (-conf[i], i))  # ties: input order
    return sum(_right(margin[i]) for i in idx[:k]) / k


def _brute_selective(margin, conf, x):
    return _brute_top(margin, conf, max(1, math.ceil(len(margin) * x / 100)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selective_accuracy_and_area(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    margin = np.round(rng.normal(0.2, 1.0, n), 1)
    std_a, std_b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    std_a[:2] = std_b[:2] = 0.0  # zero spread: infinite confidence unless the margin is 0
    margin[1] = 0.0
    u = metrics.pair_uncertainty(std_a, std_b)
    conf = metrics.pair_confidence(margin, u)
    ref_conf = []
    for m, a, b in zip(margin, std_a, std_b):
        s = math.sqrt(a * a + b * b)
        ref_conf.append(abs(m) / s if s > 0 else (math.inf if m != 0 else 0.0))
    assert conf.tolist() == pytest.approx(ref_conf)
    got = metrics.selective_accuracy(margin, conf)
    assert list(got) == ["25", "50", "75", "100"]
    for x in (25, 50, 75, 100):
        assert got[str(x)] == pytest.approx(_brute_selective(margin, ref_conf, x))
    assert got["100"] == pytest.approx(metrics.pairwise_accuracy(margin, np.zeros(n)))
    area = sum(_brute_top(margin, ref_conf, k) for k in range(1, n + 1)) / n
    assert metrics.selective_auc(margin, conf) == pytest.approx(area)
    assert metrics.selective_accuracy([], []) == {"25": None, "50": None, "75": None, "100": None}


def test_ece_against_bins():
    rng = np.random.default_rng(7)
    margin = rng.normal(0.3, 2.0, 200)
    margin[:3] = 0.0
    bins: dict[int, list] = {}
    for m in margin:
        p = 1 / (1 + math.exp(-m))
        c = max(p, 1 - p)
        b = min(int((c - 0.5) / 0.05), 9)
        bins.setdefault(b, []).append((c, _right(m)))
    ece = sum(
        len(v) / len(margin) * abs(sum(r for _, r in v) / len(v) - sum(c for c, _ in v) / len(v)) for v in bins.values()
    )
    assert metrics.expected_calibration_error(margin) == pytest.approx(ece)
    # calibrated: every pair at confidence 0.75, right 3 times in 4
    m = math.log(3.0)
    assert metrics.expected_calibration_error([m, m, m, -m]) == pytest.approx(0.0, abs=1e-12)
    assert metrics.expected_calibration_error([m, m, m, m]) == pytest.approx(0.25)


def test_order_agreement_against_loops():
    rng = np.random.default_rng(3)
    codes = np.repeat(np.arange(12), 4)
    plain = rng.integers(0, 4, 48).astype(float)
    other = plain + rng.normal(0, 1.0, 48)
    got = order_agreement(codes, plain, other, 12)
    same, taus = [], []
    for g in range(12):
        p, o = plain[codes == g], other[codes == g]
        top_o = [i for i in range(4) if o[i] == o.max()]
        best_p = [i for i in range(4) if p[i] == p.max()]
        same.append(sum(i in best_p for i in top_o) / len(top_o))
        c = d = tx = ty = 0
        for i in range(4):
            for j in range(i + 1, 4):
                s = np.sign(p[i] - p[j]) * np.sign(o[i] - o[j])
                c += s > 0
                d += s < 0
                tx += p[i] == p[j]
                ty += o[i] == o[j]
        denom = math.sqrt((6 - tx) * (6 - ty))
        if denom:
            taus.append((c - d) / denom)
    assert got["groups"] == 12
    assert got["top1_same"] == pytest.approx(sum(same) / 12)
    assert got["kendall_tau_b"] == pytest.approx(sum(taus) / len(taus))


def test_evaluate_reports_uncertainty_per_source():
    rows = []
    rng = np.random.default_rng(0)
    for i in range(40):
        for pref in ("chosen", "rejected"):
            rows.append(
                {
                    "row_id": f"r{i}",
                    "kind": "preference",
                    "source": "a" if i < 20 else "b",
                    "preference": pref,
                    "tie": False,
                    "human_rank": None,
                }
            )
    units = pa.Table.from_pylist(rows)
    score = rng.normal(0, 1, len(rows))
    std = rng.uniform(0.1, 1, len(rows))
    report = evaluate(units, {"score": score}, None, Uncertainty(std, "score", score - std, score - 2 * std))
    for src, sl in (("a", slice(0, 40)), ("b", slice(40, 80))):
        entry = report["pairwise"][src]
        m = score[sl][0::2] - score[sl][1::2]
        u = np.sqrt(std[sl][0::2] ** 2 + std[sl][1::2] ** 2)
        assert entry["selective_accuracy"]["50"] == pytest.approx(_brute_selective(m, list(np.abs(m) / u), 50))
        assert entry["selective_accuracy_by_margin"]["25"] == pytest.approx(_brute_selective(m, list(np.abs(m)), 25))
        assert entry["mean_score_std"] == pytest.approx(std[sl].mean()) == report["mean_score_std"][src]
        assert entry["ece"] == pytest.approx(metrics.expected_calibration_error(m))
        assert entry["conservative"] == pytest.approx(
            metrics.pairwise_accuracy((score - std)[sl][0::2], (score - std)[sl][1::2])
        )
