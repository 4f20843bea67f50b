"""Time to validation F1: the `fast` recipe against `georgia` on the same synthetic split.

Each recipe trains through `crystalscope.train.run.train` (the CLI's code path) on one
synthetic split; the wall time of the first epoch at which every class's validation F1 reaches
the threshold is read from the run's metrics.csv (its ``elapsed_s`` column, cache build excluded).
Weights are random by default (this machine has no model hub). Both recipes freeze most of the
backbone, which only makes sense on pretrained features, so give ImageNet weights where they
exist: ``--weights imagenet`` on a connected machine, or local files per model. Run:
    .venv/bin/python benchmarks/time_to_f1.py [--per-class 100] [--max-epochs 25]
        [--difficulty easy]
        [--weights imagenet | --weights resnet50=r50.safetensors resnet101=r101.safetensors]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import torch

from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.recipes import RECIPES
from crystalscope.synth.crops import SynthSettings, parse_difficulty, synthesize
from crystalscope.train.run import train


def first_epoch_reaching(metrics_csv: Path, classes: list[str], threshold: float
                         ) -> tuple[int, float] | None:
    """(epoch, seconds) of the first row where every class's val F1 >= threshold."""
    with metrics_csv.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if all(float(row[f"val_f1_{name}"]) >= threshold for name in classes):
                return int(row["epoch"]), float(row["elapsed_s"])
    return None


def first_reaching_macro(metrics_csv: Path, level: float) -> tuple[int, float]:
    """(epoch, seconds) of the first row whose validation macro F1 >= level."""
    with metrics_csv.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if float(row["val_f1_macro"]) >= level:
                return int(row["epoch"]), float(row["elapsed_s"])
    raise ValueError(f"{metrics_csv}: never reached macro F1 {level}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipes", nargs="+", default=["fast", "georgia"])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--weights", nargs="+", default=["none"],
                        help="none, imagenet, or MODEL=PATH pairs")
    parser.add_argument("--max-epochs", type=int, default=25)
    parser.add_argument("--threshold", type=float, default=0.997)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=parse_difficulty, default="easy",
                        help="easy (default) or a number in 0..1: harder settings make a share "
                             "of the crops ambiguous by design, so no model reaches F1 0.997")
    args = parser.parse_args()
    per_model = dict(item.split("=", 1) for item in args.weights if "=" in item)
    default_weights = next((w for w in args.weights if "=" not in w), "none")
    with tempfile.TemporaryDirectory() as tmp:
        images, splits = Path(tmp) / "images", Path(tmp) / "splits"
        synthesize(images, SynthSettings(per_class=args.per_class, seed=args.seed,
                                         difficulty=args.difficulty))
        split_dataset(images, splits)
        print(f"{args.per_class} synthetic crops per class (difficulty {args.difficulty:g}), "
              f"weights {' '.join(args.weights)}, "
              f"{torch.get_num_threads()} threads, threshold: every class's val F1 >= "
              f"{args.threshold}, at most {args.max_epochs} epochs")
        runs = {}
        for recipe in args.recipes:
            model = RECIPES[recipe]["model"]
            config = resolve_train_config({
                "data": splits, "recipe": recipe, "epochs": args.max_epochs,
                "f1_threshold": args.threshold, "seed": args.seed,
                "weights": per_model.get(model, default_weights),
                "runs_dir": Path(tmp) / "runs", "name": recipe,
                "evaluate": False, "export": False,
            })
            result = train(config, quiet=True)
            runs[recipe] = result
            reached = first_epoch_reaching(result.run_dir / "metrics.csv", ["cex", "pg"],
                                           args.threshold)
            per_epoch = result.seconds / max(1, result.epochs)
            where = (f"reached at epoch {reached[0]} after {reached[1]:7.1f} s" if reached
                     else f"not reached in {result.epochs} epochs ({result.seconds:.1f} s)")
            print(f"{recipe:8s} {config.model}@{config.image_size}: {where}; "
                  f"{per_epoch:5.1f} s/epoch; best val macro F1 "
                  f"{result.best_val_f1_macro:.4f}", flush=True)
        # The level every recipe reached, and how long each took to get there: a comparison
        # that holds even when a recipe never reaches the threshold.
        common = min(float(r.best_val_f1_macro or 0.0) for r in runs.values())
        times = {name: first_reaching_macro(r.run_dir / "metrics.csv", common)
                 for name, r in runs.items()}
        print(f"to the validation macro F1 every recipe reached ({common:.4f}): " + ", ".join(
            f"{name} epoch {epoch} after {seconds:.1f} s" for name, (epoch, seconds)
            in times.items()))


if __name__ == "__main__":
    main()
