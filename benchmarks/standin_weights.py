"""Stand-in "pretrained" backbones for benchmarks on a machine that cannot fetch ImageNet weights.

The recipes freeze most of the backbone, which only makes sense when its lower layers already
compute useful features. Without a model hub, this script makes such layers here: it trains a
timm backbone (every layer) to tell which of scikit-image's 20 bundled photographs a random
piece (20-100% of the short side, flipped or turned) comes from, for a fixed time budget, and
writes the backbone without its classifier as ``OUT/<model>.safetensors``, loadable with
``crystalscope train --weights OUT/<model>.safetensors`` and by ``time_to_f1.py --weights
MODEL=PATH``.

These are NOT ImageNet weights: minutes of training on 20 photographs, not days on 1.3
million images. Numbers measured with them say how the recipes behave on top of *some*
pretrained features, not how they behave on ImageNet's. No crystal image is used here.

    .venv/bin/python benchmarks/standin_weights.py OUT [--models resnet50 resnet101]
        [--minutes 10 | --steps 640] [--image-size 96]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from crystalscope.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from crystalscope.data.unfamiliar import NATURAL_IMAGES


def photo_pieces(per_photo: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random square pieces of each photograph, resized to ``size``: uint8 (N, 3, S, S), labels."""
    import skimage.data

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(NATURAL_IMAGES):
        photo = np.asarray(getattr(skimage.data, name)())
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        photo = photo[..., :3].astype(np.uint8)
        h, w = photo.shape[:2]
        for _ in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.2, 1.0))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            piece = Image.fromarray(photo[y:y + side, x:x + side]).resize(
                (size, size), Image.Resampling.BILINEAR)
            images.append(np.asarray(piece).transpose(2, 0, 1))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of the 8 rotations/flips per batch (the crops, like the probe's, have no up)."""
    turn = int(torch.randint(4, (1,), generator=generator))
    images = torch.rot90(images, turn, dims=(2, 3))
    return images.flip(3) if bool(torch.randint(2, (1,), generator=generator)) else images


def pretrain(model_name: str, images: torch.Tensor, labels: torch.Tensor, *, minutes: float,
             steps: int | None, batch_size: int, lr: float, seed: int
             ) -> tuple[nn.Module, float, int]:
    """Train every layer for ``steps`` batches, or ``minutes`` when steps is None; return the
    model, its held-out accuracy and the steps taken."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    held = order[: len(order) // 10]
    train = order[len(order) // 10:]
    model = timm.create_model(model_name, num_classes=len(NATURAL_IMAGES))
    model = model.to(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    def normalise(batch: torch.Tensor) -> torch.Tensor:
        return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    deadline = time.monotonic() + minutes * 60

    def done() -> bool:
        return taken >= steps if steps is not None else time.monotonic() >= deadline

    taken = 0
    model.train()
    while not done():
        shuffled = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(shuffled) - batch_size + 1, batch_size):
            index = shuffled[start:start + batch_size]
            batch = dihedral(images[index], generator)
            loss = loss_fn(model(normalise(batch)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            taken += 1
            if done():
                break
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(normalise(images[held[i:i + 128]])).argmax(1)
                               for i in range(0, len(held), 128)])
    accuracy = float((predicted == labels[held]).float().mean())
    return model, accuracy, taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet101"])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time per model")
    parser.add_argument("--steps", type=int, help="batches per model (instead of --minutes), "
                        "so that deeper models are not trained less")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--per-photo", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = photo_pieces(args.per_photo, args.image_size, args.seed)
    print(f"{len(labels)} pieces of {len(NATURAL_IMAGES)} photographs at {args.image_size} px, "
          f"{torch.get_num_threads()} threads, {args.minutes:g} min per model")
    for name in args.models:
        started = time.monotonic()
        model, accuracy, steps = pretrain(name, images, labels, minutes=args.minutes,
                                          steps=args.steps, batch_size=args.batch_size,
                                          lr=args.lr, seed=args.seed)
        model.reset_classifier(0)
        path = args.out / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        print(f"{name}: {steps} steps of {args.batch_size} in {time.monotonic() - started:.0f} s, "
              f"held-out accuracy {accuracy:.3f} (chance {1 / len(NATURAL_IMAGES):.3f}) -> {path}")


if __name__ == "__main__":
    main()
