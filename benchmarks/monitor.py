"""Monitor on simulated batches: detection delay after the PG onset, false alarms per 1,000
clean windows, and throughput — or, with --overdispersed, the alarm rules alone on 10^5-window
simulated streams of over-dispersed, drifting false calls.

Images: trains a small model (ResNet-18 at 96 px, random init, on 200 + 200 synthetic crops
drawn at 96 px and the batches' difficulty) unless --run is given; then, per seed, simulates a
PG batch, a control batch and a calibration batch (`crystalscope synth batch`, crops drawn like
the model's), calibrates the alarm on the calibration batch and replays the other two with the
default rule. Run:
    .venv/bin/python benchmarks/monitor.py [--seeds 4] [--windows 50] [--per-window 30]

--overdispersed: per setting (intra-window correlation rho in {0, 0.01, 0.05} x AR(1) drift of
the false-call rate of +-0, 50, 100%), each rule is calibrated on 100 clean windows of the same
stream and then run over 5,000 clean windows, 20 times (10^5 clean windows: false alarms per
10^4); then --trials times calibrated afresh, run 50 clean windows and a step of real impurity
to 2x, 3x and 5x the base rate (detection delay in windows: 1 = the first contaminated one).
The cusum's min shift is the drift's amplitude (rate x drift: a clean batch reaches it), its
promise ARL0 = 10^4; the binomial rule is the first one (alpha 1e-3, 2 windows in a row); the
oracle is the cusum given the true rate, rho and drift instead of a calibration: the best this
rule can do, and how much the 100-window calibration costs. It ends with the information
bound of every setting (``alarm_limits.py``, beside this script: how fast any rule with the
same promise can be).
    .venv/bin/python benchmarks/monitor.py --overdispersed [--trials 100] [--false-rate 0.04]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from alarm_limits import print_information_bounds  # benchmarks/, beside this script
from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.infer.predictor import load_predictor
from crystalscope.monitor.rule_setup import build_alarm_rule, rule_from_calibration
from crystalscope.monitor.rules import calibrate_counts
from crystalscope.monitor.run import Monitor, replay
from crystalscope.monitor.settings import AlarmSettings, FrameCutting
from crystalscope.monitor.trend import AlarmRule
from crystalscope.synth.batch import BatchSettings, synthesize_batch
from crystalscope.synth.counts import CountStream, drift_path, window_counts
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.train.run import train

CROP = 96  # the model's crops and the batches' crops are drawn alike, at this side


def small_model(folder: Path, difficulty: float) -> Path:
    synthesize(folder / "images", SynthSettings(per_class=200, size=CROP,
                                                difficulty=difficulty, seed=5))
    split_dataset(folder / "images", folder / "splits")
    config = resolve_train_config({
        "data": folder / "splits", "runs_dir": folder / "runs", "name": "monitor",
        "model": "resnet18", "weights": "none", "image_size": 96, "trainable": 1.0,
        "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "scheduler": "none",
        "augmentation": "dihedral", "epochs": 15, "f1_threshold": 0.97})
    result = train(config, quiet=True)
    print(f"model: best validation macro F1 {result.best_val_f1_macro:.4f} "
          f"({result.epochs} epochs)", flush=True)
    return result.run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, help="an exported run (default: train one)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--windows", type=int, default=50)
    parser.add_argument("--per-window", type=int, default=30)
    parser.add_argument("--onset", type=int, default=25)
    parser.add_argument("--rate", type=float, default=0.02)
    parser.add_argument("--difficulty", type=float, default=0.3)
    parser.add_argument("--frames", type=int, default=0,
                        help="full frames per window (cut with each of --cut) instead of crops")
    parser.add_argument("--cut", nargs="+", default=["tiles", "particles"])
    parser.add_argument("--overdispersed", action="store_true",
                        help="the alarm rules on simulated over-dispersed, drifting counts")
    parser.add_argument("--trials", type=int, default=100,
                        help="--overdispersed: calibrations per setting for the delays")
    parser.add_argument("--false-rate", type=float, default=0.04,
                        help="--overdispersed: the clean stream's mean false-call rate")
    parser.add_argument("--calibration-windows", type=int, default=CALIBRATION_WINDOWS,
                        help="--overdispersed: clean windows each calibration sees")
    parser.add_argument("--crops", type=int, default=400,
                        help="--overdispersed: crops per window")
    args = parser.parse_args()
    if args.overdispersed:
        overdispersed(args)
        return
    with tempfile.TemporaryDirectory() as model_dir:
        run = args.run or small_model(Path(model_dir), args.difficulty)
        for cutter in (args.cut if args.frames else [None]):
            run_all(args, cutter, run)


def run_all(args: argparse.Namespace, cutter: str | None, run: Path) -> None:
    """``args.seeds`` PG and control batches, one way of cutting frames."""
    with tempfile.TemporaryDirectory() as tmp:
        predictor = load_predictor(run)
        delays, false_alarms, clean_windows, significant_clean = [], 0, 0, 0
        crops, seconds = 0, 0.0
        for seed in range(args.seeds):
            settings = BatchSettings(windows=args.windows, per_window=args.per_window,
                                     onset=args.onset, rate=args.rate,
                                     difficulty=args.difficulty, seed=seed,
                                     frames=args.frames, size=CROP, frame_size=4 * CROP)
            cutting = FrameCutting(crop_size=settings.size, cut=cutter) if cutter else None
            out = Path(tmp) / f"batch{seed}"
            summary = synthesize_batch(out, settings)
            rule = build_alarm_rule(predictor, run, AlarmSettings(
                positive="pg", calibrate=out / "calibration"), cutting)
            rate = rule.false_positive_rate
            first_pg = summary["batches"]["pg-batch"]["first_pg_window"]
            delay = None  # this seed's PG batch: windows from the first PG crop to the alarm
            for name in ("pg-batch", "control"):
                result = replay(Monitor(predictor, rule, out / f"monitor-{name}",
                                        cutting=cutting, say=lambda _: None), out / name)
                crops += result.crops
                seconds += result.seconds
                clean = [w for w in result.windows if name == "control" or w.index < first_pg]
                clean_windows += len(clean)
                significant_clean += sum(w.significant for w in clean)
                if result.alarm and (name == "control" or result.alarm.index < first_pg):
                    false_alarms += 1
                elif result.alarm:
                    delay = result.alarm.index - first_pg
                    delays.append(delay)
            print(json.dumps({"seed": seed, "false_positive_rate": round(rate, 4),
                              "first_pg_window": first_pg, "delay_windows": delay}),
                  flush=True)
        what = (f"{args.frames} frames cut into {cutter}" if cutter
                else f"{args.per_window} crops")
        print(f"{args.seeds} PG + {args.seeds} control batches of {args.windows} windows x "
              f"{what} (PG onset window {args.onset}, +{args.rate:.0%} per "
              f"window), rule {rule.rule}:")
        print(f"  detection delay after the first PG crop: "
              f"{np.median(delays) if delays else float('nan'):.1f} windows median "
              f"(min {min(delays, default=-1)}, max {max(delays, default=-1)}); "
              f"{len(delays)}/{args.seeds} PG batches alarmed")
        print(f"  false alarms: {false_alarms} in {clean_windows} clean windows "
              f"({1000 * false_alarms / max(1, clean_windows):.2f} per 1,000); significant "
              f"clean windows: {1000 * significant_clean / max(1, clean_windows):.2f} per 1,000")
        print(f"  throughput: {crops / seconds:.0f} crops/s (decode + ONNX Runtime + trend)")


# ----------------------------------------------------------------------------- over-dispersion

CALIBRATION_WINDOWS = 100  # --calibration-windows
CLEAN_RUNS, CLEAN_WINDOWS = 20, 5_000  # 10^5 clean windows per setting
STEPS = (2, 3, 5)
MAX_DELAY = 300


def make_rule(kind: str, counts: list[tuple[int, int]], stream: CountStream) -> AlarmRule:
    """A rule calibrated on clean counts, as build_alarm_rule makes it from a clean stream."""
    calibration = calibrate_counts(counts, "simulated clean stream")
    if kind == "oracle":  # knows the stream: its rate, rho and drift, exactly
        return AlarmRule(positive="pg", false_positive_rate=stream.rate, rule="cusum",
                         min_shift=stream.drift * stream.rate, dispersion=stream.rho,
                         design_crops=stream.crops)
    draft = AlarmRule(positive="pg", false_positive_rate=calibration.rate_bound, rule=kind)
    return rule_from_calibration(draft, calibration,
                                 min_shift=stream.drift * stream.rate if kind == "cusum" else 0.0)


def calibrated(kind: str, stream: CountStream, rng: np.random.Generator, z: float | None,
               windows: int) -> tuple[object, float]:
    """A fresh detector calibrated on ``windows`` clean windows; the drift's state."""
    rates, z = drift_path(stream, windows, rng, z)
    counts = window_counts(stream, rates, rng)
    rule = make_rule(kind, [(int(k), stream.crops) for k in counts], stream)
    return rule.impurity_rule(), z


def alarms(detector: object, counts: np.ndarray, crops: int, *, first_only: bool = False
           ) -> list[int]:
    """Windows (0-based) where the detector alarmed; it starts afresh after each alarm."""
    found = []
    for index, k in enumerate(counts.tolist()):
        if detector.update(k, crops).alarm:  # type: ignore[attr-defined]
            found.append(index)
            if first_only:
                break
            detector.reset()  # type: ignore[attr-defined]
    return found


def one_setting(stream: CountStream, trials: int, seed: int, calibration_windows: int
                ) -> dict:
    """False alarms per 10^4 clean windows and median delays to 2x/3x/5x, per rule."""
    result = {}
    for kind in ("cusum", "binomial", "oracle"):
        rng = np.random.default_rng(seed)  # both rules see the same streams
        false_alarms = 0
        for _ in range(CLEAN_RUNS):
            detector, z = calibrated(kind, stream, rng, None, calibration_windows)
            rates, z = drift_path(stream, CLEAN_WINDOWS, rng, z)
            false_alarms += len(alarms(detector, window_counts(stream, rates, rng),
                                       stream.crops))
        delays = {m: [] for m in STEPS}
        for _ in range(trials):
            detector, z = calibrated(kind, stream, rng, None, calibration_windows)
            rates, z = drift_path(stream, 50, rng, z)
            alarms(detector, window_counts(stream, rates, rng), stream.crops)
            state = detector.statistic  # type: ignore[attr-defined]
            rates, z = drift_path(stream, MAX_DELAY, rng, z)
            for m in STEPS:  # the same drift and warm-up state for each step size
                detector.statistic = state  # type: ignore[attr-defined]
                counts = window_counts(stream, rates + (m - 1) * stream.rate, rng)
                found = alarms(detector, counts, stream.crops, first_only=True)
                delays[m].append(found[0] + 1 if found else MAX_DELAY + 1)
        result[kind] = {"false_alarms_per_1e4": 1e4 * false_alarms / (CLEAN_RUNS * CLEAN_WINDOWS),
                        **{f"delay_{m}x": float(np.median(delays[m])) for m in STEPS},
                        **{f"missed_{m}x": sum(d > MAX_DELAY for d in delays[m]) / trials
                           for m in STEPS}}
    return result


def overdispersed(args: argparse.Namespace) -> None:
    """The table: every setting, both rules."""
    import time

    print(f"false-call rate {args.false_rate:.0%}, {args.crops} crops a window, AR(1) 0.95, "
          f"calibrated on {args.calibration_windows} clean windows; cusum ARL0 10^4, min shift = "
          "drift x rate; binomial alpha 1e-3 x 2 windows", flush=True)
    print("| rho | drift | rule | false alarms / 10^4 windows | median delay 2x | 3x | 5x |")
    print("|---|---|---|---|---|---|---|")
    for rho in (0.0, 0.01, 0.05):
        for drift in (0.0, 0.5, 1.0):
            stream = CountStream(rate=args.false_rate, rho=rho, drift=drift, crops=args.crops)
            start = time.perf_counter()
            result = one_setting(stream, args.trials, seed=int(1000 * rho + 10 * drift),
                                 calibration_windows=args.calibration_windows)
            for kind, numbers in result.items():
                delays = " | ".join(
                    f"{numbers[f'delay_{m}x']:.0f}"
                    + (f" ({100 * numbers[f'missed_{m}x']:.0f}% missed)"
                       if numbers[f"missed_{m}x"] else "") for m in STEPS)
                print(f"| {rho} | +-{drift:.0%} | {kind} | "
                      f"{numbers['false_alarms_per_1e4']:.1f} | {delays} |", flush=True)
            print(f"<!-- {time.perf_counter() - start:.0f} s -->", flush=True)
    print_information_bounds(args.false_rate, args.crops)


if __name__ == "__main__":
    main()
