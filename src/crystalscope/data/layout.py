"""Class folders: a data set is a folder holding one sub-folder of images per class.

Class names come from folder names, never from a fixed list. The Kaggle layout
``archive/cropped/cropped/{cex,pg}`` is found by descending through folders that hold a single
sub-folder and no images.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from crystalscope.data.images import IMAGE_EXTENSIONS
from crystalscope.errors import UserError

SPLIT_NAMES = ("train", "valid", "test")
# The folder each split is written to, per layout: crystalscope's own, or the train/val/test of
# torchvision's ImageFolder recipes and Ultralytics' classification data sets.
SPLIT_LAYOUTS = {"crystalscope": {"train": "train", "valid": "valid", "test": "test"},
                 "ultralytics": {"train": "train", "valid": "val", "test": "test"}}
VALID_ALIAS = "val"


def split_folder_name(split: str, layout: str = "crystalscope") -> str:
    """The folder ``split`` is written to in ``layout`` (``SPLIT_LAYOUTS``)."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split {split!r}: one of {', '.join(SPLIT_NAMES)}")
    return SPLIT_LAYOUTS[layout][split]


def split_path(root: Path, split: str) -> Path:
    """``root/<split>``: the one place a split folder's sub-folders are named (writing them is
    data/split.py's, reading them data/decoded.py's :class:`SplitFolder`). The validation
    split is ``root/valid``, or ``root/val`` when only that is there (the ImageFolder and
    Ultralytics name)."""
    path = Path(root) / split_folder_name(split)
    if split == "valid" and not path.is_dir() and (Path(root) / VALID_ALIAS).is_dir():
        return Path(root) / VALID_ALIAS
    return path


@dataclass(frozen=True)
class ClassFolder:
    """One class: its name (the folder name) and its files, sorted by path."""

    name: str
    path: Path
    files: tuple[Path, ...]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def list_files(folder: Path) -> list[Path]:
    """Every regular file below ``folder`` (recursively; not into linked folders), sorted by
    relative path; hidden files and folders skipped.

    One directory listing per folder; a file's type comes from the listing (a stat only for
    links), so a folder of 10^6 crops costs 10^6 names, not 10^6 stats: O(N log N) with the
    sort.
    """
    found: list[tuple[str, Path]] = []
    pending: list[tuple[str, str]] = [(str(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((entry.path, f"{prefix}{entry.name}/"))
                    elif entry.is_file():
                        found.append((prefix + entry.name, Path(entry.path)))
        except OSError:  # unreadable or vanished folder: nothing listed from it, as rglob
            continue
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def is_image_name(path: Path) -> bool:
    """True if the file name has an image extension (the content is checked when read)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_class_root(root: Path) -> Path:
    """Return the folder whose sub-folders are the classes.

    Descends through folders that hold exactly one sub-folder and no files, so that
    ``archive/`` from Kaggle resolves to ``archive/cropped/cropped``; a sub-folder that holds
    images itself is a class (a data set of one class), so the descent stops above it.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such folder")
    if not root.is_dir():
        raise UserError(f"{root}: is a file; give a folder that holds one sub-folder per class")
    current = root
    while True:
        children = [c for c in current.iterdir() if _visible(c)]
        subdirs = [c for c in children if c.is_dir()]
        if (len(subdirs) == 1 and not any(c.is_file() for c in children)
                and not any(is_image_name(p) for p in subdirs[0].iterdir() if p.is_file())):
            current = subdirs[0]
            continue
        return current


def read_class_folders(root: Path, *, min_classes: int = 2) -> list[ClassFolder]:
    """Read the class folders below ``root``; refuse too few classes or an empty class."""
    class_root = find_class_root(root)
    subdirs = sorted((c for c in class_root.iterdir() if c.is_dir() and _visible(c)),
                     key=lambda p: p.name)
    classes = [ClassFolder(d.name, d, tuple(list_files(d))) for d in subdirs]
    if len(classes) < min_classes:
        found = ", ".join(c.name for c in classes) or "none"
        loose = [p for p in class_root.iterdir() if p.is_file() and is_image_name(p)]
        if loose:
            found += f"; {len(loose)} images lie directly in it"
        raise UserError(
            f"{class_root}: found {len(classes)} class folder(s) ({found}); need at least "
            f"{min_classes}, one sub-folder of images per class (e.g. {root}/cex, {root}/pg)"
        )
    empty = [c.name for c in classes if not c.files]
    if empty:
        raise UserError(
            f"{class_root}: class folder(s) {', '.join(empty)} hold no files; "
            "remove them or add images"
        )
    return classes


def count_files(root: Path) -> int:
    """How many files the class folders under ``root`` hold."""
    return sum(len(c.files) for c in read_class_folders(root))


def expand_paths(paths: list[str] | list[Path]) -> list[Path]:
    """Files, folders (their images, recursively) and globs -> image paths, in given order.

    A file named explicitly is kept whatever its extension (reading it says if it is no
    image); a name that matches nothing is an error.
    """
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given)
        if path.is_file():
            found[path] = None
        elif path.is_dir():
            found.update(dict.fromkeys(p for p in list_files(path) if is_image_name(p)))
        elif any(ch in str(given) for ch in "*?["):
            # glob.glob, not Path.glob: the pattern may be absolute or start with '..'
            matches = sorted(glob.glob(str(given), recursive=True))  # noqa: PTH207
            if not matches:
                raise UserError(f"{given}: matches no files")
            for match in map(Path, matches):
                if match.is_dir():
                    found.update(dict.fromkeys(p for p in list_files(match) if is_image_name(p)))
                elif is_image_name(match):
                    found[match] = None
        else:
            raise UserError(f"{given}: no such file or folder")
    if not found:
        raise UserError(f"no images found in {', '.join(map(str, paths))}")
    return list(found)
