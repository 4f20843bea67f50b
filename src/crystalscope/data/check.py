"""`crystalscope data check`: what is in a folder of class folders, and what is wrong with it.

:func:`scan_dataset` reads every file once (in parallel), fingerprints it and groups duplicates;
:func:`summarize` turns the scan into the report that the CLI prints as a table or JSON. The
split stage reuses the same scan.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from crystalscope.data.dedupe import (
    Fingerprint,
    dihedral_phashes,
    file_sha256,
    group_duplicates,
    groups_of,
    is_low_texture,
    pack_phashes,
    pixel_digest,
)
from crystalscope.data.images import FormatMismatchWarning, ImageLoadError, load_image
from crystalscope.data.layout import read_class_folders
from crystalscope.parallel import ordered_map

Progress = Callable[[int], None]


@dataclass(slots=True)
class FileRecord:
    """What one file is: where, which class, its fingerprints, or why it cannot be read."""

    path: Path
    class_name: str
    size_bytes: int
    sha256: str
    error: str | None = None
    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    pixel_digest: str | None = None
    phashes: bytes | None = None  # pack_phashes; None: unreadable, or too flat to hash
    low_texture: bool = False
    warning: str | None = None
    group: int = -1

    @property
    def readable(self) -> bool:
        return self.error is None


@dataclass
class DatasetScan:
    """Every file of a data set, in class then path order, with duplicate groups assigned."""

    root: Path
    class_names: list[str]
    records: list[FileRecord] = field(default_factory=list)


def inspect_file(path: Path, class_name: str) -> FileRecord:
    """Read one file: hash it, decode it safely, fingerprint its pixels."""
    path = Path(path)
    size = path.stat().st_size
    record = FileRecord(path=path, class_name=class_name, size_bytes=size, sha256=file_sha256(path))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FormatMismatchWarning)
            image = load_image(path)
        with Image.open(path) as raw:  # the stored format and mode, before conversion
            record.format, record.mode = raw.format, raw.mode
    except ImageLoadError as exc:
        record.error = exc.reason
        return record
    if caught:
        record.warning = str(caught[0].message)
    record.width, record.height = image.size
    gray = np.asarray(image.convert("L"))
    record.pixel_digest = pixel_digest(gray)
    record.low_texture = is_low_texture(image)
    if not record.low_texture:
        record.phashes = pack_phashes(dihedral_phashes(image))
    return record


def _inspect_pair(args: tuple[Path, str]) -> FileRecord:
    return inspect_file(*args)


def inspect_tree(root: Path, *, workers: int | None = None, progress: Progress | None = None,
                 min_classes: int = 2) -> tuple[list[str], list[FileRecord]]:
    """The class names under ``root`` and every file's record (each file read once, in
    parallel); duplicate groups are not assigned yet. O(N) reads."""
    classes = read_class_folders(Path(root), min_classes=min_classes)
    jobs = [(path, c.name) for c in classes for path in c.files]
    records: list[FileRecord] = []
    for record in ordered_map(_inspect_pair, jobs, workers=workers, min_parallel=64,
                              chunksize=32):
        records.append(record)
        if progress:
            progress(1)
    return [c.name for c in classes], records


def assign_groups(records: list[FileRecord]) -> None:
    """Give files that share any fingerprint (bytes, pixels up to rotation, near pHash) one
    group id (:func:`~crystalscope.data.dedupe.group_duplicates`: O(N) memory)."""
    fingerprints = [Fingerprint(r.sha256, r.pixel_digest, r.phashes) for r in records]
    for record, group in zip(records, group_duplicates(fingerprints), strict=True):
        record.group = group


def scan_dataset(root: Path, *, workers: int | None = None,
                 progress: Progress | None = None) -> DatasetScan:
    """Inspect every file under ``root``'s class folders and group duplicates across classes."""
    class_names, records = inspect_tree(root, workers=workers, progress=progress)
    assign_groups(records)
    return DatasetScan(root=Path(root), class_names=class_names, records=records)


def summarize(scan: DatasetScan) -> dict[str, Any]:
    """The `data check` report: counts, sizes, modes, unreadable files, duplicate groups."""
    records = scan.records
    readable = [r for r in records if r.readable]
    per_class: dict[str, dict[str, Any]] = {}
    for name in scan.class_names:
        mine = [r for r in records if r.class_name == name]
        good = [r for r in mine if r.readable]
        sizes = Counter(f"{r.width}x{r.height}" for r in good)
        per_class[name] = {
            "files": len(mine),
            "readable": len(good),
            "unreadable": len(mine) - len(good),
            "share": round(len(good) / max(1, len(readable)), 4),
            "sizes": dict(sizes.most_common(5)),
            "distinct_sizes": len(sizes),
            "modes": dict(Counter(r.mode for r in good)),
            "formats": dict(Counter(r.format for r in good)),
        }
    duplicate_groups = []
    for members in groups_of(r.group for r in records).values():
        if len(members) < 2:
            continue
        group_records = [records[i] for i in members]
        same_bytes = len({r.sha256 for r in group_records}) == 1
        classes = sorted({r.class_name for r in group_records})
        duplicate_groups.append({
            "kind": "exact" if same_bytes else "rotated/flipped or near",
            "classes": classes,
            "label_conflict": len(classes) > 1,
            "files": [str(r.path) for r in group_records],
        })
    counts = [per_class[n]["readable"] for n in scan.class_names]
    return {
        "root": str(scan.root),
        "classes": scan.class_names,
        "files": len(records),
        "readable": len(readable),
        "per_class": per_class,
        "imbalance_ratio": round(max(counts) / max(1, min(counts)), 4) if counts else None,
        "unreadable": [
            {"file": str(r.path), "class": r.class_name, "reason": r.error}
            for r in records if not r.readable
        ],
        "format_warnings": [r.warning for r in records if r.warning],
        "duplicate_groups": duplicate_groups,
        "duplicate_files": sum(len(g["files"]) - 1 for g in duplicate_groups),
        "label_conflicts": sum(g["label_conflict"] for g in duplicate_groups),
    }
