"""How well the unknown-detector separates CEX/PG crops from what it never saw.

Per seed: synthesises CEX/PG crops (96 px, medium-hard difficulty), splits them, trains a
ResNet-18 from random weights (what this CPU allows), exports it (which fits and calibrates
the detector on the train/valid splits at a 1% false-reject rate), then scores

- in-distribution: the test split plus a fresh synthetic CEX/PG set (another seed);
- near unknown kinds: bubbles, empty frames, heavy defocus, cubes (`synth unknown`);
- far unknown kinds: pieces of scikit-image's photographs (the cat, …).

Prints AUROC (in vs out) and, at the calibrated threshold, the in-distribution false-reject
rate and the share of unknown images flagged — for the detector and for the
alternatives it was chosen over (scored on the same images, thresholds set the same way).
Run:
    .venv/bin/python benchmarks/unknown.py [--seeds 2] [--per-class 420]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from crystalscope.config import resolve_train_config
from crystalscope.data.decoded import build_cache
from crystalscope.data.split import split_dataset
from crystalscope.data.split_settings import SplitSettings
from crystalscope.export.stage import ExportSettings, export_run
from crystalscope.infer.predictor import load_predictor
from crystalscope.model.inference import LoadedRun, load_run, run_batches
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.synth.unknown import (
    FAR_KINDS,
    NEAR_KINDS,
    UnknownSettings,
    synthesize_unknown,
)
from crystalscope.train.run import train
from crystalscope.unknown.detector import conformal_threshold
from crystalscope.unknown.scores import GaussianDistance, knn_distance, max_softmax_score

SIZE = 96


def train_model(folder: Path, per_class: int, difficulty: float, seed: int) -> Path:
    synthesize(folder / "images", SynthSettings(per_class=per_class, size=SIZE,
                                                uniform_size=SIZE, difficulty=difficulty,
                                                seed=seed))
    split_dataset(folder / "images", folder / "splits", SplitSettings(seed=seed))
    config = resolve_train_config({
        "data": folder / "splits", "runs_dir": folder / "runs", "name": "unknown",
        "model": "resnet18", "weights": "none", "image_size": SIZE, "trainable": 1.0,
        "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "scheduler": "none",
        "augmentation": "dihedral", "epochs": 15, "f1_threshold": 0.99, "seed": seed,
        "evaluate": False, "export": False})
    result = train(config, quiet=True)
    print(f"  trained: best validation macro F1 {result.best_val_f1_macro:.4f} "
          f"({result.epochs} epochs, {result.seconds:.0f} s)")
    return result.run_dir


def outputs(run: LoadedRun, folder: Path) -> dict[str, np.ndarray]:
    """Probabilities, embeddings, stage statistics and labels of every image under folder."""
    items = [(p, 0) for p in sorted(folder.rglob("*.png"))]
    images = build_cache(items, run.spec).images
    probabilities, embeddings, statistics = run_batches(run.net, images)
    return {"statistics": statistics.double().numpy(),
            "probabilities": probabilities.double().numpy(), "embeddings": embeddings.numpy()}


def alternatives(run: LoadedRun) -> dict[str, Callable[[dict], np.ndarray]]:
    """Scores the detector was chosen over, fitted on the same train split."""
    decoded = build_cache(run.data.split("train"), run.spec)
    labels = decoded.labels.numpy()
    embeddings = run_batches(run.net, decoded.images)[1].numpy()
    gaussian = GaussianDistance.fit(embeddings, labels)
    return {
        "max-softmax (1 - top probability)": lambda o: max_softmax_score(o["probabilities"]),
        "kNN (k=5) on the final embedding": lambda o: knn_distance(embeddings,
                                                                   o["embeddings"], 5),
        "Mahalanobis on the final embedding": lambda o: gaussian(o["embeddings"]),
    }


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(truth, np.r_[inside, outside]))


def measure(name: str, score: Callable[[dict], np.ndarray], sets: dict[str, dict],
            valid: dict, rate: float, threshold: float | None = None) -> dict:
    """AUROC and flagged shares of ``score``; its threshold set like the detector's (on half
    of the validation split) unless given."""
    if threshold is None:
        half = {key: value[1::2] for key, value in valid.items()}
        threshold, _ = conformal_threshold(score(half), rate)
    inside = np.r_[score(sets["test"]), score(sets["fresh"])]
    row = {"method": name, "false_reject": float(np.mean(inside > threshold))}
    for group, kinds in (("near", NEAR_KINDS), ("far", FAR_KINDS)):
        outside = np.concatenate([score(sets[k]) for k in kinds])
        row[f"{group}_auroc"] = auroc(inside, outside)
        row[f"{group}_flagged"] = float(np.mean(outside > threshold))
    for kind in (*NEAR_KINDS, *FAR_KINDS):
        row[kind] = auroc(inside, score(sets[kind]))
        row[f"{kind}_flagged"] = float(np.mean(score(sets[kind]) > threshold))
    return row


def one_seed(folder: Path, seed: int, args: argparse.Namespace) -> list[dict]:
    run_dir = train_model(folder, args.per_class, args.difficulty, seed)
    export = export_run(run_dir, settings=ExportSettings(false_reject=args.false_reject))
    print("  " + f"detector: {export.unknown_detector['calibration']}")
    synthesize(folder / "fresh", SynthSettings(per_class=args.fresh, size=SIZE,
                                               uniform_size=SIZE, difficulty=args.difficulty,
                                               seed=1000 + seed))
    synthesize_unknown(folder / "unknown-images", UnknownSettings(
        per_kind=args.per_kind, size=SIZE, difficulty=args.difficulty, seed=2000 + seed))
    run = load_run(run_dir)
    sets = {"test": outputs(run, folder / "splits" / "test"),
            "fresh": outputs(run, folder / "fresh")}
    for kind in (*NEAR_KINDS, *FAR_KINDS):
        sets[kind] = outputs(run, folder / "unknown-images" / kind)
    valid = outputs(run, folder / "splits" / "valid")
    detector = load_predictor(run_dir).unknown_detector
    assert detector is not None

    def stages_only(o: dict) -> np.ndarray:  # the detector without its max-softmax part
        parts = detector.components(o["statistics"], o["probabilities"])[:, :-1]
        return ((parts - detector.center[:-1]) / detector.scale[:-1]).max(axis=1)

    rows = [measure("crystalscope (its own threshold: unknown_score > 1)",
                    lambda o: detector.score(o["statistics"], o["probabilities"]),
                    sets, valid, args.false_reject, threshold=1.0),
            measure("  the same without max-softmax", stages_only, sets, valid,
                    args.false_reject)]
    rows += [measure(name, score, sets, valid, args.false_reject)
             for name, score in alternatives(run).items()]
    inside = len(sets["test"]["probabilities"]) + len(sets["fresh"]["probabilities"])
    print(f"  in-distribution images: {inside}; validation (calibration): "
          f"{len(valid['probabilities'])}; near: {len(NEAR_KINDS)} x {args.per_kind}; "
          f"far: {args.per_kind}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=420,
                        help="crops per class; 420 gives a validation split of 210, half of "
                             "which (105) can hold a 1%% false-reject rate")
    parser.add_argument("--fresh", type=int, default=200, help="fresh CEX/PG crops per class")
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--difficulty", type=float, default=0.3)
    parser.add_argument("--false-reject", type=float, default=0.01)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        print(f"seed {seed}")
        with tempfile.TemporaryDirectory() as folder:
            for row in one_seed(Path(folder), seed, args):
                results.setdefault(row["method"], []).append(row)
    print(f"\nmean over {args.seeds} seed(s); flagged = share called unknown at the threshold "
          f"calibrated for {100 * args.false_reject:g}% false rejects")
    print(f"{'method':48s} {'FRR':>6s} {'near AUROC':>10s} {'far AUROC':>9s} "
          f"{'near flagged':>12s} {'far flagged':>11s}")
    for method, rows in results.items():
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "method"}
        print(f"{method:48s} {mean['false_reject']:6.4f} {mean['near_auroc']:10.3f} "
              f"{mean['far_auroc']:9.3f} {mean['near_flagged']:12.2f} "
              f"{mean['far_flagged']:11.2f}")
    print("\nper kind (AUROC / flagged), crystalscope's detector:")
    rows = next(iter(results.values()))
    for kind in (*NEAR_KINDS, *FAR_KINDS):
        print(f"  {kind:8s} " + "  ".join(f"{r[kind]:.3f} / {r[kind + '_flagged']:.2f}"
                                          for r in rows))


if __name__ == "__main__":
    main()
