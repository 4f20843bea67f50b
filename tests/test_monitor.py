"""monitor: no alarm on a clean batch, an alarm after the onset (never before) on a PG batch,
the alarm's statistics against scipy, live watching, and streams with problems."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy.stats import binomtest

from crystalscope.cli import main
from crystalscope.errors import UserError
from crystalscope.monitor.trend import AlarmRule, Trend
from crystalscope.synth.batch import BatchSettings, synthesize_batch

SETTINGS = BatchSettings(windows=14, per_window=24, onset=7, rate=0.1, max_fraction=0.6,
                         size=96, difficulty=0.0, seed=2, calibration_windows=30)


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch") / "batches"
    synthesize_batch(out, SETTINGS, workers=2)
    return out


def _monitor(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["monitor", *argv])
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def _rows(out: Path) -> list[dict]:
    with (out / "trend.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_alarm_p_values_are_scipys_one_sided_binomial_test() -> None:
    trend = Trend(["cex", "pg"], AlarmRule(positive="pg", false_positive_rate=0.1, alpha=1e-3,
                                           consecutive=2, rule="binomial"))
    history = [(2, 30), (9, 30), (11, 30), (12, 30), (3, 30)]
    results = [trend.add(i, f"t{i}", ["pg"] * k + ["cex"] * (n - k))
               for i, (k, n) in enumerate(history, 1)]
    significant = []
    for (k, n), result in zip(history, results, strict=True):
        reference = binomtest(k, n, 0.1, alternative="greater").pvalue
        assert result.p_value == pytest.approx(reference, rel=1e-9)
        assert result.significant == (reference < 1e-3)
        significant.append(reference < 1e-3)
        assert result.interval is not None and result.interval[0] <= k / n <= result.interval[1]
    first = next(i for i in range(1, len(history)) if significant[i - 1] and significant[i])
    assert [r.alarm for r in results] == [i == first for i in range(len(history))]  # once
    assert f"ALARM at window {first + 1}" in trend.explain_alarm(results[first])


def test_no_alarm_on_the_control_batch_and_an_alarm_after_the_onset(
        pg_detector: Path, batches: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _monitor([str(pg_detector), str(batches / "control"), "--positive", "pg",
                               "--calibrate", str(batches / "calibration"),
                               "--out", str(tmp_path / "control")], capsys)
    assert code == 0 and "no alarm" in out, err
    assert not any(r["alarm"] == "1" for r in _rows(tmp_path / "control"))
    code, out, err = _monitor([str(pg_detector), str(batches / "pg-batch"), "--positive", "pg",
                               "--calibrate", str(batches / "calibration"),
                               "--out", str(tmp_path / "pg")], capsys)
    assert code == 3, out + err  # the alarm's exit code
    rows = _rows(tmp_path / "pg")
    alarm_window = next(int(r["window"]) for r in rows if r["alarm"] == "1")
    first_pg = json.loads((batches / "batch.json").read_text())["batches"]["pg-batch"][
        "first_pg_window"]
    assert first_pg <= alarm_window <= SETTINGS.windows
    events = [json.loads(line) for line in (tmp_path / "pg" / "events.jsonl").open()]
    alarm = next(e for e in events if e["event"] == "alarm")
    assert alarm["window"] == alarm_window and alarm["rule"] == "cusum"
    assert alarm["statistic"] >= alarm["threshold"] > 0
    assert (tmp_path / "pg" / "timeline.png").stat().st_size > 10_000
    assert "ALARM at window" in err


def test_the_alarm_runs_the_users_command(pg_detector: Path, batches: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    evidence = tmp_path / "evidence.json"
    hook = (f"{sys.executable} -c \"import os, pathlib; pathlib.Path(r'{evidence}')"
            ".write_text(os.environ['CRYSTALSCOPE_ALARM'])\"")
    code, _, _ = _monitor([str(pg_detector), str(batches / "pg-batch"), "--positive", "pg",
                           "--false-positive-rate", "0.05", "--out", str(tmp_path / "m"),
                           "--on-alarm", hook], capsys)
    assert code == 3
    assert json.loads(evidence.read_text())["false_positive_rate"] == 0.05


def test_watch_picks_up_windows_written_after_it_starts(pg_detector: Path, batches: Path,
                                                       tmp_path: Path) -> None:
    live = tmp_path / "probe"
    live.mkdir()
    command = [sys.executable, "-m", "crystalscope.cli", "monitor", str(pg_detector), str(live),
               "--positive", "pg", "--false-positive-rate", "0.1", "--watch", "--poll", "0.2",
               "--settle", "1", "--stop-when-idle", "6", "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(3)  # the monitor is up and sees an empty folder
    sources = sorted((batches / "control").glob("t*"))[:3]
    for source in sources:
        shutil.copytree(source, live / source.name)
        time.sleep(0.5)
    (live / "t0004").mkdir()  # an empty window
    (live / "t0005").mkdir()
    (live / "t0005" / "broken.png").write_bytes(b"\x89PNG not really")
    shutil.copy(next(sources[0].glob("*.png")), live / "t0005" / "ok.png")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    rows = _rows(tmp_path / "out")
    assert [r["time"] for r in rows] == ["t0001", "t0002", "t0003", "t0004", "t0005"]
    # every readable crop is classified, or counted unknown (the detector's, apart)
    assert [int(r["crops"]) + int(r["count_unknown"]) for r in rows] == [24, 24, 24, 0, 1]
    assert all(int(r["count_cex"]) + int(r["count_pg"]) == int(r["crops"]) for r in rows)
    events = [json.loads(line)["event"] for line in (tmp_path / "out" / "events.jsonl").open()]
    assert "empty_window" in events and "unreadable" in events


def test_bad_streams_give_one_line(pg_detector: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "no_time.csv").write_text("path\na.png\n")
    (tmp_path / "blank_time.csv").write_text("time,path\n,a.png\n")
    (tmp_path / "flat").mkdir()
    for argv, expected in (
        ([str(tmp_path / "no_time.csv")], "needs the columns time and path"),
        ([str(tmp_path / "blank_time.csv")], "has no time"),
        ([str(tmp_path / "flat")], "holds no time folders"),
        ([str(tmp_path / "missing")], "no such folder"),
    ):
        code, _, err = _monitor([str(pg_detector), *argv, "--positive", "pg",
                                 "--false-positive-rate", "0.1", "--out",
                                 str(tmp_path / "o")], capsys)
        assert code == 2 and expected in err and "Traceback" not in err
    code, _, err = _monitor([str(pg_detector), str(tmp_path / "flat"), "--out",
                             str(tmp_path / "o")], capsys)
    assert code == 2 and "--positive" in err


def test_flat_folders_take_time_from_names_or_mtimes(batches: Path, tmp_path: Path) -> None:
    import os

    from crystalscope.monitor.frames import parse_time, read_stream

    crops = sorted((batches / "control" / "t0001").glob("*.png"))[:6]
    flat = tmp_path / "flat"
    flat.mkdir()
    stamps = ["20261128-101500", "20261128-101530", "20261128-101610", "20261128-101655",
              "20261128-101720", "20261128-102000"]
    for crop, stamp in zip(crops, stamps, strict=True):
        shutil.copy(crop, flat / f"frame_{stamp}.png")
        os.utime(flat / f"frame_{stamp}.png", (parse_time(stamp), parse_time(stamp)))
    by_name = read_stream(flat, time_from="name", window_seconds=60)
    # windows start at 10:15:00 and are 60 s long: {10:15:00, 10:15:30}, {10:16:10, 10:16:55}
    # {10:17:20}, {10:20:00}; an empty minute in between is no window
    assert [len(w.paths) for w in by_name] == [2, 2, 1, 1]
    assert by_name[0].time == "2026-11-28T10:15:00+00:00"
    by_mtime = read_stream(flat, time_from="mtime", window_seconds=60)
    assert [w.paths for w in by_mtime] == [w.paths for w in by_name]
    assert parse_time("2026-11-28T10:15:00") == parse_time("20261128-101500")
    (flat / "no_time.png").write_bytes(crops[0].read_bytes())
    with pytest.raises(UserError, match="no timestamp matches"):
        read_stream(flat, time_from="name")


def test_frames_are_cut_into_tiles_or_particles() -> None:
    import numpy as np
    from PIL import Image

    from crystalscope.monitor.cutting import cut_particles, cut_tiles, particle_boxes
    from crystalscope.synth.scenes import render_frame

    rng = np.random.default_rng(8)
    # Bright agglomerates: the segmentation finds bright, compact particles (dim translucent
    # ones and faint rims it can miss; see the README's frames benchmark).
    frame, truth = render_frame(rng, 384, 96, 0.1, 3, kind="granular")
    image = Image.fromarray(frame).convert("RGB")
    tiles = cut_tiles(image, 96)
    assert len(tiles) == 16 and all(t.size == (96, 96) for t in tiles)
    boxes = particle_boxes(image, 96)
    assert len(cut_particles(image, 96)) == len(boxes) >= 1
    centres = [truth[(top + bottom) // 2, (left + right) // 2] for left, top, right, bottom
               in boxes]
    assert max(centres) > 0.5  # a segment sits on an agglomerate


def test_monitor_cuts_full_frames(pg_detector: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    settings = BatchSettings(windows=16, per_window=1, onset=6, rate=0.08, size=96,
                             difficulty=0.0, seed=4, frames=2, frame_size=384,
                             calibration_windows=30)
    summary = synthesize_batch(tmp_path / "frames", settings, workers=2)
    first_pg = summary["batches"]["pg-batch"]["first_pg_window"]
    common = ["--positive", "pg", "--frames", "--crop-size", "96", "--calibrate",
              str(tmp_path / "frames" / "calibration")]
    code, out, err = _monitor([str(pg_detector), str(tmp_path / "frames" / "control"),
                               *common, "--out", str(tmp_path / "control")], capsys)
    assert code == 0 and "no alarm" in out, err
    code, out, err = _monitor([str(pg_detector), str(tmp_path / "frames" / "pg-batch"),
                               *common, "--out", str(tmp_path / "pg")], capsys)
    # Whether (and when) the small test model alarms on frames is a benchmark's question
    # (benchmarks/monitor.py --frames); what the code guarantees: every frame is cut and
    # counted, and an alarm, if any, comes after the first PG.
    assert code in (0, 3), out + err
    assert "frames/s" in out and f"{2 * settings.windows} frames" in out
    rows = _rows(tmp_path / "pg")
    assert len(rows) == settings.windows and all(int(r["crops"]) > 0 for r in rows)
    alarms = [int(r["window"]) for r in rows if r["alarm"] == "1"]
    assert (code == 3) == bool(alarms) and all(first_pg <= a for a in alarms)


def test_the_alarm_is_posted_to_a_url(pg_detector: Path, batches: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            return

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, _, _ = _monitor([str(pg_detector), str(batches / "pg-batch"), "--positive", "pg",
                               "--false-positive-rate", "0.05", "--out", str(tmp_path / "m"),
                               "--post", f"http://127.0.0.1:{server.server_port}/alarm"],
                              capsys)
    finally:
        server.shutdown()
    assert code == 3
    assert len(received) == 1 and received[0]["statistic"] >= received[0]["threshold"]
    assert received[0]["counts"]["pg"] > 0


def test_the_false_positive_rate_comes_from_the_report_beside_a_run_or_a_model_file(
        tmp_path: Path) -> None:
    """One rule for monitor and serve: MODEL may be the run folder or its model.onnx."""
    from crystalscope.errors import UserError
    from crystalscope.monitor.rule_setup import choose_false_positive_rate
    from crystalscope.monitor.trend import false_positive_rate_from_report

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "model.onnx"):  # what makes it a run (contents not read here)
        (run / name).write_text("", encoding="utf-8")
    (run / "report.json").write_text(json.dumps(
        {"classes": ["cex", "pg"], "confusion_matrix": [[95, 5], [10, 90]]}), encoding="utf-8")
    expected = false_positive_rate_from_report(run / "report.json", "pg")
    assert 0.05 < expected[0] < 0.15  # upper bound of 5/100
    for model in (run, run / "model.onnx"):
        assert choose_false_positive_rate(None, model, "pg") == expected  # type: ignore[arg-type]
    assert choose_false_positive_rate(None, run / "model.onnx", "pg",  # type: ignore[arg-type]
                                      given=0.02) == (0.02, "given")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.onnx").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="no test report beside"):
        choose_false_positive_rate(None, elsewhere / "model.onnx", "pg")  # type: ignore[arg-type]


@pytest.mark.parametrize("times", [["15", "5", "10"], ["10:00", "9:00", "9:30:15"]])
def test_csv_stream_times_sort_as_times_not_as_text(tmp_path: Path, times: list[str]) -> None:
    from crystalscope.monitor.frames import read_stream, time_value

    stream = tmp_path / "stream.csv"
    stream.write_text("time,path\n" + "".join(f"{t},crop-{t.replace(':', '')}.png\n"
                                              for t in times), encoding="utf-8")
    order = [w.time for w in read_stream(stream)]
    assert order == sorted(times, key=time_value)  # type: ignore[arg-type]
    assert order != sorted(times)  # text order would differ: 10 < 5, 10:00 < 9:00


def test_csv_stream_labels_that_are_not_times_keep_text_order(tmp_path: Path) -> None:
    from crystalscope.monitor.frames import read_stream

    stream = tmp_path / "stream.csv"
    stream.write_text("time,path\nbatch-b,b.png\nbatch-a,a.png\n", encoding="utf-8")
    assert [w.time for w in read_stream(stream)] == ["batch-a", "batch-b"]


def test_a_class_named_unknown_is_refused(exported_run: Path) -> None:
    """'unknown' marks crops the detector flags; a class of that name would be counted as
    such (or the reverse), so the monitor refuses to start."""
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.monitor.rule_setup import build_alarm_rule
    from crystalscope.monitor.settings import AlarmSettings

    predictor = load_predictor(exported_run / "model.onnx", classes=["unknown", "pg"])
    with pytest.raises(UserError, match="class named 'unknown'"):
        build_alarm_rule(predictor, exported_run,
                         AlarmSettings(positive="pg", false_positive_rate=0.05))
