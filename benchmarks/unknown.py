"""How well the unknown-detector separates CEX/PG crops from what it never saw.

Per seed: synthesises CEX/PG crops (96 px, medium-hard difficulty), splits them, trains a
ResNet-18 from random weights (what this CPU allows), exports it (which fits the quality gate
and the novelty score on the training split and calibrates them together on the validation
split at a 1% false-reject rate), then scores

- in-distribution: the test split plus a fresh synthetic CEX/PG set (another seed);
- near unknown kinds: bubbles, empty frames, heavy defocus, cubes (`synth unknown`);
- far unknown kinds: pieces of scikit-image's photographs (the cat, …);
- the 14 real crops in ../shared/data/opencrystal-samples (a real crystal is not unknown).

Prints AUROC (in vs out; a crop the gate rejects ranks above every score) and, at the
calibrated threshold, the in-distribution false-reject rate and the share of unknown images
flagged — for the detector and for the novelty scores it was chosen over (each behind the same
gate, its threshold set the same way on the same validation images), and the detector's
reasons per kind. Run:
    .venv/bin/python benchmarks/unknown.py [--seeds 3] [--per-class 1000]

``--detector-only`` skips the network (the detector reads only the crops): per seed it fits
the detector on the same synthetic splits and prints what it flags, about 4 minutes a seed
instead of 10-24 — for more seeds than the ones it was chosen on, e.g. held out:
    .venv/bin/python benchmarks/unknown.py --detector-only --first-seed 3 --per-kind 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from crystalscope.config import resolve_train_config
from crystalscope.data.decoded import build_cache
from crystalscope.data.split import split_dataset
from crystalscope.data.split_settings import SplitSettings
from crystalscope.export.stage import ExportSettings, export_run
from crystalscope.infer.predictor import load_predictor
from crystalscope.model.inference import LoadedRun, load_run, run_batches
from crystalscope.model.spec import ModelSpec
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.synth.unknown import (
    FAR_KINDS,
    NEAR_KINDS,
    UnknownSettings,
    synthesize_unknown,
)
from crystalscope.train.run import train
from crystalscope.unknown.appearance import AppearanceNeighbours, appearance
from crystalscope.unknown.calibration import (
    appearance_calibration,
    conformal_threshold,
    copy_fingerprints,
    copy_groups,
    gated_threshold,
)
from crystalscope.unknown.detector import (
    APPEARANCE,
    SCALING_IMAGES,
    STAGES,
    UnknownDetector,
    fit_detector,
)
from crystalscope.unknown.quality import MEASURES
from crystalscope.unknown.scores import knn_distance, max_softmax_score

SIZE = 96
KINDS = (*NEAR_KINDS, *FAR_KINDS)
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "opencrystal-samples"


def synthesize_splits(folder: Path, per_class: int, difficulty: float, seed: int) -> None:
    """The seed's CEX/PG crops, split into ``folder/splits``."""
    synthesize(folder / "images", SynthSettings(per_class=per_class, size=SIZE,
                                                uniform_size=SIZE, difficulty=difficulty,
                                                seed=seed))
    split_dataset(folder / "images", folder / "splits", SplitSettings(seed=seed))


def synthesize_measured(folder: Path, seed: int, args: argparse.Namespace) -> None:
    """The seed's sets measured beside the splits: fresh CEX/PG crops (``folder/fresh``, another
    seed) and the unknown kinds (``folder/unknown-images``)."""
    synthesize(folder / "fresh", SynthSettings(per_class=args.fresh, size=SIZE,
                                               uniform_size=SIZE, difficulty=args.difficulty,
                                               seed=1000 + seed))
    synthesize_unknown(folder / "unknown-images", UnknownSettings(
        per_kind=args.per_kind, size=SIZE, difficulty=args.difficulty, seed=2000 + seed))


def train_model(folder: Path, per_class: int, difficulty: float, seed: int) -> Path:
    synthesize_splits(folder, per_class, difficulty, seed)
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


def outputs(run: LoadedRun, items: list[tuple[Path, int]]) -> dict[str, np.ndarray]:
    """The network's outputs, the crops themselves and their labels."""
    decoded = build_cache(items, run.spec)
    probabilities, embeddings, statistics = run_batches(run.net, decoded.images)
    return {"statistics": statistics.double().numpy(), "labels": decoded.labels.numpy(),
            "probabilities": probabilities.double().numpy(), "embeddings": embeddings.numpy(),
            "images": decoded.images.numpy()}


def pngs(folder: Path) -> list[tuple[Path, int]]:
    return [(p, 0) for p in sorted(folder.rglob("*.png"))]


class StageScores:
    """The network-feature scores the appearance score was chosen over, on the train split."""

    def __init__(self, train: dict, stage_sizes: list[int]) -> None:
        self.edges = list(itertools.pairwise(np.cumsum([0, *stage_sizes])))
        x, y = train["statistics"], train["labels"]
        self.mean, self.spread = x.mean(axis=0), x.std(axis=0) + 1e-9
        self.bank = self.normalised(x)
        self.shrunk = []
        for a, b in self.edges:  # Ledoit-Wolf shrunk covariance around each class mean
            classes = np.unique(y)
            means = np.stack([x[y == c, a:b].mean(axis=0) for c in classes])
            centred = x[:, a:b] - means[np.searchsorted(classes, y)]
            self.shrunk.append((means, LedoitWolf().fit(centred).precision_))

    def normalised(self, x: np.ndarray) -> np.ndarray:
        """Each stage standardised and L2-normalised, concatenated (deep nearest neighbours)."""
        z = (x - self.mean) / self.spread
        return np.concatenate([z[:, a:b] / np.linalg.norm(z[:, a:b], axis=1, keepdims=True)
                               for a, b in self.edges], axis=1)

    def knn(self, o: dict) -> np.ndarray:
        return knn_distance(self.bank, self.normalised(o["statistics"]), 5)

    def shrunk_mahalanobis(self, o: dict) -> np.ndarray:
        """(N, stages): the distance to the nearest class mean at each stage."""
        x = o["statistics"]
        columns = []
        for (a, b), (means, precision) in zip(self.edges, self.shrunk, strict=True):
            columns.append(np.sqrt(np.min([np.einsum("ij,jk,ik->i", x[:, a:b] - m, precision,
                                                     x[:, a:b] - m) for m in means], axis=0)))
        return np.stack(columns, axis=1)


def scaled_max(parts: Callable[[dict], np.ndarray], scaling: dict) -> Callable[[dict], np.ndarray]:
    """Several parts on one scale (median 0, standard deviation 1 on ``scaling``), the max."""
    reference = parts(scaling)
    center, spread = np.median(reference, axis=0), reference.std(axis=0) + 1e-12
    return lambda o: ((parts(o) - center) / spread).max(axis=1)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    both = np.nan_to_num(np.r_[inside, outside], posinf=np.finfo(float).max)
    return float(roc_auc_score(truth, both))


def measure(name: str, score: Callable[[dict], np.ndarray], sets: dict[str, dict],
            calibration: dict, rate: float, *, gate: bool = True,
            threshold: float | None = None) -> dict:
    """AUROC and flagged shares of ``score`` behind the gate (a rejected crop scores +inf);
    its threshold the conformal quantile on ``calibration`` unless given."""
    def gated(o: dict) -> np.ndarray:
        values = np.asarray(score(o), np.float64)
        return np.where(o["gated"], np.inf, values) if gate else values

    if threshold is None:  # as export sets it
        rejected = calibration["gated"] if gate else np.zeros(len(calibration["gated"]), bool)
        threshold, _ = gated_threshold(score(calibration), rejected, rate)
    inside = np.r_[gated(sets["test"]), gated(sets["fresh"])]
    row = {"method": f"{name} @ {100 * rate:g}%",
           "false_reject": float(np.mean(inside > threshold)),
           "real": int(np.sum(gated(sets["real"]) > threshold))}
    for group, kinds in (("near", NEAR_KINDS), ("far", FAR_KINDS)):
        outside = np.concatenate([gated(sets[k]) for k in kinds])
        row[f"{group}_auroc"] = auroc(inside, outside)
        row[f"{group}_flagged"] = float(np.mean(outside > threshold))
    for kind in KINDS:
        row[kind] = auroc(inside, gated(sets[kind]))
        row[f"{kind}_flagged"] = float(np.mean(gated(sets[kind]) > threshold))
    return row


def own_calibration(detector: UnknownDetector, train: dict, valid: dict
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The exported detector's calibration (raw scores, gated), recomputed: its bank is the
    training and validation crops (fewer than its limit), scored leave-one-out."""
    assert detector.appearance is not None and detector.gate is not None
    bank = np.concatenate([train["images"], valid["images"]])
    assert len(detector.appearance.bank) == len(bank)
    return appearance_calibration(detector.appearance, detector.gate,
                                  detector.gate.measure(bank),
                                  np.arange(len(bank)) < len(train["images"]),
                                  copy_groups(copy_fingerprints(bank)),
                                  np.zeros((0, detector.appearance.width)),
                                  np.zeros((0, len(MEASURES))))


def photo_sources(folder: Path) -> dict[str, str]:
    """File name -> the scikit-image photo each ``natural`` image was cut from (unknown.json)."""
    written = json.loads((folder / "unknown.json").read_text(encoding="utf-8"))
    return {Path(name).name: photo for name, photo in written["sources"].items()}


def one_seed(folder: Path, seed: int, args: argparse.Namespace,
             flagged_by_photo: defaultdict[str, list[bool]]) -> list[dict]:
    run_dir = train_model(folder, args.per_class, args.difficulty, seed)
    export = export_run(run_dir, settings=ExportSettings(false_reject=args.false_rejects[0]))
    print("  " + f"detector: {export.unknown_detector['calibration']}")
    synthesize_measured(folder, seed, args)
    run = load_run(run_dir)
    sets = {"train": outputs(run, run.data.split("train")),
            "valid": outputs(run, run.data.split("valid")),
            "test": outputs(run, run.data.split("test")),
            "fresh": outputs(run, pngs(folder / "fresh")),
            "real": outputs(run, pngs(REAL))}
    for kind in KINDS:
        sets[kind] = outputs(run, pngs(folder / "unknown-images" / kind))
    detector = load_predictor(run_dir).unknown_detector
    assert detector is not None and detector.gate is not None
    for o in sets.values():
        o["gated"] = detector.gate.failed(detector.gate.measure(o["images"])).any(axis=1)
        o["descriptors"] = appearance(o["images"])
    valid = sets["valid"]
    reasons = {kind: Counter(r for r in detector.assess(sets[kind]["images"],
                                                        sets[kind]["statistics"],
                                                        sets[kind]["probabilities"])[1] if r)
               for kind in (*KINDS, "real")}
    for kind, counted in reasons.items():
        print(f"  {kind:8s} reasons: {dict(counted)}")
    _, natural_reasons = detector.assess(sets["natural"]["images"], sets["natural"]["statistics"],
                                         sets["natural"]["probabilities"])
    sources = photo_sources(folder / "unknown-images")
    for path, reason in zip(pngs(folder / "unknown-images" / "natural"), natural_reasons,
                            strict=True):
        flagged_by_photo[sources[path[0].name]].append(reason is not None)

    def own(o: dict) -> np.ndarray:
        return detector.score(o["statistics"], o["probabilities"], o["descriptors"])

    raw, gated = own_calibration(detector, sets["train"], valid)
    exported = gated_threshold(raw, gated, args.false_rejects[0])[0]
    assert np.isclose(exported, detector.threshold), (exported, detector.threshold)
    earlier = AppearanceNeighbours.fit(sets["train"]["descriptors"], k=5, whiten=False)

    previous = fit_detector(sets["train"]["statistics"], sets["train"]["labels"],
                            valid["statistics"], valid["probabilities"],
                            run_stage_sizes(run),
                            args.false_rejects[0], method=STAGES,
                            train_images=sets["train"]["images"],
                            valid_images=valid["images"])
    n = len(valid["labels"])  # the previous detector's calibration images, as it chose them
    unscaled_index = np.setdiff1d(np.arange(n), np.linspace(0, n - 1, min(
        n // 2, SCALING_IMAGES)).round().astype(int))
    unscaled = {key: value[unscaled_index] for key, value in valid.items()}
    stages = StageScores(sets["train"], previous.stage_sizes)
    half = {key: value[0::2] for key, value in valid.items()}  # scales the multi-part scores
    other = {key: value[1::2] for key, value in valid.items()}
    shrunk = scaled_max(lambda o: np.c_[stages.shrunk_mahalanobis(o),
                                        max_softmax_score(o["probabilities"])], half)
    rows = []
    for rate in args.false_rejects:
        scaled = raw / detector.threshold  # own()'s scale: the exported threshold is 1
        rows += [measure("crystalscope: appearance kNN", own, sets, valid, rate,
                         threshold=gated_threshold(scaled, gated, rate)[0]),
                 measure("  the same without the gate", own, sets, valid, rate, gate=False,
                         threshold=conformal_threshold(scaled, rate)[0]),
                 measure("  earlier: k=5, standardised, train bank, valid calibration",
                         lambda o: earlier(o["descriptors"]), sets, valid, rate),
                 measure("stage Mahalanobis + max-softmax (previous)",
                         lambda o: previous.raw_score(o["statistics"], o["probabilities"]),
                         sets, unscaled, rate),
                 measure("kNN (k=5) on normalised stage features", stages.knn, sets, valid,
                         rate),
                 measure("shrunk Mahalanobis per stage + max-softmax", shrunk, sets, other,
                         rate),
                 measure("max-softmax (1 - top probability)",
                         lambda o: max_softmax_score(o["probabilities"]), sets, valid, rate)]
    inside = len(sets["test"]["labels"]) + len(sets["fresh"]["labels"])
    print(f"  in-distribution images: {inside}; validation (calibration): "
          f"{len(valid['labels'])}; near: {len(NEAR_KINDS)} x {args.per_kind}; "
          f"far: {args.per_kind}; real: {len(sets['real']['labels'])}")
    return rows


def detector_only_seed(folder: Path, seed: int, args: argparse.Namespace,
                       flagged_by_photo: defaultdict[str, list[bool]]) -> dict[str, float]:
    """The detector alone, fitted as export fits it on the seed's splits (no network): the
    share of each set it flags at ``args.false_rejects[0]``."""
    synthesize_splits(folder, args.per_class, args.difficulty, seed)
    synthesize_measured(folder, seed, args)
    spec = ModelSpec(input_size=SIZE, classes=("CEX", "PG"))

    def crops(items: list[tuple[Path, int]]) -> np.ndarray:
        return build_cache(items, spec).images.numpy()

    train, valid = crops(pngs(folder / "splits" / "train")), crops(pngs(folder / "splits" /
                                                                      "valid"))
    detector = fit_detector(np.zeros((len(train), 1)), np.zeros(len(train)),
                            np.zeros((len(valid), 1)), np.full((len(valid), 2), 0.5), [1],
                            args.false_rejects[0], method=APPEARANCE, train_images=train,
                            valid_images=valid)

    def reasons(items: list[tuple[Path, int]]) -> list[str | None]:
        images = crops(items)
        return detector.assess(images, np.zeros((len(images), 1)),
                               np.full((len(images), 2), 0.5))[1]

    inside = (reasons(pngs(folder / "splits" / "test"))
              + reasons(pngs(folder / "fresh")))
    row = {"crystals": len(inside),
           "false_reject": float(np.mean([r is not None for r in inside])),
           "real": sum(r is not None for r in reasons(pngs(REAL)))}
    sources = photo_sources(folder / "unknown-images")
    for kind in KINDS:
        items = pngs(folder / "unknown-images" / kind)
        flagged = [r is not None for r in reasons(items)]
        row[kind] = float(np.mean(flagged))
        if kind == "natural":
            for (path, _), flag in zip(items, flagged, strict=True):
                flagged_by_photo[sources[path.name]].append(flag)
    print("  " + "  ".join(f"{key} {value:.4g}" for key, value in row.items()), flush=True)
    return row


def detector_only(args: argparse.Namespace) -> None:
    """``--detector-only``: per seed and the mean, the share of each set flagged."""
    rows = []
    flagged_by_photo: defaultdict[str, list[bool]] = defaultdict(list)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        print(f"seed {seed}", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            rows.append(detector_only_seed(Path(folder), seed, args, flagged_by_photo))
    print(f"\nmean over seeds {args.first_seed}-{args.first_seed + args.seeds - 1}, detector "
          f"alone at {100 * args.false_rejects[0]:g}% (flagged shares; real: crops of 14)")
    print("  " + "  ".join(f"{key} {np.mean([r[key] for r in rows]):.4g}" for key in rows[0]))
    print("photographs flagged, by the photo they were cut from:")
    print("  " + ", ".join(f"{photo} {sum(flags)}/{len(flags)}" for photo, flags in sorted(
        flagged_by_photo.items(), key=lambda item: sum(item[1]) / len(item[1]))))


def run_stage_sizes(run: LoadedRun) -> list[int]:
    """The width of each stage's statistics in the run's network."""
    import torch

    with torch.inference_mode():
        _, _, stages = run.net.stages(torch.zeros(1, 3, SIZE, SIZE))
    return [s.shape[1] for s in stages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--detector-only", action="store_true",
                        help="fit and measure the detector alone, no network (fast)")
    parser.add_argument("--per-class", type=int, default=1000,
                        help="crops per class; 1000 gives a validation split of 500, which "
                             "sets the threshold")
    parser.add_argument("--fresh", type=int, default=1000,
                        help="fresh CEX/PG crops per class (measure the false-reject rate)")
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--difficulty", type=float, default=0.3)
    parser.add_argument("--false-rejects", type=float, nargs="+", default=[0.01, 0.02],
                        help="rates to calibrate for; export fits the first")
    args = parser.parse_args()
    if args.detector_only:
        detector_only(args)
        return
    results: dict[str, list[dict]] = {}
    flagged_by_photo: defaultdict[str, list[bool]] = defaultdict(list)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        print(f"seed {seed}", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            for row in one_seed(Path(folder), seed, args, flagged_by_photo):
                results.setdefault(row["method"], []).append(row)
    print(f"\nmean over {args.seeds} seed(s); flagged = share called unknown at the threshold "
          "calibrated for the rate after @ (gate and score together)")
    print(f"{'method':52s} {'FRR':>6s} {'near AUROC':>10s} {'far AUROC':>9s} "
          f"{'near flagged':>12s} {'far flagged':>11s} {'real':>6s}")
    for method, rows in results.items():
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "method"}
        print(f"{method:52s} {mean['false_reject']:6.4f} {mean['near_auroc']:10.3f} "
              f"{mean['far_auroc']:9.3f} {mean['near_flagged']:12.2f} "
              f"{mean['far_flagged']:11.2f} {mean['real']:6.2f}")
    print("\nphotographs flagged by the detector, by the photo they were cut from (all seeds):")
    print("  " + ", ".join(f"{photo} {sum(flags)}/{len(flags)}" for photo, flags in sorted(
        flagged_by_photo.items(), key=lambda item: sum(item[1]) / len(item[1]))))
    for method, rows in results.items():
        print(f"\nper kind, mean over seeds (AUROC / flagged): {method.strip()}")
        for kind in KINDS:
            print(f"  {kind:8s} {np.mean([r[kind] for r in rows]):.3f} / "
                  f"{np.mean([r[kind + '_flagged'] for r in rows]):.2f}   seeds: "
                  + "  ".join(f"{r[kind]:.3f}/{r[kind + '_flagged']:.2f}" for r in rows))


if __name__ == "__main__":
    main()
