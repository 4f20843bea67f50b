"""The alarm's statistics: what a clean stream looks like, and when a window's impurity calls
stop being explained by it.

A real probe's false impurity calls are over-dispersed: one particle breaks into several
crops, frames are correlated, focus and fouling drift. The count of false calls among the n
crops of a window then varies more than binomial(n, f): its variance is
``n f (1 - f) (1 + (n - 1) rho)``, rho the intra-window correlation (the beta-binomial; Laney's
p' chart measures the same excess as sigma_z^2 = 1 + (n - 1) rho). :func:`calibrate_counts`
measures f *and* rho on a clean stream, each with an upper 95% bound.

Every rule is one class behind one small interface, :class:`Rule`: ``update(k, n) ->
Evidence`` per window (the rule holds its own state), ``reset()``, ``describe()`` (its promise,
for messages and plots), and ``from_settings(settings)``, which reads the options it needs;
:data:`RULES` names them. The impurity alarm and the "unknown particles" event are two
instances (``AlarmRule.impurity_rule()`` / ``unknown_rule()`` in ``monitor/trend.py``).

- :class:`BetaBinomialCusum` (the default): Page's CUSUM of the beta-binomial log-likelihood
  ratio of "share p1" against "share p0", p0 = the clean rate's upper bound plus the smallest
  shift worth an alarm (``min_shift``), p1 = p0 + max(min_shift, rate). Its threshold is set
  so that the in-control average run length at share p0 (ARL0, Brook & Evans' Markov chain)
  is the promise: one false alarm per ARL0 windows in expectation, at most.
- :class:`BinomialRun`: the first rule, kept for comparison — ``consecutive`` windows in a row
  whose one-sided binomial p-value at rate f is below ``alpha``; it assumes independent crops
  and a fixed rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, Protocol

import numpy as np
from scipy.stats import betabinom, binom, chi2
from scipy.stats import t as student_t

from crystalscope.errors import UserError

RuleName = Literal["cusum", "binomial"]
MIN_CALIBRATION_WINDOWS = 30
Z95 = 1.959964  # the 95% interval's upper end, as the rest of the monitor (binomial rule)
Z95_ONE_SIDED = 1.644854  # an upper 95% bound: the cusum's rate
ARL_GRID = 400  # cells of the Markov chain that approximates the CUSUM (Brook & Evans)


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """A clean stream's false impurity calls: the rate and the window-to-window spread.

    ``rate``: pooled share of impurity calls; ``rate_bound``: its one-sided upper 95% bound
    (Wilson, at the effective sample size: slow drift and spread widen it); ``dispersion``:
    the short-term intra-window correlation rho, from successive windows' differences
    (Laney's moving-range idea: slow drift cancels out of them), with its upper
    95% bound ``dispersion_bound``; ``total_dispersion``: the same from the Pearson X^2 of all
    windows, drift included; ``drift``: the share's slow spread (standard deviation) that the
    total holds beyond the short term; ``window_crops``: the median crops per window.
    """

    rate: float
    rate_bound: float
    dispersion: float
    dispersion_bound: float
    windows: int
    crops: int
    window_crops: int
    source: str
    total_dispersion: float = 0.0
    drift: float = 0.0
    measured_spread: bool = True  # False: rho assumed or given, not measured
    independent_bound: float = 0.0  # the rate's Wilson bound as if crops were independent

    @property
    def laney_sigma_z(self) -> float:
        """Laney's sigma_z at the median window: how many binomial standard deviations one
        window's share really varies by in the short term."""
        return math.sqrt(1 + (self.window_crops - 1) * self.dispersion)

    def describe(self) -> str:
        """The calibration in one line."""
        if not self.measured_spread and self.windows:
            return (f"{self.windows} clean windows, {self.crops} crops: rate {self.rate:.4f} "
                    f"(upper bound {self.independent_bound:.4f} as if crops were independent); "
                    f"too few windows (< {MIN_CALIBRATION_WINDOWS}) to measure the spread")
        if not self.measured_spread:
            return (f"rate {self.rate_bound:.4f} ({self.source}); intra-window correlation "
                    f"{self.dispersion:.4f} assumed, not measured (calibrate on a clean stream "
                    "to measure it)")
        return (f"{self.windows} clean windows, {self.crops} crops: rate {self.rate:.4f} "
                f"(upper bound {self.rate_bound:.4f}); intra-window correlation "
                f"{self.dispersion:.4f} (upper bound {self.dispersion_bound:.4f}; Laney "
                f"sigma_z {self.laney_sigma_z:.2f}); slow drift of the share +-"
                f"{2 * self.drift:.4f} (2 sd)")


def wilson_upper(successes: float, trials: float, z: float = Z95) -> float:
    """Upper end of the Wilson score interval (fractional counts allowed)."""
    if trials <= 0:
        return 1.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + half) / (1 + z * z / trials))


def long_run_factor(z: np.ndarray) -> float:
    """How much the variance of a mean of ``z`` exceeds var(z) / m when the windows are
    correlated in time (drift): 1 + 2 sum of the autocorrelations, summed by Geyer's initial
    positive sequence (pairs of lags while their sum stays positive and decreasing; Geyer 1992,
    as for MCMC effective sample sizes). At least 1. O(m log m) (autocorrelations by FFT)."""
    m = len(z)
    energy = float((z ** 2).sum())
    if m < 4 or energy <= 0:
        return 1.0
    spectrum = np.fft.rfft(z, 2 * m)
    autocorrelation = np.fft.irfft(spectrum * np.conj(spectrum))[:m] / energy
    factor, previous = -1.0, math.inf
    for lag in range(0, m // 2 - 1, 2):
        pair = float(autocorrelation[lag] + autocorrelation[lag + 1])
        if pair <= 0:
            break
        previous = min(pair, previous)
        factor += 2 * previous
    return max(1.0, factor)


def calibrate_counts(counts: Sequence[tuple[int, int]], source: str, *,
                     need_spread: bool = True) -> Calibration:
    """The clean rate and its over-dispersion from per-window (impurity calls, crops), in time
    order.

    With z_i = (k_i - n_i f) / sqrt(n_i f (1 - f)) and phi = 1 + (n - 1) rho: the short-term
    phi is the mean squared successive difference of z over 2 (von Neumann), its upper bound
    from chi^2 with 2(m - 1)/3 degrees of freedom; the total phi is Pearson's X^2 / (m - 1).
    The rate's bound counts the crops as total / (phi x T) independent ones, T the long-run
    variance factor of z (:func:`long_run_factor`: drifting windows are not independent draws
    either), with Student's t (one-sided 95%) at m / T - 1 degrees of freedom in place of z.
    With fewer than 30 windows the spread is not measured: an error, or, when not
    ``need_spread`` (the binomial rule), the rate alone. O(windows log windows).
    """
    windows = [(int(k), int(n)) for k, n in counts if n > 0]
    if not windows:
        raise UserError("--calibrate: the calibration stream holds no readable crops")
    calls, crops = sum(w[0] for w in windows), sum(w[1] for w in windows)
    independent = wilson_upper(calls, crops)
    if len(windows) < MIN_CALIBRATION_WINDOWS and not need_spread:
        return Calibration(rate=calls / crops, rate_bound=independent, dispersion=0.0,
                           dispersion_bound=0.0, windows=len(windows), crops=crops,
                           window_crops=int(np.median([w[1] for w in windows])),
                           source=source, measured_spread=False, independent_bound=independent)
    if len(windows) < MIN_CALIBRATION_WINDOWS:
        raise UserError(f"--calibrate: {len(windows)} non-empty windows; the alarm needs at "
                        f"least {MIN_CALIBRATION_WINDOWS} clean windows to measure how much "
                        "the false calls vary from window to window")
    k = np.array([w[0] for w in windows], dtype=float)
    n = np.array([w[1] for w in windows], dtype=float)
    m, total = len(windows), float(n.sum())
    rate = float(k.sum() / total)
    window_crops = int(np.median(n))
    rho = rho_bound = rho_total = drift = 0.0
    design, quantile = 1.0, Z95_ONE_SIDED  # crops per independent crop; the bound's quantile
    if 0 < rate < 1 and window_crops > 1:
        z = (k - n * rate) / np.sqrt(n * rate * (1 - rate))
        to_rho = 1 / (window_crops - 1)
        phi_total = float((z ** 2).sum()) / (m - 1)
        phi_short = float((np.diff(z) ** 2).sum()) / (2 * (m - 1))
        freedom = 2 * (m - 1) / 3
        phi_short_bound = phi_short * freedom / float(chi2.ppf(0.05, freedom))
        rho_total = max(0.0, (phi_total - 1) * to_rho)
        rho, rho_bound = (min(1.0, max(0.0, (phi - 1) * to_rho))
                          for phi in (phi_short, phi_short_bound))
        binomial_var = rate * (1 - rate) / window_crops
        drift = math.sqrt(max(0.0, phi_total - phi_short) * binomial_var)
        in_time = long_run_factor(z)
        design = max(phi_total, 1 + (window_crops - 1) * rho_bound) * in_time
        quantile = float(student_t.ppf(0.95, max(1.0, m / in_time - 1)))
    bound = wilson_upper(k.sum() / design, total / design, quantile)
    return Calibration(rate=rate, rate_bound=bound, dispersion=rho, dispersion_bound=rho_bound,
                       windows=m, crops=int(total), window_crops=window_crops, source=source,
                       total_dispersion=rho_total, drift=drift, independent_bound=independent)


def assumed_calibration(rate_bound: float, source: str, dispersion: float = 0.0
                        ) -> Calibration:
    """A rate from elsewhere (the test report, or given) with an assumed rho."""
    return Calibration(rate=rate_bound, rate_bound=rate_bound, dispersion=dispersion,
                       dispersion_bound=dispersion, windows=0, crops=0, window_crops=0,
                       source=source, measured_spread=False, independent_bound=rate_bound)


# ----------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class Evidence:
    """One window's evidence: the window's own one-sided p-value under the clean model (None
    for a window without crops), the rule's running statistic (CUSUM) or run length
    (binomial), the threshold it is compared with, and whether the alarm condition holds."""

    p_value: float | None
    statistic: float
    threshold: float
    alarm: bool


class RuleSettings(Protocol):
    """What a rule may read from the alarm's settings (``monitor/trend.py:AlarmRule``)."""

    false_positive_rate: float
    alpha: float
    consecutive: int
    arl0: float
    min_shift: float
    dispersion: float
    design_crops: int


class Rule(Protocol):
    """The seam of the alarm: fed one window at a time, it holds its own state."""

    name: str

    def update(self, k: int, n: int) -> Evidence:
        """The evidence after a window with ``k`` calls among ``n`` crops (``n`` = 0: a
        window without crops, which never raises the alarm)."""
        ...

    def reset(self) -> None:
        """Back to no evidence (after an alarm has been handled)."""
        ...

    def describe(self) -> str:
        """The rule and its false-alarm promise, in words."""
        ...


def _beta_parameters(p: float, rho: float) -> tuple[float, float]:
    scale = 1 / rho - 1
    return p * scale, (1 - p) * scale


@lru_cache(maxsize=512)
def _log_pmf(n: int, p: float, rho: float) -> np.ndarray:
    """log P(k) for k = 0..n under beta-binomial(n, p, rho) (binomial at rho = 0)."""
    k = np.arange(n + 1)
    if rho <= 0:
        return binom.logpmf(k, n, p)
    a, b = _beta_parameters(p, rho)
    return betabinom.logpmf(k, n, a, b)


@lru_cache(maxsize=512)
def _tail(n: int, p: float, rho: float) -> np.ndarray:
    """P(K >= k) for k = 0..n (the one-sided p-values of every possible count)."""
    pmf = np.exp(_log_pmf(n, p, rho))
    return np.minimum(1.0, np.cumsum(pmf[::-1])[::-1])


@lru_cache(maxsize=512)
def log_likelihood_ratio(n: int, p0: float, p1: float, rho: float) -> np.ndarray:
    """log P(k | p1) / P(k | p0) for k = 0..n: the CUSUM's increment per window."""
    return _log_pmf(n, p1, rho) - _log_pmf(n, p0, rho)


def average_run_length(increments: np.ndarray, pmf: np.ndarray, threshold: float,
                       cells: int = ARL_GRID) -> float:
    """Expected windows until a CUSUM S = max(0, S + x) started at 0 reaches ``threshold``,
    x drawn i.i.d. from ``increments`` with probabilities ``pmf``.

    Brook & Evans (1972): the statistic on ``cells`` cells of [0, threshold) is a Markov
    chain; the run lengths solve (I - R) L = 1. O(cells^2 * support + cells^3).
    """
    keep = pmf > 1e-15
    x, p = increments[keep], pmf[keep] / pmf[keep].sum()
    width = threshold / cells
    centres = (np.arange(cells) + 0.5) * width
    centres[0] = 0.0  # cell 0 stands for S = 0, where the chain starts and returns
    # An increment of +-inf (a count impossible under one share) jumps out or to zero.
    target = np.clip(centres[:, None] + np.nan_to_num(x, nan=0.0)[None, :], -1.0,
                     threshold + 1.0)
    cell = np.floor(target / width).astype(np.int64)
    cell[target <= 0] = 0
    inside = cell < cells
    rows = np.broadcast_to(np.arange(cells)[:, None], cell.shape)
    transition = np.zeros((cells, cells))
    np.add.at(transition, (rows[inside], cell[inside]),
              np.broadcast_to(p, cell.shape)[inside])
    lengths = np.linalg.solve(np.eye(cells) - transition, np.ones(cells))
    return float(lengths[0])


@lru_cache(maxsize=64)
def cusum_threshold(n: int, p0: float, p1: float, rho: float, arl0: float) -> float:
    """The smallest threshold whose in-control ARL (share p0) is at least ``arl0``, within 1%
    of ARL0: regula falsi on log ARL, nearly linear in the threshold (a handful of
    :func:`average_run_length` solves)."""
    increments = log_likelihood_ratio(n, p0, p1, rho)
    pmf = np.exp(_log_pmf(n, p0, rho))

    def excess(h: float) -> float:  # log ARL(h) - log ARL0: >= 0 keeps the promise
        return math.log(average_run_length(increments, pmf, h)) - math.log(arl0)

    low, high = 0.0, max(1.0, math.log(arl0) / 2)
    f_low, f_high = -math.log(arl0), excess(high)
    while f_high < 0:
        low, f_low, high = high, f_high, 2 * high
        if high > 1e4:
            raise UserError(f"no CUSUM threshold reaches ARL0 {arl0:g} at {n} crops a window")
        f_high = excess(high)
    weight_low, weight_high, side = f_low, f_high, 0  # Illinois: halve a stalled end's weight
    for _ in range(60):
        if f_high < 0.01 or high - low < 1e-6 * high:
            break
        middle = high - weight_high * (high - low) / (weight_high - weight_low)
        f_middle = excess(middle)
        if f_middle >= 0:
            high, f_high, weight_high = middle, f_middle, f_middle
            weight_low = weight_low / 2 if side == 1 else f_low
            side = 1
        else:
            low, f_low, weight_low = middle, f_middle, f_middle
            weight_high = weight_high / 2 if side == -1 else f_high
            side = -1
    return high


@dataclass
class BetaBinomialCusum:
    """Page's CUSUM of the beta-binomial log-likelihood ratio, share p1 against p0.

    The threshold is set for windows of ``design_crops`` crops (the calibration's median;
    when 0, the first window's) so that, at a share of p0 or below, a false alarm comes once
    per ``arl0`` windows at most, in expectation. Each window costs one table look-up
    (tables cached per window size).
    """

    p0: float
    p1: float
    rho: float
    arl0: float
    design_crops: int = 0
    name: str = "cusum"
    statistic: float = 0.0
    threshold: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.p0 < self.p1 < 1:
            raise UserError(f"the alarm's shares: need 0 < {self.p0:.4g} < {self.p1:.4g} < 1 "
                            "(lower min_shift, or check the false-positive rate)")
        if self.design_crops:
            self.threshold = cusum_threshold(self.design_crops, self.p0, self.p1, self.rho,
                                             self.arl0)

    def design(self, n: int) -> None:
        """Set the threshold for windows of ``n`` crops (when none was given)."""
        self.design_crops = n
        self.threshold = cusum_threshold(n, self.p0, self.p1, self.rho, self.arl0)

    @classmethod
    def from_settings(cls, settings: RuleSettings) -> BetaBinomialCusum:
        """p0: the clean rate's bound plus ``min_shift``; p1: p0 + max(min_shift, rate)."""
        p0 = settings.false_positive_rate + settings.min_shift
        return cls(p0, p0 + max(settings.min_shift, settings.false_positive_rate),
                   settings.dispersion, settings.arl0, settings.design_crops)

    def update(self, k: int, n: int) -> Evidence:
        if n == 0:  # no crops, no evidence either way: the statistic stays
            return Evidence(None, self.statistic, self.threshold, alarm=False)
        if not self.threshold:
            self.design(n)
        increment = float(log_likelihood_ratio(n, self.p0, self.p1, self.rho)[k])
        self.statistic = max(0.0, self.statistic + increment)
        return Evidence(p_value=float(_tail(n, self.p0, self.rho)[k]),
                        statistic=self.statistic, threshold=self.threshold,
                        alarm=self.statistic >= self.threshold)

    def reset(self) -> None:
        self.statistic = 0.0

    def detection_delay(self, share: float) -> float:
        """Expected windows (of ``design_crops``) to the alarm once the share is ``share``."""
        n = self.design_crops
        increments = log_likelihood_ratio(n, self.p0, self.p1, self.rho)
        return average_run_length(increments, np.exp(_log_pmf(n, share, self.rho)),
                                  self.threshold)

    def describe(self) -> str:
        size = (f"windows of {self.design_crops} crops" if self.design_crops
                else "windows the size of the first one")
        return (f"CUSUM of the beta-binomial likelihood ratio (intra-window correlation "
                f"{self.rho:.4f}): at an impurity share of {100 * self.p0:.2f}% or less, one "
                f"false alarm per {self.arl0:,.0f} windows at most, in expectation; tuned to "
                f"detect a share of {100 * self.p1:.2f}% ({size})")


@dataclass
class BinomialRun:
    """``consecutive`` windows in a row whose one-sided binomial p-value at ``rate`` is below
    ``alpha`` (independent crops, a fixed rate)."""

    rate: float
    alpha: float
    consecutive: int
    name: str = "binomial"
    statistic: float = 0.0  # the current run of significant windows

    @classmethod
    def from_settings(cls, settings: RuleSettings) -> BinomialRun:
        return cls(settings.false_positive_rate, settings.alpha, settings.consecutive)

    def update(self, k: int, n: int) -> Evidence:
        if n == 0:  # no crops: the run of significant windows is broken
            self.statistic = 0.0
            return Evidence(None, self.statistic, self.consecutive, alarm=False)
        p_value = float(_tail(n, self.rate, 0.0)[k])
        self.statistic = self.statistic + 1 if p_value < self.alpha else 0
        return Evidence(p_value=p_value, statistic=self.statistic, threshold=self.consecutive,
                        alarm=self.statistic >= self.consecutive)

    def reset(self) -> None:
        self.statistic = 0.0

    def describe(self) -> str:
        return (f"binomial test: {self.consecutive} window(s) in a row with P(this many | "
                f"rate {self.rate:.4f}) < {self.alpha:g}; assumes independent crops at a fixed "
                "rate (no promise under over-dispersion or drift)")


# The rules by name (`--rule`); cli/options.py:AlarmRuleName lists the same names.
RULES: dict[str, type[BetaBinomialCusum] | type[BinomialRun]] = {
    "cusum": BetaBinomialCusum, "binomial": BinomialRun}
