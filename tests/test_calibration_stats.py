"""Calibration statistics on synthetic score arrays: Welford moments, the reservoir, the threshold
policies' false-alarm rates, conformal p-values and the checkpoint fallback."""
import math
import zlib

import numpy as np
import pytest
from scipy import stats

from ama_stream.calibration import Calibration, CalibrationError, CalibrationFitter, Entry, Policy
from ama_stream.streamstats import RunningStats

DISTRIBUTIONS = {
    "normal": lambda rng, n: rng.normal(500.0, 40.0, n),
    "gamma": lambda rng, n: 100.0 + rng.gamma(2.0, 30.0, n),  # skewed: a Gaussian rule misjudges its tails
    "lognormal": lambda rng, n: rng.lognormal(5.0, 0.6, n),
}


def fitted(scores: np.ndarray, policy: Policy, chunk: int = 4096, **kwargs) -> Calibration:
    fitter = CalibrationFitter(**kwargs)
    for i in range(0, len(scores), chunk):
        fitter.update(scores[i : i + chunk])
    calibration, _ = fitter.finish("model-x", policy, {"spec": "synthetic"})
    return calibration


def fpr_tolerance(alpha: float, m: int, n_test: int, sigmas: float = 4.5) -> float:
    """The calibrated FPR varies with the calibration sample (Beta, ~alpha/m) and the test draw (binomial)."""
    return sigmas * math.sqrt(alpha * (1 - alpha) * (1 / (m + 1) + 1 / n_test))


# --------------------------------------------------------------------------- streaming statistics


def test_welford_matches_two_pass_float64_despite_a_large_offset():
    rng = np.random.default_rng(0)
    data = 1e9 + rng.normal(0.0, 1.0, 200_000)  # a naive sum of squares loses every digit here
    stats_ = RunningStats(capacity=100)
    cuts = np.sort(rng.choice(np.arange(1, data.size), 300, replace=False))
    for part in np.split(data, cuts):
        stats_.update(part)
    assert stats_.n == data.size
    assert stats_.mean == pytest.approx(data.mean(), rel=1e-15, abs=1e-6)
    assert stats_.std == pytest.approx(data.std(), rel=1e-9)


def test_welford_does_not_depend_on_how_the_stream_is_chunked():
    data = np.random.default_rng(1).gamma(2.0, 3.0, 10_000)
    one, many = RunningStats(10), RunningStats(10)
    one.update(data)
    for v in data:
        many.update(np.array([v]))
    assert many.mean == pytest.approx(one.mean, rel=1e-12)
    assert many.std == pytest.approx(one.std, rel=1e-10)


def test_reservoir_is_bounded_uniform_and_seeded():
    n, capacity = 100_000, 2_000
    values = np.arange(n, dtype=np.float64)
    a, b, c = RunningStats(capacity, seed=3), RunningStats(capacity, seed=3), RunningStats(capacity, seed=4)
    for part in np.array_split(values, 97):
        a.update(part)
        b.update(part)
        c.update(part)
    sample = a.sample()
    assert sample.size == capacity and np.all(np.diff(sample) > 0)  # sorted, no value taken twice
    assert np.array_equal(sample, b.sample()) and not np.array_equal(sample, c.sample())
    # every position of the stream is equally likely to be kept: the sample is uniform over [0, n)
    assert stats.kstest(sample / n, "uniform").pvalue > 0.001
    early = np.mean(sample < n / 2)
    assert abs(early - 0.5) < 4.5 * math.sqrt(0.25 / capacity)


def test_reservoir_keeps_everything_below_capacity():
    s = RunningStats(capacity=50)
    s.update(np.array([3.0, 1.0, 2.0]))
    assert np.array_equal(s.sample(), [1.0, 2.0, 3.0])


def test_fitter_skips_non_finite_scores_and_refuses_a_constant_stream():
    fitter = CalibrationFitter()
    fitter.update(np.array([1.0, np.nan, 2.0, np.inf, 3.0]))
    assert fitter.n == 3 and fitter.skipped_nonfinite == 2
    flat = CalibrationFitter()
    flat.update(np.full(100, 7.0))
    with pytest.raises(CalibrationError, match="sigma would be 0"):
        flat.finish("m", Policy(), {"spec": "x"})


# --------------------------------------------------------------------------- policies and false-alarm rates


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("policy_name", ["two-sided", "upper"])
def test_measured_false_alarm_rate_matches_the_target_on_held_out_normal_data(name, policy_name):
    rng = np.random.default_rng(zlib.crc32(f"{name}/{policy_name}".encode()))
    alpha, m, n_test = 0.01, 20_000, 400_000
    calibration = fitted(DISTRIBUTIONS[name](rng, m), Policy(policy_name, alpha))
    assert calibration.rule().expected_fpr == pytest.approx(alpha, abs=1 / (m + 1))
    measured = calibration.decide(DISTRIBUTIONS[name](rng, n_test)).anomaly.mean()
    assert abs(measured - alpha) < fpr_tolerance(alpha, m, n_test), (name, policy_name, measured)


def test_the_sigma_rule_misses_the_target_on_skewed_scores_where_the_quantile_does_not():
    """Why the default is an empirical quantile: |z| > 3 assumes Gaussian R-scores."""
    rng = np.random.default_rng(5)
    cal_scores, test = DISTRIBUTIONS["lognormal"](rng, 20_000), DISTRIBUTIONS["lognormal"](rng, 400_000)
    gaussian_fpr = math.erfc(3 / math.sqrt(2))  # 0.0027
    sigma_rule = fitted(cal_scores, Policy.make("sigma", k=3.0)).decide(test).anomaly.mean()
    quantile = fitted(cal_scores, Policy("two-sided", gaussian_fpr)).decide(test).anomaly.mean()
    assert sigma_rule > 3 * gaussian_fpr  # the long right tail alarms far more often than promised
    assert abs(quantile - gaussian_fpr) < fpr_tolerance(gaussian_fpr, 20_000, 400_000)


def test_the_exact_conformal_rate_holds_for_small_calibration_sets():
    """With m calibration scores the false-alarm rate is exactly floor((m+1) a) / (m+1) on average:
    an off-by-one in the quantile index would move it by 1/(m+1) = 0.01 here."""
    rng = np.random.default_rng(7)
    m, alpha, trials, per_trial = 99, 0.05, 3000, 40
    rates = []
    for _ in range(trials):
        calibration = fitted(rng.normal(0, 1, m), Policy("upper", alpha))
        rates.append(calibration.decide(rng.normal(0, 1, per_trial)).anomaly.mean())
    expected = math.floor((m + 1) * alpha) / (m + 1)
    assert abs(np.mean(rates) - expected) < 0.003


def test_upper_ignores_unusually_low_scores_two_sided_does_not():
    rng = np.random.default_rng(2)
    scores = rng.normal(100.0, 10.0, 20_000)
    low, high = np.array([20.0]), np.array([180.0])
    upper, two_sided = fitted(scores, Policy("upper", 0.001)), fitted(scores, Policy("two-sided", 0.001))
    assert not upper.decide(low).anomaly[0] and upper.decide(high).anomaly[0]
    assert two_sided.decide(low).anomaly[0] and two_sided.decide(high).anomaly[0]
    assert upper.decide(low).p_value[0] == pytest.approx(1.0, abs=1e-3)  # z very negative: nothing unusual upward


def test_sigma_policy_alerts_on_abs_z_above_k():
    calibration = fitted(np.random.default_rng(0).normal(0.0, 1.0, 5000), Policy.make("sigma", k=2.5))
    z = np.array([-2.6, -2.4, 0.0, 2.4, 2.6])
    r = calibration.mu + z * calibration.sigma
    d = calibration.decide(r)
    assert np.array_equal(d.anomaly, [True, False, False, False, True])
    assert np.all(d.threshold == 2.5)


# --------------------------------------------------------------------------- p-values


@pytest.mark.parametrize("policy_name", ["two-sided", "upper"])
def test_p_values_are_uniform_on_normal_data(policy_name):
    rng = np.random.default_rng(11)
    calibration = fitted(DISTRIBUTIONS["gamma"](rng, 20_000), Policy(policy_name, 0.001))
    p = calibration.decide(DISTRIBUTIONS["gamma"](rng, 5_000)).p_value
    assert stats.kstest(p, "uniform").pvalue > 0.001
    anomalies = calibration.decide(np.array([1e4, 2e4])).p_value
    assert np.all(anomalies == 1 / (20_000 + 1))  # beyond every calibration score: the smallest p there is


def test_anomaly_is_exactly_p_at_most_the_target():
    rng = np.random.default_rng(4)
    for policy_name in ("two-sided", "upper"):
        calibration = fitted(rng.normal(0, 1, 3000), Policy(policy_name, 0.02))
        d = calibration.decide(rng.normal(0, 1.5, 50_000))
        assert d.anomaly.any()
        assert np.array_equal(d.anomaly, d.p_value <= 0.02)


def test_a_target_finer_than_the_sample_warns_and_alerts_beyond_every_score():
    rng = np.random.default_rng(6)
    calibration = fitted(rng.normal(0, 1, 500), Policy("two-sided", 0.0005))
    rule = calibration.rule()
    assert rule.threshold == pytest.approx(np.max(np.abs((rule.entry.sample - rule.entry.mu) / rule.entry.sigma)))
    assert rule.expected_fpr == pytest.approx(1 / 501)
    [warning] = calibration.warnings()
    assert "500 calibration scores" in warning and "20000 are needed" in warning


def test_the_sample_cap_limits_resolution_and_says_so():
    rng = np.random.default_rng(8)
    calibration = fitted(rng.normal(0, 1, 30_000), Policy("two-sided", 0.0001), max_sample=5_000)
    assert calibration.global_entry.n == 30_000 and calibration.global_entry.sample.size == 5_000
    assert calibration.global_entry.mu == pytest.approx(0.0, abs=0.03)  # moments use every score
    [warning] = calibration.warnings()
    assert "a sample of 5000 of 30000 scores" in warning
    assert not fitted(rng.normal(0, 1, 30_000), Policy("two-sided", 0.001)).warnings()


# --------------------------------------------------------------------------- the checkpoint fallback


class _Ckpt:
    model_id, mu, sigma, n_train, created_at = "model-x", 10.0, 2.0, 500, ""


def test_checkpoint_fallback_is_the_papers_two_sided_gaussian_rule():
    calibration = Calibration.from_checkpoint(_Ckpt())
    assert calibration.calibration_id == "checkpoint:model-x"
    d = calibration.decide(np.array([10.0, 16.5, 3.5, 15.9]))
    assert np.allclose(d.z, [0.0, 3.25, -3.25, 2.95])
    assert np.array_equal(d.anomaly, [False, True, True, False])
    assert np.allclose(d.p_value, [math.erfc(abs(z) / math.sqrt(2)) for z in d.z])
    assert np.allclose(d.log_a, stats.norm(10.0, 2.0).logpdf([10.0, 16.5, 3.5, 15.9]))
    gaussian = np.random.default_rng(0).normal(10.0, 2.0, 5000)
    assert stats.kstest(calibration.decide(gaussian).p_value, "uniform").pvalue > 0.001
    with pytest.raises(CalibrationError, match="not saved"):
        calibration.to_json_bytes()


def test_invalid_statistics_and_policies_are_refused():
    with pytest.raises(CalibrationError, match="sigma must be a finite number > 0"):
        Entry(n=10, mu=0.0, sigma=0.0)
    with pytest.raises(CalibrationError, match="mu must be a finite"):
        Entry(n=10, mu=float("nan"), sigma=1.0)
    with pytest.raises(CalibrationError, match="target_fpr in"):
        Policy("two-sided", 1.5)
    with pytest.raises(CalibrationError, match="unknown policy"):
        Policy("median", 0.1)
    with pytest.raises(CalibrationError, match="k > 0"):
        Policy.make("sigma", k=-1)


def test_a_score_that_is_not_a_number_is_never_normal():
    """NaN > threshold is False: a NaN R used to be decided normal. Every policy now flags it."""
    import numpy as np

    from ama_stream.calibration import Calibration, CalibrationFitter, Entry, Policy

    fitter = CalibrationFitter(seed=0)
    fitter.update(np.random.default_rng(0).normal(0, 1, 2000))
    calibrations = [Calibration("m", Entry(n=10, mu=0.0, sigma=1.0), Policy("sigma", None, 3.0))]
    calibrations += [fitter.finish("m", Policy(name, 0.01), {"spec": "test"})[0] for name in ("two-sided", "upper")]
    for calibration in calibrations:
        d = calibration.decide(np.array([0.0, np.nan, np.inf, -np.inf]))
        assert d.anomaly.tolist() == [False, True, True, True], calibration.policy
