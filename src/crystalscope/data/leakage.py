"""Leakage between the splits of a folder that `split` did not make: the same crop, a rotated
or flipped copy of it, or a near-duplicate in two of train/valid/test.

`split` keeps every duplicate group in one split; hand-made splits, or crops labelled again
into ``train/``, do not. :func:`find_split_overlap` fingerprints the splits with the hashes
`split` uses (:mod:`crystalscope.data.dedupe`) and returns the groups that cross a split
boundary. Cost: every file read once (in parallel) and the linear near-duplicate search, so
O(N) time and memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crystalscope.data.check import FileRecord, assign_groups, inspect_tree
from crystalscope.data.dedupe import groups_of
from crystalscope.data.layout import SPLIT_NAMES, split_path


@dataclass(frozen=True)
class OverlapGroup:
    """Files of one duplicate group that lie in more than one split."""

    splits: tuple[str, ...]
    files: tuple[Path, ...]
    exact: bool  # the same bytes (else rotated/flipped or near)


def find_split_overlap(data: Path, *, workers: int | None = None) -> list[OverlapGroup]:
    """The duplicate groups that span two or more of ``data``'s split folders."""
    records: list[FileRecord] = []
    split_of: list[str] = []
    for split in SPLIT_NAMES:
        folder = split_path(data, split)
        if not folder.is_dir():
            continue
        _, found = inspect_tree(folder, workers=workers, min_classes=1)
        records += found
        split_of += [split] * len(found)
    assign_groups(records)
    overlaps = []
    for members in groups_of(r.group for r in records).values():
        splits = tuple(sorted({split_of[i] for i in members}, key=SPLIT_NAMES.index))
        if len(splits) > 1:
            overlaps.append(OverlapGroup(splits, tuple(records[i].path for i in members),
                                         len({records[i].sha256 for i in members}) == 1))
    return overlaps


def describe_overlap(groups: list[OverlapGroup], data: Path) -> str:
    """One line: how many crops are shared between which splits, with one example."""
    files = sum(len(g.files) for g in groups)
    pairs = sorted({"/".join(g.splits) for g in groups})
    example = groups[0]
    shown = " = ".join(str(p.relative_to(data)) if p.is_relative_to(data) else str(p)
                       for p in example.files[:2])
    return (f"{len(groups)} crop(s) appear in more than one split ({files} files, "
            f"{'; '.join(pairs)}; e.g. {shown}, "
            f"{'the same bytes' if example.exact else 'a rotated, flipped or near copy'})")
