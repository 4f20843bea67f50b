"""EMA weights: an exponential moving average of the network's weights (timm's ModelEmaV3),
validated, checkpointed and exported instead of the raw weights.

The average is updated after every optimiser step. For validation the averaged weights are
swapped into the network; they stay there through the checkpoints written after validation
(so ``best.ckpt`` — what evaluate and export read — holds them), and the raw weights come back
at the start of the next epoch. A checkpoint keeps the raw weights in this callback's state,
so ``--resume`` continues both. Cost: one more copy of the network in memory; per step one
``lerp`` over every weight, O(parameters).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class EmaWeights(L.Callback):
    """Keep ``decay``'s moving average of ``pl_module.net`` (with timm's warm-up: the decay
    grows from 0 over the first steps, so a short run is not held at its random start)."""

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema decay {decay}: give a number between 0 and 1")
        self.decay = decay
        self.ema: Any = None  # a timm ModelEmaV3
        self.raw: dict[str, torch.Tensor] | None = None  # while the averaged weights are in
        self.pending_raw: dict[str, torch.Tensor] | None = None  # from a checkpoint

    def _start(self, net: torch.nn.Module) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(net, decay=self.decay, use_warmup=True)
        if self.pending_raw is not None:  # resumed: the net holds the checkpoint's average
            net.load_state_dict(self.pending_raw)
            self.pending_raw = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is None:
            self._start(pl_module.net)
        if self.raw is not None:
            pl_module.net.load_state_dict(self.raw)
            self.raw = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update(pl_module.net, step=trainer.global_step)

    def on_validation_epoch_start(self, trainer: L.Trainer,
                                  pl_module: L.LightningModule) -> None:
        if self.ema is None or self.raw is not None or trainer.sanity_checking:
            return
        self.raw = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        pl_module.net.load_state_dict(self.ema.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "raw": self.raw}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending_raw = state_dict.get("raw")
