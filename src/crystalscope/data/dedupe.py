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
64 bits are cut into a few blocks of about 21 bits (:func:`plan_search`), two hashes within the
distance differ by at most ``radius`` bits in at least one block (pigeonhole), so only hashes
whose block lies within that radius are compared. The cost grows as N x (probes + N x 8 /
2**21) rather than N^2, and the groups are kept as connected components in O(N) memory.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    """The 64-bit pHashes of the 8 rotations/flips of ``image`` (the image itself first).

    Bit for bit imagehash's DCT pHash (32 x 32 LANCZOS thumbnail, 2-D DCT, the 8 x 8 lowest
    frequencies against their median), computed for the 8 views in one batch: a scan of 10^6
    files spends most of its time here.
    """
    import scipy.fftpack

    gray = image.convert("L")
    thumbnails = np.stack([np.asarray((gray if op is None else gray.transpose(op)).resize(
        (32, 32), Image.Resampling.LANCZOS)) for op in DIHEDRAL])
    dct = scipy.fftpack.dct(scipy.fftpack.dct(thumbnails, axis=1), axis=2)[:, :8, :8]
    bits = dct.reshape(8, 64) > np.median(dct.reshape(8, 64), axis=1, keepdims=True)
    return tuple(int(v) for v in np.packbits(bits, axis=1).view(">u8").reshape(8))


def dihedral_phash(image: Image.Image) -> str:
    """The smallest pHash (16 hex digits) over the 8 rotations/flips of ``image``."""
    return f"{min(dihedral_phashes(image)):016x}"


def is_low_texture(image: Image.Image) -> bool:
    """Nearly flat: its 32 x 32 grey thumbnail's standard deviation is under LOW_TEXTURE_STD."""
    thumbnail = image.convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    return float(np.asarray(thumbnail, np.float32).std()) < LOW_TEXTURE_STD


PHashes = tuple[int, ...] | bytes  # the 8 hashes, or packed by pack_phashes


def pack_phashes(hashes: tuple[int, ...]) -> bytes:
    """The 8 hashes as 64 little-endian bytes: ~100 bytes a file instead of ~400 for a tuple of
    Python ints, which counts when a scan holds 10^6 files."""
    return np.array(hashes, dtype="<u8").tobytes()


def hash_table(rows: Sequence[PHashes]) -> np.ndarray:
    """(N, 8) uint64 from hash tuples or packed bytes."""
    if all(isinstance(r, bytes) for r in rows):
        return np.frombuffer(b"".join(rows), dtype="<u8").reshape(-1, 8).astype(np.uint64)
    return np.array([np.frombuffer(r, dtype="<u8") if isinstance(r, bytes) else r
                     for r in rows], dtype=np.uint64).reshape(-1, 8)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The fingerprints of one file (pixel ones are None for unreadable files, and phashes
    None for low-texture images)."""

    sha256: str
    pixel_digest: str | None = None
    phashes: PHashes | None = None


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes (broadcast)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


HASH_BITS = 64
MAX_BLOCK_BITS = 22  # a block's bucket table has 2**bits offsets: 32 MiB at 22 bits
QUERY_CHUNK = 2048  # query rows per step: bounds each step's candidate arrays


@dataclass(frozen=True)
class SearchPlan:
    """How the 64 bits are cut for a multi-index search within ``max_distance`` bits.

    Two hashes within ``max_distance`` bits differ by at most ``radius`` bits in at least one
    of the blocks (generalised pigeonhole: ``len(widths) * (radius + 1) > max_distance``), so
    each query probes, per block, every key within ``radius`` bits of its own.
    """

    widths: tuple[int, ...]
    radius: int

    @property
    def probes(self) -> int:
        """Keys probed per query row, over all blocks."""
        return sum(sum(math.comb(w, r) for r in range(self.radius + 1)) for w in self.widths)

    def expected_candidates(self, rows: int, variants: int = 8) -> float:
        """Candidates per query row for uniformly random hashes: the cost model."""
        return sum(sum(math.comb(w, r) for r in range(self.radius + 1)) * variants * rows / 2**w
                   for w in self.widths)


def plan_search(rows: int, max_distance: int, variants: int = 8) -> SearchPlan:
    """The block cut with the least expected work for ``rows`` hashes of ``variants`` each.

    Cost per query row: keys probed plus candidates found (each a table look-up and one
    popcount). Narrow blocks make each key match ~``variants * rows / 2**bits`` rows (the
    quadratic trap of 7-bit blocks at distance 8); wide blocks need many probes. At distance
    8 and 10^4-10^6 rows this picks 3 blocks of 21-22 bits probed within 2 bits.
    """
    if max_distance < 0 or max_distance >= HASH_BITS:
        raise ValueError(f"max_distance must be in 0..{HASH_BITS - 1}, got {max_distance}")
    best: tuple[float, SearchPlan] | None = None
    for blocks in range(1, HASH_BITS + 1):
        edges = np.linspace(0, HASH_BITS, blocks + 1).round().astype(int)
        widths = tuple(int(b - a) for a, b in itertools.pairwise(edges.tolist()))
        if max(widths) > MAX_BLOCK_BITS:
            continue
        plan = SearchPlan(widths, max_distance // blocks)
        cost = plan.probes + plan.expected_candidates(rows, variants)
        if best is None or cost < best[0]:
            best = (cost, plan)
    assert best is not None  # 3 or more blocks are always narrow enough
    return best[1]


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit mask with at most ``radius`` bits set (0 first)."""
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(width), r)]
    return np.array(masks, dtype=np.int64)


@dataclass
class SearchStats:
    """What a near-duplicate search did: candidate pairs checked, and pairs found."""

    candidates: int = 0
    pairs: int = 0


def _near_edges(hashes: np.ndarray, max_distance: int, stats: SearchStats | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Edges (i, j), i != j, where row i's hash (column 0) is within ``max_distance`` bits of
    one of row j's 8 variants; in chunks, each pair possibly more than once.

    Cost: O(N x probes + candidates) time, candidates ~ N x plan.expected_candidates(N) for
    random hashes (see :func:`plan_search`); memory O(N x variants + 2**22 + chunk), never
    O(N^2). Each candidate is checked on the one variant whose block matched.
    """
    n, variants = hashes.shape
    plan = plan_search(n, max_distance, variants)
    flat = hashes.reshape(-1)  # entry e = row e // variants, variant e % variants
    shift = 0
    for width in plan.widths:
        mask, offset = np.uint64((1 << width) - 1), np.uint64(shift)
        shift += width
        keys = ((flat >> offset) & mask).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        offsets = np.zeros((1 << width) + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys, minlength=1 << width), out=offsets[1:])
        del keys
        flips = _flip_masks(width, plan.radius)
        query_keys = ((hashes[:, 0] >> offset) & mask).astype(np.int64)
        for first in range(0, n, QUERY_CHUNK):
            rows = np.arange(first, min(first + QUERY_CHUNK, n))
            probed = (query_keys[rows, None] ^ flips[None, :]).reshape(-1)
            lo, hi = offsets[probed], offsets[probed + 1]
            counts = hi - lo
            total = int(counts.sum())
            if total == 0:
                continue
            # ragged arange: the positions lo[k] .. hi[k]-1 of every probe k, concatenated
            steps = np.ones(total, dtype=np.int64)
            nonempty = counts > 0
            heads = np.cumsum(counts)[nonempty] - counts[nonempty]
            steps[heads] = lo[nonempty] - np.concatenate(([0], hi[nonempty][:-1] - 1))
            entries = order[np.cumsum(steps)]
            query = np.repeat(np.repeat(rows, len(flips)), counts)
            other = entries // variants
            close = (np.bitwise_count(hashes[query, 0] ^ flat[entries]) <= max_distance) \
                & (other != query)
            if stats is not None:
                stats.candidates += total
            if close.any():
                yield query[close], other[close]


def near_pairs(hashes: np.ndarray, max_distance: int,
               stats: SearchStats | None = None) -> list[tuple[int, int]]:
    """Pairs (i < j) whose hash i is within ``max_distance`` bits of any of j's 8 variants
    (or j's of i's), sorted.

    ``hashes`` is (N, 8) uint64: each row the 8 rotations/flips of one image, itself first.
    A multi-index search (:func:`plan_search`); the pairs themselves are held, so use it where
    their number is small, and :func:`group_duplicates` (bounded memory) for grouping.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if len(hashes) < 2:
        return []
    found = [np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
             for a, b in _near_edges(hashes, max_distance, stats)]
    if not found:
        return []
    pairs = np.unique(np.concatenate(found), axis=0)
    if stats is not None:
        stats.pairs = len(pairs)
    return [(int(a), int(b)) for a, b in pairs]


class Components:
    """Connected components of a growing edge set in O(N) memory: edges are folded into a
    star per component (each node to its component's smallest node) whenever they pile up."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sources: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.pending = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.sources.append(np.asarray(a, dtype=np.int64))
        self.targets.append(np.asarray(b, dtype=np.int64))
        self.pending += len(a)
        if self.pending > 4 * self.n + 1_000_000:
            root = self.roots()
            self.sources, self.targets = [np.arange(self.n)], [root]
            self.pending = self.n

    def roots(self) -> np.ndarray:
        """Per node, the smallest node of its component."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if not self.sources:
            return np.arange(self.n)
        a, b = np.concatenate(self.sources), np.concatenate(self.targets)
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(self.n, self.n))
        _, labels = connected_components(graph, directed=False)
        smallest = np.full(labels.max() + 1, self.n, dtype=np.int64)
        np.minimum.at(smallest, labels, np.arange(self.n))
        return smallest[labels]


def same_value_edges(values: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Edges from each file to the first file with the same (non-None) value: O(N)."""
    first_seen: dict[str, int] = {}
    a, b = [], []
    for index, value in enumerate(values):
        if value is None:
            continue
        first = first_seen.setdefault(value, index)
        if first != index:
            a.append(first)
            b.append(index)
    return np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)


def group_duplicates(fingerprints: Sequence[Fingerprint], *,
                     max_distance: int = PHASH_DISTANCE,
                     stats: SearchStats | None = None) -> list[int]:
    """Group ids, one per fingerprint: files sharing any fingerprint get the same id.

    Ids are the index of the group's first file, so they are stable for a stable file order.
    Cost: O(N) for exact bytes and pixels; the near search as :func:`_near_edges` on the
    distinct hash rows (identical rows are joined directly); memory O(N).
    """
    n = len(fingerprints)
    components = Components(n)
    for key in ("sha256", "pixel_digest"):
        components.add(*same_value_edges([getattr(f, key) for f in fingerprints]))
    hashed = np.array([i for i, f in enumerate(fingerprints) if f.phashes is not None],
                      dtype=np.int64)
    if len(hashed) > 1:
        table = hash_table([fingerprints[i].phashes for i in hashed])  # type: ignore[misc]
        distinct, first, inverse = np.unique(table, axis=0, return_index=True,
                                             return_inverse=True)
        inverse = inverse.reshape(-1)
        components.add(hashed[first[inverse]], hashed)  # identical rows: one group
        representative = hashed[first]
        for a, b in _near_edges(distinct, max_distance, stats):
            components.add(representative[a], representative[b])
    return components.roots().tolist()


def groups_of(group_ids: Iterable[int]) -> dict[int, list[int]]:
    """Map each group id to the indices of its members, in order."""
    members: dict[int, list[int]] = defaultdict(list)
    for index, group_id in enumerate(group_ids):
        members[group_id].append(index)
    return dict(members)
