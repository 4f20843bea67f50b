"""Sim-to-real: train on `crystalscope synth` crops only, test on real probe crops.

Per seed: synthesises 800 CEX + 800 PG crops (default settings: 151 px CEX, 132-230 px PG),
splits them 70/25/5, trains a ResNet-18 from random weights (the setting that works without
internet) at 96 px with the 8 rotations/flips for 25 epochs, with dihedral test-time averaging
(``--tta``: the exported model averages each crop's 8 rotations and flips), exports it (which
fits and calibrates the unknown-detector at 1% false rejects on the synthetic train/valid
splits), then classifies the real crops in ``--real`` (default:
../shared/data/opencrystal-samples; the class is the file name's prefix, ``CEX (1).png`` ->
cex). The real crops are test data only: nothing is fitted on them.

Prints accuracy and per-class recall with Wilson 95% intervals, each crop's P(PG) and unknown
flag, the same network's result on single views (no averaging) for comparison, and the
statistics where synthetic and real crops differ most, class by class (brightness
percentiles, saturated share, gradient energy, spectrum slope, LBP texture).
Run:
    .venv/bin/python benchmarks/realism.py [--seeds 1 2] [--per-class 800] [--epochs 25]
        [--tta dihedral|none]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from crystalscope.config import resolve_train_config
from crystalscope.data.layout import is_image_name
from crystalscope.data.split import split_dataset
from crystalscope.data.split_settings import SplitSettings
from crystalscope.evaluate.statistics import wilson_interval
from crystalscope.export.stage import export_run
from crystalscope.infer.predictor import load_predictor
from crystalscope.model.inference import InferenceNet, load_run, run_batches
from crystalscope.model.spec import decode
from crystalscope.synth.crops import SynthSettings, render_group, synthesize
from crystalscope.synth.statistics import compare, image_statistics
from crystalscope.train.run import train

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "opencrystal-samples"


def real_crops(folder: Path) -> list[tuple[Path, str]]:
    """(path, class) of each real crop: the class is the name's prefix, lower case."""
    crops = [(path, path.name.split(" (")[0].split("_")[0].lower())
             for path in sorted(folder.iterdir()) if is_image_name(path)]
    if not crops:
        raise SystemExit(f"{folder}: holds no images; give --real FOLDER")
    return crops


def train_on_synthetic(folder: Path, *, per_class: int, epochs: int, size: int, seed: int,
                       tta: str = "dihedral") -> Path:
    synthesize(folder / "images", SynthSettings(per_class=per_class, seed=seed))
    split_dataset(folder / "images", folder / "splits", SplitSettings(seed=seed))
    config = resolve_train_config({
        "data": folder / "splits", "runs_dir": folder / "runs", "name": "realism",
        "model": "resnet18", "weights": "none", "image_size": size, "trainable": 1.0,
        "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "scheduler": "cosine",
        "augmentation": "dihedral", "tta": tta, "epochs": epochs, "f1_threshold": 1.0, "seed": seed,
        "evaluate": False, "export": False})
    result = train(config, quiet=True)
    print(f"  trained: best synthetic validation macro F1 {result.best_val_f1_macro:.4f} "
          f"({result.epochs} epochs, {result.seconds:.0f} s)")
    export_run(result.run_dir)
    return result.run_dir


def score_real(run_dir: Path, crops: list[tuple[Path, str]]) -> dict:
    predictor = load_predictor(run_dir / "model.onnx")
    images = np.stack([decode(path, predictor.spec)[0] for path, _ in crops])
    outputs = predictor.predict(images)
    predicted = [predictor.classes[i] for i in outputs.probabilities.argmax(axis=1)]
    truth = [name for _, name in crops]
    unknown = (outputs.unknown_scores > 1.0 if outputs.unknown_scores is not None
               else np.zeros(len(crops), bool))
    return {"classes": predictor.classes, "truth": truth, "predicted": predicted,
            "probabilities": outputs.probabilities, "unknown": unknown,
            "unknown_scores": outputs.unknown_scores}


def single_view_text(run_dir: Path, crops: list[tuple[Path, str]]) -> str:
    """Accuracy and PG recall of the run's network on each crop as it lies (no averaging)."""
    import torch

    run = load_run(run_dir)
    net = InferenceNet(run.net.classifier, run.spec).eval()
    images = torch.from_numpy(np.stack([decode(path, run.spec)[0]
                                        for path, _ in crops]))
    probabilities, _, _ = run_batches(net, images)
    predicted = [run.classes[i] for i in probabilities.argmax(dim=1).tolist()]
    truth = [name for _, name in crops]
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    pg = [p for t, p in zip(truth, predicted, strict=True) if t == "pg"]
    recall = f", PG recall {sum(p == 'pg' for p in pg)}/{len(pg)}" if pg else ""
    return f"{correct}/{len(truth)}{recall}"


def interval_text(successes: int, trials: int) -> str:
    low, high = wilson_interval(successes, trials) or (float("nan"), float("nan"))
    return f"{successes / trials:.4f} ({successes}/{trials}; 95% CI {low:.4f}-{high:.4f})"


def print_scores(scores: dict, crops: list[tuple[Path, str]]) -> dict[str, float]:
    truth, predicted = scores["truth"], scores["predicted"]
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    print(f"  accuracy on {len(truth)} real crops: {interval_text(correct, len(truth))}")
    result = {"accuracy": correct / len(truth), "unknown": int(scores["unknown"].sum())}
    for name in scores["classes"]:
        rows = [p for t, p in zip(truth, predicted, strict=True) if t == name]
        if rows:
            hits = sum(p == name for p in rows)
            print(f"  recall {name}: {interval_text(hits, len(rows))}")
            result[f"recall_{name}"] = hits / len(rows)
    print(f"  flagged unknown: {result['unknown']} of {len(truth)}")
    positive = scores["classes"][-1]
    for (path, name), p, prob, unknown, score in zip(
            crops, predicted, scores["probabilities"], scores["unknown"],
            scores["unknown_scores"] if scores["unknown_scores"] is not None
            else [np.nan] * len(crops),
            strict=True):
        mark = "" if p == name else "  <- wrong"
        print(f"    {path.name:18s} {name:4s} -> {p:4s} P({positive}) {prob[-1]:.3f} "
              f"score {score:5.2f}{' unknown' if unknown else ''}{mark}")
    return result


def print_statistics(crops: list[tuple[Path, str]], seed: int, count: int) -> None:
    """Real vs synthetic image statistics per class, largest gaps first."""
    settings = SynthSettings(seed=seed + 1000)
    for name in sorted({c for _, c in crops}):
        real = [image_statistics(Image.open(path)) for path, c in crops if c == name]
        synthetic = [image_statistics(render_group(name, n, settings)[0])
                     for n in range(1, count + 1)]
        print(f"  {name}: {len(real)} real vs {count} synthetic crops "
              "(gap in synthetic SDs; share of real inside the synthetic 1-99% range)")
        for row in compare(real, synthetic)[:8]:
            print(f"    {row['statistic']:16s} real {row['real']:9.4f}  synthetic "
                  f"{row['synthetic']:9.4f}  gap {row['gap_sd']:+6.2f} SD  "
                  f"inside {row['inside']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=REAL)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--per-class", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--tta", choices=["dihedral", "none"], default="dihedral",
                        help="test-time averaging built into the trained model")
    parser.add_argument("--statistics", type=int, default=200,
                        help="synthetic crops per class for the statistics (0: skip them)")
    parser.add_argument("--keep", type=Path, help="keep the last seed's run folder here")
    args = parser.parse_args()
    crops = real_crops(args.real)
    print(f"realism benchmark: {len(crops)} real crops from {args.real}; "
          f"ResNet-18 (random init) at {args.size} px trained on {args.per_class} synthetic "
          f"crops per class, {args.epochs} epochs, test-time averaging {args.tta}")
    summary = []
    for seed in args.seeds:
        print(f"seed {seed}:")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = train_on_synthetic(Path(tmp), per_class=args.per_class,
                                         epochs=args.epochs, size=args.size, seed=seed,
                                         tta=args.tta)
            summary.append(print_scores(score_real(run_dir, crops), crops))
            if args.tta != "none":
                print(f"  the same network on single views: {single_view_text(run_dir, crops)} "
                      "right")
            if args.keep:
                shutil.rmtree(args.keep, ignore_errors=True)
                shutil.copytree(run_dir, args.keep)
        print(f"  ({time.perf_counter() - start:.0f} s)")
    if len(summary) > 1:
        for key in summary[0]:
            values = [s[key] for s in summary]
            print(f"over {len(summary)} seeds: {key} mean {np.mean(values):.4f}, "
                  f"min {np.min(values):.4f}, max {np.max(values):.4f}")
    if args.statistics:
        print("image statistics, real vs synthetic:")
        print_statistics(crops, args.seeds[0], args.statistics)


if __name__ == "__main__":
    main()
