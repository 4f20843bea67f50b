"""``model.onnx``: dynamic batch, class names and preprocessing in its metadata, and a parity
check against torch before the file is given its name.

The graph is :class:`~crystalscope.model.inference.InferenceNet`: input ``images`` (float32
RGB 0-255, NCHW, resized to the input size), outputs ``probabilities``, ``embedding`` and
``statistics`` (the stages' feature statistics the unknown-image detector reads).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from crystalscope.errors import CrystalscopeError
from crystalscope.export.metadata import add_metadata, raw_metadata
from crystalscope.model.inference import InferenceNet

PARITY_TOLERANCE = 1e-4
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "embedding", "statistics")


class ExportParityError(CrystalscopeError):
    """ONNX Runtime and torch disagree about the exported model."""


def _to_onnx(net: InferenceNet, path: Path, image_size: int) -> None:
    """torch -> ONNX with the dynamo exporter (the TorchScript one as a fallback)."""
    example = torch.zeros(2, 3, image_size, image_size)
    common = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            torch.onnx.export(net, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes={INPUT_NAME: {0: batch}}, verbose=False,
                              **common)
            return
        except Exception as dynamo_error:
            try:
                torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=17,
                                  dynamic_axes={INPUT_NAME: {0: "batch"},
                                                **{name: {0: "batch"} for name in OUTPUT_NAMES}},
                                  **common)
            except Exception as legacy_error:
                raise CrystalscopeError(
                    f"ONNX export failed: {type(dynamo_error).__name__}: "
                    f"{str(dynamo_error)[:200]}; TorchScript exporter: "
                    f"{type(legacy_error).__name__}: {str(legacy_error)[:200]}"
                ) from legacy_error


def check_parity(path: Path, net: InferenceNet, images: torch.Tensor,
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """Run ``images`` through ONNX Runtime and torch; raise unless probabilities agree within
    ``tolerance`` and the feature statistics within ``tolerance`` relative to their scale.

    Returns the largest absolute difference of the probabilities.
    """
    import onnxruntime as ort

    batch = images.float()
    with torch.inference_mode():
        expected = [t.numpy() for t in net(batch)]
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch.numpy()})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportParityError(f"{path}: ONNX Runtime cannot run the exported model "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    for name, ours, theirs in zip(OUTPUT_NAMES, expected, got, strict=True):
        if theirs.shape != ours.shape:
            raise ExportParityError(f"{path}: ONNX Runtime gives {name} of shape {theirs.shape}, "
                                    f"torch {ours.shape}")
    difference = float(np.abs(got[0] - expected[0]).max())
    if not difference <= tolerance:  # also catches NaN
        raise ExportParityError(f"{path}: ONNX Runtime and torch disagree: max |Δ probability| "
                                f"= {difference:.2e} > {tolerance:.0e}; the export is broken")
    scale = max(float(np.abs(expected[2]).max()), 1.0)
    statistics_difference = float(np.abs(got[2] - expected[2]).max()) / scale
    if not statistics_difference <= tolerance:
        raise ExportParityError(f"{path}: ONNX Runtime and torch disagree on the feature "
                                f"statistics (relative {statistics_difference:.2e} > "
                                f"{tolerance:.0e}); the export is broken")
    return difference


def export_onnx(net: InferenceNet, path: Path, image_size: int, metadata: dict[str, Any],
                parity_images: torch.Tensor) -> float:
    """Export, add metadata, check parity, then move into place; returns the max difference.

    A model that fails the check never appears under ``path``.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        _to_onnx(net, partial, image_size)
        add_metadata(partial, metadata)
        difference = check_parity(partial, net, parity_images)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return difference


# Relu, Add and the pools too: left in float, each ReLU between two convolutions costs a
# dequantize/requantize pair (66 in a ResNet-101), which made int8 slower per image at batch 32
# than at batch 1 (benchmarks/infer.py --int8: 27 vs 43 images/s; with them 49 vs 49).
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "Add", "MaxPool", "GlobalAveragePool"]


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_images: torch.Tensor) -> None:
    """Static int8 quantisation (QDQ, per-channel weights) calibrated on real images.

    Convolutions, dense layers, ReLUs, residual sums and pools run in int8; the softmax and the
    unknown-detector's statistics stay in float. The metadata (classes, preprocessing) is copied
    from the fp32 model.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            images = calibration_images.float().numpy()
            self.batches = iter([{INPUT_NAME: images[i:i + 8]}
                                 for i in range(0, len(images), 8)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process

    int8_path = Path(int8_path)
    partial = int8_path.with_name(f".{int8_path.name}.partial")
    prepared = int8_path.with_name(f".{int8_path.name}.prepared")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Shape inference and graph folding first, as ONNX Runtime recommends.
            quant_pre_process(str(fp32_path), str(prepared))
            quantize_static(str(prepared), str(partial), Batches(),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=QUANTIZED_OPS)
        source = onnx.load(str(fp32_path))
        add_metadata(partial, raw_metadata(source))
        partial.replace(int8_path)
    finally:
        partial.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
