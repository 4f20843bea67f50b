"""`crystalscope monitor`: classify each window's crops, follow the impurity fraction, raise
the alarm — over a recorded stream (replay) or while the probe writes it (``--watch``).

Writes trend.csv (one row per window), events.jsonl (alarm, empty windows, unreadable crops,
hook failures) and timeline.png. Problems in the stream are events, never the end of a live run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from crystalscope.console import err
from crystalscope.data.images import ImageLoadError
from crystalscope.infer.predictor import Predictor
from crystalscope.infer.stream import Failure, predict_stream
from crystalscope.monitor.cutting import cut_frame
from crystalscope.monitor.frames import Window, read_stream
from crystalscope.monitor.report import plot_timeline
from crystalscope.monitor.resume import Previous, read_previous
from crystalscope.monitor.settings import FrameCutting
from crystalscope.monitor.trend import (
    UNKNOWN_REASONS,
    AlarmRule,
    MonitorResult,
    Trend,
    WindowResult,
    is_unknown_label,
    unknown_label,
)

TREND_COLUMNS = ("window", "time", "crops", "fraction", "low95", "high95", "smoothed",
                 "p_value", "significant", "statistic", "threshold",
                 "alarm")  # then one count column per class, then
UNKNOWN_COLUMNS = ("count_unknown", "unknown_fraction", "unknown_p_value", "unknown_alarm",
                   *(f"unknown_{reason}" for reason in UNKNOWN_REASONS))


class Publisher(Protocol):
    """Somewhere the monitor's state goes after each window (the OPC UA server)."""

    def publish(self, values: dict[str, object]) -> None:
        """Write these values (names: crystalscope.monitor.opcua.VARIABLES)."""
        ...


def unknown_rate(predictor: Predictor) -> float | None:
    """The share of in-distribution crops the model's detector calls unknown: its calibrated
    bound (None without a detector)."""
    if predictor.unknown_detector is None:
        return None
    bound = predictor.unknown_detector.calibration.get("false_reject_bound")
    return float(bound if bound is not None else predictor.unknown_detector.target_false_reject)


def calls(predictor: Predictor, paths: list[Path], cutting: FrameCutting | None = None
          ) -> Iterator[tuple[Path, str] | Failure]:
    """(image, predicted class or ``unknown:<reason>``) per crop — or per piece of each frame
    when cutting frames. ``unknown``: the model's unknown-detector flags the crop (reason:
    empty, blurred, saturated or novel)."""
    classes = predictor.classes
    if cutting is None:
        for item in predict_stream(predictor, paths):
            yield item if isinstance(item, Failure) else (
                item.path, unknown_label(item.unknown_reason) if item.unknown
                else classes[item.best])
        return
    for path in paths:
        try:
            pieces = cut_frame(path, cutting.crop_size, cutting.cut, predictor.spec)
        except ImageLoadError as exc:
            yield Failure(path, str(exc))
            continue
        if len(pieces):
            outputs = predictor.predict(pieces)
            reasons = outputs.unknown_reasons
            for row, best in enumerate(predictor.decide(outputs.probabilities)):
                reason = reasons[row] if reasons is not None else None
                yield path, (unknown_label(reason) if reason is not None
                             else classes[int(best)])


class Monitor:
    """Holds the model, the rule, the outputs; processes one window at a time."""

    def __init__(self, predictor: Predictor, rule: AlarmRule, out_dir: Path, *,
                 on_alarm: str | None = None, post_url: str | None = None,
                 cutting: FrameCutting | None = None,
                 say: Callable[[str], None] = err.print,
                 publishers: Sequence[Publisher] = (), repeat_every: int = 10,
                 post_retries: int = 3, post_backoff_s: float = 0.5,
                 identity: dict[str, object] | None = None, resume: bool = False) -> None:
        if rule.unknown_rate is None and predictor.unknown_detector is not None:
            rule = replace(rule, unknown_rate=unknown_rate(predictor))
        self.predictor, self.rule, self.say, self.cutting = predictor, rule, say, cutting
        self.publishers = list(publishers)
        self.repeat_every, self.post_retries = repeat_every, post_retries
        self.post_backoff_s = post_backoff_s
        self.degraded: str | None = None  # why the monitor can no longer be trusted
        self.watcher: object = None  # the thread that feeds it, when it runs in one
        self.trend = Trend(predictor.classes, rule)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.on_alarm, self.post_url = on_alarm, post_url
        self.result = MonitorResult(files={"trend.csv": self.out_dir / "trend.csv",
                                           "events.jsonl": self.out_dir / "events.jsonl",
                                           "timeline.png": self.out_dir / "timeline.png"})
        self.header = [*TREND_COLUMNS, *(f"count_{c}" for c in predictor.classes),
                       *(UNKNOWN_COLUMNS if rule.unknown_rate is not None else ())]
        self.done_times: set[str] = set()  # windows an earlier run on this --out processed
        previous = (read_previous(self.out_dir, identity or {}, self.header, predictor.classes)
                    if resume else None)
        if previous is not None:
            self._restore(previous)
            return
        for name in ("trend.csv", "events.jsonl"):
            self.result.files[name].unlink(missing_ok=True)  # a new run, new files
        with self.result.files["trend.csv"].open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow(self.header)
        self.event("start", **(identity or {}))

    def _restore(self, previous: Previous) -> None:
        """Go on where an earlier run on this --out stopped (see monitor/resume.py)."""
        windows, trend = previous.windows, self.trend
        self.result.windows = list(windows)
        self.result.resumed_windows = len(windows)
        self.result.resumed_crops = sum(w.crops for w in windows)
        self.done_times = {w.time for w in windows}
        trend.smoothed = next((w.smoothed for w in reversed(windows) if w.smoothed is not None),
                              None)
        for window in windows:  # the rules' state, as the first run left it: replayed
            trend.impurity.update(window.counts[self.rule.positive], window.crops)
            if trend.unknown is not None:
                evidence = trend.unknown.update(window.unknown, window.unknown + window.crops)
                trend.in_unknown_event = evidence.alarm
        for window in reversed(windows):  # where the running evidence began
            if not window.statistic:
                break
            trend.evidence_since = window.index
            trend.evidence_counts[0] += window.counts[self.rule.positive]
            trend.evidence_counts[1] += window.crops
        by_index = {w.index: w for w in windows}
        self.result.unknown_alarms = [by_index[i] for i in previous.unknown_alarm_windows
                                      if i in by_index]
        if previous.alarm is not None and previous.alarm.get("window") in by_index:
            alarm = by_index[previous.alarm["window"]]
            self.result.alarm, trend.alarm_window = alarm, alarm
            self.result.alarm_text = previous.alarm.get("message")
            self.result.examples[alarm.index] = [Path(p) for p in
                                                 previous.alarm.get("examples", [])]
        self.event("resumed", after_window=windows[-1].index if windows else 0,
                   alarm_window=self.result.alarm.index if self.result.alarm else None)
        self.say(f"resuming {self.out_dir}: {len(windows)} windows done"
                 + (f", alarm standing since window {self.result.alarm.index}"
                    if self.result.alarm else ""))

    def status(self) -> tuple[str, str]:
        """(ok | alarm | unknown particles | degraded, why) — for /health, OPC UA, the page."""
        if self.degraded:
            return "degraded", self.degraded
        if self.result.alarm:
            return "alarm", self.result.alarm_text or "alarm"
        if self.result.unknown_alarms and self.trend.run_of_unknown >= self.rule.consecutive:
            return "unknown particles", self.trend.explain_unknown_alarm(
                self.result.unknown_alarms[-1])
        count = len(self.result.windows)
        return "ok", f"{count} window{'s' * (count != 1)}, no alarm"

    def mark_degraded(self, why: str) -> None:
        """The watcher stopped or the stream cannot be read: say so everywhere."""
        self.degraded = why
        with contextlib.suppress(OSError):  # the out folder may be what failed
            self.event("degraded", reason=why)
        self.say(f"[bold yellow]monitor degraded: {why}[/bold yellow]")
        self._publish()

    def _publish(self, window: WindowResult | None = None) -> None:
        """The state after a window (or a status change) to every publisher (OPC UA)."""
        if not self.publishers:
            return
        status, why = self.status()
        values: dict[str, object] = {"Status": status, "StatusReason": why,
                                     "Rule": self.rule.rule, "Promise": self.trend.promise(),
                                     "BaseRate": self.rule.in_control_share,
                                     "AlarmWindow": self.result.alarm.index
                                     if self.result.alarm else 0}
        if window is not None:
            values.update(Window=window.index, Crops=window.crops,
                          ImpurityShare=window.fraction,
                          ImpurityShareUpper=window.interval[1] if window.interval else None,
                          PValue=window.p_value, Statistic=window.statistic,
                          Threshold=window.threshold, UnknownShare=window.unknown_fraction)
        values["AlarmActive"] = self.result.alarm is not None  # last: the rest is in place
        for publisher in self.publishers:
            try:
                publisher.publish(values)
            except Exception as exc:  # a publisher must not stop the monitor
                self.event("publish_failed", publisher=type(publisher).__name__,
                           error=str(exc))

    def event(self, kind: str, **details: object) -> None:
        record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "event": kind,
                  **details}
        with self.result.files["events.jsonl"].open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def process(self, window: Window) -> WindowResult:
        start = time.perf_counter()
        predicted, unreadable, positives, unknowns = [], [], [], []
        for item in calls(self.predictor, window.paths, self.cutting):
            if isinstance(item, Failure):
                unreadable.append(item.reason)
                continue
            path, label = item
            predicted.append(label)
            if is_unknown_label(label) and path not in unknowns:
                unknowns.append(path)
            if label == self.rule.positive and path not in positives:
                positives.append(path)
        result = self.trend.add(window.index, window.time, predicted, unreadable)
        self.result.windows.append(result)
        self.result.examples[window.index] = positives[:4]
        self.result.crops += result.crops
        self.result.images += len(window.paths) - len(unreadable)
        self.result.seconds += time.perf_counter() - start
        self._write_row(result)
        if unreadable:
            self.event("unreadable", window=window.index, time=window.time, files=unreadable)
        if not predicted:
            self.event("empty_window", window=window.index, time=window.time)
            self.say(f"[yellow]window {window.time}: no readable crops[/yellow]")
        if result.unknown_alarm:
            text = self.trend.explain_unknown_alarm(result)
            self.result.unknown_alarms.append(result)
            self.say(f"[bold yellow]{text}[/bold yellow]")
            self.event("unknown_particles", window=window.index, time=window.time,
                       unknown=result.unknown, crops=result.crops + result.unknown,
                       fraction=result.unknown_fraction, p_value=result.unknown_p_value,
                       examples=[str(p) for p in unknowns[:4]], message=text)
        if result.alarm:
            self._raise_alarm(result)
        elif (self.result.alarm is not None and self.repeat_every
              and (result.index - self.result.alarm.index) % self.repeat_every == 0):
            self._repeat_alarm(result)
        self._publish(result)
        return result

    def _write_row(self, r: WindowResult) -> None:
        with self.result.files["trend.csv"].open("a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow([
                r.index, r.time, r.crops, _round(r.fraction),
                _round(r.interval[0] if r.interval else None),
                _round(r.interval[1] if r.interval else None), _round(r.smoothed),
                "" if r.p_value is None else f"{r.p_value:.3e}", int(r.significant),
                _round(r.statistic), _round(r.threshold), int(r.alarm), *r.counts.values(),
                *((r.unknown, _round(r.unknown_fraction),
                   "" if r.unknown_p_value is None else f"{r.unknown_p_value:.3e}",
                   int(r.unknown_alarm),
                   *(r.unknown_reasons.get(reason, 0) for reason in UNKNOWN_REASONS))
                  if self.rule.unknown_rate is not None else ())])

    def _raise_alarm(self, window: WindowResult) -> None:
        text = self.trend.explain_alarm(window)
        self.result.alarm, self.result.alarm_text = window, text
        self.say(f"[bold red]{text}[/bold red]")
        evidence = {"window": window.index, "time": window.time, "crops": window.crops,
                    "counts": window.counts, "fraction": window.fraction,
                    "interval": window.interval, "p_value": window.p_value,
                    "rule": self.rule.rule, "statistic": window.statistic,
                    "threshold": window.threshold,
                    "false_positive_rate": self.rule.false_positive_rate,
                    "in_control_share": self.rule.in_control_share,
                    "alpha": self.rule.alpha, "promise": self.trend.promise(),
                    "examples": [str(p) for p in self.result.examples.get(window.index, [])],
                    "message": text}
        self.event("alarm", **evidence)
        self._notify(evidence)

    def _repeat_alarm(self, window: WindowResult) -> None:
        """The alarm stands until the batch ends: remind every ``repeat_every`` windows."""
        alarm = self.result.alarm
        assert alarm is not None
        text = (f"ALARM STILL ACTIVE (since window {alarm.index}, {alarm.time}): window "
                f"{window.index} ({window.time}) has {window.counts[self.rule.positive]} of "
                f"{window.crops} crops called {self.rule.positive}")
        self.say(f"[bold red]{text}[/bold red]")
        evidence = {"window": window.index, "time": window.time, "crops": window.crops,
                    "counts": window.counts, "fraction": window.fraction,
                    "alarm_window": alarm.index, "repeated": True, "message": text}
        self.event("alarm_repeated", **evidence)
        self._notify(evidence)

    def _notify(self, evidence: dict) -> None:
        """The alarm's hooks: a command and an HTTP POST, each failure an event."""
        if self.on_alarm:
            try:
                subprocess.run(shlex.split(self.on_alarm), check=True, timeout=30,
                               env={**os.environ, "CRYSTALSCOPE_ALARM": json.dumps(evidence)})
            except (OSError, subprocess.SubprocessError) as exc:
                self.event("hook_failed", hook="command", error=str(exc))
                self.say(f"[yellow]--on-alarm failed: {exc}[/yellow]")
        if self.post_url:
            self._post(evidence)

    def _post(self, evidence: dict) -> bool:
        """POST with retries: ``post_retries`` more tries after the first, waiting 0.5, 1,
        2 … s between them; every failed try is an event. True when delivered."""
        body = json.dumps(evidence).encode()
        for attempt in range(self.post_retries + 1):
            request = urllib.request.Request(self.post_url, data=body,  # type: ignore[arg-type]
                                             headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=5).close()
                return True
            except OSError as exc:
                last = attempt == self.post_retries
                self.event("hook_failed", hook="post", attempt=attempt + 1, final=last,
                           error=str(exc))
                if last:
                    self.say(f"[yellow]--post {self.post_url} failed {attempt + 1} times: "
                             f"{exc}[/yellow]")
                    return False
                time.sleep(self.post_backoff_s * 2 ** attempt)
        return False

    def finish(self) -> MonitorResult:
        if self.result.windows:
            plot_timeline(self.result, self.rule, self.result.files["timeline.png"])
        return self.result


def _round(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def replay(monitor: Monitor, stream: Path,
           progress: Callable[[int], None] | None = None, **stream_options: object
           ) -> MonitorResult:
    """Every window of a recorded stream, in time order (options: see ``read_stream``)."""
    for window in read_stream(stream, **stream_options):  # type: ignore[arg-type]
        if window.time in monitor.done_times:  # an earlier run on this --out did it
            continue
        monitor.process(window)
        if progress:
            progress(1)
    return monitor.finish()
