"""A bounded load test of `crystalscope serve`: N requests to POST /predict, C at a time, over
loopback against a real uvicorn server; prints p50/p99 latency, throughput and errors.

The model is a random-initialised ResNet-18 at 64 px exported to ONNX (the serving path, not
the model, is measured) unless --run is given. Run:
    .venv/bin/python benchmarks/serve.py [--requests 2000] [--concurrency 8] [--run RUN]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crystalscope.export.onnx import export_onnx
from crystalscope.infer.predictor import load_predictor
from crystalscope.model.backbones import Classifier, create_backbone
from crystalscope.model.inference import InferenceNet
from crystalscope.model.spec import ModelSpec
from crystalscope.serve.app import ServeSettings, create_app
from crystalscope.serve.server import running


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            "filename=\"crop.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    return body + image + f"\r\n--{boundary}--\r\n".encode(), boundary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--run", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            predictor = load_predictor(args.run)
        else:
            torch.manual_seed(0)
            net = InferenceNet(Classifier(create_backbone("resnet18"), 2),
                               ModelSpec(64, ("cex", "pg"))).eval()
            export_onnx(net, Path(tmp) / "model.onnx", 64,
                        {"classes": ["cex", "pg"], "preprocessing": {"input_size": 64}},
                        torch.zeros(2, 3, 64, 64))
            predictor = load_predictor(Path(tmp) / "model.onnx")
        rng = np.random.default_rng(0)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (151, 151), dtype=np.uint8)).save(buffer, "PNG")
        body, boundary = multipart(buffer.getvalue())
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        with running(create_app(ServeSettings(predictor=predictor))) as url:

            def one(_: int) -> tuple[float, bool]:
                start = time.perf_counter()
                request = urllib.request.Request(f"{url}/predict", data=body, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        ok = response.status == 200
                        response.read()
                except OSError:
                    ok = False
                return time.perf_counter() - start, ok

            one(0)  # warm-up
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            seconds = time.perf_counter() - start
        latencies = np.array([r[0] for r in results]) * 1000
        errors = sum(not r[1] for r in results)
        print(f"POST /predict (one 151x151 PNG), {args.requests} requests, {args.concurrency} "
              f"concurrent, loopback, {predictor.input_size} px model: p50 "
              f"{np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} "
              f"ms, {args.requests / seconds:.0f} requests/s, errors {errors}")


if __name__ == "__main__":
    main()
