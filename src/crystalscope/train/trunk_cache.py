"""The frozen-trunk cache: run the frozen trunk once per image and transform, then train the top.

With ``--trainable < 1`` the trunk's output (see :mod:`crystalscope.model.trunk`) depends only
on its input. When the augmentation is a finite set of exact transforms (the 8 rotations/flips
of ``dihedral``, or ``none``), every input the trunk will ever see is known before training:
compute them all once (fp16, in RAM or a memory-mapped file, size-checked first), and each
epoch then runs only the top. The run's checkpoints and exports are the same as without the
cache; validation reads cached features of the untransformed images.

:func:`why_not` says in one line why the cache cannot apply to a run.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from crystalscope.config import TrainConfig
from crystalscope.data.decoded import choose_cache
from crystalscope.errors import UserError
from crystalscope.model.classifier import CrystalClassifier
from crystalscope.model.trunk import inference_copy
from crystalscope.train.data import CachedImages, SplitDataModule

TRANSFORMS = {"dihedral": 8, "none": 1}
BATCH = 32  # images per trunk pass while the cache is built


def dihedral(images: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th (0-7) of the 8 rotations/flips; 0 is the image itself."""
    images = torch.rot90(images, index // 2, dims=(-2, -1))
    return torch.flip(images, dims=(-1,)) if index % 2 else images


def why_not(config: TrainConfig, module: CrystalClassifier) -> str | None:
    """Why the frozen-trunk cache cannot apply to this run (one line), or None if it can."""
    if config.trunk_cache == "off":
        return "frozen-trunk cache: off (--trunk-cache off)"
    if module.split is None:
        return f"frozen-trunk cache: not used: {module.trunk_note}"
    if config.augmentation not in TRANSFORMS:
        return (f"frozen-trunk cache: not used: the {config.augmentation} augmentation's random "
                "warps give the trunk a new input every epoch (dihedral or none can be cached)")
    if config.randaugment != "none" or config.mixup or config.cutmix:
        return ("frozen-trunk cache: not used: RandAugment, mixup and CutMix give the trunk a "
                "new input every step")
    if config.compile:
        return "frozen-trunk cache: not used with --compile"
    if str(config.devices) not in ("1", "auto") or config.num_nodes > 1 or (
            config.strategy not in ("auto", "single_device")):
        return "frozen-trunk cache: not used: it runs on one device only"
    return None


class TrunkFeatures(Dataset):
    """Cached trunk outputs (N, T, C, H, W) fp16: each item is one random transform's."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        transform = int(torch.randint(0, self.features.shape[1], ()).item())
        return self.features[index, transform], self.labels[index]


def _device(config: TrainConfig) -> torch.device:
    wants_gpu = config.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def _storage(shape: tuple[int, ...], where: str, file: Path | None) -> torch.Tensor:
    if where == "ram" or file is None:
        return torch.empty(shape, dtype=torch.float16)
    return torch.from_numpy(np.lib.format.open_memmap(file, mode="w+", dtype=np.float16,
                                                      shape=shape))


def cache_trunk_features(data: SplitDataModule, module: CrystalClassifier, config: TrainConfig,
                         cache_dir: Path,
                         progress: Callable[[str, int], Callable[[int], None]] | None = None
                         ) -> str:
    """Replace ``data``'s train and validation sets by cached trunk features and switch
    ``module`` to train on them. Returns a one-line summary for the run's log."""
    assert data.train_set is not None and data.val_set is not None and module.split is not None
    assert isinstance(data.train_set, CachedImages) and isinstance(data.val_set, CachedImages)
    started = time.perf_counter()
    device = _device(config)
    trunk = inference_copy(module.split.trunk).to(device)
    module.to(device)  # for normalize's mean/std; Lightning moves it again as it pleases
    transforms = TRANSFORMS[config.augmentation]
    with torch.no_grad():
        probe = trunk(module.normalize(data.train_set.images[:1].to(device)))
    per_item = probe[0].numel() * 2  # fp16
    counts = {"train": len(data.train_set), "valid": len(data.val_set)}
    nbytes = (counts["train"] * transforms + counts["valid"]) * per_item
    where = choose_cache(config.cache, nbytes)
    if where == "disk":
        cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
        if nbytes > 0.9 * free:
            raise UserError(f"the frozen-trunk cache needs {nbytes / 2**30:.1f} GiB, more than "
                            f"the {free / 2**30:.1f} GiB free under {cache_dir}; free some "
                            "space, or train with --trunk-cache off")
    sets = {}
    for split, dataset, count in (("train", data.train_set, transforms),
                                  ("valid", data.val_set, 1)):
        shape = (len(dataset), count, *probe.shape[1:])
        features = _storage(shape, where, cache_dir / f"trunk-{split}.npy")
        report = progress(f"trunk cache {split}", len(dataset) * count) if progress else None
        with torch.no_grad():
            for start in range(0, len(dataset), BATCH):
                images = dataset.images[start:start + BATCH].to(device)
                for index in range(count):
                    x = module.normalize(dihedral(images, index))
                    features[start:start + len(images), index] = trunk(x).half().cpu()
                    if report:
                        report(len(images))
        sets[split] = features
    data.train_set = TrunkFeatures(sets["train"], data.train_set.labels)
    data.val_set = CachedImages(sets["valid"][:, 0], data.val_set.labels)
    module.to("cpu")
    module.inputs = "trunk_features"
    if device.type == "cpu":
        # Measured on 2 cores: the cached top of the fast recipe (ResNet-50 at 160 px, maps of
        # 10x10 and 5x5 px) trains 9% faster in the plain layout than channels_last; the full
        # georgia step (ResNet-101 at 224 px) is 6% faster with channels_last, so only here.
        module.set_top_layout(torch.contiguous_format)
    return (f"frozen-trunk cache: {module.split.trunk_blocks} of {module.split.blocks} blocks "
            f"computed once for {counts['train']} x {transforms} + {counts['valid']} inputs "
            f"in {time.perf_counter() - started:.0f} s ({nbytes / 2**30:.2f} GiB fp16 in "
            f"{'RAM' if where == 'ram' else 'a disk file'}); each epoch trains the top only")
