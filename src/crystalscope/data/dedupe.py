"""Duplicate detection: exact copies and rotated/flipped copies of one crop.

Three fingerprints per image, each invariant to what it should ignore:

- ``sha256``: the file's bytes (exact copies);
- ``pixel_digest``: the smallest SHA-1 of the 8-bit grayscale pixels over the 8 rotations and
  flips (pixel-exact rotated/flipped copies, as in the public PG data);
- ``phash``: the smallest 64-bit perceptual hash (imagehash's DCT pHash) over the 8 rotations
  and flips (re-encoded or slightly altered rotated/flipped copies).

Files that share any fingerprint fall into one group (union-find), so a chain of copies is one
group however it was stored.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

DIHEDRAL = (
    None,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def dihedral_arrays(gray: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and flips of a 2-D array."""
    out = []
    for k in range(4):
        rotated = np.rot90(gray, k)
        out += [rotated, np.fliplr(rotated)]
    return out


def pixel_digest(gray: np.ndarray) -> str:
    """A digest of the pixels that is the same for all 8 rotations/flips of the image."""
    digests = []
    for variant in dihedral_arrays(gray):
        variant = np.ascontiguousarray(variant)
        header = f"{variant.shape[0]}x{variant.shape[1]}:".encode()
        digests.append(hashlib.sha1(header + variant.tobytes(), usedforsecurity=False).hexdigest())
    return min(digests)


def dihedral_phash(image: Image.Image) -> str:
    """The smallest pHash (16 hex digits) over the 8 rotations/flips of ``image``."""
    gray = image.convert("L")
    hashes = [
        str(imagehash.phash(gray if op is None else gray.transpose(op))) for op in DIHEDRAL
    ]
    return min(hashes)


@dataclass(frozen=True)
class Fingerprint:
    """The three fingerprints of one file (pixel ones are None for unreadable files)."""

    sha256: str
    pixel_digest: str | None = None
    phash: str | None = None


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_duplicates(fingerprints: Sequence[Fingerprint]) -> list[int]:
    """Group ids, one per fingerprint: files sharing any fingerprint get the same id.

    Ids are the index of the group's first file, so they are stable for a stable file order.
    """
    union = _UnionFind(len(fingerprints))
    for key in ("sha256", "pixel_digest", "phash"):
        first_seen: dict[str, int] = {}
        for index, fingerprint in enumerate(fingerprints):
            value = getattr(fingerprint, key)
            if value is None:
                continue
            if value in first_seen:
                union.union(first_seen[value], index)
            else:
                first_seen[value] = index
    return [union.find(i) for i in range(len(fingerprints))]


def groups_of(group_ids: Iterable[int]) -> dict[int, list[int]]:
    """Map each group id to the indices of its members, in order."""
    members: dict[int, list[int]] = defaultdict(list)
    for index, group_id in enumerate(group_ids):
        members[group_id].append(index)
    return dict(members)
