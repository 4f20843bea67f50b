"""Live monitoring: can `monitor --watch` keep up with a probe writing crops at a given rate?

A writer thread copies simulated windows into a watched folder at ``--crops-per-second``;
the monitor (the same code as `crystalscope monitor --watch`) processes each window once the
next one appears. Reported: the lag from a window's completion (its last crop written) to its
processing — a lag that keeps growing from window to window means the monitor falls behind.
Run:
    .venv/bin/python benchmarks/monitor_live.py --run RUN [--crops-per-second 100 200 400]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

from crystalscope.infer.predictor import load_predictor
from crystalscope.monitor.run import Monitor
from crystalscope.monitor.trend import AlarmRule
from crystalscope.monitor.watching import watch
from crystalscope.synth.batch import BatchSettings, synthesize_batch


def write_windows(sources: list[Path], live: Path, crops_per_second: float,
                  finished: dict[str, float]) -> None:
    """Copy each window's crops at the given rate; note when each window was complete."""
    for source in sources:
        target = live / f".{source.name}.partial"
        target.mkdir()
        for crop in sorted(source.glob("*.png")):
            start = time.perf_counter()
            shutil.copy(crop, target / crop.name)
            time.sleep(max(0.0, 1 / crops_per_second - (time.perf_counter() - start)))
        target.rename(live / source.name)  # a window appears whole, as a probe would close it
        finished[source.name] = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, required=True, help="an exported run")
    parser.add_argument("--crops-per-second", type=float, nargs="+", default=[100, 200, 400])
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--per-window", type=int, default=40)
    args = parser.parse_args()
    predictor = load_predictor(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        settings = BatchSettings(windows=args.windows, per_window=args.per_window,
                                 onset=args.windows // 2, rate=0.05,
                                 calibration_windows=1)
        synthesize_batch(Path(tmp) / "batch", settings)
        sources = sorted(p for p in (Path(tmp) / "batch" / "pg-batch").glob("t*") if p.is_dir())
        print(f"{args.windows} windows of {args.per_window} crops, 2 cores")
        for rate in args.crops_per_second:
            live, processed = Path(tmp) / f"live-{rate:g}", {}
            live.mkdir()
            finished: dict[str, float] = {}
            monitor = Monitor(predictor, AlarmRule(positive="pg", false_positive_rate=0.05),
                              Path(tmp) / f"out-{rate:g}", say=lambda _: None)
            original = monitor.process

            def timed(window, _original=original, _processed=processed):
                result = _original(window)
                _processed[window.time] = time.monotonic()
                return result

            monitor.process = timed  # type: ignore[method-assign]
            writer = threading.Thread(target=write_windows,
                                      args=(sources, live, rate, finished))
            writer.start()
            watch(monitor, live, poll_s=0.1, settle_s=1.0, idle_stop_s=3.0)
            writer.join()
            lags = [processed[name] - finished[name] for name in sorted(processed)
                    if name in finished]
            # The last window has no successor: it waits for --settle (1 s) by design.
            print(f"  {rate:5.0f} crops/s written: {len(lags)} windows processed; lag after "
                  f"a window closes: first {lags[0]:.2f} s, second-to-last {lags[-2]:.2f} s, "
                  f"max {max(lags[:-1]):.2f} s (the last, waiting for --settle: "
                  f"{lags[-1]:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
