"""Backbones from timm, where their weights come from, and which part of them trains.

``--weights imagenet`` asks timm for its pretrained weights (from the Hugging Face hub, so it
needs internet); ``--weights PATH`` loads a local timm / torchvision / safetensors file through
timm's own loader; ``--weights none`` starts from random weights. A model named
``hf-hub:ORG/NAME`` or ``local-dir:PATH`` (model/sources.py) brings its own weights.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from crystalscope.model.sources import BackboneSource, is_sourced, resolve_source
from crystalscope.settings import SettingsError


def create_backbone(name: str, weights: str = "none",
                    source: BackboneSource | None = None) -> nn.Module:
    """A timm model without its classifier: input images -> pooled feature vector.

    ``weights`` is ``"imagenet"``, ``"none"`` or a path to a local weights file. ``name`` may be
    ``hf-hub:ORG/NAME`` or ``local-dir:PATH`` (then ``imagenet`` means the weights stored there,
    and ``source``, once resolved, rebuilds the architecture without reading its config again).
    """
    if is_sourced(name):
        return _sourced_backbone(name, weights, source or resolve_source(name))
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SettingsError("model", f"not a timm model{hint}; see timm.list_models()", name)
    kwargs = {"num_classes": 0, "global_pool": "avg"}
    if weights == "none":
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights == "imagenet":
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # offline, hub down, no such weights: all need the same advice
            raise SettingsError(
                "weights",
                f"could not fetch the pretrained weights of {name} ({type(exc).__name__}); on "
                "a machine with internet run "
                f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` "
                "and copy the model.safetensors file from the Hugging Face cache "
                "(~/.cache/huggingface/hub), or download it from the model's page, then give "
                "its path as the weights (--weights path/to/model.safetensors)", "imagenet",
            ) from exc
    path = Path(weights)
    if not path.is_file():
        raise SettingsError("weights", "use imagenet, none, or the path of a weights file "
                            "(.safetensors, .pth, .bin)", weights)
    try:
        return timm.create_model(name, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except Exception as exc:
        raise SettingsError("weights", f"not loadable into {name} ({type(exc).__name__}: "
                            f"{str(exc)[:200]})", str(path)) from exc


def _sourced_backbone(name: str, weights: str, source: BackboneSource) -> nn.Module:
    """A hub or folder model: its architecture, with random, its own or a file's weights."""
    kwargs = {**source.model_args, "num_classes": 0, "global_pool": "avg"}
    if weights == "none":
        return timm.create_model(source.architecture, pretrained=False, **kwargs)
    if weights == "imagenet":  # for these: the weights stored with the model
        kwargs.pop("pretrained_model_args", None)
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, global_pool="avg")
        except Exception as exc:
            raise SettingsError("weights", f"could not load the weights of {name} "
                                f"({type(exc).__name__}: {str(exc)[:200]}); for a folder, "
                                "check its model.safetensors; offline, use local-dir:",
                                "imagenet") from exc
    path = Path(weights)
    if not path.is_file():
        raise SettingsError("weights", "use imagenet (the model's own), none, or the path of a "
                            "weights file (.safetensors, .pth, .bin)", weights)
    try:
        return timm.create_model(source.architecture, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except Exception as exc:
        raise SettingsError("weights", f"not loadable into {name} ({type(exc).__name__}: "
                            f"{str(exc)[:200]})", str(path)) from exc


def parameter_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly (convolutions, norms, linears), in model order.

    These are the "layers" that ``--trainable`` counts, like Keras counts layers.
    """
    return [(name, m) for name, m in module.named_modules()
            if any(True for _ in m.parameters(recurse=False))]


def freeze_fraction(backbone: nn.Module, trainable: float) -> list[str]:
    """Freeze all but the top ``trainable`` fraction of the backbone's layers.

    Returns the names of the layers that stay trainable. Frozen parameters get
    ``requires_grad=False``; :func:`set_frozen_norms_eval` keeps their norm layers in eval mode.
    """
    if not 0.0 <= trainable <= 1.0:
        raise SettingsError("trainable", "give a fraction between 0 and 1", trainable)
    layers = parameter_layers(backbone)
    keep = round(trainable * len(layers))
    trainable_names = []
    for index, (name, layer) in enumerate(layers):
        train_it = index >= len(layers) - keep
        for parameter in layer.parameters(recurse=False):
            parameter.requires_grad_(train_it)
        if train_it:
            trainable_names.append(name)
    return trainable_names


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def set_frozen_norms_eval(module: nn.Module) -> None:
    """Put norm layers whose parameters are frozen in eval mode (running stats stay fixed)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            params = list(layer.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                layer.eval()


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


def make_head(in_features: int, num_classes: int, kind: str = "mlp") -> nn.Module:
    """The classification head: the original project's MLP, or a plain linear layer."""
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind != "mlp":
        raise SettingsError("head", "use mlp or linear", kind)
    return nn.Sequential(
        nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512),
        nn.Dropout(0.4), nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Dropout(0.3),
        nn.Linear(256, num_classes),
    )


class Classifier(nn.Module):
    """Backbone + head: images (N, 3, H, W) normalised -> one logit per class."""

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "mlp") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = make_head(backbone.num_features, num_classes, head)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (the embedding used by index/similar/explore)."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))
