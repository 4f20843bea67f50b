"""A time-ordered stream of crops, as windows.

STREAM is a folder of time folders (``t0001/``, ``2026-11-28T10-15/`` …: one window each, in
name order), or a CSV with ``time,path`` columns (one window per distinct time, in time
order; relative paths are relative to the CSV).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from crystalscope.data.layout import is_image_name, list_files
from crystalscope.errors import UserError


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
                        "of time folders or a CSV of time,path")
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
    return [Window(i, t, by_time[t]) for i, t in enumerate(sorted(by_time), 1)]


def read_stream(stream: Path) -> list[Window]:
    """The windows of STREAM, in time order."""
    stream = Path(stream)
    if not stream.exists():
        raise UserError(f"{stream}: no such folder or CSV")
    return _from_csv(stream) if stream.is_file() else _from_folders(stream)
