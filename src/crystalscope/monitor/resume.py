"""A monitor restarted on the same ``--out`` goes on where it stopped: the windows already in
trend.csv are not processed again; the window count, the rules' state (their windows
replayed), the smoothed share and a standing alarm come back from trend.csv and events.jsonl.

events.jsonl starts with a ``start`` record naming the stream, the model and the rule; a
folder that holds another run is refused (one line), never mixed with this one nor overwritten.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crystalscope.errors import UserError
from crystalscope.monitor.trend import UNKNOWN_REASONS, WindowResult

IDENTITY_KEYS = ("stream", "model", "positive", "rule", "false_positive_rate", "min_shift",
                 "arl0", "alpha", "consecutive")


@dataclass
class Previous:
    """What an earlier run on this ``--out`` left."""

    windows: list[WindowResult] = field(default_factory=list)
    alarm: dict[str, Any] | None = None  # the alarm event
    unknown_alarm_windows: list[int] = field(default_factory=list)


def _number(text: str) -> float | None:
    return None if text in ("", None) else float(text)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b),  # type: ignore[arg-type]
                                                                rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def read_previous(out_dir: Path, identity: dict[str, Any], header: list[str],
                  classes: list[str]) -> Previous | None:
    """The earlier run in ``out_dir`` (None when there is none, or it processed no window); a
    one-line error when it is another stream's, model's or rule's, or was written with other
    columns. A row cut short by a killed run is dropped. O(windows)."""
    trend, events = out_dir / "trend.csv", out_dir / "events.jsonl"
    if not trend.is_file() and not events.is_file():
        return None
    fresh_hint = f"give a new --out, or --fresh to start over in {out_dir}"
    records = []
    if events.is_file():
        for line in events.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short when the run was killed
    windows: list[WindowResult] = []
    if trend.is_file():
        with trend.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            columns = next(reader, None)
            rows = [values for values in reader if len(values) == len(columns or [])]
        if rows and columns != header:
            raise UserError(f"--out {out_dir}: its trend.csv has other columns (another "
                            "version or model); " + fresh_hint)
        windows = [_window(dict(zip(header, values, strict=True)), classes) for values in rows]
    if not windows:
        return None  # nothing was processed there: start over, nothing is lost
    start = next((r for r in records if r.get("event") == "start"), None)
    if start is None:
        raise UserError(f"--out {out_dir}: holds a monitor's files without their start record; "
                        + fresh_hint)
    differs = [key for key in IDENTITY_KEYS if not _same(start.get(key), identity.get(key))]
    if differs:
        raise UserError(f"--out {out_dir}: holds the run of another "
                        f"{', '.join(differs)} ({start.get(differs[0])!r}); " + fresh_hint)
    return Previous(windows=windows,
                    alarm=next((r for r in records if r.get("event") == "alarm"), None),
                    unknown_alarm_windows=[int(r["window"]) for r in records
                                           if r.get("event") == "unknown_particles"])


def _window(row: dict[str, str], classes: list[str]) -> WindowResult:
    low, high = _number(row["low95"]), _number(row["high95"])
    unknown_p = _number(row.get("unknown_p_value", ""))
    return WindowResult(
        index=int(row["window"]), time=row["time"], crops=int(row["crops"]),
        counts={c: int(row[f"count_{c}"]) for c in classes},
        fraction=_number(row["fraction"]),
        interval=None if low is None or high is None else (low, high),
        smoothed=_number(row["smoothed"]), p_value=_number(row["p_value"]),
        significant=row["significant"] == "1", alarm=row["alarm"] == "1",
        statistic=_number(row["statistic"]), threshold=_number(row["threshold"]),
        unknown=int(row.get("count_unknown") or 0),
        unknown_fraction=_number(row.get("unknown_fraction", "")),
        unknown_p_value=unknown_p, unknown_alarm=row.get("unknown_alarm") == "1",
        unknown_reasons={reason: int(row[f"unknown_{reason}"]) for reason in UNKNOWN_REASONS
                         if row.get(f"unknown_{reason}")})
