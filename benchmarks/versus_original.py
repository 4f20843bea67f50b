"""Side by side with the original project on the same images, in one run.

The host's speed drifts by tens of percent within minutes, so only ratios measured together
mean anything: each round times (a) the original recipe in TF/Keras (benchmarks/
original_keras.py, run by a Python that has tensorflow-cpu and tf_keras) and then (b)
crystalscope's training step from files for the `georgia` recipe (the original's: ResNet-101 at
224 px, last 10% trainable, batch 64, its affine augmentation) and the `fast` recipe, and prints
the ratios of that round. Then `crystalscope predict` over a folder, start-up included, as a
user runs it (torch, ONNX Runtime fp32, ONNX Runtime int8, and int8 through OpenVINO when it is
installed), against the original's one file at a time. Weights are random (speed does not
depend on them).

Without --keras-python (or $CRYSTALSCOPE_KERAS_PYTHON) it prints our side only and says why.
Run:
    .venv/bin/python benchmarks/versus_original.py --keras-python ../.venv-tf/bin/python
        [--rounds 2] [--steps 3] [--predict-images 512]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.data.split_settings import SplitSettings
from crystalscope.export.stage import ExportSettings, export_run
from crystalscope.recipes import RECIPES
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.train.run import train

sys.path.insert(0, str(Path(__file__).parent))
from train import measure

KERAS_SCRIPT = Path(__file__).with_name("original_keras.py")


def keras_python(given: str | None) -> tuple[str | None, str]:
    """The Python to run the original with, or None and why not."""
    python = given or os.environ.get("CRYSTALSCOPE_KERAS_PYTHON")
    if not python:
        return None, ("no --keras-python given (a Python with tensorflow-cpu and tf_keras, "
                      "e.g. a separate venv: python -m venv ../.venv-tf && ../.venv-tf/bin/pip "
                      "install tensorflow-cpu tf_keras pillow scipy)")
    check = subprocess.run([python, "-c", "import tf_keras, PIL, scipy"], capture_output=True,
                           text=True)
    if check.returncode != 0:
        return None, f"{python} cannot import tf_keras, PIL and scipy: install them there"
    return python, ""


def run_original(python: str, images: Path, steps: int) -> dict[str, float]:
    done = subprocess.run([python, str(KERAS_SCRIPT), str(images), "--steps", str(steps)],
                          capture_output=True, text=True, check=True)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    return {line["what"]: line["images_per_s"] for line in lines}


def trained_model(splits: Path, runs: Path, recipe: str, model: str, size: int,
                  epochs: int) -> Path:
    """A short run of ``recipe`` exported with int8: a complete model folder to predict with."""
    config = resolve_train_config({
        "recipe": recipe, "data": splits, "runs_dir": runs, "name": recipe, "epochs": epochs,
        "model": model, "image_size": size,
        "weights": "none", "trainable": RECIPES[recipe]["trainable"], "evaluate": False,
        "export": False, "seed": 0})
    run_dir = train(config, quiet=True).run_dir
    export_run(run_dir, settings=ExportSettings(int8=True))
    return run_dir


def predict_rate(model: Path, images: Path, output: Path, *extra: str) -> float:
    """Images/s of `crystalscope predict MODEL IMAGES --output OUTPUT`, start-up included."""
    count = sum(1 for _ in images.rglob("*.png"))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crystalscope.cli", "predict", str(model),
                    str(images), "--format", "csv", "--output", str(output), *extra],
                   check=True, capture_output=True)
    return count / (time.perf_counter() - start)


def class_changes(fp32_csv: Path, int8_csv: Path) -> tuple[int, int, float]:
    """(images, how many changed class, largest probability change) between two predict CSVs."""
    def read(path: Path) -> dict[str, tuple[str, float]]:
        with path.open(newline="", encoding="utf-8") as handle:
            return {row["file"]: (row["predicted_class"], float(row["probability_pg"]))
                    for row in csv.DictReader(handle)}
    fp32, int8 = read(fp32_csv), read(int8_csv)
    changed = sum(fp32[f][0] != int8[f][0] for f in fp32)
    return len(fp32), changed, max(abs(fp32[f][1] - int8[f][1]) for f in fp32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keras-python", help="Python with tensorflow-cpu and tf_keras")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="training steps timed per round")
    parser.add_argument("--predict-images", type=int, default=1000)
    parser.add_argument("--predict-epochs", type=int, default=1,
                        help="epochs of the models predict runs (speed does not depend on it)")
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="ResNet-18 at 32 px for every recipe: checks the script, not speed")
    args = parser.parse_args()

    def model_of(recipe: str) -> tuple[str, int]:
        return ("resnet18", 32) if args.smoke else (RECIPES[recipe]["model"],
                                                     RECIPES[recipe]["image_size"])

    python, why = keras_python(args.keras_python)
    torch.manual_seed(0)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
          "threads; images/s (higher is better)")
    if python is None:
        print(f"original (TF/Keras): not measured: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        batch = RECIPES["georgia"]["batch_size"]
        per_class = (args.steps + 1) * batch // 2 * 10 // 7 + 8  # enough train batches
        synthesize(folder / "images", SynthSettings(per_class=per_class, seed=11))
        split_dataset(folder / "images", folder / "splits", SplitSettings(seed=11))
        ours = {"georgia": [], "fast": []}
        original: dict[str, list[float]] = {"train": [], "predict_per_image": []}
        for round_index in range(1, args.rounds + 1):
            line = [f"round {round_index}:"]
            if python:
                for key, value in run_original(python, folder / "images", args.steps).items():
                    original[key].append(value)
                line.append(f"original train {original['train'][-1]:5.1f}")
            for recipe in ("georgia", "fast"):
                steady, _, _ = measure(*model_of(recipe), args.steps, folder / "splits", 0,
                                       recipe=recipe)
                ours[recipe].append(steady)
                ratio = f" ({steady / original['train'][-1]:.2f}x)" if python else ""
                line.append(f"{recipe} {steady:5.1f}{ratio}")
            print("  ".join(line), flush=True)
        print("training, median of the rounds:")
        base = statistics.median(original["train"]) if python else None
        if base:
            print(f"  original (Keras ResNet-101@224, 10% trainable) {base:6.1f}")
        for recipe, values in ours.items():
            settings = RECIPES[recipe]
            value = statistics.median(values)
            ratio = (f"  {value / base:.2f}x the original"
                     f"{' (same recipe)' if recipe == 'georgia' else ''}") if base else ""
            model, size = model_of(recipe)
            print(f"  crystalscope {recipe:8s} ({model}@{size}, "
                  f"{settings['trainable']:.0%} trainable) {value:6.1f}{ratio}")
        if args.skip_predict:
            return
        synthesize(folder / "predict" / "crops",
                   SynthSettings(per_class=args.predict_images // 2, seed=12))
        crops = folder / "predict" / "crops"
        print(f"predict over a folder of {args.predict_images} crops, start-up included:")
        if python:
            rate = statistics.median(original["predict_per_image"])
            print(f"  original (Keras, one file at a time, model already loaded) {rate:6.1f}")
        for recipe in ("georgia", "fast"):
            model, size = model_of(recipe)
            run_dir = trained_model(folder / "splits", folder / "runs", recipe, model, size,
                                    args.predict_epochs)
            for name, path, extra in (("torch", run_dir, ("--backend", "torch")),
                                      ("onnx fp32", run_dir / "model.onnx", ()),
                                      ("onnx int8", run_dir / "model.int8.onnx", ()),
                                      *openvino_int8(run_dir)):
                rate_ours = predict_rate(path, crops, folder / f"{recipe}-{name}.csv", *extra)
                ratio = (f"  {rate_ours / statistics.median(original['predict_per_image']):.1f}x"
                         " the original" if python else "")
                print(f"  crystalscope {model}@{size} {name:9s} "
                      f"{rate_ours:6.1f}{ratio}", flush=True)
            for name in ("onnx int8", "openvino int8"):
                if not (folder / f"{recipe}-{name}.csv").is_file():
                    continue
                images, changed, largest = class_changes(folder / f"{recipe}-onnx fp32.csv",
                                                         folder / f"{recipe}-{name}.csv")
                print(f"    {name} vs onnx fp32 on {images} crops: {changed} changed class "
                      f"({100 * changed / images:.2f}%), largest probability change "
                      f"{largest:.3f}")


def openvino_int8(run_dir: Path) -> list[tuple[str, Path, tuple[str, ...]]]:
    """The int8 model through OpenVINO, when it is installed (else a line says so)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("  (openvino int8 not measured: OpenVINO is not installed; "
              "pip install 'crystalscope[openvino]')")
        return []
    return [("openvino int8", run_dir / "model.int8.onnx", ("--backend", "openvino"))]


if __name__ == "__main__":
    main()
