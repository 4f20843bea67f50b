"""The frozen-trunk cache: epoch time and validation F1 with and without it, same seed.

Trains the `fast` recipe (ResNet-50 at 160 px, dihedral augmentation) on synthetic crops with
``--trainable 0.25`` (the recipe's) and ``0.10``, once with ``--trunk-cache off`` and once with
``auto``, and prints per run: the cache's one-off build, the median epoch after the first, the
total, and the best validation macro F1. Random-initialised weights (no hub here): the frozen
trunk is random, so the F1 is low, but the same F1 with and without the cache is the check.
Run:
    .venv/bin/python benchmarks/trunk_cache.py [--per-class 300] [--epochs 6]
        [--trainable 0.25 0.10]
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import tempfile
from pathlib import Path

from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.data.split_settings import SplitSettings
from crystalscope.evaluate.plots import read_metrics_csv
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.train.run import train


def one_run(splits: Path, runs: Path, trainable: float, cache: str, epochs: int,
            seed: int, model: str, size: int) -> dict[str, float]:
    config = resolve_train_config({
        "recipe": "fast", "data": splits, "runs_dir": runs, "model": model, "image_size": size,
        "name": f"t{trainable}-{cache}", "weights": "none", "trainable": trainable,
        "trunk_cache": cache, "epochs": epochs, "patience": epochs, "seed": seed,
        "evaluate": False, "export": False})
    result = train(config, quiet=True)
    elapsed = read_metrics_csv(result.run_dir / "metrics.csv")["elapsed_s"]
    epoch_seconds = [b - a for a, b in itertools.pairwise(elapsed)]
    note = next((n for n in result.notes if n.startswith("frozen-trunk cache")), "")
    build = re.search(r"in (\d+) s", note)
    return {"build": float(build.group(1)) if build else 0.0,
            "epoch": statistics.median(epoch_seconds), "total": result.seconds,
            "f1": result.best_val_f1_macro or 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--trainable", type=float, nargs="+", default=[0.25, 0.10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthesize(folder / "images", SynthSettings(per_class=args.per_class, seed=args.seed))
        split_dataset(folder / "images", folder / "splits", SplitSettings(seed=args.seed))
        print(f"fast recipe ({args.model}@{args.size}, dihedral), {2 * args.per_class} crops, "
              f"{args.epochs} epochs, seed {args.seed}")
        for trainable in args.trainable:
            runs = {cache: one_run(folder / "splits", folder / "runs", trainable, cache,
                                   args.epochs, args.seed, args.model, args.size)
                    for cache in ("off", "auto")}
            for cache, r in runs.items():
                print(f"  trainable {trainable:.2f} cache {cache:4s}: build {r['build']:5.0f} s"
                      f"  epoch {r['epoch']:6.1f} s  total {r['total']:6.0f} s  "
                      f"best val macro F1 {r['f1']:.4f}", flush=True)
            off, on = runs["off"], runs["auto"]
            print(f"  trainable {trainable:.2f}: epochs {off['epoch'] / on['epoch']:.1f}x "
                  f"faster, whole run {off['total'] / on['total']:.1f}x, F1 "
                  f"{on['f1'] - off['f1']:+.4f}", flush=True)


if __name__ == "__main__":
    main()
