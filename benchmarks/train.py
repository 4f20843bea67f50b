"""Training throughput: the full step fed from image files vs from tensors already in memory.

(a) "files": synthetic PNGs -> SplitDataModule (decode once into the uint8 cache, tensor
    augmentation, DataLoader) -> training step. Reported twice: steady state (every epoch after
    the first: the cache is built, only augmentation and batching remain) and first epoch
    (the one-off decode included, spread over the measured steps).
(b) "tensors": the same step on a uint8 batch already in memory (no data pipeline at all).
The gap is the data pipeline's overhead. Run:
    .venv/bin/python benchmarks/train.py [--configs resnet18:128 resnet101:224] [--steps 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from crystalscope.data.split import split_dataset
from crystalscope.model.classifier import CrystalClassifier
from crystalscope.recipes import RECIPES
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.train.data import SplitDataModule


def _step(module: CrystalClassifier, optimizer: torch.optim.Optimizer, images: torch.Tensor,
          labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    module.loss(module.training_forward(images), labels).backward()
    optimizer.step()


def measure(model: str, size: int, steps: int, folder: Path, workers: int,
            recipe: str = "georgia") -> tuple[float, float, float]:
    """(steady images/s from files, first-epoch images/s, images/s from tensors) of
    ``recipe``'s training step with ``model`` at ``size`` px."""
    settings = RECIPES[recipe]
    batch = settings["batch_size"]
    module = CrystalClassifier(model=model, classes=["cex", "pg"],
                               trainable=settings["trainable"], optimizer=settings["optimizer"],
                               lr=settings["lr"], momentum=settings["momentum"],
                               weight_decay=settings["weight_decay"]).train()
    optimizer = module.configure_optimizers()
    images = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 2, (batch,))
    _step(module, optimizer, images, labels)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        _step(module, optimizer, images, labels)
    tensors = steps * batch / (time.perf_counter() - start)

    start = time.perf_counter()
    data = SplitDataModule(folder, image_size=size, batch_size=batch,
                           augmentation=settings["augmentation"], num_workers=workers)
    data.setup()
    decode_seconds = time.perf_counter() - start
    start = time.perf_counter()
    done = 0
    for images, labels in data.train_dataloader():
        _step(module, optimizer, images, labels)
        done += 1
        if done == steps:
            break
    step_seconds = time.perf_counter() - start
    steady = done * batch / step_seconds
    first_epoch = done * batch / (step_seconds + decode_seconds)
    return steady, first_epoch, tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["resnet18:128", "resnet101:224"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        batch = RECIPES["georgia"]["batch_size"]
        per_class = max(8, (args.steps * batch) // 2 * 10 // 7 + 8)  # enough for `steps` batches
        synthesize(Path(tmp) / "images", SynthSettings(per_class=per_class))
        split_dataset(Path(tmp) / "images", Path(tmp) / "splits")
        print(f"training step, georgia recipe (SGD, batch {batch}, last 10% trainable), "
              f"{args.steps} steps, {torch.get_num_threads()} threads")
        for item in args.configs:
            model, size = item.split(":")
            steady, first, tensors = measure(model, int(size), args.steps,
                                             Path(tmp) / "splits", args.workers)
            print(f"{model}@{size}: (a) files {steady:6.1f} images/s steady "
                  f"({first:6.1f} in the first epoch, decode included)   "
                  f"(b) tensors {tensors:6.1f} images/s   "
                  f"steady overhead {100 * (1 - steady / tensors):5.1f}%")


if __name__ == "__main__":
    main()
