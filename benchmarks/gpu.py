"""The GPU path, ready to measure: training images/s end to end (PNG crops -> the decode cache
-> augmentation -> bf16 autocast, channels_last step -> validation) with crystalscope's own
`train`, and inference images/s through ONNX Runtime's CUDA execution provider (and torch).

Goal on one H200-class GPU: >= 3,000 training images/s for ResNet-50 at 224 px (NVIDIA's
published ResNet-50 AMP training figure on an A100 is about 2,500). On a machine without a
GPU it says so and exits 0. `--device cpu` runs the same code on the CPU with small settings,
to check the script itself (the test suite does that). Run:
    .venv/bin/python benchmarks/gpu.py [--per-class 4096] [--batch-size 256] [--epochs 3]
    .venv/bin/python benchmarks/gpu.py --device cpu --model resnet18 --size 32 --per-class 32
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def measure_training(root: Path, args: argparse.Namespace) -> Path:
    """Train with crystalscope's `train`; print images/s per epoch; return the run folder."""
    from crystalscope.config import resolve_train_config
    from crystalscope.data.split import split_dataset
    from crystalscope.data.split_settings import SplitSettings
    from crystalscope.synth.crops import SynthSettings, synthesize
    from crystalscope.train.run import train

    start = time.perf_counter()
    synthesize(root / "images", SynthSettings(per_class=args.per_class, seed=0))
    split = split_dataset(root / "images", root / "splits",
                          SplitSettings(ratios="0.8,0.2,0", seed=0))
    counts = split.report["counts"]
    n_train = sum(c["train"] for c in counts.values())
    n_valid = sum(c["valid"] for c in counts.values())
    print(f"data: {n_train} train + {n_valid} valid crops written and split in "
          f"{time.perf_counter() - start:.0f} s")
    gpu = args.device == "cuda"
    config = resolve_train_config({
        "data": root / "splits", "runs_dir": root / "runs", "name": "gpu", "model": args.model,
        "weights": "none", "image_size": args.size, "trainable": 1.0,
        "batch_size": args.batch_size, "optimizer": "adamw", "lr": 1e-3, "scheduler": "none",
        "augmentation": "dihedral", "epochs": args.epochs, "f1_threshold": 1.0,
        "patience": args.epochs, "accelerator": "gpu" if gpu else "cpu", "devices": "1",
        "precision": "bf16-mixed" if gpu else "32-true", "compile": args.compile,
        "num_workers": args.workers, "evaluate": False, "export": False})
    result = train(config, quiet=True)
    with (result.run_dir / "metrics.csv").open(encoding="utf-8") as handle:
        elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(handle)]
    previous = 0.0
    for epoch, seconds in enumerate(elapsed, start=1):
        spent, previous = seconds - previous, seconds
        print(f"  epoch {epoch}: {spent:6.1f} s, {n_train / spent:8.0f} training images/s "
              f"(the epoch's validation pass over {n_valid} crops included"
              + ("; the first epoch also decodes the PNGs" if epoch == 1 else "") + ")")
    if len(elapsed) > 1:
        steady = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
        print(f"training, steady state (epochs 2-{len(elapsed)}): {n_train / steady:.0f} "
              f"images/s ({args.model} at {args.size} px, batch {args.batch_size}, "
              f"{config.precision}, channels_last{', compiled' if args.compile else ''})")
    return result.run_dir


def measure_inference(run_dir: Path, args: argparse.Namespace) -> None:
    """ONNX Runtime (CUDA execution provider where the build has it) and torch, images/s."""
    import onnxruntime as ort

    from crystalscope.export.onnx import export_onnx
    from crystalscope.model.inference import load_run

    run = load_run(run_dir)
    images = torch.randint(0, 256, (args.infer_batch, 3, args.size, args.size),
                           dtype=torch.uint8)
    onnx_path = run_dir / "model.onnx"
    export_onnx(run.net, onnx_path, args.size, {"classes": run.classes}, images[:4].float())
    wanted = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
    if wanted not in ort.get_available_providers():
        print(f"onnxruntime {ort.__version__} has no {wanted} (install onnxruntime-gpu for "
              "the CUDA execution provider); ONNX Runtime not measured")
    else:
        session = ort.InferenceSession(str(onnx_path), providers=[wanted])
        x = images.float().numpy()
        name = session.get_inputs()[0].name
        print("  " + _rate(lambda: session.run(["probabilities"], {name: x}),
                           args.infer_batch, args.infer_steps, f"onnxruntime {wanted}"))
    device = torch.device(args.device)
    net = run.net.to(device).to(memory_format=torch.channels_last).eval()
    x = images.to(device).float().contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    @torch.inference_mode()
    def forward() -> None:
        with torch.autocast(args.device, dtype=dtype, enabled=args.device == "cuda"):
            net(x)
        if args.device == "cuda":
            torch.cuda.synchronize()

    print("  " + _rate(forward, args.infer_batch, args.infer_steps,
                       f"torch {args.device} ({'bf16' if args.device == 'cuda' else 'fp32'})"))


def _rate(call: Callable[[], object], batch: int, steps: int, label: str) -> str:
    call()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        call()
    seconds = time.perf_counter() - start
    return f"inference, {label}, batch {batch}: {batch * steps / seconds:.0f} images/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--per-class", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--infer-batch", type=int, default=64)
    parser.add_argument("--infer-steps", type=int, default=20)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device on this machine: the GPU benchmark has nothing to measure "
              "(run it where `torch.cuda.is_available()` is true; `--device cpu` checks the "
              "script itself)")
        sys.exit(0)
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="crystalscope-gpu-") as tmp:
        run_dir = measure_training(Path(tmp), args)
        measure_inference(run_dir, args)


if __name__ == "__main__":
    main()
