"""The model contract: how a crystalscope model is fed and what it outputs, and where its files are.

A :class:`ModelSpec` is written once, as data, into ``model.json`` (``"preprocessing"``) and the
ONNX metadata (``crystalscope.preprocessing``), and read back by every consumer: training
data, predict, serve, monitor and CAMs decode images with :func:`decode`, which honours every
field (or the spec is refused when read), and the network normalises with the spec's mean and
std inside itself (``model/normalize.py``).
:func:`resolve_model` is the one rule for "which file is MODEL"; :class:`RunLayout` names a
run folder's files.

This module imports neither torch nor Lightning, so the ONNX-only path stays light.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from crystalscope.data.images import load_image
from crystalscope.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_normalization(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's weights were trained with, from timm's pretrained config
    (ImageNet's where timm has none)."""
    import timm

    try:
        config = timm.get_pretrained_cfg(model)
    except Exception:  # an unknown name is reported where the model is created
        config = None
    mean = tuple(float(v) for v in getattr(config, "mean", None) or IMAGENET_MEAN)
    std = tuple(float(v) for v in getattr(config, "std", None) or IMAGENET_STD)
    return mean, std


RESIZE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
# The values each field may take; a model description with any other is refused.
ALLOWED = {"resize": tuple(RESIZE_FILTERS), "channels": ("RGB",), "layout": ("NCHW",),
           "value_range": ((0, 255),), "normalization": ("inside", "outside")}
DEFAULT_OUTPUTS = {
    "probabilities": "softmax over classes, in the order of 'classes'",
    "embedding": "pooled backbone features",
    "statistics": "each backbone stage's channel means and standard deviations"}


@dataclass(frozen=True)
class ModelSpec:
    """How images become the network's input, and what it returns.

    Images are decoded to ``channels`` (RGB: grayscale repeated), resized with ``resize`` to
    ``input_size`` x ``input_size`` (squashed, no crop), laid out as ``layout`` with values in
    ``value_range``; ``normalization="inside"``: the network itself applies
    ``(x / 255 - mean) / std`` (``model/normalize.py``), as crystalscope's own models do;
    ``"outside"``: a foreign model, fed by the predictor's ``Preprocessing``.
    """

    input_size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bilinear"
    channels: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    value_range: tuple[int, int] = (0, 255)
    normalization: Literal["inside", "outside"] = "inside"
    outputs: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_OUTPUTS))

    def __post_init__(self) -> None:
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) \
                or self.input_size < 8:
            raise UserError(f"input_size {self.input_size!r}: give a whole number of at "
                            "least 8 pixels")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(f"mean {self.mean} / std {self.std}: give three values each, "
                            "std above 0")
        if len(self.classes) < 2:
            raise UserError(f"classes {self.classes}: a classifier needs at least two")
        for name, allowed in ALLOWED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"{name} {value!r}: not one of "
                                f"{', '.join(map(str, allowed))}")
        if not set(DEFAULT_OUTPUTS) >= set(self.outputs):
            raise UserError(f"outputs {sorted(self.outputs)}: only "
                            f"{', '.join(DEFAULT_OUTPUTS)} are known")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(classes=list(self.classes), mean=list(self.mean), std=list(self.std),
                    value_range=list(self.value_range))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], classes: list[str] | None = None) -> ModelSpec:
        """Read a spec back, strictly: a field this version does not know, or a value it
        cannot honour, is refused (a newer exporter's model is not silently fed wrong).
        ``classes`` where the record keeps them apart (model.json files written before the
        spec held them); fields missing from early records take their defaults."""
        if not isinstance(data, dict):
            raise UserError(f"not a crystalscope model description (a {type(data).__name__})")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"preprocessing field(s) {', '.join(unknown)}: not known to this "
                            "crystalscope; upgrade it to read this model")
        values = dict(data)
        try:
            values["classes"] = tuple(str(c) for c in (data.get("classes") or classes or ()))
            for name in ("mean", "std"):
                if name in values:
                    values[name] = tuple(float(v) for v in values[name])
            if "value_range" in values:
                values["value_range"] = tuple(int(v) for v in values["value_range"])
            if "outputs" in values:
                values["outputs"] = {str(k): str(v) for k, v in dict(values["outputs"]).items()}
        except (TypeError, ValueError) as exc:
            raise UserError(f"not a crystalscope model description ({exc})") from exc
        if "input_size" not in values:
            raise UserError("not a crystalscope model description (no input_size)")
        return cls(**values)


def decode(source: Path | Image.Image, spec: ModelSpec) -> tuple[np.ndarray, int, int]:
    """An image file (read safely) or a PIL image as ``spec``'s input: (3, S, S) uint8 in
    ``spec.channels``, resized with ``spec.resize`` to ``spec.input_size`` without a crop;
    plus the original width and height. The one decode of every stage (training cache,
    evaluate, export, predict, serve, monitor cutting, CAMs)."""
    image = source if isinstance(source, Image.Image) else load_image(source,
                                                                       warn_on_mismatch=False)
    width, height = image.size
    size = (spec.input_size, spec.input_size)
    resized = image.convert(spec.channels).resize(size, RESIZE_FILTERS[spec.resize])
    return np.asarray(resized).transpose(2, 0, 1).copy(), width, height


@dataclass(frozen=True)
class RunLayout:
    """The files of a run folder (``runs/<name>/``), named once."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def classes(self) -> Path:
        return self.root / "classes.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, which: str = "best") -> Path:
        return self.checkpoints / f"{which}.ckpt"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def report_text(self) -> Path:
        return self.root / "report.txt"

    @property
    def model_json(self) -> Path:
        return self.root / "model.json"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def onnx(self) -> Path:
        return self.root / "model.onnx"

    @property
    def int8_onnx(self) -> Path:
        return self.root / "model.int8.onnx"

    @property
    def detector(self) -> Path:
        return self.root / "unknown.safetensors"

    @property
    def tracking(self) -> Path:
        """Which MLflow / W&B runs the run logged to (train/tracking.py)."""
        return self.root / "tracking.json"

    @property
    def card(self) -> Path:
        """The model card (export/card.py)."""
        return self.root / "README.md"

    @property
    def exported(self) -> tuple[Path, ...]:
        """Every file an export may write (an export removes those it does not write again)."""
        return (self.weights, self.model_json, self.onnx, self.detector, self.int8_onnx,
                self.card)


ModelKind = Literal["run", "folder", "onnx", "safetensors"]


@dataclass(frozen=True)
class ResolvedModel:
    """What MODEL names: a run folder, a folder of exported files (``export --out``), an ONNX
    file, or safetensors weights with their model.json."""

    kind: ModelKind
    path: Path  # the folder or the model file

    @property
    def folder(self) -> Path:
        """Where the model's companions (model.json, report.json, unknown.safetensors) lie."""
        return self.path if self.kind in ("run", "folder") else self.path.parent

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.folder)


def resolve_model(model: Path | str) -> ResolvedModel:
    """The one rule for MODEL arguments: a run directory (it has config.yaml), a folder of
    exported files, a ``.onnx`` file, or ``model.safetensors`` / ``model.json``."""
    model = Path(model)
    if not model.exists():
        raise UserError(f"{model}: no such model; give a run directory, a model.onnx or a "
                        "model.safetensors")
    if model.is_dir():
        layout = RunLayout(model)
        if layout.config.is_file():
            return ResolvedModel("run", model)
        if layout.onnx.is_file() or layout.weights.is_file():
            return ResolvedModel("folder", model)
        raise UserError(f"{model}: neither a run directory (no config.yaml) nor a folder of "
                        "exported files (no model.onnx or model.safetensors)")
    suffix = model.suffix.lower()
    if suffix == ".onnx":
        return ResolvedModel("onnx", model)
    if suffix in (".safetensors", ".json"):
        return ResolvedModel("safetensors", model.with_suffix(".safetensors"))
    raise UserError(f"{model}: not a model file; give a run directory, a .onnx or a "
                    ".safetensors file")
