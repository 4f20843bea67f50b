"""Active labelling vs random order: how many labels reach the F1 of all labels.

Per seed: a synthetic unlabelled pool (`crystalscope synth`, default difficulty) and a separate
validation set. A simulated labeller gives the true class, a batch at a time, in one of two
orders: random, or `crystalscope label`'s active order (diversity on the crops' embeddings for
the first batch, then the model's margin uncertainty mixed with diversity,
crystalscope.label.ordering.active_order). After each batch a model is trained on the labels so
far and its validation macro F1 recorded. The model is a logistic regression on the crops'
embeddings, so that dozens of retrainings take seconds on a CPU: by default the page's own
offline embedding (thumbnails and brightness histograms), or with ``--embeddings model`` the
embeddings of a ResNet-18 trained briefly on a separate synthetic set (a model from an earlier
campaign); 32 principal components either way.

Prints F1 against labels for both orders, the F1 random order reaches with every label, and the
share of the labels the active order needs to reach it. Run:
    .venv/bin/python benchmarks/active.py [--seeds 1 2 3] [--pool 300] [--batch 20]
        [--embeddings pixels|model]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.data.split_settings import SplitSettings
from crystalscope.infer.predictor import Predictor, load_predictor
from crystalscope.infer.stream import predict_stream
from crystalscope.label.ordering import active_order
from crystalscope.label.scoring import ORDER_DIMENSIONS, pixel_embeddings
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.train.run import train


def load_set(folder: Path, per_class: int, seed: int, predictor: Predictor | None
             ) -> tuple[np.ndarray, np.ndarray]:
    synthesize(folder, SynthSettings(per_class=per_class, seed=seed))
    paths = sorted(folder.rglob("*.png"))
    labels = np.array([int(p.parent.name == "pg") for p in paths])
    if predictor is None:
        return pixel_embeddings(paths), labels
    return np.array([r.embedding for r in predict_stream(predictor, paths)]), labels


def earlier_model(folder: Path) -> Predictor:
    """A ResNet-18 trained for 8 epochs on 150 crops per class of another seed, exported."""
    synthesize(folder / "images", SynthSettings(per_class=150, seed=99))
    split_dataset(folder / "images", folder / "splits", SplitSettings(seed=99))
    config = resolve_train_config({
        "data": folder / "splits", "runs_dir": folder / "runs", "name": "earlier",
        "model": "resnet18", "weights": "none", "image_size": 64, "trainable": 1.0,
        "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "scheduler": "cosine",
        "augmentation": "dihedral", "epochs": 8, "evaluate": False, "seed": 99})
    return load_predictor(train(config, quiet=True).run_dir)


def fit_f1(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
           ) -> tuple[float, LogisticRegression | None]:
    if len(set(y.tolist())) < 2:  # one class so far: the model says that class
        return float(f1_score(y_val, np.full_like(y_val, y[0]), average="macro")), None
    model = LogisticRegression(max_iter=2000, C=1.0).fit(x, y)
    return float(f1_score(y_val, model.predict(x_val), average="macro")), model


def curve(order: str, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
          batch: int, seed: int) -> list[tuple[int, float]]:
    rng = np.random.default_rng(seed)
    labelled: list[int] = []
    points = []
    model = None
    while len(labelled) < len(x):
        if order == "random":
            rest = np.setdiff1d(np.arange(len(x)), labelled)
            picks = rng.permutation(rest)[:batch].tolist()
        else:
            probabilities = None if model is None else model.predict_proba(x)
            picks = active_order(x, probabilities,
                                 labelled=np.array(labelled) if labelled else None, count=batch)
        labelled += picks
        f1, model = fit_f1(x[labelled], y[labelled], x_val, y_val)
        points.append((len(labelled), f1))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pool", type=int, default=300, help="crops per class in the pool")
    parser.add_argument("--validation", type=int, default=200, help="crops per class")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--embeddings", choices=["pixels", "model"], default="pixels")
    args = parser.parse_args()
    shares = []
    models = tempfile.TemporaryDirectory()
    predictor = earlier_model(Path(models.name)) if args.embeddings == "model" else None
    print(f"embeddings: {args.embeddings}")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            x, y = load_set(Path(tmp) / "pool", args.pool, seed, predictor)
            x_val, y_val = load_set(Path(tmp) / "valid", args.validation, 1000 + seed,
                                    predictor)
        # Embeddings reduced as the page reduces them, fitted on the pool only.
        pca = PCA(n_components=ORDER_DIMENSIONS, svd_solver="full").fit(x)
        x, x_val = pca.transform(x), pca.transform(x_val)
        curves = {order: curve(order, x, y, x_val, y_val, args.batch, seed)
                  for order in ("random", "active")}
        target = curves["random"][-1][1]
        reached = next((n for n, f1 in curves["active"] if f1 >= target), len(x))
        shares.append(reached / len(x))
        print(f"seed {seed}: pool {len(x)} crops, validation {len(x_val)}; macro F1 by labels")
        for (n, random_f1), (_, active_f1) in zip(curves["random"], curves["active"],
                                                  strict=True):
            if n <= 200 or n % 100 == 0 or n == len(x):
                print(f"  {n:5d} labels   random {random_f1:.4f}   active {active_f1:.4f}")
        print(f"  random order with all {len(x)} labels: F1 {target:.4f}; active order "
              f"reaches it with {reached} labels ({100 * reached / len(x):.0f}%)", flush=True)
    print(f"labels the active order needs for random's final F1: "
          f"{', '.join(f'{100 * s:.0f}%' for s in shares)} of the pool "
          f"(median {100 * float(np.median(shares)):.0f}%)")


if __name__ == "__main__":
    main()
