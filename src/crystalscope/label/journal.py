"""``labels.csv``: every labelling decision, appended and flushed to disk at once.

One row per decision: ``time, file, sha256, class, action, input``. ``action`` is ``label``,
``skip`` or ``undo`` (which takes back its file's latest not yet undone label or skip — an
undo row without a file, as early journals wrote, the latest of any file); ``input`` is
``keyboard``, ``button`` or ``import`` (from another tool's export). Nothing is ever
rewritten, so a crash or ``kill -9`` loses at most the row being written; :func:`replay`
ignores a cut last line.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

COLUMNS = ("time", "file", "sha256", "class", "action", "input")
ACTIONS = ("label", "skip", "undo")
INPUTS = ("keyboard", "button", "import")


@dataclass(frozen=True)
class Decision:
    """One row of the journal."""

    time: str
    file: str  # relative to the images folder, with forward slashes
    sha256: str
    label: str  # the class; empty for skip and undo
    action: str
    input: str


class Journal:
    """Appends decisions to ``path`` (created with its header), each flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            _end_with_newline(self.path)
        self._handle = self.path.open("a", newline="", encoding="utf-8")
        if new:
            self._write(COLUMNS)

    def append(self, file: str, sha256: str, label: str, action: str, input: str) -> Decision:
        if action not in ACTIONS or input not in INPUTS:
            raise ValueError(f"action {action!r} / input {input!r}: use one of "
                             f"{', '.join(ACTIONS)} / {', '.join(INPUTS)}")
        decision = Decision(datetime.now(UTC).isoformat(timespec="milliseconds"), file, sha256,
                            label, action, input)
        self._write((decision.time, file, sha256, label, action, input))
        return decision

    def _write(self, row: tuple[str, ...]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(row)
        self._handle.write(buffer.getvalue())
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _end_with_newline(path: Path) -> None:
    """After a crash mid-row, start the next row on a line of its own."""
    with path.open("rb+") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) != b"\n":
            handle.write(b"\n")


def read_decisions(path: Path) -> list[Decision]:
    """Every complete row of the journal, in order (a cut or malformed row is skipped)."""
    if not Path(path).is_file():
        return []
    decisions = []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if None in row.values() or row.get("action") not in ACTIONS or (
                    row.get("input") not in INPUTS):
                continue  # a row cut by a crash
            decisions.append(Decision(row["time"], row["file"], row["sha256"], row["class"],
                                      row["action"], row["input"]))
    return decisions


def replay(decisions: list[Decision]) -> tuple[dict[str, str], list[Decision]]:
    """(file -> class for every file whose latest standing decision is a label; the standing
    decisions in order, undone ones removed). A skip stands too, but gives no class.

    An undo takes back the latest standing decision of the file it names, never another
    file's. O(decisions) with a per-file stack; undone rows are dropped in one final pass.
    """
    standing: list[Decision | None] = []
    per_file: dict[str, list[int]] = {}  # file -> positions of its standing decisions
    for decision in decisions:
        if decision.action != "undo":
            per_file.setdefault(decision.file, []).append(len(standing))
            standing.append(decision)
            continue
        if decision.file:
            positions = per_file.get(decision.file)
        else:  # an early journal's undo: the latest standing decision of any file
            positions = per_file[standing[-1].file] if standing else None  # type: ignore[union-attr]
        if positions:
            standing[positions.pop()] = None
            while standing and standing[-1] is None:  # the last entry is always standing
                standing.pop()
    kept = [decision for decision in standing if decision is not None]
    labels: dict[str, str] = {}
    for decision in kept:
        if decision.action == "label":
            labels[decision.file] = decision.label
        else:
            labels.pop(decision.file, None)
    return labels, kept
