"""Load a model for inference — ONNX Runtime by default, OpenVINO or torch optionally — with
its preprocessing, and run it on batches of decoded images.

MODEL is a run directory, an exported ``model.onnx`` or ``model.safetensors`` (+ model.json),
or any ONNX image classifier whose preprocessing is given (``Preprocessing``): so a model from
another tool, e.g. the original project's Keras ResNet-101 (NHWC, caffe preprocessing, one
sigmoid output), can be run and compared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from crystalscope.errors import UserError
from crystalscope.export.metadata import read_metadata
from crystalscope.infer.onnx_engines import RUN_BATCH, Runtime, open_onnx
from crystalscope.model.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    RunLayout,
    resolve_model,
)
from crystalscope.operating_point import OperatingPoint
from crystalscope.settings import Settings, SettingsError
from crystalscope.unknown.detector import UnknownDetector, load_detector

if TYPE_CHECKING:
    from crystalscope.model.inference import InferenceNet

Backend = Literal["onnx", "openvino", "torch"]
Tta = Literal["none", "dihedral"]
TTA_CHOICES = ("none", "dihedral")
ONNX_RUNTIMES: dict[str, Runtime] = {"onnx": "onnxruntime", "openvino": "openvino"}
OutputKind = Literal["probabilities", "logits"]
OUTPUT_KINDS = ("probabilities", "logits")
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # Keras' "caffe" mode: BGR, mean subtracted


class Preprocessing(Settings):
    """How RGB uint8 images (N, 3, S, S) become the model's input.

    ``mode``: ``raw`` (float 0-255, the model normalises: crystalscope's own exports),
    ``imagenet`` ((x/255 - mean) / std), ``caffe`` (BGR, minus the Keras caffe means),
    ``tf`` (x / 127.5 - 1).
    """

    input_size: int = Field(ge=1)
    layout: Literal["nchw", "nhwc"] = "nchw"
    mode: Literal["raw", "imagenet", "caffe", "tf"] = "raw"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_foreign_model(cls, input_size: int | None, layout: str | None = None,
                          preprocess: str | None = None, mean: str | None = None,
                          std: str | None = None) -> Preprocessing | None:
        """A foreign ONNX model's preprocessing from text settings (mean/std as "a,b,c");
        None when no ``input_size`` is given (the model's own metadata then decides)."""
        if input_size is None:
            if any(v is not None for v in (layout, preprocess, mean, std)):
                raise SettingsError("input_size", "needed as well when layout, preprocess, "
                                    "mean or std is given")
            return None

        def triple(text: str | None, name: str, default: tuple) -> tuple[float, ...]:
            if text is None:
                return default
            try:
                values = tuple(float(v) for v in text.split(","))
            except ValueError:
                values = ()
            if len(values) != 3:
                raise SettingsError(name, "give three numbers, e.g. 0.485,0.456,0.406", text)
            return values

        mode = preprocess or ("imagenet" if mean or std else "raw")
        if mode not in ("raw", "imagenet", "caffe", "tf"):
            raise SettingsError("preprocess", "use raw, imagenet, caffe or tf", mode)
        return cls(input_size=input_size, layout=layout or "nchw",  # type: ignore[arg-type]
                   mode=mode, mean=triple(mean, "mean", IMAGENET_MEAN),  # type: ignore[arg-type]
                   std=triple(std, "std", IMAGENET_STD))  # type: ignore[arg-type]

    def apply(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32)
        if self.mode == "imagenet":
            mean = np.asarray(self.mean, np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(self.std, np.float32).reshape(1, 3, 1, 1)
            x = (x / 255.0 - mean) / std
        elif self.mode == "caffe":
            x = x[:, ::-1] - np.asarray(CAFFE_BGR_MEAN, np.float32).reshape(1, 3, 1, 1)
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        if self.layout == "nhwc":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x)


RawOutputs = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass
class Outputs:
    """A batch's results: probabilities (N, C); embeddings (N, D), ``unknown_scores`` (N,;
    above 1 = unlike the training crystals) and ``unknown_reasons`` (per image: empty, blurred,
    saturated, novel, or None) when the model has them."""

    probabilities: np.ndarray
    embeddings: np.ndarray | None
    unknown_scores: np.ndarray | None
    unknown_reasons: list[str | None] | None = None


@dataclass
class Predictor:
    """A loaded model: classes, how it is fed (``spec``: the decode; ``preprocessing``: what
    is done to the decoded pixels before the model — nothing for crystalscope's own, which
    normalise inside), a function from images to outputs, and its unknown-detector."""

    classes: list[str]
    spec: ModelSpec
    preprocessing: Preprocessing
    backend: Backend
    source: Path
    run: Callable[[np.ndarray], RawOutputs] = field(repr=False)
    has_embedding: bool = True
    unknown_detector: UnknownDetector | None = field(default=None, repr=False)
    outputs: OutputKind = "probabilities"
    export_id: str = ""  # crystalscope's exports: the id stamped in every file of one export
    built_in_tta: Tta = "none"  # averaging inside the model's graph (its export's choice)
    added_tta: Tta = "none"  # averaging added here, around a single-view model
    notes: list[str] = field(default_factory=list)
    operating_point: OperatingPoint | None = None  # export --threshold; None: the arg-max

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """The called class index of each row of (N, C) probabilities: the model's operating
        point when it has one, else the most probable class. O(N C)."""
        probabilities = np.asarray(probabilities)
        if probabilities.ndim == 1:
            return self.decide(probabilities[None])
        if self.operating_point is not None:
            return self.operating_point.decide(probabilities)
        return probabilities.argmax(axis=1)

    def called(self, probabilities: np.ndarray) -> str:
        """The class name called for one image's probabilities (C,)."""
        return self.classes[int(self.decide(probabilities)[0])]

    @property
    def tta(self) -> Tta:
        """The test-time averaging the predictions get, wherever it happens."""
        return "dihedral" if "dihedral" in (self.built_in_tta, self.added_tta) else "none"

    @property
    def model_id(self) -> str:
        """What identifies the network that makes this predictor's embeddings: the export id,
        or for a foreign model (or an early export) the SHA-256 of its file."""
        suffix = ":dihedral" if self.added_tta == "dihedral" else ""  # other embeddings
        if self.export_id:
            return self.export_id + suffix
        from crystalscope.data.dedupe import file_sha256

        return ("sha256:" + file_sha256(self.source) if self.source.is_file() else str(
            self.source)) + suffix

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def require_unknown_detector(self, setting: str) -> None:
        """Refuse ``setting`` (a field that needs the detector) for a model without one."""
        if self.unknown_detector is None:
            raise SettingsError(setting, f"{self.source} has no unknown-detector; export the "
                                "run again (crystalscope export RUN) to fit one")

    def predict(self, images: np.ndarray) -> Outputs:
        """uint8 RGB (N, 3, S, S) -> probabilities, embeddings and unknown scores."""
        if self.added_tta == "dihedral":
            return self._predict_dihedral(images)
        raw, embeddings, statistics = self.run(self.preprocessing.apply(images))
        probabilities = to_probabilities(raw, len(self.classes), self.outputs)
        scores = reasons = None
        if self.unknown_detector is not None and statistics is not None:
            scores, reasons = self.unknown_detector.assess(images, statistics, probabilities)
        return Outputs(probabilities, embeddings, scores, reasons)

    def _predict_dihedral(self, images: np.ndarray) -> Outputs:
        """The mean over the 8 rotations and flips of a single-view model's probabilities and
        embeddings, as the in-graph averaging computes them (8x the compute). No unknown
        scores: the detector was calibrated on single views."""
        n = len(images)
        raw, embeddings, _ = self.run(self.preprocessing.apply(dihedral_views(images)))
        probabilities = to_probabilities(raw, len(self.classes), self.outputs)
        mean = probabilities.reshape(8, n, -1).mean(axis=0)
        if embeddings is not None:
            embeddings = embeddings.reshape(8, n, *embeddings.shape[1:]).mean(axis=0)
        return Outputs(mean, embeddings, None)


def dihedral_views(images: np.ndarray) -> np.ndarray:
    """(N, 3, S, S) -> (8N, 3, S, S): the 4 rotations, then the same mirrored, view-major —
    the order and the views of the in-graph averaging (``model.inference.dihedral_views``)."""
    rotations = [np.rot90(images, k, axes=(2, 3)) for k in range(4)]
    return np.ascontiguousarray(np.concatenate([*rotations, *(r[..., ::-1] for r in rotations)]))


def to_probabilities(output: np.ndarray, num_classes: int,
                     kind: OutputKind = "probabilities") -> np.ndarray:
    """Model output -> class probabilities, as ``kind`` says the model gives them.

    ``probabilities``: rows as they are (a softmax or a sigmoid already applied); ``logits``:
    a softmax over each row, or a sigmoid of a single column. One sigmoid column becomes
    [1 - p, p]. Decided per model, never from a batch's values, so an image's result does not
    depend on the images that share its batch.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind {kind!r}: use probabilities or logits")
    output = np.asarray(output, dtype=np.float64)
    if output.ndim == 1:
        output = output[:, None]
    if output.shape[1] == 1 and num_classes == 2:
        p = output[:, 0]
        if kind == "logits":
            p = 1.0 / (1.0 + np.exp(-p))
        return np.stack([1 - p, p], axis=1)
    if output.shape[1] != num_classes:
        raise UserError(f"the model gives {output.shape[1]} outputs per image but "
                        f"{num_classes} class names are known; give --classes")
    if kind == "probabilities":
        return output
    shifted = np.exp(output - output.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _output_kind(path: Path, output_name: str, given: OutputKind | None,
                 metadata: dict) -> OutputKind:
    """What the model's first output is: given, else its metadata, else its name."""
    if given:
        return given
    if metadata.get("outputs") in OUTPUT_KINDS:
        return metadata["outputs"]
    if output_name == "probabilities":  # crystalscope's own exports
        return "probabilities"
    raise SettingsError("outputs", f"{path}: say what its output {output_name!r} holds: "
                        "probabilities (a softmax or sigmoid is applied in the model) or "
                        "logits")


def _onnx_predictor(path: Path, backend_overrides: dict, backend: Backend = "onnx",
                    threads: int | None = None) -> Predictor:
    engine = open_onnx(path, ONNX_RUNTIMES[backend], threads)
    metadata = read_metadata(path)
    classes = backend_overrides.get("classes") or metadata.get("classes")
    if not classes:
        raise UserError(f"{path}: carries no class names; give them, e.g. --classes cex,pg")
    if "preprocessing" in metadata and not backend_overrides.get("preprocessing"):
        # crystalscope's own model: fed as its spec says (normalised inside the network)
        spec = ModelSpec.from_dict(metadata["preprocessing"], list(classes))
        preprocessing = Preprocessing(input_size=spec.input_size)
    else:
        preprocessing = backend_overrides.get("preprocessing") or _guess(engine.input_shape,
                                                                          path)
        spec = ModelSpec(input_size=preprocessing.input_size, classes=tuple(classes),
                         normalization="outside")
    names = engine.output_names
    wanted = [names[0] if "probabilities" not in names else "probabilities"]
    # The detector was calibrated on this model's own fp32 statistics: an int8 or foreign
    # model beside a model.json is not given it, and then its statistics are not computed.
    layout = RunLayout(path.parent)
    detector = None
    if "statistics" in names and path.name == layout.onnx.name:
        check_same_export(path, metadata.get("export_id", ""), layout.model_json)
        detector = load_detector(layout.model_json)
    optional = [name for name in ("embedding", "statistics") if name in names
                and (name != "statistics" or detector is not None)]
    fetch = [*wanted, *optional]
    runner = engine.runner(fetch, RUN_BATCH)  # a fixed-batch model: the engine uses its own

    def run(x: np.ndarray) -> RawOutputs:
        results = dict(zip(fetch, runner(x), strict=True))
        return results[wanted[0]], results.get("embedding"), results.get("statistics")

    return Predictor(classes=list(classes), spec=spec, preprocessing=preprocessing,
                     backend=backend, source=path, run=run, has_embedding="embedding" in optional,
                     unknown_detector=detector, outputs=_output_kind(path, wanted[0],
                                                        backend_overrides.get("outputs"),
                                                        metadata),
                     export_id=str(metadata.get("export_id", "")),
                     built_in_tta=(metadata.get("architecture") or {}).get("tta", "none"),
                     operating_point=_operating_point(metadata, list(classes), path))


def _operating_point(description: dict, classes: list[str], source: Path
                     ) -> OperatingPoint | None:
    """The operating point stored with a model (ONNX metadata or model.json), if any."""
    stored = description.get("operating_point")
    if not stored:
        return None
    try:
        return OperatingPoint.from_dict(stored, classes)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source}: its operating point cannot be used ({exc}); export the "
                        "run again") from exc


def check_same_export(onnx_path: Path, onnx_export_id: str, model_json: Path) -> None:
    """Refuse an ONNX file beside a model.json of another export (a half-replaced folder, or
    files copied together by hand): its detector was calibrated on another network."""
    if not model_json.is_file():
        return
    try:
        json_export_id = str(json.loads(model_json.read_text(encoding="utf-8"))
                             .get("export_id", ""))
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # not ours to judge: load_detector reports a broken model.json
    if json_export_id != onnx_export_id:
        raise UserError(f"{onnx_path} (export {onnx_export_id or 'without id'}) and "
                        f"{model_json} (export {json_export_id or 'without id'}) come from "
                        "different exports; run `crystalscope export` again")


def _guess(shape: list, path: Path) -> Preprocessing:
    """A foreign model without our metadata: the input size from its static shape, if any."""
    sizes = [d for d in shape[1:] if isinstance(d, int) and d > 4]
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise UserError(f"{path}: give its preprocessing: --input-size, --layout, "
                        "--preprocess caffe|imagenet|tf|raw (or --mean/--std)")
    layout = "nhwc" if isinstance(shape[-1], int) and shape[-1] == 3 else "nchw"
    return Preprocessing(input_size=sizes[0], layout=layout, mode="imagenet")


def _torch_predictor(net: InferenceNet, source: Path, model_json: Path,
                     operating_point: OperatingPoint | None = None) -> Predictor:
    import torch  # here, not at the top: the ONNX path starts without torch (about 2 s)

    net = net.eval()

    @torch.inference_mode()
    def run(x: np.ndarray) -> RawOutputs:
        probabilities, embedding, statistics = net(torch.from_numpy(x))
        return probabilities.numpy(), embedding.numpy(), statistics.numpy()

    try:
        export_id = str(json.loads(model_json.read_text(encoding="utf-8")).get("export_id", ""))
    except (OSError, json.JSONDecodeError, AttributeError):
        export_id = ""  # a run without an export yet
    return Predictor(classes=list(net.spec.classes), spec=net.spec,
                     preprocessing=Preprocessing(input_size=net.spec.input_size),
                     backend="torch", source=source, run=run,
                     unknown_detector=load_detector(model_json), export_id=export_id,
                     built_in_tta=net.tta, operating_point=operating_point)


def load_predictor(model: Path, *, backend: Backend = "onnx", classes: list[str] | None = None,
                   preprocessing: Preprocessing | None = None,
                   outputs: OutputKind | None = None, threads: int | None = None,
                   tta: Tta | None = None) -> Predictor:
    """Open MODEL (run directory, model.onnx, model.safetensors/model.json) for inference.

    ``classes``, ``preprocessing`` and ``outputs`` describe a foreign ONNX model (what its
    output holds: ``probabilities`` or ``logits``); crystalscope's own models carry them.
    ``threads``: CPU threads of an ONNX runtime (None: every core). ``tta``: None, the
    model's own choice; ``dihedral`` on a single-view model averages the 8 views here;
    ``none`` on a model that averages inside its graph is refused (export it with
    ``--tta none``).
    """
    if outputs not in (None, *OUTPUT_KINDS):
        raise SettingsError("outputs", "use probabilities or logits", outputs)
    predictor = _load_predictor(model, backend=backend, classes=classes,
                                preprocessing=preprocessing, outputs=outputs, threads=threads)
    point = predictor.operating_point
    if point is not None:
        predictor.notes.append(f"the model's operating point decides: {point.class_name} when "
                               f"P({point.class_name}) >= {point.threshold:.4g}, else the most "
                               "probable other class (export --threshold)")
    if tta is None or tta == predictor.built_in_tta:
        return predictor
    if tta not in TTA_CHOICES:
        raise SettingsError("tta", "use none or dihedral", tta)
    if tta == "none":
        raise UserError(f"{model}: averages each crop's 8 rotations and flips inside its graph; "
                        "for single-view predictions (8 times less compute) export it so: "
                        "crystalscope export RUN --tta none --out DIR")
    predictor.added_tta = "dihedral"
    if predictor.unknown_detector is not None:
        predictor.unknown_detector = None
        predictor.notes.append("--tta dihedral around a single-view model: no unknown scores "
                               "(its detector was calibrated on single views); export the run "
                               "with --tta dihedral to have both")
    return predictor


def _load_predictor(model: Path, *, backend: Backend, classes: list[str] | None,
                    preprocessing: Preprocessing | None, outputs: OutputKind | None,
                    threads: int | None) -> Predictor:
    resolved = resolve_model(model)
    layout = resolved.layout
    overrides = {"classes": classes, "preprocessing": preprocessing, "outputs": outputs}
    if resolved.kind == "onnx":
        if backend == "torch":
            raise UserError(f"{model}: an ONNX file runs on ONNX Runtime or OpenVINO; for "
                            "--backend torch give the run directory or model.safetensors")
        return _onnx_predictor(resolved.path, overrides, backend, threads)
    if resolved.kind in ("run", "folder") and backend in ONNX_RUNTIMES:
        if not layout.onnx.is_file():
            raise UserError(f"{model}: has no model.onnx; run `crystalscope export {model}` "
                            "or use --backend torch")
        return _onnx_predictor(layout.onnx, overrides, backend, threads)
    if resolved.kind == "run":
        from crystalscope.model.inference import exported_choices, load_run

        run = load_run(resolved.path)  # the export's temperature and threshold, if its own
        return _torch_predictor(run.net, resolved.path, layout.model_json,
                                exported_choices(run).get("operating_point"))
    from crystalscope.export.weights import load_model

    weights = layout.weights if resolved.kind == "folder" else resolved.path
    net, description = load_model(weights)
    return _torch_predictor(net, resolved.path, weights.with_suffix(".json"),
                            _operating_point(description, list(net.spec.classes), weights))


def parse_classes(text: str | None) -> list[str] | None:
    """``cex,pg`` or a JSON list -> class names."""
    if not text:
        return None
    names = json.loads(text) if text.strip().startswith("[") else text.split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise SettingsError("classes", "give at least two distinct names, e.g. cex,pg", text)
    return names
