"""Predict beyond one machine: the same results as :func:`~crystalscope.infer.stream.
predict_stream`, computed on Ray Data.

The pipeline is read -> decode -> model -> driver:

- the file paths become a Ray dataset (``from_items``, blocks of ``BLOCK_ROWS`` paths);
- Ray tasks read and decode each file (``model.spec.decode``, the one decode of every stage);
- an actor pool runs the exported ONNX model, one model load per actor, in batches of
  ``batch_size`` images, each actor's runtime held to the CPUs Ray gave it;
- the driver receives the rows in the order of the paths (``preserve_order``) as the same
  :class:`ImageResult` / :class:`Failure` records the local stream yields, so predict's writers
  and index's store write the same rows whichever engine computed them.

Cost: O(N) in time, spread over the cluster's CPUs; the driver holds the N paths and a few
blocks in flight, never the images of the whole set. Every node must see the files and the
model at the same paths (a shared file system or the same copy on each node). Ray is an
optional extra: ``pip install 'crystalscope[ray]'``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from crystalscope.data.images import ImageLoadError
from crystalscope.infer.stream import Failure, ImageResult
from crystalscope.model.spec import ModelSpec, decode
from crystalscope.settings import SettingsError

RAY_INSTALL = "pip install 'crystalscope[ray]'"
BLOCK_ROWS = 1024  # paths per Ray block: enough work per task, small enough to spread
# Decode tasks ask for less than a CPU: so they are not fused into the model actors (Ray Data
# fuses operators with equal resources), and decoding runs beside the model on every CPU.
DECODE_CPUS = 0.5


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SettingsError("engine", f"ray needs Ray installed: {RAY_INSTALL}", "ray") from None
    return ray


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to Ray for one run: ``address`` None starts a local Ray (with ``num_cpus``)
    and stops it afterwards; ``auto`` or ``ray://host:10001`` joins a running cluster."""
    ray = _require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.ERROR}
        try:
            if address is None:
                ray.init(num_cpus=num_cpus, **options)
            else:
                ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or "a local Ray"
            raise SettingsError("ray_address", f"cannot start or reach {where} "
                                f"({str(exc).splitlines()[0][:200]})", address) from exc
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _decode_batch(batch: dict[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Ray task: decode a block of paths; an unreadable file keeps its row with its error."""
    paths = batch["path"]
    images = np.zeros((len(paths), 3, spec.input_size, spec.input_size), dtype=np.uint8)
    width = np.zeros(len(paths), dtype=np.int64)
    height = np.zeros(len(paths), dtype=np.int64)
    errors = []
    for row, path in enumerate(paths):
        try:
            images[row], width[row], height[row] = decode(Path(str(path)), spec)
        except ImageLoadError as exc:
            errors.append(str(exc))
        else:
            errors.append("")
    return {"index": batch["index"], "path": paths, "image": images, "width": width,
            "height": height, "error": np.array(errors, dtype=str)}


class _ModelActor:
    """One model load per actor; each call runs one batch of decoded images."""

    def __init__(self, model: str, load_options: dict[str, Any], threads: int) -> None:
        from crystalscope.infer.predictor import load_predictor

        self.predictor = load_predictor(Path(model), threads=threads, **load_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = batch["error"] == ""
        n, classes = len(good), len(self.predictor.classes)
        probabilities = np.full((n, classes), np.nan, dtype=np.float32)
        unknown = np.full(n, np.nan, dtype=np.float64)
        reasons = np.full(n, "", dtype=object)
        called = np.full(n, -1, dtype=np.int64)
        out = {key: batch[key] for key in ("index", "path", "width", "height", "error")}
        embeddings = None
        if good.any():
            outputs = self.predictor.predict(batch["image"][good])
            probabilities[good] = outputs.probabilities
            called[good] = self.predictor.decide(outputs.probabilities)
            if outputs.embeddings is not None:
                embeddings = np.zeros((n, outputs.embeddings.shape[1]), dtype=np.float32)
                embeddings[good] = outputs.embeddings
            if outputs.unknown_scores is not None:
                unknown[good] = outputs.unknown_scores
            if outputs.unknown_reasons is not None:
                reasons[good] = [reason or "" for reason in outputs.unknown_reasons]
        out["probabilities"] = probabilities
        out["called"] = called
        out["unknown_score"] = unknown
        out["unknown_reason"] = reasons.astype(str)
        if embeddings is not None:
            out["embedding"] = embeddings
        return out


def actors_for(cpus: float, cpus_per_actor: int) -> int:
    """Model actors: half the cluster's CPUs (the other half decodes), at least one."""
    return max(1, math.floor(cpus / 2 / cpus_per_actor))


def ray_predict_stream(model: Path, paths: Sequence[Path], *, batch_size: int = 32,
                       backend: str = "onnx", load_options: dict[str, Any] | None = None,
                       address: str | None = None, num_cpus: int | None = None,
                       cpus_per_actor: int = 1, actors: int | None = None,
                       spec: ModelSpec | None = None,
                       progress: Callable[[int], None] | None = None,
                       ) -> Iterator[ImageResult | Failure]:
    """Results in the order of ``paths``, computed on Ray (see the module docstring).

    ``model``: a run directory or model.onnx that every Ray node can read; ``load_options``:
    what :func:`~crystalscope.infer.predictor.load_predictor` takes besides (classes,
    preprocessing, outputs of a foreign model); ``actors``: model actors (default: half the
    cluster's CPUs over ``cpus_per_actor``); ``spec``: how the model is fed, when the caller
    has the model open already (otherwise it is opened here to read it).
    """
    if backend not in ("onnx", "openvino"):
        raise SettingsError("backend", "the ray engine runs the exported ONNX model; use onnx "
                            "or openvino", backend)
    if batch_size < 1:
        raise SettingsError("batch_size", "give at least 1", batch_size)
    if not paths:
        return
    if spec is None:
        from crystalscope.infer.predictor import load_predictor

        spec = load_predictor(Path(model), backend=backend, threads=1,
                              **(load_options or {})).spec
    options = {"backend": backend, **(load_options or {})}
    with ray_session(address, num_cpus) as ray:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        pool = actors or actors_for(ray.cluster_resources().get("CPU", 1), cpus_per_actor)
        items = [{"index": i, "path": str(Path(p).resolve())} for i, p in enumerate(paths)]
        dataset = (ray.data.from_items(items, override_num_blocks=max(1, math.ceil(
                       len(items) / BLOCK_ROWS)))
                   .map_batches(_decode_batch, fn_kwargs={"spec": spec},
                                batch_size=batch_size, batch_format="numpy",
                                num_cpus=DECODE_CPUS)
                   .map_batches(_ModelActor, fn_constructor_kwargs={
                       "model": str(Path(model).resolve()), "load_options": options,
                       "threads": cpus_per_actor},
                       batch_size=batch_size, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(size=pool),
                       num_cpus=cpus_per_actor))
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            for row in range(len(batch["index"])):
                path = paths[int(batch["index"][row])]
                error = str(batch["error"][row])
                if error:
                    yield Failure(path, error)
                    continue
                score = float(batch["unknown_score"][row])
                yield ImageResult(
                    path, batch["probabilities"][row],
                    batch["embedding"][row] if "embedding" in batch else None,
                    int(batch["width"][row]), int(batch["height"][row]),
                    None if math.isnan(score) else score,
                    str(batch["unknown_reason"][row]) or None, int(batch["called"][row]))
            if progress:
                progress(len(batch["index"]))


def check_engine(engine: str) -> None:
    """``local`` or ``ray`` (Ray installed); a one-line error otherwise."""
    if engine not in ("local", "ray"):
        raise SettingsError("engine", "use local or ray", engine)
    if engine == "ray":
        _require_ray()

