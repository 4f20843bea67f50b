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


def test_group_duplicates_joins_chains_across_fingerprints() -> None:
    prints = [Fingerprint("a", "p1", "h1"), Fingerprint("b", "p1", "h2"),
              Fingerprint("c", "p3", "h2"), Fingerprint("d", "p4", "h4"),
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
    assert [(r.path, r.sha256, r.phash, r.group) for r in serial] == \
           [(r.path, r.sha256, r.phash, r.group) for r in parallel]
