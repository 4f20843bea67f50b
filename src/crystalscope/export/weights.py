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

from crystalscope.errors import UserError
from crystalscope.model.backbones import Classifier, create_backbone
from crystalscope.model.inference import InferenceNet
from crystalscope.model.sources import BackboneSource
from crystalscope.model.spec import ModelSpec, RunLayout

FORMAT = "crystalscope-model"
FORMAT_VERSION = 2  # 2: preprocessing is a ModelSpec (data, not prose)


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


def model_description(*, backbone: str, head: str, spec: ModelSpec, embedding_size: int,
                      recipe: dict[str, Any], metrics: dict[str, Any],
                      data: dict[str, Any], tta: str = "none",
                      temperature: float = 1.0,
                      source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of model.json; ``preprocessing`` is the :class:`ModelSpec`, as data;
    ``architecture.tta`` the test-time averaging built into the network, ``temperature`` the
    divisor of its logits before the softmax."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": {"backbone": backbone, "library": "timm", "head": head,
                         "num_classes": len(spec.classes), "embedding_size": embedding_size,
                         "tta": tta, "temperature": temperature,
                         **({"source": source} if source else {})},
        "classes": list(spec.classes),
        "preprocessing": spec.to_dict(),
        "recipe": recipe, "metrics": metrics, "data": data,
        "versions": library_versions(),
    }


def save_model(net: InferenceNet, description: dict[str, Any], out_dir: Path
               ) -> tuple[Path, Path]:
    """Write model.safetensors (the Classifier's weights) and model.json."""
    out_dir = Path(out_dir)
    weights_path, json_path = RunLayout(out_dir).weights, RunLayout(out_dir).model_json
    state = {k: v.detach().contiguous().cpu() for k, v in net.classifier.state_dict().items()}
    save_file(state, weights_path, metadata={"format": FORMAT,
                                             "classes": json.dumps(description["classes"])})
    json_path.write_text(json.dumps(description, indent=2), encoding="utf-8")
    return weights_path, json_path


def _model_files(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        return RunLayout(path).weights, RunLayout(path).model_json
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
    source = architecture.get("source")  # a hub or folder model: rebuilt without either
    backbone = create_backbone(architecture["backbone"], "none",
                               BackboneSource.from_dict(source) if source else None)
    net = Classifier(backbone, len(classes), architecture["head"])
    try:
        net.load_state_dict(load_file(weights_path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise UserError(f"{weights_path}: does not fit the architecture in {json_path.name} "
                        f"({str(exc)[:200]})") from exc
    spec = model_spec(description, json_path)
    # Files written before test-time averaging existed have no "tta": they had none.
    # Files written before temperature scaling existed have no "temperature": they had none.
    return (InferenceNet(net, spec, tta=architecture.get("tta", "none"),
                         temperature=architecture.get("temperature", 1.0)).eval(), description)


def model_spec(description: dict[str, Any], source: Path | str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` in a model.json (or ONNX metadata) description."""
    try:
        return ModelSpec.from_dict(description["preprocessing"], description.get("classes"))
    except (KeyError, TypeError, UserError) as exc:
        where = source or RunLayout(Path()).model_json.name
        raise UserError(f"{where}: carries no usable preprocessing ({exc})") from exc

