"""Inference speed: ONNX Runtime (and OpenVINO, when installed) vs torch eager at batch 1, 8
and 32, fp32 (and int8 with --int8), and peak memory of `predict`'s streaming over 10,000
images.

Models are random-initialised (speed does not depend on the weights). Run:
    .venv/bin/python benchmarks/infer.py [--model resnet50 --size 160] [--images 64] [--int8]
        [--stream 10000]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crystalscope.export.onnx import export_onnx, quantize_int8
from crystalscope.infer.onnx_engines import open_onnx
from crystalscope.infer.predictor import load_predictor
from crystalscope.infer.stream import predict_stream
from crystalscope.model.backbones import Classifier, create_backbone
from crystalscope.model.inference import InferenceNet
from crystalscope.model.spec import ModelSpec
from crystalscope.synth.crops import SynthSettings, synthesize


def _rate(make_runner, images: np.ndarray, batch: int) -> float:
    """Images/s of ``make_runner(batch)`` over ``images``, ``batch`` at a time."""
    function = make_runner(batch)
    function(images[:batch])  # warm-up
    start = time.perf_counter()
    for begin in range(0, len(images), batch):
        function(images[begin:begin + batch])
    return len(images) / (time.perf_counter() - start)


def _rss_mb() -> float:
    """Resident memory now (Linux /proc), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--images", type=int, default=64, help="images per speed measurement")
    parser.add_argument("--int8", action="store_true", help="also time the int8 ONNX model")
    parser.add_argument("--stream", type=int, default=10_000,
                        help="images for the streaming memory check (0: skip)")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = InferenceNet(Classifier(create_backbone(args.model), 2),
                       ModelSpec(args.size, ("cex", "pg"))).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(net, onnx_path, args.size, {"classes": ["cex", "pg"]},
                    torch.from_numpy(images[:4]))
        models = {"fp32": onnx_path}
        if args.int8:
            models["int8"] = Path(tmp) / "model.int8.onnx"
            quantize_int8(onnx_path, models["int8"], torch.from_numpy(images[:16]))
        runtimes = ["onnxruntime"]
        try:
            import openvino  # noqa: F401
            runtimes.append("openvino")
        except ImportError:
            print("(OpenVINO not installed: pip install 'crystalscope[openvino]' to time it)")
        runners = {f"{runtime} {precision}": open_onnx(path, runtime).runner  # type: ignore[arg-type]
                   for precision, path in models.items() for runtime in runtimes}

        def torch_eager(batch: int):
            def run(x: np.ndarray) -> None:
                with torch.inference_mode():
                    net(torch.from_numpy(x))
            return run

        print(f"{args.model}@{args.size}, {args.images} images, "
              f"{torch.get_num_threads()} threads (images/s)")
        for name, make in runners.items():
            rates = [_rate(lambda batch, make=make: make(["probabilities"], batch), images, b)
                     for b in (1, 8, 32)]
            print(f"  {name:18s} batch 1: {rates[0]:7.1f}   batch 8: {rates[1]:7.1f}   "
                  f"batch 32: {rates[2]:7.1f}", flush=True)
        rates = [_rate(torch_eager, images, b) for b in (1, 8, 32)]
        print(f"  {'torch eager fp32':18s} batch 1: {rates[0]:7.1f}   batch 8: {rates[1]:7.1f}   "
              f"batch 32: {rates[2]:7.1f}", flush=True)

        if args.stream:
            # Streaming memory: a small model, real PNG files (repeated), predict's code path.
            files = synthesize(Path(tmp) / "frames", SynthSettings(per_class=50, size=151))
            paths = sorted((Path(tmp) / "frames").rglob("*.png"))
            small = InferenceNet(Classifier(create_backbone("resnet18"), 2),
                                 ModelSpec(64, ("cex", "pg"))).eval()
            small_path = Path(tmp) / "small.onnx"
            export_onnx(small, small_path, 64, {"classes": ["cex", "pg"],
                                                "preprocessing": {"input_size": 64}},
                        torch.zeros(2, 3, 64, 64))
            predictor = load_predictor(small_path)
            for count in (1_000, args.stream):
                before, peak = _rss_mb(), 0.0
                start = time.perf_counter()
                done = 0
                for _ in predict_stream(predictor, (paths * (count // len(paths) + 1))[:count]):
                    done += 1
                    if done % 32 == 0:
                        peak = max(peak, _rss_mb())
                seconds = time.perf_counter() - start
                print(f"  predict streaming {done:6d} images (resnet18@64, batch 32): "
                      f"{done / seconds:6.1f} images/s, resident memory {before:6.0f} MB "
                      f"before, at most {peak:6.0f} MB while streaming", flush=True)
            del files


if __name__ == "__main__":
    main()
