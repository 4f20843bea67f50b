"""The alarm's statistics against independent references: scipy's beta-binomial, a Monte-Carlo
run length, known simulated streams; the promise under over-dispersion and drift, where the
first (binomial) rule breaks it; the CUSUM inside Trend against a recursion written here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import betabinom

from crystalscope.errors import UserError
from crystalscope.monitor import rules
from crystalscope.monitor.rules import (
    BetaBinomialCusum,
    BinomialRun,
    average_run_length,
    calibrate_counts,
    cusum_threshold,
    log_likelihood_ratio,
)
from crystalscope.monitor.trend import AlarmRule, Trend
from crystalscope.synth.counts import CountStream, drift_path, window_counts


def _beta(p: float, rho: float) -> tuple[float, float]:
    return p * (1 / rho - 1), (1 - p) * (1 / rho - 1)


def _stream(stream: CountStream, windows: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    rates, _ = drift_path(stream, windows, rng)
    return [(int(k), stream.crops) for k in window_counts(stream, rates, rng)]


def test_increments_and_p_values_are_scipys_beta_binomial() -> None:
    n, p0, p1, rho = 60, 0.05, 0.1, 0.03
    k = np.arange(n + 1)
    expected = (betabinom.logpmf(k, n, *_beta(p1, rho))
                - betabinom.logpmf(k, n, *_beta(p0, rho)))
    np.testing.assert_allclose(log_likelihood_ratio(n, p0, p1, rho), expected, rtol=1e-10)
    cusum = BetaBinomialCusum(p0, p1, rho, arl0=100, design_crops=n)
    for count in (0, 3, 9):
        step = cusum.update(count, n)
        assert step.p_value == pytest.approx(betabinom.sf(count - 1, n, *_beta(p0, rho)),
                                             rel=1e-9)


@pytest.mark.parametrize(("n", "p0", "p1", "rho", "arl0"),
                         [(50, 0.05, 0.1, 0.02, 200), (200, 0.03, 0.06, 0.0, 300)])
def test_the_threshold_gives_the_promised_run_length_in_simulation(
        n: int, p0: float, p1: float, rho: float, arl0: float) -> None:
    threshold = cusum_threshold(n, p0, p1, rho, arl0)
    increments = log_likelihood_ratio(n, p0, p1, rho)
    rng = np.random.default_rng(3)
    streams = 3_000
    statistic, run = np.zeros(streams), np.zeros(streams, dtype=int)
    alive = np.ones(streams, dtype=bool)
    for t in range(1, 20 * int(arl0)):  # every stream in parallel, until each has alarmed
        shares = (rng.beta(*_beta(p0, rho), size=streams) if rho else np.full(streams, p0))
        statistic = np.maximum(0, statistic + increments[rng.binomial(n, shares)])
        ended = alive & (statistic >= threshold)
        run[ended], alive = t, alive & ~ended
        if not alive.any():
            break
    measured = run.mean()  # standard error ~ arl0 / sqrt(3000): under 2%
    assert 0.9 * arl0 <= measured <= 1.12 * arl0, (threshold, measured)
    pmf = np.exp(rules._log_pmf(n, p0, rho))
    assert average_run_length(increments, pmf, 0.9 * threshold) < arl0  # the smallest one


def test_calibration_measures_rate_and_correlation_of_a_known_stream() -> None:
    stream = CountStream(rate=0.04, rho=0.02, crops=300)
    calibration = calibrate_counts(_stream(stream, 3_000, seed=1), "simulated")
    assert calibration.rate == pytest.approx(0.04, rel=0.05)
    assert calibration.dispersion == pytest.approx(0.02, rel=0.2)
    assert calibration.dispersion <= calibration.dispersion_bound < 0.03
    assert calibration.rate < calibration.rate_bound < 0.045
    independent = calibrate_counts(_stream(CountStream(rho=0.0), 3_000, seed=2), "simulated")
    assert independent.dispersion < 0.002 and independent.drift < 0.003


def test_slow_drift_is_measured_apart_from_the_short_term_spread() -> None:
    stream = CountStream(rate=0.04, rho=0.0, drift=1.0, ar=0.95, crops=400)
    calibration = calibrate_counts(_stream(stream, 3_000, seed=4), "simulated")
    truth_rates, _ = drift_path(stream, 200_000, np.random.default_rng(0))
    assert calibration.drift == pytest.approx(truth_rates.std(), rel=0.3)
    assert calibration.dispersion < 0.003  # successive differences cancel the slow drift
    assert calibration.total_dispersion > 5 * max(calibration.dispersion, 1e-4)


def test_long_run_factor_of_an_ar1_series_is_its_known_value() -> None:
    rng = np.random.default_rng(7)
    noise = rng.normal(size=50_000)
    series = np.empty_like(noise)
    series[0] = noise[0]
    for i in range(1, len(noise)):
        series[i] = 0.8 * series[i - 1] + noise[i]
    assert rules.long_run_factor(series - series.mean()) == pytest.approx(9.0, rel=0.1)
    assert rules.long_run_factor(noise) == pytest.approx(1.0, abs=0.1)


def test_the_rate_bound_covers_the_true_rate_under_drift() -> None:
    # 100-window calibrations of a drifting stream: windows are not independent draws, so
    # the bound must widen with their autocorrelation (95% nominal, one-sided; 0.85 measured
    # here, under 0.75 without the widening: a calibration much shorter than the drift's
    # memory cannot reach the nominal level).
    stream = CountStream(rate=0.04, rho=0.01, drift=1.0, ar=0.95, crops=400)
    covered = [calibrate_counts(_stream(stream, 100, seed=s), "s").rate_bound >= stream.rate
               for s in range(200)]
    assert np.mean(covered) >= 0.8


def test_fewer_than_30_windows_are_refused_for_the_cusum_with_one_line() -> None:
    counts = [(2, 100)] * 29
    with pytest.raises(UserError, match="at least 30 clean windows"):
        calibrate_counts(counts, "s")
    rate_only = calibrate_counts(counts, "s", need_spread=False)  # the binomial rule
    assert rate_only.rate == pytest.approx(0.02) and not rate_only.measured_spread


def _false_alarms(rule_for: object, stream: CountStream, runs: int, windows: int) -> int:
    alarms = 0
    for run in range(runs):
        rng = np.random.default_rng(100 + run)
        rates, z = drift_path(stream, 100, rng)
        detector = rule_for([(int(k), stream.crops)  # type: ignore[operator]
                             for k in window_counts(stream, rates, rng)])
        rates, _ = drift_path(stream, windows, rng, z)
        for k in window_counts(stream, rates, rng).tolist():
            if detector.update(k, stream.crops).alarm:
                alarms += 1
                detector.reset()
    return alarms


def test_the_cusum_keeps_its_promise_where_the_binomial_rule_breaks_it() -> None:
    # Over-dispersed, drifting clean stream (the case); promise: ARL0 = 1,000 windows.
    stream = CountStream(rate=0.04, rho=0.05, drift=0.5, ar=0.95, crops=400)

    def cusum(counts: list[tuple[int, int]]) -> BetaBinomialCusum:
        c = calibrate_counts(counts, "s")
        return AlarmRule("pg", c.rate_bound, arl0=1_000, min_shift=0.5 * stream.rate,
                         dispersion=c.dispersion_bound, design_crops=c.window_crops
                         ).impurity_rule()  # type: ignore[return-value]

    def binomial(counts: list[tuple[int, int]]) -> BinomialRun:
        c = calibrate_counts(counts, "s")
        return BinomialRun(c.independent_bound, 1e-3, 2)

    windows = 10 * 2_000
    promised = windows / 1_000
    assert _false_alarms(cusum, stream, 10, 2_000) <= promised  # measured: 0 here
    assert _false_alarms(binomial, stream, 10, 2_000) > 20 * promised


def test_a_step_to_three_times_the_rate_is_detected_quickly_at_400_crops() -> None:
    stream = CountStream(rate=0.04, rho=0.0, crops=400)
    delays = []
    for seed in range(20):
        c = calibrate_counts(_stream(stream, 100, seed=seed), "s")
        detector = AlarmRule("pg", c.rate_bound, dispersion=c.dispersion_bound,
                             design_crops=c.window_crops).impurity_rule()
        rng = np.random.default_rng(1_000 + seed)
        counts = window_counts(stream, np.full(50, 3 * stream.rate), rng).tolist()
        delays.append(next(i for i, k in enumerate(counts, 1) if detector.update(k, 400).alarm))
    assert np.median(delays) <= 3


def test_trend_runs_the_cusum_a_recursion_written_here_gives() -> None:
    rule = AlarmRule("pg", 0.05, arl0=500, dispersion=0.02, design_crops=40)
    trend = Trend(["cex", "pg"], rule)
    p0, p1 = 0.05, 0.10
    threshold = cusum_threshold(40, p0, p1, 0.02, 500)
    history = [2, 1, 3, 6, 8, 9, 10, 2]
    statistic, first_alarm, since, since_at_alarm = 0.0, None, None, None
    for i, k in enumerate(history, 1):
        increment = (betabinom.logpmf(k, 40, *_beta(p1, 0.02))
                     - betabinom.logpmf(k, 40, *_beta(p0, 0.02)))
        statistic = max(0.0, statistic + increment)
        since = (since or i) if statistic > 0 else None
        result = trend.add(i, f"t{i}", ["pg"] * k + ["cex"] * (40 - k))
        assert result.statistic == pytest.approx(statistic, rel=1e-9)
        assert result.threshold == pytest.approx(threshold)
        if first_alarm is None and statistic >= threshold:
            first_alarm, since_at_alarm = i, since
        assert result.alarm == (i == first_alarm)
    assert first_alarm is not None
    text = trend.explain_alarm(trend.alarm_window)  # type: ignore[arg-type]
    assert f"ALARM at window {first_alarm}" in text and "one false alarm per 500" in text
    assert f"since window {since_at_alarm}," in text  # where the evidence began to build


def test_table_caches_stay_bounded_with_many_window_sizes() -> None:
    detector = AlarmRule("pg", 0.05, arl0=100, design_crops=50).impurity_rule()
    for n in range(10, 1_500):
        detector.update(n // 20, n)
    assert rules._log_pmf.cache_info().currsize <= 512
    assert rules.log_likelihood_ratio.cache_info().currsize <= 512


@pytest.mark.parametrize(("options", "field"), [
    ({"min_shift": -0.1}, "min_shift"),
    ({"arl0": 1}, "arl0"),
    ({"rule": "laney"}, "rule"),
    ({"dispersion": 1.5}, "dispersion"),
    ({"false_positive_rate": 0.0}, "false_positive_rate"),
])
def test_bad_rule_settings_are_refused_with_the_field_named(options: dict, field: str) -> None:
    from crystalscope.settings import SettingsError

    settings = {"positive": "pg", "false_positive_rate": 0.05, **options}
    with pytest.raises(SettingsError) as caught:
        Trend(["cex", "pg"], AlarmRule(**settings))
    assert caught.value.field == field and "--" not in str(caught.value)
    assert caught.value.for_flags().startswith("--" + field.replace("_", "-"))


# ----------------------------------------------------------------------------- the seam


def _every_rule() -> dict[str, rules.Rule]:
    """Each rule of RULES as the monitor builds it, and the unknown crops' rule."""
    built: dict[str, rules.Rule] = {
        name: AlarmRule("pg", 0.05, rule=name, arl0=200, design_crops=40).impurity_rule()
        for name in rules.RULES}
    unknown = AlarmRule("pg", 0.05, unknown_rate=0.02).unknown_rule()
    assert unknown is not None
    built["unknown"] = unknown
    return built


@pytest.mark.parametrize("name", [*rules.RULES, "unknown"])
def test_every_rule_keeps_the_contract_of_the_seam(name: str) -> None:
    rule = _every_rule()[name]
    assert rule.name in rule.describe().lower()  # the promise names the rule
    empty = rule.update(0, 0)  # a window without crops: no p-value, never an alarm
    assert empty.p_value is None and not empty.alarm
    for _ in range(20):  # clean windows: no evidence builds up
        evidence = rule.update(0, 40)
        assert 0 < evidence.p_value <= 1 and not evidence.alarm and evidence.statistic == 0
    alarms = [rule.update(40, 40).alarm for _ in range(10)]  # every crop called: the alarm
    assert any(alarms[:3]) and alarms[-1]
    first = alarms.index(True)
    assert not any(alarms[:first]) and all(alarms[first:])  # it holds while the evidence does
    rule.reset()
    after = rule.update(0, 40)
    assert after.statistic == 0 and not after.alarm
    # the state is the instance's own: a second instance fed the same windows agrees
    twin, counts = _every_rule()[name], [(3, 40), (9, 40), (0, 0), (20, 40), (1, 40)]
    again = _every_rule()[name]
    assert [twin.update(k, n) for k, n in counts] == [again.update(k, n) for k, n in counts]


def test_the_binomial_rules_p_value_is_scipys_binomial_tail() -> None:
    from scipy.stats import binom

    rule = AlarmRule("pg", 0.05, unknown_rate=0.02).unknown_rule()
    assert rule is not None
    for k, n in ((0, 10), (1, 10), (3, 40), (12, 40), (40, 40)):
        assert rule.update(k, n).p_value == pytest.approx(binom.sf(k - 1, n, 0.02), rel=1e-9)


def test_the_cli_offers_exactly_the_rules_there_are() -> None:
    from crystalscope.cli.options import AlarmRuleName

    assert [r.value for r in AlarmRuleName] == list(rules.RULES)
