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

from crystalscope.data.dedupe import Components, same_value_edges
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
