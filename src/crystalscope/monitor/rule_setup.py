"""The alarm rule, built once for ``monitor`` and ``serve --monitor``: where the false-call
rate and its spread come from (a clean stream, the test report, or given), and the checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from crystalscope.errors import UserError
from crystalscope.infer.predictor import Predictor
from crystalscope.infer.stream import Failure
from crystalscope.model.spec import resolve_model
from crystalscope.monitor.frames import read_stream
from crystalscope.monitor.rules import Calibration, assumed_calibration, calibrate_counts
from crystalscope.monitor.run import calls
from crystalscope.monitor.settings import AlarmSettings, FrameCutting
from crystalscope.monitor.trend import (
    UNKNOWN,
    AlarmRule,
    check_positive,
    false_positive_rate_from_report,
    is_unknown_label,
)


def calibrate(predictor: Predictor, clean_stream: Path, positive: str,
              cutting: FrameCutting | None = None, *, need_spread: bool = True
              ) -> Calibration:
    """The false-call rate and its window-to-window spread, measured on a stream known to be
    clean (its windows in time order; see :func:`~crystalscope.monitor.rules.calibrate_counts`)."""
    counts = []
    for window in read_stream(clean_stream):
        labels = [item[1] for item in calls(predictor, window.paths, cutting)
                  if not isinstance(item, Failure) and not is_unknown_label(item[1])]
        counts.append((labels.count(positive), len(labels)))
    return calibrate_counts(counts, f"measured on the clean stream {clean_stream}",
                            need_spread=need_spread)


def choose_calibration(predictor: Predictor, model: Path, positive: str, *,
                       given: float | None = None, clean_stream: Path | None = None,
                       cutting: FrameCutting | None = None, dispersion: float | None = None,
                       need_spread: bool = True) -> Calibration:
    """The model's false impurity calls for the alarm, and where they came from.

    In this order: ``given``; measured on ``clean_stream`` (rate and spread); the upper 95%
    bound from the test report that ``evaluate`` wrote beside the model (``model`` is a run
    folder or a model file inside one). Without a clean stream the spread is ``dispersion``
    (default 0: independent crops), said so. One rule for ``monitor`` and ``serve --monitor``.
    """
    if given is None and clean_stream is not None:
        measured = calibrate(predictor, clean_stream, positive, cutting,
                             need_spread=need_spread)
        if dispersion is None:
            return measured
        return replace(measured, dispersion=dispersion, dispersion_bound=dispersion,
                       measured_spread=False)
    rate, source = ((given, "given") if given is not None
                    else choose_false_positive_rate(predictor, model, positive))
    return assumed_calibration(rate, source, dispersion or 0.0)


def choose_false_positive_rate(predictor: Predictor, model: Path, positive: str, *,
                               given: float | None = None) -> tuple[float, str]:
    """``given``, else the upper 95% bound from the test report beside the model."""
    if given is not None:  # its range is checked where the rule is used (``Trend``)
        return given, "given"
    report = resolve_model(model).layout.report
    if not report.is_file():
        raise UserError(f"no test report beside {model} to take the false-positive rate from; "
                        "run `crystalscope evaluate RUN`, or give false_positive_rate or a "
                        "clean stream to calibrate on")
    return false_positive_rate_from_report(report, positive)


def build_alarm_rule(predictor: Predictor, model: Path, settings: AlarmSettings,
                     cutting: FrameCutting | None = None) -> AlarmRule:
    """The alarm rule for ``monitor`` and ``serve --monitor`` alike, built once from the
    checked ``settings``: the rate and spread :func:`choose_calibration` picks, checked again
    with them (:meth:`AlarmRule.check`)."""
    if UNKNOWN in predictor.classes:
        raise UserError(f"{model}: has a class named '{UNKNOWN}', the monitor's mark for crops "
                        "unlike the training images; its crops could not be told apart — "
                        "rename the class folder and train again")
    draft = AlarmRule(positive=settings.positive, false_positive_rate=0.5,
                      alpha=settings.alpha, consecutive=settings.consecutive,
                      rule=settings.rule, arl0=settings.arl0,
                      dispersion=settings.dispersion or 0.0)
    check_positive(settings.positive, predictor.classes)  # before a stream is read
    calibration = choose_calibration(predictor, model, settings.positive,
                                     given=settings.false_positive_rate,
                                     clean_stream=settings.calibrate, cutting=cutting,
                                     dispersion=settings.dispersion,
                                     need_spread=settings.rule == "cusum")
    built = rule_from_calibration(draft, calibration, min_shift=settings.min_shift)
    built.check()
    return built


def rule_from_calibration(draft: AlarmRule, calibration: Calibration, *,
                          min_shift: float = 0.0) -> AlarmRule:
    """``draft`` (its rule, promise and options) with the calibration's numbers: the cusum
    takes the rate's bound widened for spread and drift, the binomial rule the bound as if
    crops were independent (as it always did)."""
    rate = (calibration.rate_bound if draft.rule == "cusum" or not calibration.windows
            else calibration.independent_bound)
    return replace(draft, false_positive_rate=rate, source=calibration.source,
                   min_shift=min_shift, dispersion=calibration.dispersion_bound,
                   design_crops=calibration.window_crops, calibration=calibration)
