"""`split --group-by`: crops that must stay in one split because they share a source — cut from
one frame, or taken in one session — named by a regular expression over their paths or by a
column of a CSV.

A key joins the duplicate groups of the files that carry it (union-find over both kinds of
edge), so a session that holds a rotated copy of another session's crop puts both sessions in
one split. Files without a key stay in their own (duplicate) group. Cost: O(N) to compute the
keys and O(N) memory for the union (:class:`~crystalscope.data.dedupe.Components`).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystalscope.data.check import DatasetScan
from crystalscope.data.dedupe import Components, same_value_edges
from crystalscope.data.layout import find_class_root
from crystalscope.errors import UserError


@dataclass(frozen=True)
class GroupKeys:
    """One key per file (None: the file has none) and where they came from."""

    keys: list[str | None]
    source: str  # "regex …" or "csv …:column"

    @property
    def missing(self) -> int:
        return sum(key is None for key in self.keys)

    @property
    def distinct(self) -> int:
        return len({key for key in self.keys if key is not None})


def keys_from_regex(names: Sequence[str], pattern: str) -> GroupKeys:
    """Each name's key: the first capture group of ``pattern`` (searched in the name), or the
    whole match when the pattern has no group; None when it does not match."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--group-by {pattern!r}: not a regular expression ({exc})") from None
    keys: list[str | None] = []
    for name in names:
        found = compiled.search(name)
        keys.append(None if found is None else
                    found.group(1) if compiled.groups else found.group(0))
    return GroupKeys(keys, f"regex {pattern}")


def keys_from_csv(names: Sequence[str], table: Path, column: str) -> GroupKeys:
    """Each name's key from ``table``: a CSV with a ``file`` column (the path as ``names``
    gives it: relative to the class folders' parent, with forward slashes) and ``column``."""
    try:
        with Path(table).open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            if "file" not in fields or column not in fields:
                raise UserError(f"{table}: needs the columns file and {column} (it has "
                                f"{', '.join(fields) or 'none'})")
            by_file = {row["file"].replace("\\", "/").strip(): (row[column] or "").strip()
                       for row in reader}
    except OSError as exc:
        raise UserError(f"{table}: cannot read it ({exc.strerror or exc})") from None
    keys = [by_file.get(name) or None for name in names]
    return GroupKeys(keys, f"csv {Path(table).name}:{column}")


def join_groups(groups: Sequence[int], keys: Sequence[str | None]) -> list[int]:
    """Group ids after joining the files that share a key: each file's new id is the smallest
    index in its joined group (ids stay indices of a group's first file). O(N)."""
    n = len(groups)
    components = Components(n)
    components.add(np.asarray(groups, dtype=np.int64), np.arange(n, dtype=np.int64))
    components.add(*same_value_edges(list(keys)))
    return components.roots().tolist()


def apply_group_keys(scan: DatasetScan, group_by: str | None, group_file: Path | None,
                     group_column: str) -> dict | None:
    """Join the scan's duplicate groups by ``group_by`` (a regular expression over each
    file's path relative to the class folders' parent, e.g. ``cex/session3/f12_c4.png``) or by
    ``group_file``'s ``group_column`` (one of them: ``SplitSettings`` checks it); what was
    done, for split.json (None: neither)."""
    if group_by is None and group_file is None:
        return None
    parent = find_class_root(scan.root)
    names = [r.path.relative_to(parent).as_posix() for r in scan.records]
    keys = (keys_from_regex(names, group_by) if group_by is not None
            else keys_from_csv(names, group_file, group_column))  # type: ignore[arg-type]
    if keys.distinct == 0:
        raise UserError(f"{keys.source}: gives no file a group (e.g. {names[0]!r}); check it "
                        "against the paths, which are relative to the class folders' parent")
    for record, group in zip(scan.records, join_groups([r.group for r in scan.records],
                                                       keys.keys), strict=True):
        record.group = group
    return {"source": keys.source, "groups": keys.distinct, "files_without_group": keys.missing}
