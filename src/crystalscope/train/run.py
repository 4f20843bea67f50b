"""`crystalscope train`: a split folder in, a run directory out.

``runs/<name>/`` holds ``config.yaml`` (the resolved settings), ``metrics.csv`` (one row per
epoch), ``checkpoints/{best,last}.ckpt`` and Lightning's CSV/TensorBoard logs. Checkpoint choice
(best validation macro F1) and early stopping use the validation split only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from crystalscope.config import TrainConfig, load_train_config, save_config
from crystalscope.console import err
from crystalscope.data.loaders import SplitDataModule
from crystalscope.errors import UserError
from crystalscope.evaluate.stage import Evaluation, evaluate_run
from crystalscope.export.stage import Export, export_run
from crystalscope.model.backbones import count_parameters
from crystalscope.model.classifier import CrystalClassifier
from crystalscope.train.callbacks import (
    CheckpointOnInterrupt,
    EpochTable,
    MetricsCsv,
    StopWhenEveryClassF1,
)


@dataclass
class TrainResult:
    """Where the run is and how it ended."""

    run_dir: Path
    epochs: int
    best_val_f1_macro: float | None
    stopped_by_f1: bool
    seconds: float
    evaluation: Evaluation | None = None
    export: Export | None = None
    notes: list[str] = field(default_factory=list)


def new_run_dir(config: TrainConfig) -> Path:
    """``runs_dir/<model>-<YYYYmmdd>-<HHMMSS>`` (or ``--name``); never an existing folder."""
    name = config.name or f"{config.model}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.runs_dir) / name
    if run_dir.exists():
        raise UserError(f"{run_dir}: a run of that name exists; choose another --name or "
                        f"continue it with --resume {run_dir}")
    return run_dir


def _devices(value: str) -> int | str:
    return int(value) if str(value).isdigit() else value


def class_weights(counts: list[int]) -> list[float]:
    """Inverse-frequency weights, n_total / (n_classes * n_class): 1.0 when balanced."""
    total = sum(counts)
    return [total / (len(counts) * c) for c in counts]


def train(config: TrainConfig | None, *, resume: Path | None = None,
          quiet: bool = False) -> TrainResult:
    """Train a new run from ``config``, or continue the run ``resume`` (its own config)."""
    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        config = load_train_config(run_dir / "config.yaml")
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise UserError(f"--resume {run_dir}: no checkpoints/last.ckpt yet (it is written "
                            "after the first epoch); start a new run instead")
    elif config is None:
        raise UserError("give a training config or a run to resume")
    else:
        run_dir = new_run_dir(config)
    if quiet or not err.is_terminal:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    L.seed_everything(config.seed, workers=True, verbose=False)
    cache_dir = Path(config.runs_dir) / ".cache" / run_dir.name
    try:
        return _train(config, run_dir, checkpoint, cache_dir, quiet=quiet,
                      resuming=resume is not None)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)  # a disk cache, if one was made
        with contextlib.suppress(OSError):
            cache_dir.parent.rmdir()  # only if no other run is using it


def _train(config: TrainConfig, run_dir: Path, checkpoint: Path | None, cache_dir: Path, *,
           quiet: bool, resuming: bool) -> TrainResult:
    data = SplitDataModule(config.data, image_size=config.image_size,
                           batch_size=config.batch_size, augmentation=config.augmentation,
                           fraction=config.fraction, num_workers=config.num_workers,
                           seed=config.seed, cache=config.cache, cache_dir=cache_dir)
    data.setup()  # decode once, and find bad input before a run folder is made
    if not resuming:
        (run_dir / "checkpoints").mkdir(parents=True)
        save_config(config, run_dir / "config.yaml")
        (run_dir / "classes.json").write_text(json.dumps(data.classes), encoding="utf-8")
    weights = class_weights(data.class_counts()) if config.class_weights == "auto" else None
    module = CrystalClassifier(
        model=config.model, classes=data.classes,
        weights="none" if resuming else config.weights,  # the checkpoint has them
        head=config.head, trainable=config.trainable, optimizer=config.optimizer, lr=config.lr,
        momentum=config.momentum, weight_decay=config.weight_decay, scheduler=config.scheduler,
        max_epochs=config.epochs, class_weights=weights, channels_last=config.channels_last,
    )
    if config.compile:
        module.net.compile()  # in place: the checkpoint's parameter names stay the same
    trainable, total = count_parameters(module.net)
    if not quiet:
        err.print(f"run {run_dir}: {config.model} ({trainable:,} of {total:,} parameters "
                  f"train), {len(data.train_set)} train / {len(data.val_set)} valid images at "
                  f"{config.image_size} px, classes {', '.join(data.classes)}")
    for skipped in data.skipped:
        err.print(f"[yellow]skipped[/yellow] {skipped}")

    start = time.perf_counter()
    f1_stop = StopWhenEveryClassF1(config.f1_threshold)
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best",
                           monitor="val_f1_macro", mode="max", save_last=True,
                           enable_version_counter=False)
    callbacks: list[L.Callback] = [
        f1_stop, MetricsCsv(run_dir / "metrics.csv", lambda: time.perf_counter() - start),
        best, EarlyStopping(monitor="val_loss", mode="min", patience=config.patience),
        CheckpointOnInterrupt(run_dir / "checkpoints" / "last.ckpt"),
    ]
    if not quiet:
        callbacks.append(EpochTable())
    show_bar = not quiet and err.is_terminal
    if show_bar:
        callbacks.append(RichProgressBar())
    # A resumed run logs to logs/resumed-<time>/: Lightning's CSV logger would otherwise
    # replace the first part's logs/metrics.csv.
    version = f"resumed-{datetime.now():%Y%m%d-%H%M%S}" if resuming else ""
    loggers: list = [CSVLogger(run_dir, name="logs", version=version)]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    trainer = L.Trainer(
        max_epochs=config.epochs, accelerator=config.accelerator,
        devices=_devices(config.devices), strategy=config.strategy, num_nodes=config.num_nodes,
        precision=config.precision, deterministic="warn", callbacks=callbacks, logger=loggers,
        default_root_dir=run_dir, enable_progress_bar=show_bar, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        # Lightning's hints (GPU lists, tips, worker counts) are noise for our users.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*deterministic.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # on resume
        try:
            trainer.fit(module, datamodule=data,
                        ckpt_path=str(checkpoint) if checkpoint else None)
        except torch.OutOfMemoryError as exc:
            raise UserError(f"out of memory at batch size {config.batch_size}; try "
                            f"--batch-size {max(1, config.batch_size // 2)}") from exc
    score = best.best_model_score
    result = TrainResult(run_dir=run_dir, epochs=trainer.current_epoch,
                         best_val_f1_macro=float(score) if score is not None else None,
                         stopped_by_f1=f1_stop.stopped_epoch is not None,
                         seconds=time.perf_counter() - start)
    if trainer.interrupted:
        return result
    finish_run(result, config)
    return result


def finish_run(result: TrainResult, config: TrainConfig) -> None:
    """The stages after training: evaluate on the test split once, then export."""
    if config.evaluate:
        if any(p.is_file() for p in (Path(config.data) / "test").rglob("*")):
            result.evaluation = evaluate_run(result.run_dir)
        else:
            result.notes.append(f"not evaluated: {config.data} has no test images")
    if config.export:
        result.export = export_run(result.run_dir, false_reject=config.false_reject)
        result.notes.extend(result.export.notes)
