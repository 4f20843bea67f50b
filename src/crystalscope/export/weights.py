"""``model.safetensors`` + ``model.json``: a model that needs neither the run nor pickle.

``model.json`` says how to rebuild the network (timm backbone name, head, number of classes),
how to feed it (input size, resize method, channel order, normalisation), and where it came
from (recipe, metrics, data summary, library versions). :func:`load_model` rebuilds it.
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from crystalscope.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from crystalscope.errors import UserError
from crystalscope.model.backbones import Classifier, create_backbone
from crystalscope.model.inference import InferenceNet

FORMAT = "crystalscope-model"
FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the model's numbers."""
    versions = {"python": platform.python_version()}
    for name in ("crystalscope", "torch", "timm", "lightning", "onnx", "onnxruntime", "numpy",
                 "pillow"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def preprocessing(image_size: int) -> dict[str, Any]:
    """How images must be prepared for the network (the same words go into the ONNX file)."""
    return {
        "input_size": image_size, "resize": "bilinear, squashed to a square (no crop)",
        "channels": "RGB (grayscale repeated)", "layout": "NCHW", "dtype": "float32",
        "value_range": "0-255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "normalization": "inside the model: (x / 255 - mean) / std",
        "outputs": {"probabilities": "softmax over classes, in the order of 'classes'",
                    "embedding": "pooled backbone features"},
    }


def model_description(*, backbone: str, head: str, classes: list[str], image_size: int,
                      embedding_size: int, recipe: dict[str, Any],
                      metrics: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The content of model.json."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": {"backbone": backbone, "library": "timm", "head": head,
                         "num_classes": len(classes), "embedding_size": embedding_size},
        "classes": list(classes),
        "preprocessing": preprocessing(image_size),
        "recipe": recipe, "metrics": metrics, "data": data,
        "versions": library_versions(),
    }


def save_model(net: InferenceNet, description: dict[str, Any], out_dir: Path
               ) -> tuple[Path, Path]:
    """Write model.safetensors (the Classifier's weights) and model.json."""
    out_dir = Path(out_dir)
    weights_path, json_path = out_dir / "model.safetensors", out_dir / "model.json"
    state = {k: v.detach().contiguous().cpu() for k, v in net.net.state_dict().items()}
    save_file(state, weights_path, metadata={"format": FORMAT,
                                             "classes": json.dumps(description["classes"])})
    json_path.write_text(json.dumps(description, indent=2), encoding="utf-8")
    return weights_path, json_path


def _model_files(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        return path / "model.safetensors", path / "model.json"
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def load_model(path: Path) -> tuple[InferenceNet, dict[str, Any]]:
    """Rebuild the network from model.safetensors + model.json (either file, or their folder)."""
    weights_path, json_path = _model_files(path)
    for needed in (weights_path, json_path):
        if not needed.is_file():
            raise UserError(f"{needed}: missing; an exported model is model.safetensors and "
                            "model.json side by side (write them with `crystalscope export RUN`)")
    try:
        description = json.loads(json_path.read_text(encoding="utf-8"))
        architecture = description["architecture"]
        classes = description["classes"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{json_path}: not a crystalscope model.json ({exc})") from exc
    if description.get("format") != FORMAT:
        raise UserError(f"{json_path}: not a crystalscope model.json (format "
                        f"{description.get('format')!r})")
    backbone = create_backbone(architecture["backbone"], "none")
    net = Classifier(backbone, len(classes), architecture["head"])
    try:
        net.load_state_dict(load_file(weights_path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise UserError(f"{weights_path}: does not fit the architecture in {json_path.name} "
                        f"({str(exc)[:200]})") from exc
    return InferenceNet(net).eval(), description

