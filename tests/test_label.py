"""`crystalscope label`: the ordering against simple references, the journal and the folders
through undo, restarts and kill -9, the lock, and the page in a real browser."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from crystalscope.data.layout import read_class_folders
from crystalscope.errors import UserError
from crystalscope.label.app import create_label_app
from crystalscope.label.journal import Journal, read_decisions, replay
from crystalscope.label.ordering import active_order, entropy, k_center_greedy, margin
from crystalscope.label.scoring import Scores
from crystalscope.label.session import open_session, parse_label_classes
from crystalscope.serve.server import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ---- ordering
def test_entropy_and_margin_by_hand() -> None:
    p = np.array([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]])
    assert entropy(p) == pytest.approx(
        [1.0, 0.0, -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(2)], abs=1e-9)
    assert margin(p) == pytest.approx([1.0, 0.0, 0.2])
    three = np.array([[0.2, 0.3, 0.5]])
    assert margin(three) == pytest.approx([0.8])
    assert entropy(three)[0] == pytest.approx(
        -sum(q * np.log(q) for q in (0.2, 0.3, 0.5)) / np.log(3))


def _reference_k_center(x: np.ndarray, count: int, labelled: list[int]) -> list[int]:
    """Farthest-first, written the plain way."""
    chosen = list(labelled)
    picks: list[int] = []
    if not chosen:
        mean = x.mean(0)
        first = min(range(len(x)), key=lambda i: float(((x[i] - mean) ** 2).sum()))
        chosen, picks = [first], [first]
    while len(picks) < count:
        best, best_distance = -1, -1.0
        for i in range(len(x)):
            if i in chosen:
                continue
            distance = min(float(np.linalg.norm(x[i] - x[j])) for j in chosen)
            if distance > best_distance:
                best, best_distance = i, distance
        chosen.append(best)
        picks.append(best)
    return picks


def test_k_center_greedy_matches_the_plain_reference() -> None:
    line = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    assert k_center_greedy(line, 3) == [2, 4, 0]  # nearest the mean (4.8), then the ends
    rng = np.random.default_rng(0)
    points = rng.normal(size=(60, 5))
    assert k_center_greedy(points, 12) == _reference_k_center(points, 12, [])
    assert k_center_greedy(points, 10, labelled=np.array([3, 7])) == \
        _reference_k_center(points, 10, [3, 7])


def test_farthest_first_continued_equals_starting_again_and_allocates_no_n_by_n() -> None:
    """The session orders chunk after chunk; keeping the distances between chunks must give
    what a fresh traversal from every placed crop gives, in O(N) memory at 20,000 crops."""
    import tracemalloc

    from crystalscope.label.ordering import BLOCK_BYTES, FarthestFirst

    rng = np.random.default_rng(5)
    n = 20_000
    x = rng.normal(size=(n, 32))
    labelled = rng.choice(n, 3_000, replace=False)
    traversal = FarthestFirst(x)
    tracemalloc.start()
    traversal.place(labelled)
    first = traversal.pick(100)
    extra = np.setdiff1d(rng.choice(n, 50, replace=False), [*labelled, *first])
    traversal.place(extra)  # e.g. decisions replayed from the journal
    second = traversal.pick(100)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * n * 32 * 8 + 2 * BLOCK_BYTES  # an N x N float64 matrix: 3.2 GB
    placed = np.concatenate([labelled, first, extra])
    assert second == k_center_greedy(x, 100, labelled=placed)
    assert first == k_center_greedy(x, 100, labelled=labelled)


def test_uncertainty_moves_an_unsure_crop_forward() -> None:
    points = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 4.9]])
    sure_far = np.array([[0.99, 0.01], [0.99, 0.01], [0.5, 0.5]])
    assert active_order(points, labelled=np.array([0]))[0] == 1  # diversity alone
    assert active_order(points, sure_far, labelled=np.array([0]))[0] == 2  # the tie wins


# ---- journal
def test_the_journal_replays_labels_skips_and_undos(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "labels.csv")
    for name, label, action in [("a", "cex", "label"), ("b", "pg", "label"), ("c", "", "skip"),
                                ("c", "", "undo"), ("a", "pg", "label")]:
        journal.append(name, "0" * 64, label, action, "keyboard")
    journal.close()
    labels, standing = replay(read_decisions(tmp_path / "labels.csv"))
    assert labels == {"a": "pg", "b": "pg"}  # the undo took back c's skip, the latest
    assert [d.file for d in standing] == ["a", "b", "a"]


def test_undo_takes_back_the_latest_standing_decision(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "labels.csv")
    journal.append("a", "x", "cex", "label", "keyboard")
    journal.append("b", "x", "pg", "label", "keyboard")
    journal.append("", "", "", "undo", "keyboard")
    journal.append("c", "x", "", "skip", "button")
    journal.append("", "", "", "undo", "keyboard")
    journal.append("", "", "", "undo", "keyboard")
    journal.append("a", "x", "pg", "label", "button")
    journal.close()
    labels, standing = replay(read_decisions(tmp_path / "labels.csv"))
    assert labels == {"a": "pg"} and [d.file for d in standing] == ["a"]


def test_an_undo_takes_back_its_own_files_decision_only(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "labels.csv")
    journal.append("a", "x", "cex", "label", "keyboard")
    journal.append("gone.png", "y", "pg", "label", "keyboard")  # a file no longer there
    journal.append("a", "x", "", "undo", "keyboard")  # takes back a's label, not gone.png's
    journal.close()
    labels, standing = replay(read_decisions(tmp_path / "labels.csv"))
    assert labels == {"gone.png": "pg"} and [d.file for d in standing] == ["gone.png"]


def test_a_row_cut_by_a_crash_is_ignored_and_the_next_starts_on_its_own_line(
        tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    journal = Journal(path)
    journal.append("a", "x", "cex", "label", "keyboard")
    journal.close()
    with path.open("a", encoding="utf-8") as handle:
        handle.write("2026-01-01T00:00:00,b,x,pg,lab")  # cut mid-row, no newline
    journal = Journal(path)
    journal.append("c", "x", "pg", "label", "button")
    journal.close()
    labels, _ = replay(read_decisions(path))
    assert labels == {"a": "cex", "c": "pg"}


# ---- sessions on real files
def _crops(folder: Path, count: int = 8) -> Path:
    from crystalscope.synth.crops import SynthSettings, synthesize

    synthesize(folder / "pool", SynthSettings(per_class=count // 2, size=48, seed=5), workers=1)
    flat = folder / "images"
    flat.mkdir()
    for path in sorted((folder / "pool").rglob("*.png")):
        shutil.copy(path, flat / f"{path.parent.name}-{path.name}")
    return flat


def _open(images: Path, out: Path, **kwargs: object):
    return open_session(images, out, ["cex", "pg"], **kwargs)


def test_labels_copy_files_undo_removes_them_and_the_sources_stay(tmp_path: Path) -> None:
    images = _crops(tmp_path)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    session = _open(images, tmp_path / "out")
    try:
        first = session.crops[session.current()].name
        session.label("cex", "keyboard")
        second = session.crops[session.current()].name
        session.label("pg", "button")
        assert (tmp_path / "out" / "cex" / first).read_bytes() == before[first]
        assert (tmp_path / "out" / "pg" / second).is_file()
        session.undo("keyboard")
        assert not (tmp_path / "out" / "pg" / second).exists()
        assert session.crops[session.current()].name == second  # shown again
        session.move(-1)  # back to the first: relabel it
        assert session.crops[session.current()].name == first
        session.label("pg", "keyboard")
        assert not (tmp_path / "out" / "cex" / first).exists()
        assert (tmp_path / "out" / "pg" / first).is_file()
        assert session.counts() == {"cex": 0, "pg": 1}
    finally:
        session.close()
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before  # never changed
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert [r["action"] for r in rows] == ["label", "label", "undo", "label"]
    assert all(len(r["sha256"]) == 64 for r in rows)
    # The result is a class-folder tree that split and train read as is.
    (tmp_path / "out" / "cex" / "x.png").write_bytes(before[first])  # both classes present
    assert [c.name for c in read_class_folders(tmp_path / "out")] == ["cex", "pg"]


def test_a_second_session_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    images = _crops(tmp_path)
    first = _open(images, tmp_path / "out")
    try:
        with pytest.raises(UserError, match="another `crystalscope label`"):
            _open(images, tmp_path / "out")
    finally:
        first.close()
    _open(images, tmp_path / "out").close()  # free again once the first one closed


def test_unreadable_images_are_listed_and_skipped(tmp_path: Path) -> None:
    images = _crops(tmp_path)
    (images / "broken.png").write_bytes(b"not a png")
    session = _open(images, tmp_path / "out")
    try:
        assert len(session.crops) == 8 and len(session.unreadable) == 1
        assert "broken.png" in session.unreadable[0]
        assert session.state()["unreadable"] == session.unreadable
    finally:
        session.close()


def test_bad_class_lists_are_refused() -> None:
    assert parse_label_classes("cex, pg") == ["cex", "pg"]
    for text in ["", "cex,cex", "a/b,c", ",".join(str(i) for i in range(10))]:
        with pytest.raises(UserError, match=r"^classes"):
            parse_label_classes(text)


KILLED_CHILD = """
import sys, time
from pathlib import Path
from crystalscope.label.session import open_session
session = open_session(Path(sys.argv[1]), Path(sys.argv[2]), ["cex", "pg"])
n = 0
while session.current() is not None:
    session.label(("cex", "pg")[n % 2], "keyboard")
    n += 1
    print(n, flush=True)
    time.sleep(0.05)
time.sleep(60)
"""


def test_the_journal_survives_kill_9_and_a_restart_shows_the_same_counts(
        tmp_path: Path) -> None:
    images = _crops(tmp_path, 16)
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(images),
                              str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for line in child.stdout:
        if int(line) >= 5:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    labels, _ = replay(read_decisions(tmp_path / "out" / "labels.csv"))
    assert len(labels) >= 5
    session = _open(images, tmp_path / "out")  # the lock died with the process
    try:
        counts = session.counts()
        assert sum(counts.values()) == len(labels)
        for name in ("cex", "pg"):  # the folders agree with the journal
            assert len(list((tmp_path / "out" / name).glob("*.png"))) == counts[name]
        assert session.state()["left"] == 16 - len(labels)
    finally:
        session.close()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_the_api_needs_the_token_when_one_is_set(tmp_path: Path) -> None:
    session = _open(_crops(tmp_path), tmp_path / "out")
    try:
        with running(create_label_app(session, token="s3cret")) as url:
            with pytest.raises(urllib.error.HTTPError) as refused:
                _get(url + "/api/state")
            assert refused.value.code == 401
            assert _get(url + "/api/state?token=s3cret")["total"] == 8
    finally:
        session.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install "
                                              "chromium); .ci/run installs it")
def test_labelling_five_crops_by_keyboard_in_chromium(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    images = _crops(tmp_path)
    session = _open(images, tmp_path / "out",
                    embed=lambda paths: Scores(np.arange(len(paths), dtype=float)[:, None],
                                               note="test order"))
    try:
        with running(create_label_app(session)) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                "--disable-background-networking",
                                                "--no-first-run"])
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url + "/")
            page.wait_for_selector("text=left: 8")
            for key in ["1", "1", "2", "1", "2"]:  # each once its crop is on screen
                _wait_ready(page)
                page.keyboard.press(key)
            page.wait_for_selector("text=left: 3")
            _wait_ready(page)
            page.keyboard.press("z")
            page.wait_for_selector("text=left: 4")
            page.wait_for_function("document.getElementById('crop').complete")
            screenshot = Path(__file__).parent.parent / "test-artifacts" / "label.png"
            screenshot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            counts = page.locator("#counts").inner_text()
            browser.close()
    finally:
        session.close()
    assert errors == []
    assert "cex: 3" in counts and "pg: 1" in counts
    assert len(list((tmp_path / "out" / "cex").glob("*.png"))) == 3
    assert len(list((tmp_path / "out" / "pg").glob("*.png"))) == 1
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert [(r["class"], r["action"], r["input"]) for r in rows] == [
        ("cex", "label", "keyboard"), ("cex", "label", "keyboard"), ("pg", "label", "keyboard"),
        ("cex", "label", "keyboard"), ("pg", "label", "keyboard"), ("", "undo", "keyboard")]


def _wait_ready(page: object) -> None:
    """Until the page shows its crop's loaded image and waits for a key."""
    page.wait_for_function("document.body.dataset.ready === '1'")  # type: ignore[attr-defined]


def _browser(playwright: object) -> object:
    return playwright.chromium.launch(  # type: ignore[attr-defined]
        executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                        "--disable-background-networking", "--no-first-run"])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install "
                                              "chromium); .ci/run installs it")
def test_a_held_key_labels_one_crop_in_chromium(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    session = _open(_crops(tmp_path), tmp_path / "out")
    try:
        with running(create_label_app(session)) as url, sync_playwright() as playwright:
            browser = _browser(playwright)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("text=left: 8")
            _wait_ready(page)
            for _ in range(12):  # held down: the key repeats (event.repeat after the first)
                page.keyboard.down("1")
            page.keyboard.up("1")
            page.keyboard.press("2")  # pressed again before the next crop has loaded...
            _wait_ready(page)
            counts = page.locator("#counts").inner_text()
            browser.close()
    finally:
        session.close()
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert [r["class"] for r in rows] in (["cex"], ["cex", "pg"])  # ...or after: never more
    assert f"left: {8 - len(rows)}" in counts


def test_a_decision_for_a_crop_no_longer_shown_is_refused_with_409(tmp_path: Path) -> None:
    session = _open(_crops(tmp_path), tmp_path / "out")
    try:
        with running(create_label_app(session)) as url:
            shown = _get(url + "/api/state")["crop"]["id"]

            def post(body: dict) -> int:
                request = urllib.request.Request(url + "/api/label", json.dumps(body).encode(),
                                                 {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        return response.status
                except urllib.error.HTTPError as exc:
                    return exc.code

            assert post({"label": "cex", "crop": shown}) == 200
            assert post({"label": "pg", "crop": shown}) == 409  # a second tab's stale view
            assert post({"label": "pg"}) == 422  # a decision must name its crop
    finally:
        session.close()
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert [(r["class"], r["action"]) for r in rows] == [("cex", "label")]


def test_a_symlink_to_a_file_outside_the_folder_is_labelled_by_its_own_name(
        tmp_path: Path) -> None:
    images = _crops(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    moved = sorted(images.iterdir())[0]
    target = outside / "real.png"
    moved.rename(target)
    (images / "linked.png").symlink_to(target)
    session = _open(images, tmp_path / "out")
    try:
        assert "linked.png" in {crop.name for crop in session.crops}
    finally:
        session.close()


def test_a_new_crop_with_a_taken_name_leaves_the_labelled_copy_in_place(
        tmp_path: Path) -> None:
    images = _crops(tmp_path)
    (images / "run1").mkdir()
    first = sorted(p for p in images.iterdir() if p.is_file())[0]
    first.rename(images / "run1" / "frame.png")
    session = _open(images, tmp_path / "out")
    try:
        while session.crops[session.current()].name != "run1/frame.png":
            session.skip("button")
        session.label("cex", "button")
    finally:
        session.close()
    assert (tmp_path / "out" / "cex" / "frame.png").is_file()
    (images / "run2").mkdir()  # a later run brings another frame.png
    shutil.copy(sorted(p for p in images.iterdir() if p.is_file())[0],
                images / "run2" / "frame.png")
    session = _open(images, tmp_path / "out")
    try:
        assert session.counts()["cex"] == 1
    finally:
        session.close()
    assert [p.name for p in (tmp_path / "out" / "cex").iterdir()] == ["frame.png"]


def test_the_models_guess_is_looked_up_by_class_name(exported_run: Path,
                                                     tmp_path: Path) -> None:
    from crystalscope.infer.predictor import load_predictor

    predictor = load_predictor(exported_run)  # trained as cex, pg
    images = _crops(tmp_path)
    guesses = {}
    for order in (["cex", "pg"], ["pg", "cex"]):
        out = tmp_path / f"out-{order[0]}"
        session = open_session(images, out, order, predictor=predictor)
        try:
            guesses[order[0]] = [session.describe(i)["guess"] for i in range(len(session.crops))]
        finally:
            session.close()
    assert guesses["cex"] == guesses["pg"]  # the same guess whatever the key order
    with pytest.raises(UserError, match="do not include needle"):
        open_session(images, tmp_path / "out-x", ["cex", "needle"], predictor=predictor)


def test_with_a_model_the_page_shows_its_guess_and_orders_by_it(exported_run: Path,
                                                                tmp_path: Path) -> None:
    from crystalscope.infer.predictor import load_predictor

    predictor = load_predictor(exported_run)
    session = _open(_crops(tmp_path), tmp_path / "out", predictor=predictor)
    try:
        assert session.scores.probabilities is not None
        assert session.scores.probabilities.shape == (8, 2)
        assert "unsure" in session.scores.note
        crop = session.state()["crop"]
        assert crop["guess"]["class"] in ("cex", "pg") and crop["guess"]["probability"] >= 0.5
        session.label("cex", "button")
        assert session.state()["crop"]["neighbours"][0]["label"] == "cex"
    finally:
        session.close()


# ---- Label Studio
def test_label_studio_export_then_import_round_trip(exported_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from crystalscope.cli import main

    images = _crops(tmp_path)
    out = tmp_path / "out"
    session = _open(images, out)
    try:
        first = session.crops[session.current()].name
        session.label("pg", "keyboard")  # one label made here
    finally:
        session.close()
    tasks_path = tmp_path / "tasks.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["label", "export", str(images), "--out", str(out), "--classes", "cex,pg",
              "--model", str(exported_run), "--output", str(tasks_path)])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    tasks = json.loads(tasks_path.read_text())
    assert len(tasks) == 8 and all(len(t["predictions"]) == 1 for t in tasks)
    by_file = {t["data"]["crystalscope_file"]: t for t in tasks}
    assert by_file[first]["annotations"][0]["result"][0]["value"]["choices"] == ["pg"]
    assert by_file[first]["data"]["image"] == "/data/local-files/?d=" + first
    prediction = tasks[0]["predictions"][0]
    assert prediction["result"][0]["value"]["choices"][0] in ("cex", "pg")
    assert 0.5 <= prediction["score"] <= 1
    config = tasks_path.with_suffix(".xml").read_text()
    assert '<Choice value="cex"/>' in config and 'value="$image"' in config
    # A Label Studio export, as the tool writes it after people labelled in it
    names = sorted(n for n in by_file if n != first)
    exported = [
        {"id": 1, "data": {"image": "/data/local-files/?d=" + names[1]},  # no file of ours
         "annotations": [{"id": 7, "was_cancelled": False, "result": [
             {"id": "a", "from_name": "class", "to_name": "image", "type": "choices",
              "origin": "manual", "value": {"choices": ["cex"]}}]}]},
        {"id": 2, "data": {"image": "/data/upload/1/" + Path(names[2]).name,
                           "crystalscope_file": names[2]},
         "annotations": [{"was_cancelled": False, "result": [
             {"type": "choices", "value": {"choices": ["cex"]}}]},
                         {"was_cancelled": False, "result": [  # the latest wins
             {"type": "choices", "value": {"choices": ["pg"]}}]}]},
        {"id": 3, "data": {"image": "/data/local-files/?d=" + names[3]},
         "annotations": [{"was_cancelled": True, "result": [
             {"type": "choices", "value": {"choices": ["pg"]}}]}]},
        {"id": 4, "data": {"image": "/data/local-files/?d=elsewhere/none.png"},
         "annotations": [{"result": [{"type": "choices", "value": {"choices": ["pg"]}}]}]},
        {"id": 5, "data": {"image": "/data/local-files/?d=" + names[4]},
         "annotations": [{"result": [{"type": "choices", "value": {"choices": ["other"]}}]}]},
    ]
    export_path = tmp_path / "project-1.json"
    export_path.write_text(json.dumps(exported))
    with pytest.raises(SystemExit) as exit_info:
        main(["label", "import", str(export_path), str(images), "--out", str(out),
              "--classes", "cex,pg"])
    assert exit_info.value.code in (0, None)
    message = capsys.readouterr().err
    assert "imported 2 labels" in message and "1 task(s) name no crop" in message
    assert "not in --classes" in message
    rows = list(csv.DictReader((out / "labels.csv").open()))
    imported = {r["file"]: r["class"] for r in rows if r["input"] == "import"}
    assert imported == {names[1]: "cex", names[2]: "pg"}
    copies = {p.parent.name + "/" + p.name for p in out.rglob("*.png")}
    assert copies == {f"pg/{first}", f"cex/{names[1]}", f"pg/{names[2]}"}
    with pytest.raises(SystemExit) as exit_info:  # never overwrites a tasks file
        main(["label", "export", str(images), "--out", str(out), "--classes", "cex,pg",
              "--output", str(tasks_path)])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err
