import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from crystalscope.data.check import scan_dataset, summarize
from crystalscope.data.dedupe import (
    Fingerprint,
    dihedral_arrays,
    dihedral_phash,
    group_duplicates,
    near_pairs,
    pixel_digest,
)


def test_pixel_digest_and_phash_are_invariant_under_the_8_rotations_and_flips() -> None:
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (23, 31), dtype=np.uint8)
    digests = {pixel_digest(v) for v in dihedral_arrays(array)}
    hashes = {dihedral_phash(Image.fromarray(np.ascontiguousarray(v)))
              for v in dihedral_arrays(array)}
    assert len(digests) == 1 and len(hashes) == 1
    other = rng.integers(0, 255, (23, 31), dtype=np.uint8)
    assert pixel_digest(other) not in digests
    assert dihedral_phash(Image.fromarray(other)) not in hashes


def test_batched_phashes_are_imagehash_bit_for_bit(samples: Path) -> None:
    """The 8 views hashed in one batch equal imagehash.phash of each view (the independent
    reference), on real crops and on random images of odd sizes and modes."""
    import imagehash

    from crystalscope.data.dedupe import DIHEDRAL, dihedral_phashes

    rng = np.random.default_rng(2)
    images = [Image.open(p) for p in sorted(samples.glob("*.png"))]
    images += [Image.fromarray(rng.integers(0, 256, (int(h), int(w)), dtype=np.uint8))
               for h, w in rng.integers(5, 200, (40, 2))]
    images.append(Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)))
    for image in images:
        gray = image.convert("L")
        expected = tuple(int(str(imagehash.phash(gray if op is None else gray.transpose(op))),
                             16) for op in DIHEDRAL)
        assert dihedral_phashes(image) == expected


def test_group_duplicates_joins_chains_across_fingerprints() -> None:
    h1, h2, h4 = (1,) * 8, (2**40,) * 8, (2**64 - 1,) * 8
    prints = [Fingerprint("a", "p1", h1), Fingerprint("b", "p1", h2),
              Fingerprint("c", "p3", h2), Fingerprint("d", "p4", h4),
              Fingerprint("a", None, None)]
    assert group_duplicates(prints) == [0, 0, 0, 3, 0]


def test_public_pg_copies_are_grouped_and_cex_crops_are_not(sample_classes: Path) -> None:
    scan = scan_dataset(sample_classes, workers=1)
    groups: dict[int, set[str]] = {}
    for record in scan.records:
        groups.setdefault(record.group, set()).add(record.path.name)
    multi = sorted(sorted(names) for names in groups.values() if len(names) > 1)
    assert multi == [
        ["PG (5308).png", "PG (5309).png", "PG (5310).png", "PG (5311).png", "PG (5312).png"],
        ["PG (565).png", "PG (566).png", "PG (567).png"],
    ]


def test_reencoded_rotated_copy_is_grouped_by_the_perceptual_hash(tmp_path: Path,
                                                                  samples: Path) -> None:
    for name in ("cex", "pg"):
        (tmp_path / name).mkdir()
    original = Image.open(samples / "PG (5282).png").convert("L")
    original.save(tmp_path / "pg" / "a.png")
    original.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "pg" / "b.jpg", quality=95)
    shutil.copy(samples / "CEX (1).png", tmp_path / "cex" / "c.png")
    scan = scan_dataset(tmp_path, workers=1)
    by_name = {r.path.name: r for r in scan.records}
    assert by_name["a.png"].group == by_name["b.jpg"].group != by_name["c.png"].group


def test_summary_lists_bad_files_duplicates_and_label_conflicts(sample_classes: Path) -> None:
    (sample_classes / "pg" / "zero.png").write_bytes(b"")
    (sample_classes / "pg" / "readme.txt").write_text("hello")
    shutil.copy(sample_classes / "pg" / "PG (565).png", sample_classes / "cex" / "mislabelled.png")
    report = summarize(scan_dataset(sample_classes, workers=1))
    assert report["classes"] == ["cex", "pg"]
    assert report["per_class"]["cex"]["files"] == 6
    assert report["per_class"]["pg"] == {**report["per_class"]["pg"], "files": 11,
                                         "readable": 9, "unreadable": 2}
    assert report["per_class"]["cex"]["sizes"] == {"151x151": 5, "186x211": 1}
    reasons = {Path(item["file"]).name: item["reason"] for item in report["unreadable"]}
    assert set(reasons) == {"zero.png", "readme.txt"}
    assert "empty" in reasons["zero.png"] and "not an image" in reasons["readme.txt"]
    conflicts = [g for g in report["duplicate_groups"] if g["label_conflict"]]
    assert report["label_conflicts"] == 1 and len(conflicts[0]["files"]) == 4
    assert report["duplicate_files"] == 4 + 3
    json.dumps(report)  # serialisable for --json


def test_kaggle_layout_is_found(tmp_path: Path, sample_classes: Path) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(sample_classes, archive / "cropped" / "cropped")
    scan = scan_dataset(archive, workers=1)
    assert scan.class_names == ["cex", "pg"]
    assert len(scan.records) == 14


def test_parallel_scan_equals_serial_scan(synthetic_set: Path) -> None:
    serial = scan_dataset(synthetic_set, workers=1).records
    parallel = scan_dataset(synthetic_set, workers=2).records
    assert [(r.path, r.sha256, r.phashes, r.group) for r in serial] == \
           [(r.path, r.sha256, r.phashes, r.group) for r in parallel]


def test_near_pairs_equal_a_brute_force_search() -> None:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**63, (300, 8), dtype=np.uint64)
    # plant near copies: a row whose variant 3 is row i's hash with a few bits flipped
    for i in range(0, 60, 2):
        flips = rng.choice(64, size=int(rng.integers(0, 11)), replace=False)
        noise = np.uint64(sum(1 << int(b) for b in flips))
        base[i + 1, 3] = base[i, 0] ^ noise
    for distance in (0, 3, 6, 8):
        expected = set()
        for i in range(len(base)):
            for j in range(i + 1, len(base)):
                d_ij = min(bin(int(base[i, 0]) ^ int(v)).count("1") for v in base[j])
                d_ji = min(bin(int(base[j, 0]) ^ int(v)).count("1") for v in base[i])
                if min(d_ij, d_ji) <= distance:
                    expected.add((i, j))
        assert set(near_pairs(base, distance)) == expected
        assert len(expected) > 0 or distance == 0


def _altered(image: Image.Image) -> Image.Image:
    """Rotated, 2 px cropped, 5% brighter, JPEG re-encoded."""
    import io

    out = image.transpose(Image.Transpose.ROTATE_270)
    out = out.crop((2, 1, out.width - 3, out.height - 2))
    out = Image.fromarray(np.clip(np.asarray(out, np.float32) * 1.05, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=80)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("L")


def test_altered_copies_group_and_distinct_blank_frames_do_not(tmp_path: Path) -> None:
    from crystalscope.synth.crops import SynthSettings, render_group

    for name in ("cex", "pg"):
        (tmp_path / name).mkdir()
    settings = SynthSettings(seed=2)
    for number in range(1, 6):
        for name in ("cex", "pg"):
            crop = Image.fromarray(render_group(name, number, settings)[0])
            crop.save(tmp_path / name / f"{number}.png")
            _altered(crop).save(tmp_path / name / f"{number}-copy.png")
    rng = np.random.default_rng(0)
    for number in range(6):  # distinct, nearly flat frames: one grey level, faint noise
        flat = 90 + number + rng.normal(0, 0.6, (151, 151))
        Image.fromarray(flat.round().astype(np.uint8)).save(tmp_path / "cex" / f"blank{number}.png")
    scan = scan_dataset(tmp_path, workers=1)
    group = {f"{r.class_name}/{r.path.stem}": r.group for r in scan.records}
    grouped = [group[f"{name}/{n}"] == group[f"{name}/{n}-copy"]
               for n in range(1, 6) for name in ("cex", "pg")]
    # measured: 9 of 10 (a dark crop's copy is 10 bits away); exact pHash equality: 1 of 10
    assert sum(grouped) >= 8
    originals = {group[f"{name}/{n}"] for n in range(1, 6) for name in ("cex", "pg")}
    assert len(originals) == 10  # no two distinct crops merged
    blanks = {group[f"cex/blank{n}"] for n in range(6)}
    assert len(blanks) == 6 and not blanks & originals
    assert all(r.low_texture == r.path.stem.startswith("blank") for r in scan.records)


def test_near_search_on_20000_random_hashes_stays_within_a_candidate_budget() -> None:
    """The bound, not only the answer: 7-bit blocks made every key match ~1/16 of all rows
    (about 2 x 10^8 candidate pairs here); the planned blocks check ~35 per row."""
    import tracemalloc

    from crystalscope.data.dedupe import SearchStats, plan_search

    rng = np.random.default_rng(3)
    n = 20_000
    hashes = rng.integers(0, 2**64 - 1, (n, 8), dtype=np.uint64, endpoint=True)
    hashes[1] = hashes[0] ^ np.uint64(0b1011)  # one planted near copy (3 bits)
    stats = SearchStats()
    tracemalloc.start()
    pairs = near_pairs(hashes, 8, stats)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (0, 1) in pairs
    assert stats.candidates <= 100 * n  # linear in N: ~50 per row expected for random hashes
    assert stats.candidates <= 3 * n * plan_search(n, 8).expected_candidates(n)
    assert peak < 128 * 2**20  # bucket offsets (2**22) and one query chunk; no N x N


def test_group_duplicates_memory_is_bounded_by_the_files_not_their_square() -> None:
    """Identical hash rows (a cluster of 3,000 copies) are joined directly, so grouping them
    checks no N^2 pairs and holds no N^2 edges."""
    import tracemalloc

    from crystalscope.data.dedupe import SearchStats, plan_search

    rng = np.random.default_rng(4)
    distinct = rng.integers(0, 2**64 - 1, (5_000, 8), dtype=np.uint64, endpoint=True)
    copy = tuple(int(v) for v in distinct[0])
    prints = [Fingerprint(f"s{i}", f"p{i}", tuple(int(v) for v in row))
              for i, row in enumerate(distinct)]
    prints += [Fingerprint(f"c{i}", f"q{i}", copy) for i in range(3_000)]
    stats = SearchStats()
    tracemalloc.start()
    groups = group_duplicates(prints, stats=stats)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert groups[5_000:] == [0] * 3_000 and groups[0] == 0
    assert len(set(groups)) == 5_000
    # searched 3,000 identical rows would add 3,000 x 3,000 x 8 entries per block (~4 x 10^8)
    assert stats.candidates <= 3 * len(distinct) * plan_search(5_000, 8).expected_candidates(5_000)
    assert peak < 96 * 2**20
