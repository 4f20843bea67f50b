"""What an exported ONNX file says about itself: class names, preprocessing, what its output
holds — stored as ``crystalscope.*`` metadata_props, values as JSON text.

Kept apart from ``export/onnx.py`` so that reading a model (predict, serve, monitor) imports
neither torch nor timm: that would cost seconds of every start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from crystalscope.errors import UserError

METADATA_PREFIX = "crystalscope."


def add_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Store ``metadata`` as the model's metadata_props (values as JSON text)."""
    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value)
        entry = existing.get(METADATA_PREFIX + key) or model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, text
    model.producer_name = "crystalscope"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def raw_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The crystalscope entries of a loaded model, prefix removed, values as stored."""
    return {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def read_metadata(path: Path) -> dict[str, Any]:
    """The crystalscope entries of an ONNX file's metadata, JSON values decoded."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors
        raise UserError(f"{path}: not a loadable ONNX model ({str(exc)[:200]})") from exc
    decoded: dict[str, Any] = {}
    for key, value in raw_metadata(model).items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded
