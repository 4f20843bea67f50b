"""A time-ordered stream of crops, as windows.

STREAM is a folder of time folders (``t0001/``, ``2026-11-28T10-15/`` …: one window each, in
name order), a CSV with ``time,path`` columns (one window per distinct time, in time order;
relative paths are relative to the CSV), or a flat folder of crops whose time comes from their
file names (``time_from="name"``, a regular expression whose first group is the time) or their
modification times (``time_from="mtime"``), grouped into windows of ``window_seconds``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from crystalscope.data.layout import is_image_name, list_files
from crystalscope.errors import UserError
from crystalscope.settings import SettingsError


@dataclass
class Window:
    """One time window: its label and its crops."""

    index: int
    time: str
    paths: list[Path] = field(default_factory=list)


def _from_folders(stream: Path) -> list[Window]:
    folders = sorted(d for d in stream.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise UserError(f"{stream}: holds no time folders (t0001/, t0002/ …); give a folder "
                        "of time folders, a CSV of time,path, or --time-from name|mtime")
    return [Window(i, d.name, [p for p in list_files(d) if is_image_name(p)])
            for i, d in enumerate(folders, 1)]


def _from_csv(stream: Path) -> list[Window]:
    try:
        with stream.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{stream}: cannot read it as CSV ({exc})") from exc
    if not rows or not {"time", "path"} <= set(rows[0]):
        raise UserError(f"{stream}: needs the columns time and path (one row per crop)")
    missing = [n for n, r in enumerate(rows, 2) if not (r["time"] or "").strip()]
    if missing:
        raise UserError(f"{stream}: row {missing[0]} has no time")
    by_time: dict[str, list[Path]] = {}
    for row in rows:
        path = Path(row["path"])
        by_time.setdefault(row["time"].strip(), []).append(
            path if path.is_absolute() else stream.parent / path)
    return [Window(i, t, by_time[t]) for i, t in enumerate(_in_time_order(by_time), 1)]


CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d+)?))?$")


def time_value(text: str) -> float | None:
    """A CSV time as a number to sort by: seconds (``5``, ``10.5``), a timestamp
    (``20261128-101500``, ISO 8601) or a clock time (``9:00``, ``10:15:30``, seconds of the
    day); None when it is none of these."""
    clock = CLOCK.match(text)
    if clock:
        hours, minutes, seconds = clock.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds or 0)
    try:
        return parse_time(text)
    except UserError:
        return None


def _in_time_order(times: Iterable[str]) -> list[str]:
    """Times sorted as times when every one reads as a time (so ``5`` comes before ``10`` and
    ``9:00`` before ``10:00``), else as text."""
    times = list(times)
    values = [time_value(t) for t in times]
    if any(v is None for v in values):
        return sorted(times)
    return [t for _, t in sorted(zip(values, times, strict=True))]


DEFAULT_TIME_PATTERN = r"(\d{8}[T_-]?\d{6})"
TIME_FORMATS = ("%Y%m%d%H%M%S", "%Y%m%dT%H%M%S", "%Y%m%d_%H%M%S", "%Y%m%d-%H%M%S")


def parse_time(text: str) -> float:
    """Seconds since the epoch from a timestamp: 20261128-101500, ISO 8601, or plain seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    for fmt in TIME_FORMATS:
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{text!r}: not a time I can read (use e.g. 20261128-101500, "
                        "2026-11-28T10:15:00 or seconds)") from None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def _from_times(stream: Path, time_from: str, pattern: str, window_seconds: float
                ) -> list[Window]:
    files = [p for p in list_files(stream) if is_image_name(p)]
    if not files:
        raise UserError(f"{stream}: holds no images")
    stamps = []
    for path in files:
        if time_from == "mtime":
            stamps.append(path.stat().st_mtime)
            continue
        match = re.search(pattern, path.name)
        if not match:
            raise UserError(f"{path.name}: no timestamp matches --time-pattern {pattern!r}")
        stamps.append(parse_time(match.group(1) if match.groups() else match.group(0)))
    start = min(stamps)
    windows: dict[int, list[tuple[float, Path]]] = {}
    for stamp, path in zip(stamps, files, strict=True):
        windows.setdefault(int((stamp - start) // window_seconds), []).append((stamp, path))
    return [Window(i, datetime.fromtimestamp(start + n * window_seconds, UTC)
                   .isoformat(timespec="seconds"), [p for _, p in sorted(windows[n])])
            for i, n in enumerate(sorted(windows), 1)]


def read_stream(stream: Path, *, time_from: str = "folders",
                pattern: str = DEFAULT_TIME_PATTERN, window_seconds: float = 60.0
                ) -> list[Window]:
    """The windows of STREAM, in time order (``time_from``: folders, name or mtime)."""
    stream = Path(stream)
    if not stream.exists():
        raise UserError(f"{stream}: no such folder or CSV")
    if stream.is_file():
        return _from_csv(stream)
    if time_from in ("name", "mtime"):
        if window_seconds <= 0:
            raise SettingsError("window_seconds", "give a positive duration", window_seconds)
        return _from_times(stream, time_from, pattern, window_seconds)
    if time_from != "folders":
        raise SettingsError("time_from", "use folders, name or mtime", time_from)
    return _from_folders(stream)
