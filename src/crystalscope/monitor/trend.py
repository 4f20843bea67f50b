"""Per-window impurity fraction with a 95% interval, a smoothed trend, and the alarm.

The alarm asks, window by window: could the model's false positives alone explain this many
impurity (e.g. PG) calls? Under "no impurity", the number of impurity calls among n crops is
binomial(n, f), f the model's false-positive rate. The window is significant when
P(X >= k) < alpha (one-sided binomial test); the alarm fires once ``consecutive`` windows in a
row are significant. By default f is the upper end of the 95% Wilson interval of the rate
measured on the run's test split — conservative, so a small test set gives a late alarm
rather than a false one — or the rate given with ``--false-positive-rate``.

Crops the model's unknown-detector flags are counted apart (``unknown``) and left out of the
impurity share: they are neither PG nor CEX. Their own test asks whether more are unknown than
the detector's calibrated false-reject rate explains; ``consecutive`` significant windows in a
row make an "unknown particles" event (bubbles, fouling, a new crystal form …), never the
impurity alarm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from scipy.stats import binom

from crystalscope.errors import UserError
from crystalscope.evaluate.report import wilson_interval

SMOOTHING = 0.3  # weight of the newest window in the exponentially smoothed fraction
UNKNOWN = "unknown"  # the label of crops the unknown-detector flags


class EvidenceTest(Protocol):
    """How surprising ``k`` calls among ``n`` crops are when nothing new is present: the seam
    for another alarm statistic (a sequential test, a test with a prior, …)."""

    def p_value(self, k: int, n: int) -> float:
        """P(at least ``k`` of ``n`` | nothing new), for ``n`` >= 1."""
        ...


@dataclass(frozen=True)
class BinomialTest:
    """One-sided binomial test: each crop is called by mistake with probability ``rate``."""

    rate: float

    def p_value(self, k: int, n: int) -> float:
        return float(binom.sf(k - 1, n, self.rate))


@dataclass(frozen=True)
class AlarmRule:
    """What counts as evidence of the impurity: ``consecutive`` windows in a row whose
    :meth:`test` p-value is below ``alpha``."""

    positive: str
    false_positive_rate: float
    alpha: float = 1e-3
    consecutive: int = 2
    source: str = "given"
    unknown_rate: float | None = None  # the detector's false-reject rate; None: no detector

    def test(self) -> EvidenceTest:
        """The test of a window's impurity calls (the binomial rule)."""
        return BinomialTest(self.false_positive_rate)

    def unknown_test(self) -> EvidenceTest | None:
        """The test of a window's unknown crops, when the model has a detector."""
        return None if self.unknown_rate is None else BinomialTest(self.unknown_rate)


@dataclass
class WindowResult:
    """One window's counts, fraction, evidence and alarm state."""

    index: int
    time: str
    crops: int
    counts: dict[str, int]
    fraction: float | None
    interval: tuple[float, float] | None
    smoothed: float | None
    p_value: float | None
    significant: bool
    alarm: bool
    unreadable: list[str] = field(default_factory=list)
    unknown: int = 0  # crops flagged unknown (not in ``crops``)
    unknown_fraction: float | None = None  # of all classified crops, unknown included
    unknown_p_value: float | None = None
    unknown_alarm: bool = False  # the "unknown particles" event starts at this window


@dataclass
class MonitorResult:
    """What the run saw."""

    windows: list[WindowResult] = field(default_factory=list)
    alarm: WindowResult | None = None
    alarm_text: str | None = None
    unknown_alarms: list[WindowResult] = field(default_factory=list)  # where such events began
    crops: int = 0
    images: int = 0
    seconds: float = 0.0
    examples: dict[int, list[Path]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def false_positive_rate_from_report(report_json: Path, positive: str) -> tuple[float, str]:
    """Upper 95% Wilson bound of P(called ``positive`` | not ``positive``) on the test split."""
    try:
        report = json.loads(Path(report_json).read_text(encoding="utf-8"))
        classes, matrix = report["classes"], report["confusion_matrix"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{report_json}: no usable evaluation report ({exc}); run `crystalscope "
                        "evaluate RUN` or give --false-positive-rate") from exc
    if positive not in classes:
        raise UserError(f"--positive {positive}: not a class of the model "
                        f"({', '.join(classes)})")
    p = classes.index(positive)
    negatives = sum(sum(row) for c, row in enumerate(matrix) if c != p)
    false_calls = sum(row[p] for c, row in enumerate(matrix) if c != p)
    if negatives == 0:
        raise UserError(f"{report_json}: the test split has no images of other classes than "
                        f"{positive}; give --false-positive-rate")
    interval = wilson_interval(false_calls, negatives)
    assert interval is not None
    return interval[1], (f"upper 95% bound of {false_calls}/{negatives} false {positive} calls "
                         f"on the test split ({report_json})")


def false_positive_rate_from_clean_stream(predicted: list[str], positive: str
                                         ) -> tuple[float, str]:
    """Upper 95% Wilson bound of the share of ``positive`` calls on a known-clean stream."""
    if not predicted:
        raise UserError("--calibrate: the calibration stream holds no readable crops")
    calls = predicted.count(positive)
    interval = wilson_interval(calls, len(predicted))
    assert interval is not None
    return interval[1], (f"upper 95% bound of {calls}/{len(predicted)} {positive} calls on "
                         "the clean calibration stream")


class Trend:
    """Feeds windows in time order; keeps the smoothed fraction and the alarm state."""

    def __init__(self, classes: list[str], rule: AlarmRule) -> None:
        if rule.positive not in classes:
            raise UserError(f"--positive {rule.positive}: not a class of the model "
                            f"({', '.join(classes)})")
        if not 0 <= rule.false_positive_rate < 1:
            raise UserError(f"--false-positive-rate {rule.false_positive_rate}: give a rate "
                            "from 0 to below 1")
        self.classes, self.rule = classes, rule
        self.test, self.unknown_test = rule.test(), rule.unknown_test()
        self.smoothed: float | None = None
        self.run_of_significant = 0
        self.run_of_unknown = 0
        self.alarm_window: WindowResult | None = None

    def add(self, index: int, time: str, predicted: list[str],
            unreadable: list[str] | None = None) -> WindowResult:
        """One window's calls (class names, or ``unknown``) -> its counts, share and tests."""
        unknown = predicted.count(UNKNOWN)
        counts = {c: predicted.count(c) for c in self.classes}
        n, k = len(predicted) - unknown, counts[self.rule.positive]
        fraction = k / n if n else None
        p_value = self.test.p_value(k, n) if n else None
        significant = p_value is not None and p_value < self.rule.alpha
        self.run_of_significant = self.run_of_significant + 1 if significant else 0
        if fraction is not None:
            self.smoothed = (fraction if self.smoothed is None
                             else SMOOTHING * fraction + (1 - SMOOTHING) * self.smoothed)
        alarm = self.alarm_window is None and self.run_of_significant >= self.rule.consecutive
        result = WindowResult(index=index, time=time, crops=n, counts=counts,
                              fraction=fraction, interval=wilson_interval(k, n),
                              smoothed=self.smoothed, p_value=p_value, significant=significant,
                              alarm=alarm, unreadable=unreadable or [])
        if alarm:
            self.alarm_window = result
        if self.unknown_test is not None:
            self._add_unknown(result, unknown, len(predicted))
        return result

    def _add_unknown(self, result: WindowResult, unknown: int, total: int) -> None:
        """Could the detector's own false rejects explain this many unknown crops?"""
        result.unknown = unknown
        if not total:
            self.run_of_unknown = 0
            return
        result.unknown_fraction = unknown / total
        result.unknown_p_value = self.unknown_test.p_value(unknown, total)  # type: ignore[union-attr]
        significant = result.unknown_p_value < self.rule.alpha
        self.run_of_unknown = self.run_of_unknown + 1 if significant else 0
        result.unknown_alarm = self.run_of_unknown == self.rule.consecutive

    def explain_unknown_alarm(self, window: WindowResult) -> str:
        """The "unknown particles" message."""
        return (f"UNKNOWN PARTICLES from window {window.index} ({window.time}): "
                f"{window.unknown} of {window.unknown + window.crops} crops unlike anything "
                f"the model was trained on ({100 * (window.unknown_fraction or 0):.1f}%; "
                f"expected at most {100 * (self.rule.unknown_rate or 0):.1f}%, probability "
                f"{window.unknown_p_value:.2e} < {self.rule.alpha:g}, {self.rule.consecutive} "
                f"window(s) in a row); they are kept out of the {self.rule.positive} share — "
                "look at the probe (bubbles, fouling, a new crystal form?)")

    def explain_alarm(self, window: WindowResult) -> str:
        """When, why, with which evidence."""
        rule = self.rule
        k = window.counts[rule.positive]
        return (f"ALARM at window {window.index} ({window.time}): {k} of {window.crops} crops "
                f"called {rule.positive} ({100 * (window.fraction or 0):.1f}%, 95% interval "
                f"{100 * window.interval[0]:.1f}-{100 * window.interval[1]:.1f}%); false "
                f"positives alone (rate {rule.false_positive_rate:.4f}, {rule.source}) give "
                f"this many with probability {window.p_value:.2e} < {rule.alpha:g}, "
                f"{rule.consecutive} window(s) in a row")  # type: ignore[index]
