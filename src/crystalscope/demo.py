"""`crystalscope demo`: every stage on a small synthetic data set, on a laptop CPU, in minutes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from crystalscope.data.check import scan_dataset, summarize
from crystalscope.data.split import split_dataset
from crystalscope.data.synth import SynthSettings, synthesize
from crystalscope.errors import UserError

# Small and fast: a random-initialised ResNet-18 at 64 px trains to F1 ~1 in about half a minute.
DEMO_TRAINING = {"model": "resnet18", "weights": "none", "image_size": 64, "trainable": 1.0,
                 "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "scheduler": "none",
                 "augmentation": "dihedral", "epochs": 15, "f1_threshold": 0.99,
                 "accelerator": "cpu", "devices": "1"}


def run_demo(folder: Path, *, per_class: int = 120, seed: int = 0,
             say: Callable[[str], None] = print) -> dict[str, Path]:
    """Run synth -> data check -> split -> train under ``folder``; return what was written."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder}: is not empty; give a new folder for the demo")
    images, splits = folder / "images", folder / "splits"

    say(f"1/4 synth: {per_class} CEX and {per_class} PG crops (PG with rotated copies) -> {images}")
    synthesize(images, SynthSettings(per_class=per_class, difficulty=0.3, dihedral_copies=2,
                                     seed=seed))

    say(f"2/4 data check: {images}")
    report = summarize(scan_dataset(images))
    say(f"    {report['readable']} readable images, {len(report['duplicate_groups'])} duplicate "
        f"groups holding {report['duplicate_files']} extra copies, "
        f"{report['label_conflicts']} label conflicts")

    say(f"3/4 split 70/25/5, duplicate groups kept together -> {splits}")
    result = split_dataset(images, splits, seed=seed)
    for name, counts in result.report["counts"].items():
        say(f"    {name}: " + ", ".join(f"{split} {n}" for split, n in counts.items()))

    from crystalscope.config import resolve_train_config
    from crystalscope.evaluate.report import format_value
    from crystalscope.train.run import train

    say("4/4 train: ResNet-18 (random init) at 64 px, until every class's validation F1 >= 0.99;"
        " then evaluate on the test split and export")
    config = resolve_train_config({"data": splits, "runs_dir": folder / "runs", "name": "demo",
                                   "seed": seed, **DEMO_TRAINING})
    result = train(config, quiet=True)
    say(f"    {result.epochs} epochs in {result.seconds:.0f} s, best validation macro F1 "
        f"{result.best_val_f1_macro:.4f}")
    written = {"images": images, "splits": splits, "manifest": splits / "manifest.csv",
               "run": result.run_dir, "metrics": result.run_dir / "metrics.csv"}
    if result.evaluation is not None:
        report = result.evaluation.report
        say(f"    test: {report['images']} images, {report['misclassified']} misclassified, "
            f"macro F1 {format_value(report['macro']['f1']['value'])} (95% interval "
            + ", ".join(format_value(v) for v in report["macro"]["f1"]["ci95"]) + ")")
        written.update({name: result.evaluation.files[name]
                        for name in ("report.txt", "confusion_matrix.png", "errors.png")})
    if result.export is not None:
        written.update(result.export.files)
    return written
