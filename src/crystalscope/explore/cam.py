"""Class activation maps: where in the crop the model looked (Grad-CAM, LayerCAM), computed
by the ``grad-cam`` package on the backbone's last stage, for the predicted class or a chosen
one.

The image goes through the model's own preprocessing (bilinear squash to the input size, the
same normalisation inside the network), so the map explains the prediction the model makes;
the map is then resized to the original crop for the overlay. A model that averages its 8
rotations and flips (``tta: dihedral``) is explained the same way: one map per view, each
turned back onto the crop, then their mean — the map of the averaged prediction it prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from crystalscope.errors import UserError
from crystalscope.model.inference import InferenceNet, dihedral_views
from crystalscope.model.spec import decode, resolve_model
from crystalscope.settings import SettingsError

METHODS = ("gradcam", "layercam")


class Logits(nn.Module):
    """InferenceNet without the softmax: CAM targets are class scores."""

    def __init__(self, net: InferenceNet) -> None:
        super().__init__()
        self.inner = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.inner.normalize(images)
        return self.inner.classifier.head(self.inner.classifier.backbone(x))


def last_stage(net: InferenceNet, name: str | None = None) -> nn.Module:
    """The module to explain: ``name`` if given, else the backbone's last feature stage."""
    backbone = net.classifier.backbone
    if name is None:
        info = getattr(backbone, "feature_info", None)
        if not info:
            raise UserError("this backbone does not name its stages; give --layer")
        name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
    try:
        return backbone.get_submodule(name)
    except AttributeError:
        raise SettingsError("layer", "no such module in the backbone", name) from None


def load_torch_model(model: Path) -> InferenceNet:
    """The network (with its spec) of a run directory or model.safetensors/model.json."""
    resolved = resolve_model(model)
    if resolved.kind == "run":
        from crystalscope.model.inference import load_run

        return load_run(resolved.path).net
    if resolved.kind == "safetensors" or (resolved.kind == "folder"
                                          and resolved.layout.weights.is_file()):
        from crystalscope.export.weights import load_model

        return load_model(resolved.layout.weights if resolved.kind == "folder"
                          else resolved.path)[0]
    raise UserError(f"{model}: class activation maps need gradients: give the run directory "
                    "or model.safetensors (not an ONNX file)")


def unview(cam: np.ndarray, index: int) -> np.ndarray:
    """A map computed on view ``index`` of :func:`~crystalscope.model.inference.dihedral_views`
    (0-3 quarter turns, then the same mirrored), turned back onto the original crop."""
    if index >= 4:
        cam = cam[:, ::-1]
    return np.ascontiguousarray(np.rot90(cam, -(index % 4), axes=(0, 1)))


@dataclass
class Explanation:
    """One image's maps (each at the original crop size, values 0-1)."""

    path: Path
    image: np.ndarray  # (H, W, 3) uint8, the original crop
    target: str
    predicted: str
    probability: float
    maps: dict[str, np.ndarray]


def explain_image(net: InferenceNet, path: Path, *,
                  target: str | None = None, layer: str | None = None,
                  methods: tuple[str, ...] = METHODS) -> Explanation:
    """Grad-CAM and LayerCAM of one image, for ``target`` (default: the predicted class)."""
    from pytorch_grad_cam import GradCAM, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = list(net.spec.classes)
    if target is not None and target not in classes:
        raise SettingsError("class", f"not a class of the model ({', '.join(classes)})", target)
    pixels, width, height = decode(path, net.spec)
    x = torch.from_numpy(pixels).float()[None]
    with torch.inference_mode():
        probabilities = net(x)[0][0]
    best = int(probabilities.argmax())
    chosen = classes.index(target) if target is not None else best
    logits, layers = Logits(net).eval(), [last_stage(net, layer)]
    seen = dihedral_views(x) if net.views > 1 else x  # what the network averages over
    maps = {}
    for method in methods:
        cam_class = {"gradcam": GradCAM, "layercam": LayerCAM}[method]
        with cam_class(model=logits, target_layers=layers) as cam:
            views = [cam(input_tensor=seen[index:index + 1].clone(),
                         targets=[ClassifierOutputTarget(chosen)])[0]
                     for index in range(net.views)]
        grayscale = np.mean([unview(m, index) for index, m in enumerate(views)], axis=0)
        resized = Image.fromarray(grayscale.astype(np.float32), mode="F").resize(
            (width, height), Image.Resampling.BILINEAR)
        maps[method] = np.clip(np.asarray(resized), 0, 1)
    from crystalscope.data.images import load_image

    original = np.asarray(load_image(path, warn_on_mismatch=False).convert("RGB"))
    return Explanation(path=Path(path), image=original, target=classes[chosen],
                       predicted=classes[best], probability=float(probabilities[best]),
                       maps=maps)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map over the crop (the grad-cam package's colouring)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True)
