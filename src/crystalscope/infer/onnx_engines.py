"""The two runtimes that run an ONNX model on the CPU: ONNX Runtime (the default) and OpenVINO.

Both give the same small interface — the input's name and shape, the output names, and
:meth:`runner`, a function from a batch of preprocessed images to the chosen outputs — so the
predictor does not care which one runs. OpenVINO is optional (``pip install
'crystalscope[openvino]'``): on Intel CPUs its int8 kernels run crystalscope's quantised
ResNets about 1.5× faster than ONNX Runtime's (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from crystalscope.errors import UserError

Runtime = Literal["onnxruntime", "openvino"]
Runner = Callable[[np.ndarray], list[np.ndarray]]
# ONNX Runtime on a CPU runs ResNets faster in batches of 4-8 than of 32, whose activations
# fall out of the caches (ResNet-101 at 224 px, 2 cores: int8 55 vs 49 images/s, fp32 21 vs
# 18); predict's batches are cut into runs of this size. OpenVINO, compiled for a fixed batch
# of 8, runs the same int8 model at 86 images/s (about 12% slower with a dynamic batch).
RUN_BATCH = 8
OPENVINO_INSTALL = "pip install 'crystalscope[openvino]'"


def run_in_batches(infer: Callable[[np.ndarray], list[np.ndarray]], x: np.ndarray,
                   batch: int, *, pad: bool) -> list[np.ndarray]:
    """``infer`` over ``x`` ``batch`` images at a time, the outputs joined. ``pad``: the model
    takes exactly ``batch`` images (a fixed batch dimension), so a last short run is padded
    with zeros and the padding's outputs dropped. O(len(x)) images, one batch in memory."""
    parts: list[list[np.ndarray]] = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        real = len(chunk)
        if pad and real < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - real, *chunk.shape[1:]),
                                                    chunk.dtype)])
        parts.append([np.array(out[:real]) for out in infer(chunk)])  # copies: reused buffers
    return [np.concatenate([part[k] for part in parts]) for k in range(len(parts[0]))]


def fixed_batch(input_shape: list) -> int | None:
    """The model's batch size when its first input dimension is fixed, else None."""
    first = input_shape[0] if input_shape else None
    return first if isinstance(first, int) and first > 0 else None


class OnnxEngine(Protocol):
    """An opened ONNX model: what it takes, what it gives, and how to run it."""

    input_name: str
    input_shape: list  # ints where fixed, None or a name where dynamic
    output_names: list[str]

    def runner(self, fetch: list[str], batch: int) -> Runner:
        """A function from images (N, ...) to the ``fetch`` outputs, run ``batch`` at a time."""
        ...


class OnnxRuntimeEngine:
    """An ONNX model in an ONNX Runtime CPU session."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:  # e.g. one actor of a Ray pool: only the CPUs it was given
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise UserError(f"{path}: not a loadable ONNX model ({str(exc)[:200]})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise UserError(f"{path}: has {len(inputs)} inputs; an image classifier has one")
        self.input_name, self.input_shape = inputs[0].name, list(inputs[0].shape)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def runner(self, fetch: list[str], batch: int) -> Runner:
        fixed = fixed_batch(self.input_shape)  # a foreign model exported for batches of N

        def infer(chunk: np.ndarray) -> list[np.ndarray]:
            return self.session.run(fetch, {self.input_name: chunk})

        def run(x: np.ndarray) -> list[np.ndarray]:
            return run_in_batches(infer, x, fixed or batch, pad=fixed is not None)

        return run


class OpenVinoEngine:
    """An ONNX model compiled by OpenVINO for the CPU: a fixed batch (the last run of a call is
    padded), only the outputs asked for, full fp32 precision outside the int8 layers."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise UserError(f"the openvino backend needs OpenVINO: {OPENVINO_INSTALL}") from exc
        self.core = ov.Core()
        if threads:
            self.core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
        try:
            self.model = self.core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise UserError(f"{path}: not a loadable ONNX model ({str(exc)[:200]})") from exc
        if len(self.model.inputs) != 1:
            raise UserError(f"{path}: has {len(self.model.inputs)} inputs; an image "
                            "classifier has one")
        port = self.model.inputs[0]
        self.input_name = port.any_name
        self.input_shape = [d.get_length() if d.is_static else None for d in port.partial_shape]
        self.output_names = [o.any_name for o in self.model.outputs]

    def runner(self, fetch: list[str], batch: int) -> Runner:
        import openvino as ov

        by_name = {o.any_name: o for o in self.model.outputs}
        model = ov.Model([by_name[name] for name in fetch], self.model.get_parameters())
        if self.input_shape[0] is None:  # fixed batches run faster than a dynamic one
            model.reshape({model.inputs[0]: [batch, *model.inputs[0].partial_shape[1:]]})
        else:
            batch = self.input_shape[0]
        # LATENCY: one stream on every core, as ONNX Runtime runs; f32: without it OpenVINO
        # runs the float layers in bf16 where the CPU has it, which changes the results
        compiled = self.core.compile_model(model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        lock = threading.Lock()  # one request, reused: callers in several threads take turns

        def infer(chunk: np.ndarray) -> list[np.ndarray]:
            results = request.infer({0: chunk})
            return [results[port] for port in compiled.outputs]

        def run(x: np.ndarray) -> list[np.ndarray]:
            with lock:  # padded: the model is compiled for whole runs
                return run_in_batches(infer, x, batch, pad=True)

        return run


def open_onnx(path: Path, runtime: Runtime = "onnxruntime",
              threads: int | None = None) -> OnnxEngine:
    """Open an ONNX model on ``runtime`` (``threads``: CPU threads; None: the runtime's
    default, every core)."""
    if runtime == "onnxruntime":
        return OnnxRuntimeEngine(path, threads)
    if runtime == "openvino":
        return OpenVinoEngine(path, threads)
    raise ValueError(f"runtime {runtime!r}: use onnxruntime or openvino")
