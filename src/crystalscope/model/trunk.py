"""The frozen trunk: the blocks at the bottom of a backbone whose parameters are all frozen.

With ``--trainable < 1`` these blocks' outputs depend only on the input image, so training can
run them as plain inference: a copy with every BatchNorm folded into the convolution before it
(what TF/Keras does to frozen layers), under ``torch.no_grad``. The trainable top runs on the
original modules, so checkpoints and exports are unchanged. :mod:`crystalscope.train.trunk_cache`
goes one step further and computes the trunk once per image and transform.

Only timm ResNets (stem + ``layer1``-``layer4`` of residual blocks) are cut; for other
backbones :func:`split_backbone` returns why not, in one line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

STAGES = ("layer1", "layer2", "layer3", "layer4")
STEM = ("conv1", "bn1", "act1", "maxpool")


@dataclass
class BackboneSplit:
    """A backbone cut into ``trunk`` (frozen blocks) and ``top`` (the rest, head included)."""

    trunk: nn.Sequential
    top: nn.Sequential
    trunk_blocks: int  # how many blocks (stem counted as one) the trunk holds
    blocks: int


def _is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def split_backbone(backbone: nn.Module) -> BackboneSplit | str:
    """Cut a timm ResNet after its last block whose parameters are all frozen.

    Returns the split (sharing the backbone's modules; nothing is copied) or, when no cut is
    possible, the reason in one line.
    """
    if not all(hasattr(backbone, name) for name in (*STEM, *STAGES, "forward_head")):
        return (f"the frozen trunk is cut in timm ResNets only; {type(backbone).__name__} "
                "trains as usual")
    blocks: list[nn.Module] = [nn.Sequential(*(getattr(backbone, name) for name in STEM))]
    for stage in STAGES:
        blocks.extend(getattr(backbone, stage))
    frozen = 0
    while frozen < len(blocks) and _is_frozen(blocks[frozen]):
        frozen += 1
    if frozen == 0:
        return "no frozen trunk: the first block is trainable (--trainable 1.0 or close to it)"
    head = _ForwardHead(backbone)
    return BackboneSplit(trunk=nn.Sequential(*blocks[:frozen]),
                         top=nn.Sequential(*blocks[frozen:], head),
                         trunk_blocks=frozen, blocks=len(blocks))


class _ForwardHead(nn.Module):
    """The backbone's pooling (its ``forward_head``), as a module for the top's Sequential."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self._backbone = [backbone]  # a list: not registered, so its weights are not owned twice

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self._backbone[0].forward_head(features)


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the convolution before it, in place.

    Pairs are ``conv{k}``/``bn{k}`` attributes of one module (timm's blocks and stem; a
    Sequential ``conv{k}`` ends in its convolution) and a Conv2d directly followed by a
    BatchNorm2d inside a Sequential. Returns how many were folded. For inference copies only:
    the folded module's parameters differ from the original's.
    """
    folded = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            items = list(parent)
            for i in range(len(items) - 1):
                if isinstance(items[i], nn.Conv2d) and isinstance(items[i + 1], nn.BatchNorm2d):
                    parent[i] = fuse_conv_bn_eval(items[i], items[i + 1])
                    parent[i + 1] = nn.Identity()
                    folded += 1
        for k in range(1, 10):
            conv, norm = getattr(parent, f"conv{k}", None), getattr(parent, f"bn{k}", None)
            if not isinstance(norm, nn.BatchNorm2d):
                continue
            owner, name = parent, f"conv{k}"
            if isinstance(conv, nn.Sequential) and len(conv) and isinstance(conv[-1], nn.Conv2d):
                owner, name, conv = conv, str(len(conv) - 1), conv[-1]
            if isinstance(conv, nn.Conv2d):
                setattr(owner, name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, f"bn{k}", nn.Identity())
                folded += 1
    return folded


def inference_copy(trunk: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of ``trunk`` with its BatchNorms folded (same outputs up to
    float rounding, fewer passes over memory)."""
    twin = copy.deepcopy(trunk).eval()
    fold_batch_norms(twin)
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin
