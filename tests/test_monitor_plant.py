"""The monitor in a plant: a restart resumes where it stopped, a standing alarm is repeated,
--post retries with every failure recorded, windows that vanish under --watch are skipped, a
dead watcher makes /health answer 503, and the dashboard's live trend in headless Chromium."""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from crystalscope.cli import main
from crystalscope.infer.predictor import load_predictor
from crystalscope.monitor.frames import Window
from crystalscope.monitor.run import Monitor
from crystalscope.monitor.trend import AlarmRule
from crystalscope.monitor.watching import watch, watch_in_background
from crystalscope.serve.app import ServeSettings, create_app
from crystalscope.serve.server import running
from crystalscope.synth.batch import BatchSettings, synthesize_batch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SETTINGS = BatchSettings(windows=12, per_window=24, onset=5, rate=0.2, max_fraction=0.6,
                         size=96, difficulty=0.0, seed=6, calibration_windows=1)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plant") / "batch"
    synthesize_batch(out, SETTINGS, workers=2)
    return out


def _windows(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _monitor(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["monitor", *argv])
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


def _rows(out: Path) -> list[dict]:
    with (out / "trend.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").open()]


def test_a_restart_on_the_same_out_resumes_the_count_the_statistic_and_the_alarm(
        pg_detector: Path, batch: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--positive", "pg", "--false-positive-rate", "0.05", "--repeat-alarm", "0"]
    code, _ = _monitor([str(pg_detector), str(batch / "pg-batch"), *common,
                        "--out", str(tmp_path / "whole")], capsys)
    assert code == 3
    whole = _rows(tmp_path / "whole")
    alarm = next(int(r["window"]) for r in whole if r["alarm"] == "1")
    stream = tmp_path / "stream"
    stream.mkdir()
    for stop in (alarm - 2, alarm + 2, len(whole)):  # the probe keeps writing; we restart
        for window in _windows(batch / "pg-batch")[:stop]:
            if not (stream / window.name).exists():
                shutil.copytree(window, stream / window.name)
        code, said = _monitor([str(pg_detector), str(stream), *common,
                               "--out", str(tmp_path / "pieces")], capsys)
    assert code == 3 and "done by the earlier run" in said
    pieces = _rows(tmp_path / "pieces")
    # the same windows, each once, with the same numbers as one uninterrupted run
    assert [r["window"] for r in pieces] == [r["window"] for r in whole]
    for a, b in zip(pieces, whole, strict=True):
        assert (a["crops"], a["fraction"], a["alarm"]) == (b["crops"], b["fraction"], b["alarm"])
        assert float(a["statistic"]) == pytest.approx(float(b["statistic"]), abs=1e-5)
    events = [e["event"] for e in _events(tmp_path / "pieces")]
    assert events.count("alarm") == 1 and events.count("resumed") == 2
    # another stream on the same --out is refused; --fresh starts over
    code, said = _monitor([str(pg_detector), str(batch / "control"), *common,
                           "--out", str(tmp_path / "pieces")], capsys)
    assert code == 2 and "another stream" in said and "--fresh" in said
    assert _rows(tmp_path / "pieces") == pieces  # untouched
    code, _ = _monitor([str(pg_detector), str(batch / "control"), *common, "--fresh",
                        "--out", str(tmp_path / "pieces")], capsys)
    assert code == 0 and len(_rows(tmp_path / "pieces")) == SETTINGS.windows


def test_a_standing_alarm_is_repeated_every_n_windows_with_its_hooks(
        pg_detector: Path, batch: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    calls = tmp_path / "calls.txt"
    hook = f"sh -c 'echo called >> {calls}'"
    code, said = _monitor([str(pg_detector), str(batch / "pg-batch"), "--positive", "pg",
                           "--false-positive-rate", "0.05", "--repeat-alarm", "2",
                           "--on-alarm", hook, "--out", str(tmp_path / "m")], capsys)
    assert code == 3 and "ALARM STILL ACTIVE" in said
    events = _events(tmp_path / "m")
    first = next(e["window"] for e in events if e["event"] == "alarm")
    repeated = [e["window"] for e in events if e["event"] == "alarm_repeated"]
    assert repeated == list(range(first + 2, SETTINGS.windows + 1, 2))
    assert calls.read_text().count("called") == 1 + len(repeated)


class _Flaky(BaseHTTPRequestHandler):
    """Fails the first ``failures`` POSTs with 503, then accepts."""

    failures = 2
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Flaky.failures > 0:
            _Flaky.failures -= 1
            self.send_response(503)
        else:
            _Flaky.received.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return


def test_post_retries_with_backoff_and_records_every_failed_try(
        pg_detector: Path, batch: Path, tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    predictor = load_predictor(pg_detector)
    url = f"http://127.0.0.1:{server.server_port}/alarm"
    try:
        monitor = Monitor(predictor, AlarmRule("pg", 0.05), tmp_path / "ok", post_url=url,
                          post_retries=3, post_backoff_s=0.01, say=lambda _: None)
        assert monitor._post({"window": 1})
    finally:
        server.shutdown()
        server.server_close()
    failed = [e for e in _events(tmp_path / "ok") if e["event"] == "hook_failed"]
    assert [e["attempt"] for e in failed] == [1, 2] and not any(e["final"] for e in failed)
    assert _Flaky.received == [{"window": 1}]
    # nobody listening: every try fails, the last is marked final, the run goes on
    down = Monitor(predictor, AlarmRule("pg", 0.05), tmp_path / "down", post_url=url,
                   post_retries=2, post_backoff_s=0.01, say=lambda _: None)
    start = time.monotonic()
    assert not down._post({"window": 1})
    assert time.monotonic() - start >= 0.01 + 0.02  # it waited between the tries
    failed = [e for e in _events(tmp_path / "down") if e["event"] == "hook_failed"]
    assert [(e["attempt"], e["final"]) for e in failed] == [(1, False), (2, False), (3, True)]


def test_files_and_windows_that_vanish_under_watch_are_skipped_never_a_crash(
        pg_detector: Path, batch: Path, tmp_path: Path) -> None:
    predictor = load_predictor(pg_detector)
    monitor = Monitor(predictor, AlarmRule("pg", 0.05), tmp_path / "out", say=lambda _: None)
    crops = sorted((batch / "control" / "t0001").glob("*.png"))
    result = monitor.process(Window(1, "t0001", [*crops[:3], tmp_path / "rotated-away.png"]))
    assert result.crops + result.unknown == 3  # the missing file: an event, not a crash
    live = tmp_path / "live"
    live.mkdir()
    kept = []

    def probe() -> None:  # writes windows and deletes some (rotation), files and folders
        for i, window in enumerate(_windows(batch / "control")):
            target = live / window.name
            shutil.copytree(window, target)
            if i % 3 == 1:
                shutil.rmtree(target)  # the whole window rotated away
            elif i % 3 == 2:
                for crop in sorted(target.glob("*.png"))[:5]:
                    crop.unlink()  # some files deleted
                kept.append(window.name)
            else:
                kept.append(window.name)
            time.sleep(0.05)

    writer = threading.Thread(target=probe)
    watcher_monitor = Monitor(predictor, AlarmRule("pg", 0.05), tmp_path / "watched",
                              say=lambda _: None)
    writer.start()
    watch(watcher_monitor, live, poll_s=0.02, settle_s=0.3, idle_stop_s=2.0)
    writer.join()
    times = [r["time"] for r in _rows(tmp_path / "watched")]
    assert times == sorted(set(times))  # each window once, in order
    assert set(kept) <= set(times)  # every window still there was processed


def test_a_dead_watcher_makes_health_answer_503_with_why(pg_detector: Path, batch: Path,
                                                          tmp_path: Path) -> None:
    predictor = load_predictor(pg_detector)
    live = tmp_path / "live"
    live.mkdir()
    monitor = watch_in_background(predictor, AlarmRule("pg", 0.05), live, poll_s=0.05,
                                  settle_s=0.2)
    with running(create_app(ServeSettings(predictor=predictor, monitor=monitor))) as url:
        assert urllib.request.urlopen(f"{url}/health", timeout=10).status == 200
        shutil.rmtree(monitor.out_dir)  # its output folder is gone: the next write fails
        shutil.copytree(_windows(batch / "control")[0], live / "t0001")
        deadline = time.monotonic() + 30
        while monitor.degraded is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"{url}/health", timeout=10)
        body = json.loads(answer.value.read())
        status = json.loads(urllib.request.urlopen(f"{url}/monitor", timeout=10).read())
    assert answer.value.code == 503 and body["status"] == "degraded"
    assert "the watcher died" in body["reason"] and "FileNotFoundError" in body["reason"]
    assert status["status"] == "degraded"


def test_monitor_polls_return_only_new_windows(pg_detector: Path, batch: Path,
                                               tmp_path: Path) -> None:
    predictor = load_predictor(pg_detector)
    monitor = Monitor(predictor, AlarmRule("pg", 0.05), tmp_path, say=lambda _: None)
    for i, window in enumerate(_windows(batch / "control")[:5], 1):
        monitor.process(Window(i, window.name, sorted(window.glob("*.png"))))
    with running(create_app(ServeSettings(predictor=predictor, monitor=monitor))) as url:
        everything = json.loads(urllib.request.urlopen(f"{url}/monitor").read())
        newer = json.loads(urllib.request.urlopen(f"{url}/monitor?since=3").read())
    assert [w["window"] for w in everything["windows"]] == [1, 2, 3, 4, 5]
    assert [w["window"] for w in newer["windows"]] == [4, 5]
    assert newer["status"] == "ok" and newer["windows_total"] == 5
    assert newer["base_rate"] == pytest.approx(0.05) and "false alarm per" in newer["promise"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install "
                                              "chromium); .ci/run installs it")
def test_the_dashboard_draws_the_trend_as_it_grows_and_shows_the_alarm(
        pg_detector: Path, batch: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    predictor = load_predictor(pg_detector)
    live = tmp_path / "live"
    live.mkdir()
    monitor = watch_in_background(predictor, AlarmRule("pg", 0.05), live, poll_s=0.1,
                                  settle_s=0.5)
    windows = _windows(batch / "pg-batch")
    with running(create_app(ServeSettings(predictor=predictor, monitor=monitor))) as url, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                            "--no-first-run"])
        page = browser.new_page(viewport={"width": 900, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        page.wait_for_selector("#status.ok", timeout=30_000)
        points = []
        for window in windows:  # the probe writes; the page follows without a reload
            shutil.copytree(window, live / window.name)
            page.wait_for_function(
                "n => series.length >= n", arg=len(list(live.iterdir())) - 1, timeout=30_000)
            points.append(page.evaluate(
                "document.querySelector('#share').getAttribute('points').split(' ').length"))
        page.wait_for_selector("#status.alarm", timeout=30_000)
        page.wait_for_selector("#examples img", timeout=30_000)
        banner = page.inner_text("#status")
        navigations = page.evaluate("performance.getEntriesByType('navigation').length")
        screenshot = Path(__file__).parent.parent / "test-artifacts" / "dashboard-monitor.png"
        screenshot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert monitor.result.alarm is not None
    assert f"ALARM at window {monitor.result.alarm.index}" in banner
    assert points == sorted(points) and points[-1] > points[0]  # it grew
    assert navigations == 1 and errors == []  # one page load, no script error
    with Image.open(screenshot) as shot:
        assert np.asarray(shot.convert("L")).std() > 5
