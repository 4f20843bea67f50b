"""Monitor on simulated batches: detection delay after the PG onset, false alarms per 1,000
clean windows, and throughput.

Trains a small model (ResNet-18 at 96 px, random init, on 200 + 200 synthetic crops drawn at
96 px and the batches' difficulty) unless --run is given; then, per seed, simulates a PG
batch, a control batch and a calibration batch (`crystalscope synth batch`, crops drawn like
the model's), measures the false-positive rate on the calibration batch and replays the other
two with the default alarm (alpha 1e-3, 2 windows in a row). Run:
    .venv/bin/python benchmarks/monitor.py [--seeds 4] [--windows 50] [--per-window 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.infer.predictor import load_predictor
from crystalscope.monitor.run import FrameCutting, Monitor, calibrate, replay
from crystalscope.monitor.trend import AlarmRule
from crystalscope.synth.batch import BatchSettings, synthesize_batch
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
    args = parser.parse_args()
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
            cutting = FrameCutting(settings.size, cutter) if cutter else None
            out = Path(tmp) / f"batch{seed}"
            summary = synthesize_batch(out, settings)
            rate, source = calibrate(predictor, out / "calibration", "pg", cutting)
            rule = AlarmRule(positive="pg", false_positive_rate=rate, source=source)
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
              "window), alpha 1e-3, 2 windows in a row:")
        print(f"  detection delay after the first PG crop: "
              f"{np.median(delays) if delays else float('nan'):.1f} windows median "
              f"(min {min(delays, default=-1)}, max {max(delays, default=-1)}); "
              f"{len(delays)}/{args.seeds} PG batches alarmed")
        print(f"  false alarms: {false_alarms} in {clean_windows} clean windows "
              f"({1000 * false_alarms / max(1, clean_windows):.2f} per 1,000); significant "
              f"clean windows: {1000 * significant_clean / max(1, clean_windows):.2f} per 1,000")
        print(f"  throughput: {crops / seconds:.0f} crops/s (decode + ONNX Runtime + trend)")


if __name__ == "__main__":
    main()
