import numpy as np
import pytest

from pipeline.curation import calibration as cal


def test_zscore_fit_standardises_the_reference():
    rng = np.random.default_rng(1)
    ref = rng.normal(3.0, 2.0, 5000)
    c = cal.fit_calibration({"score": ref}, "zscore")
    z = cal.apply_column(c, "score", ref)
    assert abs(z.mean()) < 1e-9 and z.std() == pytest.approx(1.0)
    assert c["columns"]["score"]["mean"] == pytest.approx(ref.mean())


def test_quantile_fit_maps_to_the_empirical_cdf():
    rng = np.random.default_rng(2)
    ref = rng.exponential(1.0, 4000)
    c = cal.fit_calibration({"score": np.r_[ref, np.nan]}, "quantile", n_quantiles=201)
    assert c["columns"]["score"]["n"] == 4000  # NaN ignored
    probe = np.quantile(ref, [0.1, 0.25, 0.5, 0.9])
    ecdf = np.searchsorted(np.sort(ref), probe, side="right") / len(ref)
    assert np.allclose(cal.apply_column(c, "score", probe), ecdf, atol=1 / 200 + 1 / 4000)
    assert cal.apply_column(c, "score", [-1.0, 1e9]).tolist() == [0.0, 1.0]
    grid = np.linspace(0, 5, 50)
    assert np.all(np.diff(cal.apply_column(c, "score", grid)) >= 0)


def test_quantile_fit_with_repeated_values_maps_to_share_at_or_below():
    ref = np.array([0.0] * 50 + [1.0] * 50)
    c = cal.fit_calibration({"x": ref}, "quantile", n_quantiles=11)
    assert cal.apply_column(c, "x", [0.0, 1.0]).tolist() == [0.5, 1.0]


def test_win_probability():
    assert cal.win_probability(1.0, 1.0) == 0.5
    p = cal.win_probability([2.0, -40.0], [0.0, 0.0])
    assert p[0] == pytest.approx(1 / (1 + np.exp(-2.0))) and 0 < p[1] < 1e-17
    assert cal.win_probability(0.3, 0.1, temperature=0.5) + cal.win_probability(
        0.1, 0.3, temperature=0.5
    ) == pytest.approx(1.0)
    assert cal.win_probability(0.3, 0.1, temperature=0.5) == pytest.approx(1 / (1 + np.exp(-0.4)))
    with pytest.raises(ValueError):
        cal.win_probability(1, 0, temperature=0)


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    true_t = 0.25
    diff = rng.normal(0, 0.5, 40000)
    chosen_first = rng.random(len(diff)) < 1 / (1 + np.exp(-diff / true_t))
    margins = np.where(chosen_first, diff, -diff)  # score(human chosen) - score(human rejected)
    t = cal.fit_temperature(margins)
    assert t == pytest.approx(true_t, rel=0.05)

    def nll(temp):
        return -np.sum(np.log(cal.sigmoid(margins / temp)))

    assert nll(t) <= min(nll(t * 0.97), nll(t * 1.03))


def test_fit_temperature_limits():
    assert cal.fit_temperature([0.5, 1.0, 2.0]) == 1e-3  # all agree: as sharp as allowed
    assert cal.fit_temperature([]) == 1e3  # no signal


def test_save_and_load_roundtrip(tmp_path):
    c = cal.fit_calibration(
        {"score": [0.1, 0.2, 0.4], "rating_a": [1.0, 2.0, 4.0]}, "zscore", temperature=0.7, reference="runs/x"
    )
    uri = str(tmp_path / "heads" / "calibration.json")
    cal.save(c, uri)
    assert cal.load(uri) == c
    (tmp_path / "bad.json").write_text('{"version": 99}')
    with pytest.raises(ValueError, match="not a calibration file"):
        cal.load(str(tmp_path / "bad.json"))
