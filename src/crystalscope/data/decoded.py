"""Images decoded once for a network, and the split folder they come from — below the stages,
so evaluate, export and the unknown-detector decode without importing training (Lightning).

:func:`build_cache` decodes (path, label) pairs into a (N, 3, S, S) uint8 tensor, in RAM or
memory-mapped on disk (:func:`choose_cache`); :func:`read_split_folder` reads
``train/valid/test/<class>/``. O(N) decodes, one image in flight.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from crystalscope.data.images import ImageLoadError
from crystalscope.data.layout import SPLIT_NAMES, is_image_name, list_files, split_path
from crystalscope.errors import UserError
from crystalscope.model.spec import ModelSpec, decode


@dataclass(frozen=True)
class SplitFolder:
    """A split folder's class names and, per split, its (path, label) pairs."""

    root: Path
    classes: list[str]
    items: dict[str, list[tuple[Path, int]]]

    def split(self, name: str) -> list[tuple[Path, int]]:
        """The (path, label) pairs of one split; empty when it is not there."""
        return self.items.get(name, [])

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class (the splits present). O(images)."""
        counts = {}
        for split, pairs in self.items.items():
            per_label = Counter(label for _, label in pairs)
            counts[split] = {name: per_label[index] for index, name in enumerate(self.classes)}
        return counts


def read_trained_on(root: Path, classes: list[str]) -> SplitFolder:
    """The split folder a model was trained on, as far as it is still there: each present
    split's images in folders named after the model's classes, labelled in the model's class
    order (nothing is refused: the folder may have been thinned or moved since). O(files)."""
    items = {}
    for split in SPLIT_NAMES:
        folder = split_path(root, split)
        if folder.is_dir():
            items[split] = [(path, classes.index(path.parent.name))
                            for path in list_files(folder)
                            if is_image_name(path) and path.parent.name in classes]
    return SplitFolder(root=Path(root), classes=list(classes), items=items)


def read_split_folder(root: Path, *, need: tuple[str, ...] = ("train", "valid")) -> SplitFolder:
    """Read ``root/{train,valid,test}/<class>/``; the same class names in every split."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; give the DEST folder of `crystalscope split`")
    for split in need:
        if not split_path(root, split).is_dir():
            named = "valid/ (or val/)" if split == "valid" else f"{split}/"
            raise UserError(f"{root}: has no {named} folder; make one with "
                            f"`crystalscope split IMAGES {root}`")
    present = [s for s in SPLIT_NAMES if split_path(root, s).is_dir()]
    classes_per_split = {s: sorted(d.name for d in split_path(root, s).iterdir()
                                   if d.is_dir() and not d.name.startswith("."))
                         for s in present}
    classes = classes_per_split[present[0]]
    for split, names in classes_per_split.items():
        if names != classes:
            raise UserError(f"{root}: class folders differ between splits ({present[0]}: "
                            f"{', '.join(classes)}; {split}: {', '.join(names)})")
    if len(classes) < 2:
        raise UserError(f"{root}/train: needs at least 2 class folders, found {len(classes)}")
    items = {}
    for split in present:
        items[split] = [(path, label) for label, name in enumerate(classes)
                        for path in list_files(split_path(root, split) / name)
                        if is_image_name(path)]
        if split in need:
            labelled = {label for _, label in items[split]}
            empty = [name for index, name in enumerate(classes) if index not in labelled]
            if empty:
                raise UserError(f"{root}/{split}: class folder(s) {', '.join(empty)} hold no "
                                "images")
    return SplitFolder(root=root, classes=classes, items=items)


@dataclass
class DecodedImages:
    """Images decoded once: (N, 3, S, S) uint8, their labels and paths, and what was skipped."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[Path]
    skipped: list[str]


CacheKind = Literal["auto", "ram", "disk"]


def available_memory() -> int | None:
    """Free physical memory in bytes, where the system says (None where it does not)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # e.g. Windows has no sysconf
        return None


def choose_cache(kind: CacheKind, nbytes: int) -> Literal["ram", "disk"]:
    """``auto``: a memory-mapped file once the images would fill half the free memory."""
    if kind != "auto":
        return kind
    free = available_memory()
    return "disk" if free is not None and nbytes > free // 2 else "ram"


def build_cache(items: list[tuple[Path, int]], spec: ModelSpec,
                progress: Callable[[int], None] | None = None,
                cache_file: Path | None = None) -> DecodedImages:
    """Decode every readable image once, as ``spec`` says; unreadable ones are skipped with
    the reason.

    With ``cache_file`` the images are written to that file and memory-mapped, not held in RAM.
    """
    shape = (len(items), 3, spec.input_size, spec.input_size)
    if cache_file is None or not items:
        images = torch.empty(shape, dtype=torch.uint8)
    else:  # a .npy file, so the cache can be inspected with numpy.load(mmap_mode="r")
        images = torch.from_numpy(np.lib.format.open_memmap(cache_file, mode="w+",
                                                            dtype=np.uint8, shape=shape))
    labels, paths, skipped = [], [], []
    for path, label in items:
        try:
            images[len(paths)] = torch.from_numpy(decode(path, spec)[0])
        except ImageLoadError as exc:
            skipped.append(str(exc))
        else:
            labels.append(label)
            paths.append(path)
        if progress:
            progress(1)
    return DecodedImages(images[:len(paths)], torch.tensor(labels, dtype=torch.long), paths,
                         skipped)
