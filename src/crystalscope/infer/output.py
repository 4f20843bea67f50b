"""Write predictions as they come: an aligned table, CSV, JSON, JSON lines or Parquet.

Every number is named for what it is: ``probability_of_predicted`` is the probability of the
predicted class (whichever it is), ``probability_<class>`` that of each class. A model with an
unknown-detector adds ``unknown`` (true/false in JSON, yes/no in a table or CSV) and
``unknown_score`` (above 1 = unknown); with ``reject_unknown`` the predicted class of an unknown
image is ``unknown``.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Literal, TextIO

from crystalscope.infer.stream import Failure, ImageResult
from crystalscope.settings import SettingsError

Format = Literal["table", "csv", "json", "jsonl", "parquet"]
LEGEND = ("predicted_class: the most probable class; probability_of_predicted: its "
          "probability; probability_<class>: each class's probability (they sum to 1)")
UNKNOWN_LEGEND = ("; unknown: yes when the image holds no usable crystal or one unlike the "
                  "training crystals; unknown_score: how unlike (1 = the threshold, above it = "
                  "novel); unknown_reason: empty, blurred, saturated (the quality gate) or novel")
UNKNOWN = "unknown"


def columns(classes: list[str], with_unknown: bool = False) -> list[str]:
    return ["file", "predicted_class", "probability_of_predicted",
            *(f"probability_{name}" for name in classes),
            *(("unknown", "unknown_score", "unknown_reason") if with_unknown else ())]


def as_row(result: ImageResult, classes: list[str], *, with_unknown: bool = False,
           reject_unknown: bool = False) -> dict[str, object]:
    """One prediction as named values (``with_unknown``: with the unknown and unknown_score
    columns)."""
    best = result.best
    row: dict[str, object] = {
        "file": str(result.path), "predicted_class": classes[best],
        "probability_of_predicted": round(float(result.probabilities[best]), 6),
        **{f"probability_{name}": round(float(p), 6)
           for name, p in zip(classes, result.probabilities, strict=True)}}
    if with_unknown:
        row["unknown"] = bool(result.unknown)
        score = result.unknown_score
        row["unknown_score"] = None if score is None else round(score, 4)
        row["unknown_reason"] = result.unknown_reason
        if reject_unknown and result.unknown:
            row["predicted_class"], row["probability_of_predicted"] = UNKNOWN, None
    return row


class PredictionWriter:
    """Streams rows to ``handle`` in one of the formats."""

    def __init__(self, handle: TextIO, fmt: Format, classes: list[str], *,
                 with_unknown: bool = False, reject_unknown: bool = False) -> None:
        self.handle, self.format, self.classes = handle, fmt, classes
        self.with_unknown, self.reject_unknown = with_unknown, reject_unknown
        self.count = 0  # predictions written
        self.unknown = 0  # of which unknown
        self.reasons: Counter[str] = Counter()  # why, for the unknown ones
        self.json_records = 0  # records (predictions and failures) in the JSON array
        names = columns(classes, with_unknown)
        if fmt == "csv":
            self.csv = csv.DictWriter(handle, fieldnames=names)
            self.csv.writeheader()
        elif fmt == "json":
            handle.write("[")
        elif fmt == "table":
            self.widths = [40, max(15, *(len(c) for c in classes)), 24,
                           *(max(12, len(n)) for n in names[3:])]
            if with_unknown:  # yes/no
                self.widths[names.index("unknown")] = 7
            handle.write(self._line(names) + "\n")

    def _line(self, values: list[object]) -> str:
        cells = ["-" if v is None else str(v) if not isinstance(v, float) else f"{v:.4f}"
                 for v in values]
        first = cells[0] if len(cells[0]) <= 40 else "…" + cells[0][-39:]
        return "  ".join([first.ljust(self.widths[0]),
                          *(c.ljust(w) for c, w in zip(cells[1:], self.widths[1:],
                                                       strict=True))]).rstrip()

    def write(self, item: ImageResult | Failure) -> None:
        if isinstance(item, Failure):
            if self.format in ("json", "jsonl"):
                self._json({"file": str(item.path), "error": item.reason})
            return
        row = as_row(item, self.classes, with_unknown=self.with_unknown,
                     reject_unknown=self.reject_unknown)
        self.unknown += int(bool(item.unknown))
        if item.unknown:
            self.reasons[str(item.unknown_reason)] += 1
        if self.with_unknown and self.format in ("csv", "table"):  # yes/no, not True/False
            row["unknown"] = "yes" if row["unknown"] else "no"
        if self.format == "csv":
            self.csv.writerow(row)
        elif self.format == "table":
            self.handle.write(self._line(list(row.values())) + "\n")
        else:
            self._json(row)
        self.count += 1

    def _json(self, record: dict) -> None:
        if self.format == "jsonl":
            self.handle.write(json.dumps(record) + "\n")
        else:
            self.handle.write(("," if self.json_records else "") + "\n  " + json.dumps(record))
            self.json_records += 1

    def close(self) -> None:
        if self.format == "json":
            self.handle.write("\n]\n")
        self.handle.flush()


class ParquetPredictionWriter:
    """Streams the CSV columns to a Parquet file in row groups of ``ROW_GROUP`` predictions
    (memory bounded by one group); unreadable files are left out, as in CSV."""

    ROW_GROUP = 8192

    def __init__(self, path: Path, classes: list[str], *, with_unknown: bool = False,
                 reject_unknown: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.classes, self.with_unknown, self.reject_unknown = classes, with_unknown, \
            reject_unknown
        self.count = self.unknown = 0
        self.reasons: Counter[str] = Counter()
        fields = [pa.field("file", pa.string()), pa.field("predicted_class", pa.string()),
                  pa.field("probability_of_predicted", pa.float64()),
                  *(pa.field(f"probability_{c}", pa.float64()) for c in classes)]
        if with_unknown:
            fields += [pa.field("unknown", pa.bool_()), pa.field("unknown_score", pa.float64()),
                       pa.field("unknown_reason", pa.string())]
        self.schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.rows: list[dict[str, object]] = []

    def write(self, item: ImageResult | Failure) -> None:
        if isinstance(item, Failure):
            return
        self.rows.append(as_row(item, self.classes, with_unknown=self.with_unknown,
                                reject_unknown=self.reject_unknown))
        self.unknown += int(bool(item.unknown))
        if item.unknown:
            self.reasons[str(item.unknown_reason)] += 1
        self.count += 1
        if len(self.rows) >= self.ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


def check_new_file(path: Path) -> Path:
    """``path`` as a file to create: refuse an existing file or a missing folder."""
    path = Path(path)
    if path.exists():
        raise SettingsError("output", "exists; remove it or choose another name", path)
    if not path.parent.is_dir():
        raise SettingsError("output", f"folder {path.parent} does not exist", path)
    return path


def check_output(output_format: str, path: Path | None) -> None:
    """A binary format goes to a file, never to the screen."""
    if output_format == "parquet" and path is None:
        raise SettingsError("output", "give a FILE.parquet for the parquet format (a binary "
                            "file, not for the screen)")


def open_output(path: Path | None) -> TextIO | None:
    """A new file for --output (an existing file is never replaced)."""
    if path is None:
        return None
    return check_new_file(path).open("x", encoding="utf-8", newline="")
