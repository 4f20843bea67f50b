"""The LightningModule: the classifier, its loss, optimiser and class-wise metrics.

Metrics come from torchmetrics, so they are right under DDP (states are synchronised across
processes before ``compute``). Frozen BatchNorm layers stay in eval mode while training.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from crystalscope.model.backbones import (
    Classifier,
    create_backbone,
    freeze_fraction,
    set_frozen_norms_eval,
)
from crystalscope.model.normalize import Normalize, drop_saved_normalization
from crystalscope.model.sources import BackboneSource, is_sourced, resolve_source
from crystalscope.model.spec import backbone_normalization
from crystalscope.model.trunk import inference_copy, split_backbone


def _metrics(num_classes: int) -> MetricCollection:
    per_class = {"average": "none", "num_classes": num_classes}
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "precision": MulticlassPrecision(**per_class),
        "recall": MulticlassRecall(**per_class),
        "f1": MulticlassF1Score(**per_class),
        "precision_macro": MulticlassPrecision(num_classes=num_classes, average="macro"),
        "recall_macro": MulticlassRecall(num_classes=num_classes, average="macro"),
        "f1_macro": MulticlassF1Score(num_classes=num_classes, average="macro"),
        "precision_weighted": MulticlassPrecision(num_classes=num_classes, average="weighted"),
        "recall_weighted": MulticlassRecall(num_classes=num_classes, average="weighted"),
        "f1_weighted": MulticlassF1Score(num_classes=num_classes, average="weighted"),
    })


class CrystalClassifier(L.LightningModule):
    """A timm backbone + head, trained with cross-entropy; images arrive as uint8."""

    def __init__(self, *, model: str, classes: list[str], weights: str = "none",
                 head: str = "mlp", trainable: float = 1.0, optimizer: str = "adamw",
                 lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 scheduler: str = "none", max_epochs: int = 10,
                 class_weights: list[float] | None = None, channels_last: bool = True,
                 mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, mixup: float = 0.0,
                 cutmix: float = 0.0, label_smoothing: float = 0.0,
                 source: dict[str, Any] | None = None) -> None:
        super().__init__()
        # In the checkpoint only: the loggers get the run's resolved settings (train/tracking.py)
        self.save_hyperparameters(logger=False)
        resolved = None
        if is_sourced(model):  # hf-hub: / local-dir: read once, then kept in the checkpoint
            resolved = BackboneSource.from_dict(source) if source else resolve_source(model)
            self.hparams.source = resolved.to_dict()
        if mean is None or std is None:  # what the backbone's weights were trained with
            mean, std = backbone_normalization(model)
            if resolved is not None and resolved.mean and resolved.std:
                mean, std = resolved.mean, resolved.std
        # Kept in the checkpoint, so that the run and its exports feed the network alike.
        self.hparams.mean, self.hparams.std = list(mean), list(std)
        self.classes = list(classes)
        backbone = create_backbone(model, weights, resolved)
        self.trainable_layers = freeze_fraction(backbone, trainable)
        self.net = Classifier(backbone, len(classes), head)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        split = split_backbone(backbone)
        # Training runs the frozen trunk as inference (see model/trunk.py); the reason when not.
        self.split, self.trunk_note = (None, split) if isinstance(split, str) else (split, None)
        self.use_trunk_copy = True  # train.run turns it off for --compile
        self._trunk_copy: tuple[torch.device, nn.Module] | None = None  # not a registered module
        self.inputs = "images"  # or "trunk_features": see train/trunk_cache.py
        self.top_layout = torch.channels_last if channels_last else torch.contiguous_format
        self.normalizer = Normalize(mean, std)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss = nn.CrossEntropyLoss(weight=weight)  # validation: the plain loss
        self.mixup = None
        if mixup > 0 or cutmix > 0:  # timm's: soft targets, smoothed inside
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                               label_smoothing=label_smoothing, num_classes=len(classes))
            self.train_criterion: nn.Module = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.train_criterion = nn.CrossEntropyLoss(weight=weight,
                                                       label_smoothing=label_smoothing)
        else:
            self.train_criterion = self.loss
        self.train_metrics = _metrics(len(classes))
        self.val_metrics = _metrics(len(classes))
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.epoch_results: dict[str, Any] = {}
        self.train()  # frozen BatchNorm layers to eval mode from the start

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalised float, channels_last if configured."""
        x = self.normalizer(images)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))

    def training_forward(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` as training runs it: the frozen trunk (if any) as a no-grad copy
        with its BatchNorms folded, the rest on the trained modules. Same logits up to float
        rounding; the trunk's part costs about a third less on a CPU."""
        if self.split is None or not self.use_trunk_copy:
            return self(images)
        x = self.normalize(images)
        if self._trunk_copy is None or self._trunk_copy[0] != x.device:
            # Built lazily: after checkpoint restore, on the device training runs on.
            self._trunk_copy = (x.device, inference_copy(self.split.trunk))
        with torch.no_grad():
            features = self._trunk_copy[1](x)
        return self.top_forward(features)

    def set_top_layout(self, layout: torch.memory_format) -> None:
        """Train the top in ``layout`` (the trunk cache picks the plain layout on a CPU)."""
        self.top_layout = layout
        if self.split is not None:
            self.split.top.to(memory_format=layout)

    def top_forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from the frozen trunk's output (cached by train/trunk_cache.py)."""
        assert self.split is not None
        x = features.float().contiguous(memory_format=self.top_layout)
        return self.net.head(self.split.top(x))

    def on_train_start(self) -> None:
        self._trunk_copy = None  # weights may have been restored since it was made

    def train(self, mode: bool = True) -> CrystalClassifier:
        super().train(mode)
        if mode:
            set_frozen_norms_eval(self.net.backbone)
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning 2.x never calls .train() itself (it restores whatever modes the modules
        # had), so make sure here that frozen BatchNorm layers keep their running statistics.
        set_frozen_norms_eval(self.net.backbone)

    def mix(self, images: torch.Tensor, labels: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's mixup/CutMix of a batch: float images and soft (N, C) targets. An odd last
        image is left unmixed (timm mixes pairs), with its smoothed one-hot target."""
        from timm.data.mixup import mixup_target

        assert self.mixup is not None
        x = images.float()
        targets = mixup_target(labels, len(self.classes), smoothing=self.mixup.label_smoothing)
        paired = len(x) - len(x) % 2
        if paired >= 2:
            x[:paired], targets[:paired] = self.mixup(x[:paired], labels[:paired])
        return x, targets

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection,
              loss_metric: MeanMetric, training: bool = False) -> torch.Tensor:
        images, labels = batch
        targets, criterion = labels, (self.train_criterion if training else self.loss)
        if training and self.mixup is not None:
            images, targets = self.mix(images, labels)
        logits = (self.top_forward(images) if self.inputs == "trunk_features"
                  else self.training_forward(images))
        loss = criterion(logits, targets)
        metrics.update(logits.detach(), labels)  # mixed batches: against the unmixed labels
        loss_metric.update(loss.detach(), weight=len(labels))
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _index: int) -> torch.Tensor:
        loss = self._step(batch, self.train_metrics, self.train_loss, training=True)
        self.log("train_loss_step", loss, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _index: int) -> None:
        self._step(batch, self.val_metrics, self.val_loss)

    def _flatten(self, prefix: str, metrics: MetricCollection, loss: MeanMetric) -> dict:
        values = {f"{prefix}_loss": float(loss.compute())}
        for name, value in metrics.compute().items():
            if value.ndim == 0:
                values[f"{prefix}_{name}"] = float(value)
            else:
                for class_name, v in zip(self.classes, value.tolist(), strict=True):
                    values[f"{prefix}_{name}_{class_name}"] = float(v)
        metrics.reset()
        loss.reset()
        return values

    def on_validation_epoch_start(self) -> None:
        # Under DDP every process updates its BatchNorm running statistics with its own last
        # batch, so they differ a little: validate everywhere with the first process's, the
        # ones its checkpoint saves.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in self.net.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def on_validation_epoch_end(self) -> None:
        # Validation runs after the epoch's last training batch, so both are complete here;
        # callbacks read ``epoch_results`` in on_train_epoch_end, which comes next.
        if self.trainer.sanity_checking:
            self.val_metrics.reset()
            self.val_loss.reset()
            return
        values = {**self._flatten("train", self.train_metrics, self.train_loss),
                  **self._flatten("val", self.val_metrics, self.val_loss)}
        self.epoch_results = {"epoch": self.current_epoch, **values}
        # torchmetrics has already synchronised these across DDP processes, so they agree;
        # sync_dist only averages equal numbers (and keeps Lightning from warning).
        self.log_dict(values, sync_dist=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before it loads the state dict, for --resume and for loading.
        drop_saved_normalization(checkpoint["state_dict"])

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum,
                                        weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "cosine":
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.max_epochs)
            return {"optimizer": optimizer, "lr_scheduler": schedule}
        return optimizer
