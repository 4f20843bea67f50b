"""The spec's normalisation, written once: ``(x / 255 - mean) / std`` on uint8-valued input.

Every network crystalscope builds holds one :class:`Normalize` (the LightningModule for
training, :class:`~crystalscope.model.inference.InferenceNet` for evaluate, export, predict and
the unknown-detector; CAMs call the same module), so the ONNX graph, the checkpoint's network
and the CAMs see the same numbers. Its buffers are not saved: the spec (model.json, the
checkpoint's hyper-parameters) holds mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from crystalscope.model.spec import ModelSpec


class Normalize(nn.Module):
    """(N, 3, H, W) 0-255 values -> float ``(x - 255 mean) / (255 std)``, per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(tuple(mean)).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std)).view(1, 3, 1, 1) * 255,
                             persistent=False)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Normalize:
        return cls(spec.mean, spec.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


def drop_saved_normalization(state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Remove the ``mean``/``std`` buffers that checkpoints written before :class:`Normalize`
    saved (they equal the hyper-parameters), so that they load strictly."""
    for name in ("mean", "std"):
        state_dict.pop(prefix + name, None)
