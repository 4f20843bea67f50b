"""Duplicate detection: exact copies and rotated/flipped copies of one crop.

Three fingerprints per image, each invariant to what it should ignore:

- ``sha256``: the file's bytes (exact copies);
- ``pixel_digest``: the smallest SHA-1 of the 8-bit grayscale pixels over the 8 rotations and
  flips (pixel-exact rotated/flipped copies, as in the public PG data);
- ``phashes``: the 64-bit perceptual hashes (imagehash's DCT pHash) of the 8 rotations and
  flips: two files whose hashes differ in at most ``max_distance`` bits (Hamming distance, the
  first file's hash against any of the second's 8) are near-duplicates — re-encoded, slightly
  cropped or brightened rotated/flipped copies.

Low-texture images (nearly flat or blank: the grey levels of a 32 x 32 thumbnail vary by less
than ``LOW_TEXTURE_STD``) have pHashes made of noise, so they are grouped by exact bytes and
pixels only. Files that share any fingerprint fall into one group (union-find), so a chain of
copies is one group however it was stored. Near pairs are found with a multi-index search: the
64 bits are cut into ``max_distance + 1`` blocks, and two hashes within that distance agree
exactly on at least one block (pigeonhole), so only hashes that share a block are compared.
"""

from __future__ import annotations

import hashlib
import itertools
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


PHASH_DISTANCE = 8  # bits of 64; measured in benchmarks/dedupe.py
LOW_TEXTURE_STD = 3.0  # grey levels, on a 32 x 32 thumbnail


def dihedral_phashes(image: Image.Image) -> tuple[int, ...]:
    """The 64-bit pHashes of the 8 rotations/flips of ``image`` (the image itself first)."""
    gray = image.convert("L")
    return tuple(int(str(imagehash.phash(gray if op is None else gray.transpose(op))), 16)
                 for op in DIHEDRAL)


def dihedral_phash(image: Image.Image) -> str:
    """The smallest pHash (16 hex digits) over the 8 rotations/flips of ``image``."""
    return f"{min(dihedral_phashes(image)):016x}"


def is_low_texture(image: Image.Image) -> bool:
    """Nearly flat: its 32 x 32 grey thumbnail's standard deviation is under LOW_TEXTURE_STD."""
    thumbnail = image.convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    return float(np.asarray(thumbnail, np.float32).std()) < LOW_TEXTURE_STD


@dataclass(frozen=True)
class Fingerprint:
    """The fingerprints of one file (pixel ones are None for unreadable files, and phashes
    None for low-texture images)."""

    sha256: str
    pixel_digest: str | None = None
    phashes: tuple[int, ...] | None = None


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


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes (broadcast)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def near_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """Pairs (i < j) whose hash i is within ``max_distance`` bits of any of j's 8 variants.

    ``hashes`` is (N, 8) uint64: each row the 8 rotations/flips of one image, itself first.
    """
    n = len(hashes)
    if n < 2:
        return []
    blocks = max_distance + 1
    edges = np.linspace(0, 64, blocks + 1).round().astype(int)
    candidates: set[tuple[int, int]] = set()
    for start, stop in itertools.pairwise(edges.tolist()):
        mask = np.uint64((1 << int(stop - start)) - 1)
        keys = (hashes >> np.uint64(start)) & mask  # (N, 8)
        table: dict[int, list[int]] = defaultdict(list)
        for j, row in enumerate(keys.tolist()):
            for key in set(row):
                table[key].append(j)
        for i, key in enumerate(keys[:, 0].tolist()):
            candidates.update((min(i, j), max(i, j)) for j in table[key] if j != i)
    if not candidates:
        return []
    pairs = np.array(sorted(candidates))
    first, second = hashes[pairs[:, 0]], hashes[pairs[:, 1]]
    distance = np.minimum(hamming(first[:, :1], second).min(axis=1),
                          hamming(second[:, :1], first).min(axis=1))
    return [tuple(p) for p in pairs[distance <= max_distance].tolist()]


def group_duplicates(fingerprints: Sequence[Fingerprint], *,
                     max_distance: int = PHASH_DISTANCE) -> list[int]:
    """Group ids, one per fingerprint: files sharing any fingerprint get the same id.

    Ids are the index of the group's first file, so they are stable for a stable file order.
    """
    union = _UnionFind(len(fingerprints))
    for key in ("sha256", "pixel_digest"):
        first_seen: dict[str, int] = {}
        for index, fingerprint in enumerate(fingerprints):
            value = getattr(fingerprint, key)
            if value is None:
                continue
            if value in first_seen:
                union.union(first_seen[value], index)
            else:
                first_seen[value] = index
    hashed = [i for i, f in enumerate(fingerprints) if f.phashes is not None]
    if hashed:
        table = np.array([fingerprints[i].phashes for i in hashed], dtype=np.uint64)
        for a, b in near_pairs(table, max_distance):
            union.union(hashed[a], hashed[b])
    return [union.find(i) for i in range(len(fingerprints))]


def groups_of(group_ids: Iterable[int]) -> dict[int, list[int]]:
    """Map each group id to the indices of its members, in order."""
    members: dict[int, list[int]] = defaultdict(list)
    for index, group_id in enumerate(group_ids):
        members[group_id].append(index)
    return dict(members)
