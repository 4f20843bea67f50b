"""Shared fixtures: the real sample crops and small synthetic data sets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from crystalscope.data.split import split_dataset
from crystalscope.synth.crops import SynthSettings, synthesize

SAMPLES = Path(__file__).parent / "data" / "opencrystal"


@pytest.fixture(scope="session")
def samples() -> Path:
    """The 14 public sample crops (CEX (n).png, PG (n).png), read-only."""
    return SAMPLES


@pytest.fixture()
def sample_classes(tmp_path: Path) -> Path:
    """The samples arranged as class folders: tmp/cex/*.png, tmp/pg/*.png."""
    for image in SAMPLES.glob("*.png"):
        folder = tmp_path / "samples" / image.name.split(" ")[0].lower()
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / image.name)
    return tmp_path / "samples"


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 crops per class with 2 rotated copies per PG crop (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("synthetic") / "images"
    synthesize(out, SynthSettings(per_class=60, size=64, dihedral_copies=2, seed=3), workers=1)
    return out


@pytest.fixture()
def synthetic_copy(synthetic_set: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic set that a test may move or change."""
    return Path(shutil.copytree(synthetic_set, tmp_path / "images"))


@pytest.fixture(scope="session")
def trained_run(synthetic_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet-18 run (32 px, 3 epochs) on the synthetic set, not yet evaluated/exported.

    Tests may add evaluation and export files to it, nothing else.
    """
    from crystalscope.config import resolve_train_config
    from crystalscope.train.run import train

    root = tmp_path_factory.mktemp("trained")
    split_dataset(synthetic_set, root / "splits", workers=1)
    config = resolve_train_config({
        "data": root / "splits", "runs_dir": root / "runs", "name": "tiny", "model": "resnet18",
        "weights": "none", "image_size": 32, "trainable": 1.0, "batch_size": 16,
        "optimizer": "adamw", "lr": 1e-3, "scheduler": "none", "augmentation": "dihedral",
        "epochs": 3, "accelerator": "cpu", "devices": "1", "evaluate": False, "export": False})
    return train(config, quiet=True).run_dir


@pytest.fixture(scope="session")
def exported_run(trained_run: Path) -> Path:
    """The tiny run, evaluated on its test split and exported into its own folder."""
    from crystalscope.evaluate.stage import evaluate_run
    from crystalscope.export.stage import export_run

    if not (trained_run / "report.json").is_file():
        evaluate_run(trained_run)
    if not (trained_run / "model.onnx").is_file():
        export_run(trained_run)
    return trained_run


@pytest.fixture(scope="session")
def pg_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet-18 at 96 px trained until it tells PG from CEX, evaluated and exported (~20 s)."""
    from crystalscope.config import resolve_train_config
    from crystalscope.train.run import train

    root = tmp_path_factory.mktemp("cam")
    synthesize(root / "images", SynthSettings(per_class=240, size=96, difficulty=0.0, seed=5),
               workers=2)
    split_dataset(root / "images", root / "splits", workers=2)
    config = resolve_train_config({
        "data": root / "splits", "runs_dir": root / "runs", "name": "cam",
        "model": "resnet18", "weights": "none", "image_size": 96, "trainable": 1.0,
        "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "scheduler": "cosine",
        "augmentation": "dihedral", "epochs": 15, "f1_threshold": 0.97,
        "accelerator": "cpu", "devices": "1"})
    result = train(config, quiet=True)
    # The randomised crops are harder than the old ones: measured 0.82 at difficulty 0.1
    # without a schedule; a sanity bound, the tests below check what they use.
    assert result.best_val_f1_macro is not None and result.best_val_f1_macro >= 0.75
    return result.run_dir
