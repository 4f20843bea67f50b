"""Training throughput: the full step fed from image files vs from tensors already in memory.

(a) "files": synthetic PNGs -> SplitDataModule (decode once into the uint8 cache, tensor
    augmentation, DataLoader) -> training step; the time includes building the cache.
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

from crystalscope.data.loaders import SplitDataModule
from crystalscope.data.split import split_dataset
from crystalscope.data.synth import SynthSettings, synthesize
from crystalscope.model.classifier import CrystalClassifier
from crystalscope.train.recipes import RECIPES


def _step(module: CrystalClassifier, optimizer: torch.optim.Optimizer, images: torch.Tensor,
          labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    module.loss(module(images), labels).backward()
    optimizer.step()


def measure(model: str, size: int, steps: int, folder: Path) -> tuple[float, float]:
    georgia = RECIPES["georgia"]
    batch = georgia["batch_size"]
    module = CrystalClassifier(model=model, classes=["cex", "pg"], trainable=georgia["trainable"],
                               optimizer="sgd", lr=georgia["lr"]).train()
    optimizer = module.configure_optimizers()
    images = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 2, (batch,))
    _step(module, optimizer, images, labels)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        _step(module, optimizer, images, labels)
    tensors = steps * batch / (time.perf_counter() - start)

    start = time.perf_counter()
    data = SplitDataModule(folder, image_size=size, batch_size=batch, augmentation="georgia")
    data.setup()
    done = 0
    for images, labels in data.train_dataloader():
        _step(module, optimizer, images, labels)
        done += 1
        if done == steps:
            break
    files = done * batch / (time.perf_counter() - start)
    return files, tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["resnet18:128", "resnet101:224"])
    parser.add_argument("--steps", type=int, default=6)
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
            files, tensors = measure(model, int(size), args.steps, Path(tmp) / "splits")
            print(f"{model}@{size}: (a) files {files:6.1f} images/s   (b) tensors {tensors:6.1f} "
                  f"images/s   overhead {100 * (1 - files / tensors):5.1f}%")


if __name__ == "__main__":
    main()
