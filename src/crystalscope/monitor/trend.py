"""Per-window impurity fraction with a 95% interval, a smoothed trend, and the alarm.

The alarm asks, window by window: could the model's own false impurity (e.g. PG) calls explain
what this stream shows? The statistics live in :mod:`crystalscope.monitor.rules`: by default a
CUSUM of the beta-binomial likelihood ratio that accounts for over-dispersed, drifting false
calls and promises an in-control average run length (ARL0: one false alarm per ARL0 windows at
most, in expectation); the first rule — ``consecutive`` windows whose one-sided binomial
p-value is below ``alpha`` — is kept for comparison (``rule="binomial"``). The false-call rate
is the upper end of its 95% interval: measured on a clean stream (with its spread), on the
run's test split, or given.

Crops the model's unknown-detector flags are counted apart (``unknown``) and left out of the
impurity share: they are neither PG nor CEX. Their own rule — the same ``BinomialRun`` class,
at the detector's calibrated false-reject rate — asks whether more are unknown than that rate
explains; ``consecutive`` significant windows in a row make an "unknown particles" event
(bubbles, fouling, a new crystal form …), never the impurity alarm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from crystalscope.errors import UserError
from crystalscope.evaluate.statistics import wilson_interval
from crystalscope.monitor.rules import RULES, BinomialRun, Calibration, Rule
from crystalscope.settings import SettingsError
from crystalscope.unknown.detector import UNKNOWN_REASONS

SMOOTHING = 0.3  # weight of the newest window in the exponentially smoothed fraction
UNKNOWN = "unknown"  # the label of crops the unknown-detector flags ("unknown:<reason>")


def unknown_label(reason: str | None) -> str:
    """The call for a crop the detector flags: ``unknown:<reason>`` (``unknown`` without)."""
    return f"{UNKNOWN}:{reason}" if reason else UNKNOWN


def is_unknown_label(label: str) -> bool:
    return label == UNKNOWN or label.startswith(UNKNOWN + ":")


def check_positive(positive: str, classes: list[str]) -> None:
    """The impurity to watch is one of the model's classes."""
    if positive not in classes:
        raise SettingsError("positive", f"not a class of the model ({', '.join(classes)})",
                            positive)
DEFAULT_ARL0 = 10_000


@dataclass(frozen=True)
class AlarmRule:
    """What counts as evidence of the impurity.

    ``rule``: ``cusum`` (over-dispersion and drift aware, promises ``arl0``) or ``binomial``
    (``consecutive`` windows in a row with p < ``alpha``). ``false_positive_rate``: the
    clean rate's upper bound; ``min_shift``: the cusum alarms only on a share above
    ``false_positive_rate + min_shift``; ``dispersion``: the intra-window correlation the
    cusum assumes (the calibration's upper bound when measured).
    """

    positive: str
    false_positive_rate: float
    alpha: float = 1e-3
    consecutive: int = 2
    source: str = "given"
    unknown_rate: float | None = None  # the detector's false-reject rate; None: no detector
    rule: str = "cusum"
    arl0: float = DEFAULT_ARL0
    min_shift: float = 0.0
    dispersion: float = 0.0
    design_crops: int = 0  # the cusum's window size; 0: the first window's
    calibration: Calibration | None = None

    @property
    def in_control_share(self) -> float:
        """The share up to which the stream counts as clean (the cusum's p0)."""
        return self.false_positive_rate + (self.min_shift if self.rule == "cusum" else 0.0)

    def impurity_rule(self) -> Rule:
        """A fresh instance of the impurity alarm's rule (its state starts at zero)."""
        return RULES[self.rule].from_settings(self)

    def unknown_rule(self) -> Rule | None:
        """A fresh rule for a window's unknown crops, when the model has a detector: the
        binomial run at the detector's false-reject rate."""
        if self.unknown_rate is None:
            return None
        return BinomialRun(self.unknown_rate, self.alpha, self.consecutive)

    def check(self) -> None:
        """Every setting in range — the calibrated rate included, which the options'
        :class:`~crystalscope.monitor.settings.AlarmSettings` cannot know — with a one-line
        message naming the field."""
        if self.rule not in RULES:
            raise SettingsError("rule", f"use {' or '.join(RULES)}", self.rule)
        if not 0 < self.alpha < 1:
            raise SettingsError("alpha", "give a probability in (0, 1)", self.alpha)
        if self.consecutive < 1:
            raise SettingsError("consecutive", "give at least 1", self.consecutive)
        if not 0 <= self.false_positive_rate < 1:
            raise SettingsError("false_positive_rate", "give a rate from 0 to below 1",
                                self.false_positive_rate)
        if self.rule == "cusum":
            if self.false_positive_rate <= 0:
                raise SettingsError("false_positive_rate", "the cusum rule needs a rate above "
                                    "0 (or use rule binomial)", self.false_positive_rate)
            if not 0 <= self.min_shift < 1 - self.false_positive_rate:
                raise SettingsError("min_shift", "give a share from 0 to below "
                                    f"{1 - self.false_positive_rate:.4f}", self.min_shift)
            if self.arl0 < 10:
                raise SettingsError("arl0", "give at least 10 windows", f"{self.arl0:g}")
            if not 0 <= self.dispersion < 1:
                raise SettingsError("dispersion", "give a correlation from 0 to below 1",
                                    self.dispersion)


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
    p_value: float | None  # the window's own one-sided p-value under the clean model
    significant: bool
    alarm: bool
    statistic: float | None = None  # the rule's running statistic (cusum: S; binomial: run)
    threshold: float | None = None  # the alarm fires when the statistic reaches it
    unreadable: list[str] = field(default_factory=list)
    unknown: int = 0  # crops flagged unknown (not in ``crops``)
    unknown_fraction: float | None = None  # of all classified crops, unknown included
    unknown_p_value: float | None = None
    unknown_alarm: bool = False  # the "unknown particles" event starts at this window
    unknown_reasons: dict[str, int] = field(default_factory=dict)  # why, counted apart


@dataclass
class MonitorResult:
    """What the run saw."""

    windows: list[WindowResult] = field(default_factory=list)
    alarm: WindowResult | None = None
    alarm_text: str | None = None
    unknown_alarms: list[WindowResult] = field(default_factory=list)  # where such events began
    crops: int = 0
    images: int = 0
    resumed_windows: int = 0  # windows an earlier run on the same --out processed
    resumed_crops: int = 0
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
                        "evaluate RUN` or give false_positive_rate") from exc
    check_positive(positive, classes)
    p = classes.index(positive)
    negatives = sum(sum(row) for c, row in enumerate(matrix) if c != p)
    false_calls = sum(row[p] for c, row in enumerate(matrix) if c != p)
    if negatives == 0:
        raise UserError(f"{report_json}: the test split has no images of other classes than "
                        f"{positive}; give false_positive_rate")
    interval = wilson_interval(false_calls, negatives)
    assert interval is not None
    return interval[1], (f"upper 95% bound of {false_calls}/{negatives} false {positive} calls "
                         f"on the test split ({report_json})")


def _by_reason(window: WindowResult) -> str:
    """"; empty 4, novel 9" for the message (nothing when the window has no counts)."""
    counted = [f"{reason} {count}" for reason, count in window.unknown_reasons.items() if count]
    return "; " + ", ".join(counted) if counted else ""


class Trend:
    """Feeds windows in time order; keeps the smoothed fraction and the alarm state."""

    def __init__(self, classes: list[str], rule: AlarmRule) -> None:
        check_positive(rule.positive, classes)
        rule.check()
        self.classes, self.rule = classes, rule
        self.impurity, self.unknown = rule.impurity_rule(), rule.unknown_rule()
        self.smoothed: float | None = None
        self.in_unknown_event = False
        self.alarm_window: WindowResult | None = None
        self.evidence_since: int | None = None  # the window where the statistic left zero
        self.evidence_counts = [0, 0]  # impurity calls and crops since then

    def add(self, index: int, time: str, predicted: list[str],
            unreadable: list[str] | None = None) -> WindowResult:
        """One window's calls (class names, or ``unknown:<reason>``) -> its counts, share and
        tests."""
        flagged = [label.partition(":")[2] for label in predicted if is_unknown_label(label)]
        unknown = len(flagged)
        counts = {c: predicted.count(c) for c in self.classes}
        n, k = len(predicted) - unknown, counts[self.rule.positive]
        fraction = k / n if n else None
        step = self.impurity.update(k, n)
        if step.p_value is not None:  # a window without crops leaves the evidence as it was
            if step.statistic > 0:
                if self.evidence_since is None:
                    self.evidence_since, self.evidence_counts = index, [0, 0]
                self.evidence_counts[0] += k
                self.evidence_counts[1] += n
            else:
                self.evidence_since = None
        if fraction is not None:
            self.smoothed = (fraction if self.smoothed is None
                             else SMOOTHING * fraction + (1 - SMOOTHING) * self.smoothed)
        alarm = self.alarm_window is None and step.alarm
        empty = step.p_value is None
        result = WindowResult(
            index=index, time=time, crops=n, counts=counts, fraction=fraction,
            interval=wilson_interval(k, n), smoothed=self.smoothed, p_value=step.p_value,
            significant=not empty and step.p_value < self.rule.alpha,  # type: ignore[operator]
            alarm=alarm, statistic=None if empty else step.statistic,
            threshold=None if empty else step.threshold, unreadable=unreadable or [])
        if alarm:
            self.alarm_window = result
        if self.unknown is not None:
            self._add_unknown(result, unknown, len(predicted))
            result.unknown_reasons = {reason: flagged.count(reason) for reason in UNKNOWN_REASONS}
        return result

    def promise(self) -> str:
        """The impurity rule and its false-alarm promise, in words."""
        return self.impurity.describe()

    def _add_unknown(self, result: WindowResult, unknown: int, total: int) -> None:
        """Could the detector's own false rejects explain this many unknown crops? An event
        starts where the unknown rule's alarm condition begins to hold."""
        result.unknown = unknown
        evidence = self.unknown.update(unknown, total)  # type: ignore[union-attr]
        if total:
            result.unknown_fraction = unknown / total
            result.unknown_p_value = evidence.p_value
        result.unknown_alarm = evidence.alarm and not self.in_unknown_event
        self.in_unknown_event = evidence.alarm

    def explain_unknown_alarm(self, window: WindowResult) -> str:
        """The "unknown particles" message."""
        return (f"UNKNOWN PARTICLES from window {window.index} ({window.time}): "
                f"{window.unknown} of {window.unknown + window.crops} crops unlike anything "
                f"the model was trained on ({100 * (window.unknown_fraction or 0):.1f}%; "
                f"expected at most {100 * (self.rule.unknown_rate or 0):.1f}%, probability "
                f"{window.unknown_p_value:.2e} < {self.rule.alpha:g}, {self.rule.consecutive} "
                f"window(s) in a row{_by_reason(window)}); they are kept out of the "
                f"{self.rule.positive} share — "
                "look at the probe (empty or blurred: the window, fouling; novel: bubbles, a "
                "new crystal form?)")

    def explain_alarm(self, window: WindowResult) -> str:
        """When, why, with which evidence."""
        rule = self.rule
        k = window.counts[rule.positive]
        head = (f"ALARM at window {window.index} ({window.time}): {k} of {window.crops} crops "
                f"called {rule.positive} ({100 * (window.fraction or 0):.1f}%, 95% interval "
                f"{100 * window.interval[0]:.1f}-{100 * window.interval[1]:.1f}%); ")  # type: ignore[index]
        if rule.rule == "binomial":
            return head + (f"false positives alone (rate {rule.false_positive_rate:.4f}, "
                           f"{rule.source}) give this many with probability "
                           f"{window.p_value:.2e} < {rule.alpha:g}, {rule.consecutive} "
                           "window(s) in a row")
        since = self.evidence_since or window.index
        calls, crops = self.evidence_counts
        return head + (f"since window {since}, {calls} of {crops} crops "
                       f"({100 * calls / max(1, crops):.1f}%) against a clean share of at most "
                       f"{100 * rule.in_control_share:.2f}% (false-call rate "
                       f"{rule.false_positive_rate:.4f}, {rule.source}"
                       + (f", + min shift {rule.min_shift:.4f}" if rule.min_shift else "")
                       + f"); CUSUM {window.statistic:.2f} >= {window.threshold:.2f}, set for "
                       f"one false alarm per {rule.arl0:,.0f} windows at most")
