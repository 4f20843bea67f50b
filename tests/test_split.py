import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import pytest

from crystalscope.data.dedupe import file_sha256
from crystalscope.data.split import (
    MANIFEST_NAME,
    minimum_class_size,
    read_manifest,
    split_counts,
    split_dataset,
)
from crystalscope.data.split_settings import SplitSettings, parse_ratios
from crystalscope.errors import CrystalscopeError, UserError

DEFAULT = parse_ratios("0.70,0.25,0.05")


def test_published_counts_are_reproduced() -> None:
    assert split_counts(6860, DEFAULT) == {"train": 4802, "valid": 1715, "test": 343}
    assert split_counts(6804, DEFAULT) == {"train": 4762, "valid": 1701, "test": 341}


def test_counts_are_exact_floors() -> None:
    for n in range(1, 20_000):
        train, valid = n * 70 // 100, n * 25 // 100  # integer arithmetic: independent reference
        assert split_counts(n, DEFAULT) == {"train": train, "valid": valid,
                                            "test": n - train - valid}


def test_exact_arithmetic_avoids_the_float_rounding_of_the_original_script() -> None:
    # The original computed int(330 * 0.70) == 230 because 330 * 0.70 == 230.99999999999997.
    assert int(330 * 0.70) == 230
    assert split_counts(330, DEFAULT)["train"] == 231


def test_ratio_parsing() -> None:
    assert parse_ratios("0.8, 0.2, 0") == (Fraction(4, 5), Fraction(1, 5), Fraction(0))
    for bad in ("0.7,0.3", "0.5,0.5,0.5", "a,b,c", "0,0.5,0.5", "0.9,0.2,-0.1"):
        with pytest.raises(UserError, match="ratios") as error:
            parse_ratios(bad)
        assert error.value.for_flags().startswith("--ratios ")  # type: ignore[attr-defined]
    assert minimum_class_size(DEFAULT) == 4  # 2/1/1


def _by_split(dest: Path) -> dict[str, set[str]]:
    rows = read_manifest(dest / MANIFEST_NAME)
    return {split: {r.dest for r in rows if r.split == split}
            for split in ("train", "valid", "test")}


def test_groups_never_straddle_splits_and_counts_move_by_fewest_files(
        synthetic_set: Path, tmp_path: Path) -> None:
    dest = tmp_path / "splits"
    result = split_dataset(synthetic_set, dest, SplitSettings(seed=5), workers=1)
    rows = read_manifest(dest / MANIFEST_NAME)
    splits_of_group = defaultdict(set)
    for row in rows:
        splits_of_group[row.group].add(row.split)
    assert all(len(s) == 1 for s in splits_of_group.values())
    # 60 PG files in groups of 3 -> targets 42/15/3 are all multiples of 3: no file moves
    assert result.report["counts"]["pg"] == {"train": 42, "valid": 15, "test": 3}
    assert result.report["counts"]["cex"] == {"train": 42, "valid": 15, "test": 3}
    assert result.report["files_moved_by_groups"] == 0
    assert result.report["duplicate_groups"] == 20
    # every file copied, verified, sources untouched
    for row in rows:
        assert file_sha256(dest / row.dest) == row.sha256
        assert Path(row.source).is_file()
    assert (dest / "train" / "pg").is_dir() and (dest / "test" / "cex").is_dir()


def test_uneven_groups_move_only_the_unavoidable_files(sample_classes: Path,
                                                       tmp_path: Path) -> None:
    # PG: 9 files = groups of 5 and 3 and one single; targets 6/2/1
    dest = tmp_path / "s"
    result = split_dataset(sample_classes, dest, SplitSettings(seed=0), workers=1)
    counts = result.report["counts"]["pg"]
    assert sum(counts.values()) == 9
    # 5 + 1 fill train (6); the group of 3 fits nowhere whole: it goes to valid (room 2).
    # That would leave test without PG, so the single file moves from train to test: with 3
    # groups, every split holds the class.
    assert counts == {"train": 5, "valid": 3, "test": 1}
    assert result.report["files_moved_by_groups"] == 1


@pytest.mark.parametrize("sizes", [(5, 5, 5), (4, 4, 4, 1), (9, 1, 1), (6, 3, 3, 3), (2, 2, 2)])
def test_every_split_holds_a_class_of_at_least_three_groups(sizes: tuple[int, ...]) -> None:
    from crystalscope.data.split import _assign_units

    units, start = {}, 0
    for group, size in enumerate(sizes):
        units[group] = list(range(start, start + size))
        start += size
    target = split_counts(start, DEFAULT)
    assignment, count = _assign_units(units, target, {})
    assert all(count[s] > 0 for s in ("train", "valid", "test")), (sizes, count)
    assert sorted(assignment) == list(range(start))  # every file placed once
    by_group = {g: {assignment[i] for i in members} for g, members in units.items()}
    assert all(len(s) == 1 for s in by_group.values())  # groups stay whole


def test_same_seed_same_split_other_seed_other_split(synthetic_set: Path, tmp_path: Path) -> None:
    first = _by_split(split_dataset(synthetic_set, tmp_path / "a", SplitSettings(seed=1),
                                    workers=1).dest)
    again = _by_split(split_dataset(synthetic_set, tmp_path / "b", SplitSettings(seed=1),
                                    workers=1).dest)
    other = _by_split(split_dataset(synthetic_set, tmp_path / "c", SplitSettings(seed=2),
                                    workers=1).dest)
    assert first == again
    assert first != other


def test_sorted_order_reproduces_the_original_lexicographic_split(tmp_path: Path) -> None:
    src = tmp_path / "src"
    from crystalscope.synth.crops import SynthSettings, synthesize

    synthesize(src, SynthSettings(per_class=23, size=40, seed=9), workers=1)
    result = split_dataset(src, tmp_path / "dest", SplitSettings(order="sorted"), workers=1)
    assert result.report["files_moved_by_groups"] == 0
    splits = _by_split(result.dest)
    for name in ("cex", "pg"):
        files = sorted(os.listdir(src / name))  # noqa: PTH208 - the original project's ordering
        train, valid = int(len(files) * 0.7), int(len(files) * 0.25)
        expected = {"train": files[:train], "valid": files[train:train + valid],
                    "test": files[train + valid:]}
        for split, names in expected.items():
            assert {f"{split}/{name}/{n}" for n in names} == \
                   {d for d in splits[split] if d.startswith(f"{split}/{name}/")}


def test_link_mode_makes_hard_links(synthetic_copy: Path, tmp_path: Path) -> None:
    dest = tmp_path / "linked"
    split_dataset(synthetic_copy, dest, SplitSettings(mode="link"), workers=1)
    row = read_manifest(dest / MANIFEST_NAME)[0]
    assert (dest / row.dest).stat().st_ino == Path(row.source).stat().st_ino


def test_move_mode_moves_everything(synthetic_copy: Path, tmp_path: Path) -> None:
    dest = tmp_path / "moved"
    split_dataset(synthetic_copy, dest, SplitSettings(mode="move"), workers=1)
    rows = read_manifest(dest / MANIFEST_NAME)
    assert len(rows) == 120
    assert not any(Path(r.source).exists() for r in rows)
    assert all(file_sha256(dest / r.dest) == r.sha256 for r in rows)


def test_kill_during_move_loses_nothing_and_resume_finishes(synthetic_copy: Path,
                                                            tmp_path: Path) -> None:
    dest = tmp_path / "killed"
    env = {**os.environ, "CRYSTALSCOPE_SPLIT_FILE_DELAY": "0.02"}
    command = [sys.executable, "-m", "crystalscope.cli", "split", str(synthetic_copy),
               str(dest), "--move", "--workers", "1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until some but not all files have moved
        moved = sum(1 for p in dest.rglob("*.png")) if dest.exists() else 0
        if moved >= 20:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    rows = read_manifest(dest / MANIFEST_NAME)
    at_dest = [r for r in rows if (dest / r.dest).exists()]
    assert 0 < len(at_dest) < len(rows), "the kill should land in the middle of the move"
    for row in rows:  # every file is at its source or verified at its destination
        places = [p for p in (Path(row.source), dest / row.dest) if p.exists()]
        assert places, f"{row.source} was lost"
        assert all(file_sha256(p) == row.sha256 for p in places)

    with pytest.raises(UserError, match="--resume"):
        split_dataset(synthetic_copy, dest, SplitSettings(mode="move"))
    result = split_dataset(synthetic_copy, dest, resume=True)
    assert result.report["status"] == "complete"
    assert not any(Path(r.source).exists() for r in rows)
    assert all(file_sha256(dest / r.dest) == r.sha256 for r in rows)
    assert not list(dest.rglob("*.crystalscope-part"))


def test_resume_after_kill_between_copy_and_unlink(synthetic_copy: Path, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    split_dataset(synthetic_copy, dest, SplitSettings(mode="copy"), workers=1)
    # pretend a --move was killed after copying and verifying, before removing the sources
    report_path = dest / "split.json"
    report_path.write_text(report_path.read_text().replace('"mode": "copy"', '"mode": "move"'))
    split_dataset(synthetic_copy, dest, resume=True)
    rows = read_manifest(dest / MANIFEST_NAME)
    assert not any(Path(r.source).exists() for r in rows)


def test_foreign_file_at_destination_is_never_overwritten(synthetic_copy: Path,
                                                          tmp_path: Path) -> None:
    dest = tmp_path / "d"
    split_dataset(synthetic_copy, dest, workers=1)
    row = read_manifest(dest / MANIFEST_NAME)[0]
    (dest / row.dest).write_bytes(b"someone else's file")
    with pytest.raises(CrystalscopeError, match="left alone"):
        split_dataset(synthetic_copy, dest, resume=True)
    assert (dest / row.dest).read_bytes() == b"someone else's file"


def test_unreadable_files_are_skipped_and_listed(synthetic_copy: Path, tmp_path: Path) -> None:
    (synthetic_copy / "pg" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = split_dataset(synthetic_copy, tmp_path / "d", workers=1)
    assert [Path(s["file"]).name for s in result.report["skipped"]] == ["broken.png"]
    assert sum(result.report["counts"]["pg"].values()) == 60


def test_bad_inputs_give_clear_errors(synthetic_set: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        split_dataset(tmp_path / "missing", tmp_path / "d1")
    one_class = tmp_path / "one"
    shutil.copytree(synthetic_set / "cex", one_class / "cex")
    with pytest.raises(UserError, match="need at least 2"):
        split_dataset(one_class, tmp_path / "d2")
    (one_class / "pg").mkdir()
    with pytest.raises(UserError, match="pg hold no files"):
        split_dataset(one_class, tmp_path / "d3")
    for number in (1, 4, 7):  # three PG crops from different duplicate groups
        shutil.copy(synthetic_set / "pg" / f"PG ({number}).png", one_class / "pg")
    with pytest.raises(UserError, match=r"class 'pg' has 3 readable image.*at least 4"):
        split_dataset(one_class, tmp_path / "d4")
    with pytest.raises(UserError, match="inside the source folder"):
        split_dataset(one_class, one_class / "splits")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        split_dataset(synthetic_set, full)
    with pytest.raises(UserError, match=r"no manifest\.csv"):
        split_dataset(synthetic_set, full, resume=True)
    assert (full / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d4").exists()


def test_manifest_is_csv_with_the_documented_columns(synthetic_set: Path, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    split_dataset(synthetic_set, dest, workers=1)
    with (dest / MANIFEST_NAME).open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["source", "dest", "sha256", "group", "split", "class"]
        assert len(list(reader)) == 120


def _sessions(folder: Path, sessions: int = 12) -> Path:
    """Synthetic crops without rotated copies (a copy in another session would join the two
    sessions), in session folders: <class>/s<k>/<file>."""
    from crystalscope.synth.crops import SynthSettings, synthesize

    synthesize(folder, SynthSettings(per_class=60, size=48, dihedral_copies=0, seed=4),
               workers=1)
    for class_dir in [d for d in folder.iterdir() if d.is_dir()]:
        for index, path in enumerate(sorted(class_dir.glob("*.png"))):
            session = class_dir / f"s{index % sessions}"
            session.mkdir(exist_ok=True)
            path.rename(session / path.name)
    return folder


def _splits_per_key(dest: Path, key_of) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    with (dest / "manifest.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            found[key_of(row["dest"])].add(row["split"])
    return found


def test_group_by_keeps_each_session_in_one_split(tmp_path: Path) -> None:
    import json

    source = _sessions(tmp_path / "images")
    split_dataset(source, tmp_path / "by-regex", SplitSettings(seed=3, group_by=r"/(s\d+)/"))
    per_session = _splits_per_key(tmp_path / "by-regex", lambda dest: dest.split("/")[2])
    assert len(per_session) == 12 and all(len(s) == 1 for s in per_session.values())
    assert {s for splits in per_session.values() for s in splits} == {"train", "valid", "test"}
    report = json.loads((tmp_path / "by-regex" / "split.json").read_text())
    assert report["group_by"] == {"source": r"regex /(s\d+)/", "groups": 12,
                                  "files_without_group": 0}
    # The same from a CSV column: file (as the paths are given) and its session
    table = tmp_path / "sessions.csv"
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.png"))
    table.write_text("file,session\n" + "".join(f"{f},{f.split('/')[1]}\n" for f in files))
    split_dataset(source, tmp_path / "by-csv",
                  SplitSettings(seed=3, group_file=table, group_column="session"))
    per_session = _splits_per_key(tmp_path / "by-csv", lambda dest: dest.split("/")[2])
    assert all(len(s) == 1 for s in per_session.values())
    # without grouping, sessions straddle splits (so the test above can fail)
    split_dataset(source, tmp_path / "plain", SplitSettings(seed=3))
    per_session = _splits_per_key(tmp_path / "plain", lambda dest: dest.split("/")[2])
    assert any(len(s) > 1 for s in per_session.values())


def test_group_by_mistakes_get_one_line(synthetic_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a regular expression"):
        split_dataset(synthetic_copy, tmp_path / "a", SplitSettings(group_by="(unclosed"))
    with pytest.raises(UserError, match="gives no file a group"):
        split_dataset(synthetic_copy, tmp_path / "b", SplitSettings(group_by=r"session(\d+)"))
    table = tmp_path / "t.csv"
    table.write_text("path,session\n")
    with pytest.raises(UserError, match="needs the columns file and session"):
        split_dataset(synthetic_copy, tmp_path / "c",
                      SplitSettings(group_file=table, group_column="session"))
    assert not any((tmp_path / n).exists() for n in "abc")


def test_the_ultralytics_layout_writes_val_and_every_reader_takes_it(synthetic_set: Path,
                                                                     tmp_path: Path) -> None:
    # split --layout ultralytics writes train/val/test; the same files as valid/ would hold,
    # and the readers (training data, a run's data, data check's overlap) find them there.
    from crystalscope.data.decoded import read_split_folder, read_trained_on
    from crystalscope.data.layout import split_path
    from crystalscope.data.leakage import find_split_overlap
    from crystalscope.settings import SettingsError

    ours = split_dataset(synthetic_set, tmp_path / "ours", SplitSettings(seed=3), workers=1)
    theirs = split_dataset(synthetic_set, tmp_path / "theirs",
                           SplitSettings(seed=3, layout="ultralytics"), workers=1)
    assert sorted(p.name for p in theirs.dest.iterdir() if p.is_dir()) == ["test", "train", "val"]
    assert split_path(theirs.dest, "valid") == theirs.dest / "val"
    assert split_path(ours.dest, "valid") == ours.dest / "valid"
    mine, other = read_split_folder(ours.dest), read_split_folder(theirs.dest)
    for split in ("train", "valid", "test"):
        assert ([(p.relative_to(split_path(ours.dest, split)), label)
                 for p, label in mine.split(split)]
                == [(p.relative_to(split_path(theirs.dest, split)), label)
                    for p, label in other.split(split)])
    assert read_trained_on(theirs.dest, other.classes).counts() == mine.counts()
    assert (len(find_split_overlap(theirs.dest, workers=1))
            == len(find_split_overlap(ours.dest, workers=1)))
    with pytest.raises(SettingsError, match="layout"):
        SplitSettings(layout="yolo")
