"""Score calibration fitted on a reference run, stored as JSON next to the heads.

* z-score: x -> (x - mean) / std, per column (the score and each rating column).
* quantile: x -> the share of reference values <= x, linearly interpolated between stored quantile
  knots (values outside the reference range map to 0 or 1).
* P(a beats b) = sigmoid((score_a - score_b) / T). T defaults to 1 (the Bradley-Terry reading of the
  score the gating head is trained with); `fit_temperature` fits it by maximum likelihood on human
  preference pairs of a reference run.
"""

from __future__ import annotations

import json

import numpy as np

from pipeline import storage
from pipeline.secrets import redact

CALIBRATION_VERSION = 1
METHODS = ("zscore", "quantile")


def _clean(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v[~np.isnan(v)]


def fit_column(values, method: str, n_quantiles: int = 101) -> dict:
    v = _clean(values)
    if len(v) == 0:
        raise ValueError("cannot calibrate a column without values")
    if method == "zscore":
        std = float(np.std(v))
        return {"n": int(len(v)), "mean": float(np.mean(v)), "std": std if std > 0 else 1.0}
    if method == "quantile":
        probs = np.linspace(0.0, 1.0, n_quantiles)
        return {
            "n": int(len(v)),
            "probs": probs.tolist(),
            "quantiles": np.quantile(v, probs, method="inverted_cdf").tolist(),
        }
    raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")


def fit_calibration(
    columns: dict[str, np.ndarray],
    method: str,
    n_quantiles: int = 101,
    temperature: float = 1.0,
    reference: str | None = None,
) -> dict:
    return {
        "version": CALIBRATION_VERSION,
        "method": method,
        "reference_run": reference,
        "temperature": float(temperature),
        "columns": {name: fit_column(v, method, n_quantiles) for name, v in sorted(columns.items())},
    }


def apply_column(calibration: dict, column: str, values) -> np.ndarray:
    params = calibration["columns"][column]
    v = np.asarray(values, dtype=np.float64)
    if calibration["method"] == "zscore":
        return (v - params["mean"]) / params["std"]
    q = np.asarray(params["quantiles"])
    p = np.asarray(params["probs"])
    # Repeated knots (many equal reference values) make interp ambiguous: keep each value's last knot,
    # i.e. the share of reference values <= x.
    last = np.r_[q[1:] != q[:-1], True]
    return np.interp(v, q[last], p[last], left=0.0, right=1.0)


def sigmoid(z):
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def win_probability(score_a, score_b, temperature: float = 1.0):
    """P(a beats b) under the Bradley-Terry model on (temperature-scaled) scores."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    return sigmoid((np.asarray(score_a, dtype=np.float64) - np.asarray(score_b, dtype=np.float64)) / temperature)


def fit_temperature(margins, lo: float = 1e-3, hi: float = 1e3, iters: int = 200) -> float:
    """Maximum-likelihood T for P(chosen beats rejected) = sigmoid(margin / T), margin = s_chosen - s_rejected.

    The negative log-likelihood is convex in b = 1/T, so bisection on its derivative
    -sum(m * sigmoid(-b m)) finds the optimum; the answer is clipped to [lo, hi] (all margins positive
    would otherwise drive T to 0, margins with no signal drive it to infinity).
    """
    m = _clean(margins)
    m = m[m != 0]
    if len(m) == 0:
        return hi

    def slope(b: float) -> float:
        return float(-np.sum(m * sigmoid(-b * m)))

    b_lo, b_hi = 1.0 / hi, 1.0 / lo
    if slope(b_lo) >= 0:
        return hi
    if slope(b_hi) <= 0:
        return lo
    for _ in range(iters):
        mid = np.sqrt(b_lo * b_hi)  # bisection in log space: b spans six decades
        if slope(mid) < 0:
            b_lo = mid
        else:
            b_hi = mid
    return float(1.0 / np.sqrt(b_lo * b_hi))


def save(calibration: dict, uri: str, storage_options: dict | None = None) -> None:
    storage.write_atomic(uri, json.dumps(redact(calibration), indent=2, sort_keys=True).encode(), storage_options)


def load(uri: str, storage_options: dict | None = None) -> dict:
    cal = json.loads(storage.read_bytes(uri, storage_options))
    if cal.get("version") != CALIBRATION_VERSION or cal.get("method") not in METHODS:
        raise ValueError(f"{uri}: not a calibration file of version {CALIBRATION_VERSION}")
    return cal
