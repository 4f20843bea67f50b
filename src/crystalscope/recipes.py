"""Named training recipes: complete sets of settings that any option can override."""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # The original project (TensorFlow/Keras): ResNet-101 at 224 px, last 10% of the layers
    # trainable, SGD lr 0.1 momentum 0.9, batch 64, rotation/shift/zoom/flip augmentation,
    # up to 100 epochs, stop once every class's validation F1 >= 0.997, val-loss patience 50.
    "georgia": {
        "model": "resnet101", "image_size": 224, "trainable": 0.10, "head": "mlp",
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0,
        "scheduler": "none", "batch_size": 64, "augmentation": "georgia", "epochs": 100,
        "f1_threshold": 0.997, "patience": 50,
        "randaugment": "none", "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0,
        "ema_decay": 0.0,
    },
    # Ours: native resolution (the CEX crops are 151 px; 160 is the nearest multiple of 32),
    # a quarter of the backbone trainable, AdamW with a cosine schedule, and the 8
    # rotations/flips as augmentation (crops have no orientation; cheaper than affine warps).
    "fast": {
        "model": "resnet50", "image_size": 160, "trainable": 0.25, "head": "mlp",
        "optimizer": "adamw", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4,
        "scheduler": "cosine", "batch_size": 32, "augmentation": "dihedral", "epochs": 30,
        "f1_threshold": 0.997, "patience": 10,
        "randaugment": "none", "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0,
        "ema_decay": 0.0,
    },
}
# fast with timm's regularisers (timm's train.py, "ResNet strikes back"): RandAugment, mixup
# and CutMix, label smoothing and EMA weights; for sets large enough to need them.
RECIPES["timm"] = {**RECIPES["fast"], "randaugment": "rand-m7-mstd0.5", "mixup": 0.2,
                   "cutmix": 1.0, "label_smoothing": 0.1, "ema_decay": 0.999}
DEFAULT_RECIPE = "fast"
