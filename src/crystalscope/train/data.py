"""Torch data for training: each image decoded once into a uint8 cache, augmented as a tensor.

A split folder (``train/valid/test/<class>/…``) becomes one :class:`CachedImages` per split.
Images are read with the project's safe loader, squashed to ``size`` x ``size`` (bilinear, as
Keras' directory loader does) and kept as a (N, 3, S, S) uint8 tensor, so later epochs never
decode a PNG. The tensor lives in RAM, or in a memory-mapped file when the set is larger than
half the free memory (``cache="auto"``) or when asked (``cache="disk"``). Normalisation happens
in the model, on the device, so batches travel as uint8.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from crystalscope.data.decoded import (
    CacheKind,
    build_cache,
    choose_cache,
    read_split_folder,
)
from crystalscope.errors import UserError
from crystalscope.model.spec import ModelSpec


class CachedImages(Dataset):
    """Cached uint8 images with an optional tensor augmentation per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return image, self.labels[index]


class Dihedral(torch.nn.Module):
    """A random one of the 8 rotations/flips: crops have no up or down."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        image = torch.rot90(image, k, dims=(-2, -1))
        if torch.rand(()) < 0.5:
            image = torch.flip(image, dims=(-1,))
        return image


class RandAugment(torch.nn.Module):
    """timm's RandAugment (``config`` such as ``rand-m9-mstd0.5``) on a uint8 (3, S, S) tensor:
    timm's ops work on PIL images, so the crop goes through PIL and back (a few tens of µs at
    64 px). The fill of shifted-in pixels is the crop's own mean grey, not black."""

    def __init__(self, config: str, size: int) -> None:
        super().__init__()
        from timm.data.auto_augment import rand_augment_transform

        try:
            self.transform = rand_augment_transform(
                config, {"translate_const": int(size * 0.45), "img_mean": (128, 128, 128)})
        except (AssertionError, KeyError, ValueError, IndexError) as exc:
            raise UserError(f"randaugment {config!r}: not a timm RandAugment config, e.g. "
                            f"rand-m9-mstd0.5 ({exc})") from exc

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional

        return functional.pil_to_tensor(self.transform(functional.to_pil_image(image)))


def make_augmentation(kind: str, randaugment: str = "none", size: int = 224
                      ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``none``; ``dihedral`` (rotations/flips); ``georgia`` (the original Keras settings:
    rotation ±30°, shifts 0.2, zoom 0.3, horizontal and vertical flips); then, unless
    ``randaugment`` is ``none``, timm's RandAugment with that config (``size``: the crops')."""
    if kind == "none":
        base = None
    elif kind == "dihedral":
        base = Dihedral()
    elif kind == "georgia":
        base = v2.Compose([
            v2.RandomAffine(degrees=30, translate=(0.2, 0.2), scale=(0.7, 1.3)),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
        ])
    else:
        raise UserError(f"augmentation {kind!r}: use none, dihedral or georgia")
    if randaugment == "none":
        return base
    extra = RandAugment(randaugment, size)
    return extra if base is None else v2.Compose([base, extra])


def _world_size() -> int:
    """Processes in this DDP run (1 outside one)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


class SplitDataModule(L.LightningDataModule):
    """Train and validation data from a split folder, decoded once into RAM."""

    def __init__(self, root: Path, *, image_size: int, batch_size: int, augmentation: str,
                 randaugment: str = "none", fraction: float = 1.0, num_workers: int = 0,
                 seed: int = 0,
                 cache: CacheKind = "auto", cache_dir: Path | None = None,
                 progress: Callable[[str, int], Callable[[int], None]] | None = None) -> None:
        super().__init__()
        self.cache, self.cache_dir = cache, cache_dir
        self.cache_used: Literal["ram", "disk"] | None = None
        self.folder = read_split_folder(root)
        self.classes = self.folder.classes
        self.image_size, self.batch_size = image_size, batch_size
        # How the images are decoded: the run's spec (its mean/std are the network's concern).
        self.spec = ModelSpec(input_size=image_size, classes=tuple(self.classes))
        self.augmentation, self.fraction = augmentation, fraction
        self.randaugment = randaugment
        self.num_workers, self.seed, self.progress = num_workers, seed, progress
        self.train_set: CachedImages | None = None
        self.val_set: CachedImages | None = None
        self.skipped: list[str] = []

    def _subset(self, items: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        if self.fraction >= 1.0:
            return items
        rng = np.random.default_rng(self.seed)
        keep = []
        for label in sorted({lbl for _, lbl in items}):  # stratified: every class keeps some
            mine = [it for it in items if it[1] == label]
            count = max(1, math.ceil(len(mine) * self.fraction))
            keep += [mine[i] for i in sorted(rng.choice(len(mine), count, replace=False))]
        return keep

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        sets = {}
        chosen = {split: self._subset(self.folder.items[split]) for split in ("train", "valid")}
        nbytes = sum(len(items) for items in chosen.values()) * 3 * self.image_size ** 2
        self.cache_used = choose_cache(self.cache, nbytes)
        if self.cache_used == "disk" and self.cache_dir is None:
            self.cache_dir = Path(tempfile.mkdtemp(prefix="crystalscope-cache-"))
        for split, items in chosen.items():
            report = self.progress(f"decode {split}", len(items)) if self.progress else None
            cache_file = None
            if self.cache_used == "disk":
                assert self.cache_dir is not None
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                cache_file = self.cache_dir / f"{split}-{self.image_size}px.npy"
            decoded = build_cache(items, self.spec, report, cache_file)
            self.skipped += decoded.skipped
            sets[split] = (decoded.images, decoded.labels)
        train_images, train_labels = sets["train"]
        if len(train_labels) < self.batch_size:
            raise UserError(f"{self.folder.root}/train: {len(train_labels)} images is fewer "
                            f"than the batch size {self.batch_size}; use a smaller batch size")
        self.train_set = CachedImages(train_images, train_labels,
                                      make_augmentation(self.augmentation, self.randaugment,
                                                        self.image_size))
        self.val_set = CachedImages(*sets["valid"])

    def class_counts(self) -> list[int]:
        assert self.train_set is not None
        return torch.bincount(self.train_set.labels, minlength=len(self.classes)).tolist()

    def _loader(self, dataset: Dataset, shuffle: bool,
                sampler: Sampler | None = None) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        # Under DDP each process sees its share of the images: drop a ragged last batch only
        # when that share holds more than one batch.
        share = math.ceil(len(dataset) / _world_size())
        return DataLoader(dataset, batch_size=self.batch_size,
                          shuffle=shuffle if sampler is None else None, sampler=sampler,
                          drop_last=shuffle and share > self.batch_size,
                          num_workers=self.num_workers, generator=generator,
                          persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        sampler = None
        if _world_size() > 1:
            # Lightning's DistributedSampler pads the last batch with repeated images, which
            # would count them twice in the validation metrics; this sampler gives every
            # image to exactly one process (uneven counts are safe: no gradients here).
            sampler = UnrepeatedDistributedSampler(self.val_set, shuffle=False)
        return self._loader(self.val_set, shuffle=False, sampler=sampler)
