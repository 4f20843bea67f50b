"""Bounded helpers that every stage leans on at scale: the threaded map and the file listing."""

import threading
from pathlib import Path

from crystalscope.data.layout import list_files
from crystalscope.parallel import threaded_map


def test_threaded_map_keeps_order_and_pulls_at_most_in_flight_jobs_ahead() -> None:
    pulled = 0
    lock = threading.Lock()

    def jobs():
        nonlocal pulled
        for i in range(10_000):
            with lock:
                pulled += 1
            yield i

    results = threaded_map(lambda i: i * i, jobs(), threads=3, in_flight=50)
    first = next(results)
    assert first == 0 and pulled <= 51  # not all 10,000 futures at once
    rest = list(results)
    assert [first, *rest] == [i * i for i in range(10_000)]


def test_list_files_equals_rglob_on_links_hidden_files_and_nesting(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in (root / "z.png", root / "a" / "y.png", root / "a" / "b" / "x.png",
                 root / ".hidden" / "h.png", root / "a" / ".dot.png", outside / "o.png"):
        path.write_bytes(b"x")
    (root / "linked-folder").symlink_to(outside)  # rglob does not enter it
    (root / "a" / "linked.png").symlink_to(outside / "o.png")  # a linked file is a file
    (root / "broken.png").symlink_to(tmp_path / "missing.png")  # not a file
    expected = sorted(
        (p for p in root.rglob("*")
         if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix())
    assert list_files(root) == expected
    assert [p.relative_to(root).as_posix() for p in expected] == [
        "a/b/x.png", "a/linked.png", "a/y.png", "z.png"]
