"""`crystalscope split`: stratified, duplicate-group aware train/valid/test split that never
loses a file.

Per class, train = floor(n * r_train), valid = floor(n * r_valid), test = the rest (the
published 70/25/5 counts). Duplicate groups (exact or rotated/flipped copies) go to one split as
a whole; the counts then move by as few files as the groups allow.

Safety: the manifest (source, dest, sha256, group, split) is written before any file moves.
Each file goes to a temporary name, is verified against its sha256, then renamed into place;
a moved source is removed only after its destination verified. Killed at any moment, every
file is at its source or verified at its destination, and ``resume`` finishes the job.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from crystalscope.data.check import DatasetScan, FileRecord, scan_dataset
from crystalscope.data.dedupe import file_sha256
from crystalscope.data.grouping import apply_group_keys
from crystalscope.data.layout import (
    SPLIT_NAMES,
    count_files,
    find_class_root,
    split_folder_name,
)
from crystalscope.data.split_settings import Mode, Order, SplitSettings
from crystalscope.errors import CrystalscopeError, UserError
from crystalscope.parallel import threaded_map

Progress = Callable[[str, int, int], None]  # (stage, done, total)
MANIFEST_NAME = "manifest.csv"
REPORT_NAME = "split.json"
PART_SUFFIX = ".crystalscope-part"
MANIFEST_FIELDS = ("source", "dest", "sha256", "group", "split", "class")
# Testing aid: seconds to sleep after each file, so a test can kill the process mid-way.
_DELAY_ENV = "CRYSTALSCOPE_SPLIT_FILE_DELAY"


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """One file of the split: where it comes from, where it goes, how to verify it."""

    source: str
    dest: str  # relative to the destination folder, with forward slashes
    sha256: str
    group: str
    split: str
    class_name: str

    def to_csv(self) -> dict[str, str]:
        row = asdict(self)
        row["class"] = row.pop("class_name")
        return row

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> ManifestRow:
        return cls(row["source"], row["dest"], row["sha256"], row["group"], row["split"],
                   row["class"])


@dataclass
class SplitPlan:
    """Which file goes where, and how far the counts moved from the ideal ones."""

    rows: list[ManifestRow]
    targets: dict[str, dict[str, int]]  # class -> split -> ideal count
    counts: dict[str, dict[str, int]]  # class -> split -> planned count
    skipped: list[dict[str, str]] = field(default_factory=list)
    label_conflicts: int = 0

    @property
    def files_moved_by_groups(self) -> int:
        """Files that sit in another split than the plain ratios would put them."""
        return sum(
            max(0, self.counts[c][s] - self.targets[c][s]) for c in self.counts for s in SPLIT_NAMES
        )


def split_counts(n: int, ratios: tuple[Fraction, Fraction, Fraction]) -> dict[str, int]:
    """Ideal counts for ``n`` files: floor for train and valid, the rest to test."""
    train = int(n * ratios[0])  # Fraction arithmetic: exact, no 0.7*n rounding surprises
    valid = int(n * ratios[1])
    return {"train": train, "valid": valid, "test": n - train - valid}


def minimum_class_size(ratios: tuple[Fraction, Fraction, Fraction]) -> int:
    """The smallest class size that gives every split with a ratio > 0 at least one file."""
    n = 1
    while True:
        counts = split_counts(n, ratios)
        if all(counts[s] > 0 for s, r in zip(SPLIT_NAMES, ratios, strict=True) if r > 0):
            return n
        n += 1


def _ordered(records: list[FileRecord], order: Order, seed: int, class_name: str) -> list[int]:
    indices = sorted(range(len(records)), key=lambda i: records[i].path.name)
    if order == "shuffle":
        random.Random(f"{seed}:{class_name}").shuffle(indices)
    return indices


def _assign_units(units: dict[int, list[int]], target: dict[str, int],
                  group_split: dict[int, str]) -> tuple[dict[int, str], dict[str, int]]:
    """Assign units (duplicate groups of file indices, in priority order) to splits.

    Groups already placed by another class keep their split; multi-file groups, largest first,
    go to the first split with room for all of them (else to the one with most room); single
    files then fill train, valid, test in order. ``group_split`` is updated in place.
    """
    count = dict.fromkeys(SPLIT_NAMES, 0)
    assignment: dict[int, str] = {}
    fixed = set(group_split) & set(units)  # placed by another class: they stay where they are

    def room(split: str) -> int:
        return target[split] - count[split]

    def place(group: int, split: str) -> None:
        group_split[group] = split
        count[split] += len(units[group])
        assignment.update(dict.fromkeys(units[group], split))

    for group in units:
        if group in group_split:
            place(group, group_split[group])
    for group, members in sorted(units.items(), key=lambda item: -len(item[1])):
        if group not in group_split and len(members) > 1:
            fitting = [s for s in SPLIT_NAMES if room(s) >= len(members)]
            place(group, fitting[0] if fitting else max(SPLIT_NAMES, key=room))
    for group in units:
        if group not in group_split:
            open_splits = [s for s in SPLIT_NAMES if room(s) > 0]
            place(group, open_splits[0] if open_splits else max(SPLIT_NAMES, key=room))
    _cover_every_split(units, target, group_split, count, assignment, fixed)
    return assignment, count


def _cover_every_split(units: dict[int, list[int]], target: dict[str, int],
                       group_split: dict[int, str], count: dict[str, int],
                       assignment: dict[int, str], fixed: set[int]) -> None:
    """A class with at least 3 groups gets a file in every split that has a target: a split
    left empty by whole groups takes the smallest movable group of the split with the most
    files over its target (among splits that keep at least one group)."""
    if len(units) < 3:
        return
    for split in SPLIT_NAMES:
        if target[split] == 0 or count[split] > 0:
            continue
        groups_in = {s: [g for g in units if group_split[g] == s] for s in SPLIT_NAMES}
        movable = [g for g in units if g not in fixed and group_split[g] != split
                   and len(groups_in[group_split[g]]) >= 2]
        if not movable:
            continue
        order = list(units)
        donor_surplus = {s: count[s] - target[s] for s in SPLIT_NAMES}
        group = min(movable, key=lambda g: (len(units[g]), -donor_surplus[group_split[g]],
                                            order.index(g)))
        count[group_split[group]] -= len(units[group])
        group_split[group] = split
        count[split] += len(units[group])
        assignment.update(dict.fromkeys(units[group], split))


def plan_split(scan: DatasetScan, ratios: tuple[Fraction, Fraction, Fraction], *,
               seed: int = 0, order: Order = "shuffle", layout: str = "crystalscope"
               ) -> SplitPlan:
    """Assign every readable file to a split, keeping duplicate groups together."""
    class_root = find_class_root(scan.root)
    minimum = minimum_class_size(ratios)
    readable_by_class = {c: [r for r in scan.records if r.class_name == c and r.readable]
                         for c in scan.class_names}
    for name, records in readable_by_class.items():
        if len(records) < minimum:
            raise UserError(
                f"class '{name}' has {len(records)} readable image(s); ratios "
                f"{','.join(f'{float(r):g}' for r in ratios)} need at least {minimum} per class"
            )
    group_split: dict[int, str] = {}  # a group that spans classes keeps one split across them
    targets, counts = {}, {}
    rows: list[ManifestRow] = []
    for name in scan.class_names:
        records = readable_by_class[name]
        units: dict[int, list[int]] = defaultdict(list)
        for index in _ordered(records, order, seed, name):
            units[records[index].group].append(index)
        targets[name] = split_counts(len(records), ratios)
        assignment, counts[name] = _assign_units(units, targets[name], group_split)
        for index, split in sorted(assignment.items()):
            record = records[index]
            relative = record.path.relative_to(class_root / name).as_posix()
            rows.append(ManifestRow(
                source=str(record.path.resolve()),
                dest=f"{split_folder_name(split, layout)}/{name}/{relative}",
                sha256=record.sha256, group=f"g{record.group:06d}", split=split, class_name=name,
            ))
    classes_of_group: dict[int, set[str]] = defaultdict(set)
    for record in scan.records:
        if record.readable:
            classes_of_group[record.group].add(record.class_name)
    skipped = [{"file": str(r.path), "reason": r.error or ""} for r in scan.records
               if not r.readable]
    return SplitPlan(rows=rows, targets=targets, counts=counts, skipped=skipped,
                     label_conflicts=sum(len(c) > 1 for c in classes_of_group.values()))


# ----------------------------------------------------------------------------- execution


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    """Write the manifest atomically (temporary file, fsync, rename)."""
    temporary = path.with_name(path.name + PART_SUFFIX)
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(row.to_csv() for row in rows)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read a manifest written by :func:`write_manifest`."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS:
                raise UserError(f"{path}: not a crystalscope split manifest (columns differ)")
            return [ManifestRow.from_csv(row) for row in reader]
    except (OSError, csv.Error, KeyError) as exc:
        raise UserError(f"{path}: cannot read the manifest ({exc})") from exc


def _copy_verified(source: Path, dest: Path, sha256: str, *, link: bool) -> None:
    temporary = dest.with_name(dest.name + PART_SUFFIX)
    temporary.unlink(missing_ok=True)
    if link:
        os.link(source, temporary)
    else:
        shutil.copyfile(source, temporary)
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
    if file_sha256(temporary) != sha256:
        temporary.unlink(missing_ok=True)
        raise CrystalscopeError(f"{source}: the copy does not match the manifest's sha256; "
                                "the source changed since the split was planned")
    temporary.replace(dest)


def transfer(row: ManifestRow, dest_root: Path, mode: Mode) -> None:
    """Put one file at its destination, idempotently. Safe to repeat after a kill."""
    source, dest = Path(row.source), dest_root / row.dest
    if dest.exists():
        if file_sha256(dest) != row.sha256:
            raise CrystalscopeError(
                f"{dest}: exists but does not match the manifest's sha256; it was not written "
                "by this split, so it is left alone. Move it away and run again with --resume"
            )
        if mode == "move" and source.exists() and file_sha256(source) == row.sha256:
            source.unlink()  # a kill came between verifying the copy and removing the source
        return
    if not source.exists():
        raise CrystalscopeError(f"{source}: missing, and its destination {dest} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "move":
        try:
            source.rename(dest)  # atomic on one file system: the file is in one place only
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_verified(source, dest, row.sha256, link=False)
            source.unlink()
    else:
        _copy_verified(source, dest, row.sha256, link=mode == "link")


TRANSFER_THREADS = 4  # copying is waiting on the disk (fsync): a few files in flight at once


def _problems(row: ManifestRow, dest_root: Path, mode: Mode) -> list[str]:
    dest = dest_root / row.dest
    problems = []
    if not dest.is_file():
        problems.append(f"{dest}: missing")
    elif file_sha256(dest) != row.sha256:
        problems.append(f"{dest}: sha256 differs from the manifest")
    if mode == "move" and Path(row.source).exists():
        problems.append(f"{row.source}: still present after --move")
    return problems


def verify(rows: list[ManifestRow], dest_root: Path, mode: Mode) -> list[str]:
    """Problems found after the split: missing or changed destinations, leftover sources.
    One read of every destination (in threads): O(N)."""
    found = threaded_map(lambda row: _problems(row, dest_root, mode), rows,
                         threads=TRANSFER_THREADS)
    return [problem for problems in found for problem in problems]


@dataclass
class SplitResult:
    """What `split` did: the report that is also written to ``split.json``."""

    dest: Path
    report: dict


def _plan_report(plan: SplitPlan, settings: dict) -> dict:
    groups = Counter(row.group for row in plan.rows)
    return {
        "status": "in progress",
        **settings,
        "files": len(plan.rows),
        "counts": plan.counts,
        "targets": plan.targets,
        "files_moved_by_groups": plan.files_moved_by_groups,
        "duplicate_groups": sum(1 for n in groups.values() if n > 1),
        "files_in_duplicate_groups": sum(n for n in groups.values() if n > 1),
        "label_conflicts": plan.label_conflicts,
        "skipped": plan.skipped,
    }


def _write_report(dest: Path, report: dict) -> None:
    temporary = dest / (REPORT_NAME + PART_SUFFIX)
    temporary.write_text(json.dumps(report, indent=2), encoding="utf-8")
    temporary.replace(dest / REPORT_NAME)


def _check_new_destination(src: Path, dest: Path) -> None:
    if not src.exists():
        raise UserError(f"{src}: no such folder")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest}: is a file; give a folder for the split")
    if dest.is_dir() and any(dest.iterdir()):
        hint = ("it holds an unfinished split: add --resume to finish it"
                if (dest / MANIFEST_NAME).is_file() else "choose an empty or new folder")
        raise UserError(f"{dest}: is not empty; {hint}")
    if src.resolve() in (dest.resolve(), *dest.resolve().parents):  # inside the source
        raise UserError(f"{dest}: is inside the source folder {src}; choose a folder outside it")


def split_dataset(src: Path, dest: Path, settings: SplitSettings | None = None, *,
                  resume: bool = False, workers: int | None = None,
                  progress: Progress | None = None) -> SplitResult:
    """Split ``src`` (class folders) into ``dest/{train,valid,test}/<class>/`` as ``settings``
    say (default: :class:`SplitSettings`' defaults); ``group_by``/``group_file``: files with
    one key go to one split (:mod:`.grouping`).

    With ``resume``, finish the split recorded in ``dest/manifest.csv`` instead (its own mode
    and plan; ``settings`` are ignored). ``progress(stage, done, total)`` is called as
    files are scanned and transferred.
    """
    src, dest = Path(src), Path(dest)
    manifest_path = dest / MANIFEST_NAME
    if resume:
        if not manifest_path.is_file():
            raise UserError(f"{dest}: no {MANIFEST_NAME} there, so there is no split to resume")
        rows = read_manifest(manifest_path)
        try:
            report = json.loads((dest / REPORT_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{dest / REPORT_NAME}: cannot read the split's settings ({exc})") \
                from exc
    else:
        settings = settings or SplitSettings()
        _check_new_destination(src, dest)
        scan = scan_dataset(src, workers=workers,
                            progress=_counting(progress, "scan", count_files(src)))
        for record in scan.records:  # grouped: the plan needs the groups, not the prints
            record.pixel_digest = record.phashes = None  # ~190 MB at 10^6 files
        grouping = apply_group_keys(scan, settings.group_by, settings.group_file,
                                    settings.group_column)
        plan = plan_split(scan, settings.parsed_ratios, seed=settings.seed,
                          order=settings.order, layout=settings.layout)
        rows = plan.rows
        recorded = {"source": str(src.resolve()), "mode": settings.mode,
                    "ratios": settings.ratios, "seed": settings.seed, "order": settings.order,
                    "layout": settings.layout,
                    **({"group_by": grouping} if grouping else {})}
        report = _plan_report(plan, recorded)
        dest.mkdir(parents=True, exist_ok=True)
        _write_report(dest, report)
        write_manifest(rows, manifest_path)  # before any file moves
    mode = report["mode"]
    for leftover in dest.rglob(f"*{PART_SUFFIX}"):
        leftover.unlink()
    delay = float(os.environ.get(_DELAY_ENV) or 0)
    if delay:  # the testing aid: one file at a time, so a kill lands between two files
        for done, row in enumerate(rows, start=1):
            transfer(row, dest, mode)
            time.sleep(delay)
            if progress:
                progress("transfer", done, len(rows))
    else:  # each transfer is idempotent and has its own temporary name: safe in threads
        moved = threaded_map(lambda row: transfer(row, dest, mode), rows,
                             threads=TRANSFER_THREADS)
        for done, _ in enumerate(moved, start=1):
            if progress and (done % 256 == 0 or done == len(rows)):
                progress("transfer", done, len(rows))
    problems = verify(rows, dest, mode)
    if problems:
        raise CrystalscopeError(
            f"split did not verify: {problems[0]} (and {len(problems) - 1} more problems)")
    report["status"] = "complete"
    _write_report(dest, report)
    return SplitResult(dest=dest, report=report)


def _counting(progress: Progress | None, stage: str,
              total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    done = 0

    def advance(step: int) -> None:
        nonlocal done
        done += step
        progress(stage, done, total)

    return advance
