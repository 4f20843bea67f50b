"""`crystalscope train`: a split folder in, a run directory out.

``runs/<name>/`` holds ``config.yaml`` (the resolved settings), ``metrics.csv`` (one row per
epoch), ``checkpoints/{best,last}.ckpt`` and Lightning's CSV/TensorBoard logs. Checkpoint choice
(best validation macro F1) and early stopping use the validation split only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

from crystalscope.config import TrainConfig, load_train_config, save_config
from crystalscope.console import err
from crystalscope.data.layout import split_path
from crystalscope.errors import UserError
from crystalscope.evaluate.plots import read_metrics_csv
from crystalscope.evaluate.stage import Evaluation, evaluate_run
from crystalscope.export.stage import Export, ExportSettings, export_run
from crystalscope.model.backbones import count_parameters
from crystalscope.model.classifier import CrystalClassifier
from crystalscope.model.spec import RunLayout
from crystalscope.settings import SettingsError
from crystalscope.train.callbacks import (
    CheckpointOnInterrupt,
    EpochTable,
    MetricsCsv,
    StopWhenEveryClassF1,
)
from crystalscope.train.data import SplitDataModule
from crystalscope.train.ema import EmaWeights
from crystalscope.train.tracking import finish_tracking, make_loggers, start_tracking


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
    primary: bool = True  # False in the helper processes of a DDP run: they report nothing


# Set by the first process of a DDP run for the processes Lightning starts after it, so that
# they join its run folder instead of making their own.
RUN_DIR_VARIABLE = "CRYSTALSCOPE_RUN_DIR"
# Where the launchers (Lightning's own, torchrun, SLURM) put a process's place in the run.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_primary_process() -> bool:
    """True unless a launcher started this process as DDP rank > 0 (node or local rank > 0)."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in _RANK_VARIABLES)


def joined_run_dir(config: TrainConfig) -> Path:
    """The run folder of a DDP helper process: the first process's, which it does not create."""
    if os.environ.get(RUN_DIR_VARIABLE):
        return Path(os.environ[RUN_DIR_VARIABLE])
    if config.name:
        return Path(config.runs_dir) / config.name
    raise SettingsError("name", "needed in a distributed run started by torchrun or SLURM: "
                        "give every process the same name, so they share one run")


def new_run_dir(config: TrainConfig) -> Path:
    """``runs_dir/<model>-<YYYYmmdd>-<HHMMSS>`` (or ``--name``); never an existing folder."""
    # hf-hub:ORG/NAME and local-dir:PATH: the name's last part (no ':' or '/' in a folder)
    model = config.model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].split(":")[-1]
    name = config.name or f"{model}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.runs_dir) / name
    if run_dir.exists():
        raise SettingsError("name", f"{run_dir} exists; choose another name or resume that "
                            "run", name)
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
    primary = is_primary_process()
    if resume is not None:
        run_dir = Path(resume)
        if not RunLayout(run_dir).config.is_file():
            raise SettingsError("resume", "not a run directory (no config.yaml)", run_dir)
        config = load_train_config(RunLayout(run_dir).config)
        checkpoint = RunLayout(run_dir).checkpoint("last")
        if not checkpoint.is_file():
            raise UserError(f"--resume {run_dir}: no checkpoints/last.ckpt yet (it is written "
                            "after the first epoch); start a new run instead")
    elif config is None:
        raise UserError("give a training config or a run to resume")
    else:
        run_dir = new_run_dir(config) if primary else joined_run_dir(config)
    if quiet or not primary or not err.is_terminal:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    L.seed_everything(config.seed, workers=True, verbose=False)
    overlap_note = check_overlap(config) if primary and resume is None else None
    cache_name = run_dir.name if primary else f"{run_dir.name}-process{os.getpid()}"
    cache_dir = Path(config.runs_dir) / ".cache" / cache_name
    try:
        result = _train(config, run_dir, checkpoint, cache_dir, quiet=quiet or not primary,
                        resuming=resume is not None, primary=primary)
        if overlap_note:
            result.notes.insert(0, overlap_note)
        return result
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)  # a disk cache, if one was made
        with contextlib.suppress(OSError):
            cache_dir.parent.rmdir()  # only if no other run is using it


def check_overlap(config: TrainConfig) -> str | None:
    """Refuse splits that share crops or near-duplicates (hand-made splits, crops labelled
    again into train/); with ``allow_overlap``, say how many and go on (the note)."""
    from crystalscope.data.leakage import describe_overlap, find_split_overlap

    groups = find_split_overlap(Path(config.data))
    if not groups:
        return None
    what = describe_overlap(groups, Path(config.data))
    if not config.allow_overlap:
        raise UserError(f"{config.data}: {what}: the validation and test scores would be "
                        "optimistic. Make the splits with `crystalscope split`, or train anyway "
                        "with --allow-overlap")
    err.print(f"[yellow]{what}; training anyway (--allow-overlap)[/yellow]")
    return f"split overlap allowed: {what}"


def _train(config: TrainConfig, run_dir: Path, checkpoint: Path | None, cache_dir: Path, *,
           quiet: bool, resuming: bool, primary: bool) -> TrainResult:
    data = SplitDataModule(config.data, image_size=config.image_size,
                           batch_size=config.batch_size, augmentation=config.augmentation,
                           randaugment=config.randaugment, fraction=config.fraction,
                           num_workers=config.num_workers, seed=config.seed,
                           cache=config.cache, cache_dir=cache_dir)
    if config.class_weights == "auto" and (config.mixup or config.cutmix):
        raise SettingsError("class_weights", "auto cannot weigh mixed images (their targets "
                            "are shares of two classes); use --class-weights none with mixup "
                            "or cutmix", config.class_weights)
    data.setup()  # decode once, and find bad input before a run folder is made
    weights = class_weights(data.class_counts()) if config.class_weights == "auto" else None
    module = CrystalClassifier(
        model=config.model, classes=data.classes,
        weights="none" if resuming else config.weights,  # the checkpoint has them
        head=config.head, trainable=config.trainable, optimizer=config.optimizer, lr=config.lr,
        momentum=config.momentum, weight_decay=config.weight_decay, scheduler=config.scheduler,
        max_epochs=config.epochs, class_weights=weights, channels_last=config.channels_last,
        mixup=config.mixup, cutmix=config.cutmix, label_smoothing=config.label_smoothing,
    )
    if config.compile:
        module.net.compile()  # in place: the checkpoint's parameter names stay the same
        module.use_trunk_copy = False  # the compiled graph fuses the frozen part itself
    start = time.perf_counter()
    trainer, f1_stop, best = make_trainer(config, run_dir, started=time.time(), quiet=quiet,
                                          resuming=resuming)
    # After the trainer (settings it refuses fail first), inside the run's time and epoch 1.
    trunk_note = use_trunk_cache(config, data, module, checkpoint, cache_dir)
    if not resuming and primary:  # everything that can refuse the settings has been built
        RunLayout(run_dir).checkpoints.mkdir(parents=True)
        save_config(config, RunLayout(run_dir).config)
        RunLayout(run_dir).classes.write_text(json.dumps(data.classes), encoding="utf-8")
    trainable, total = count_parameters(module.net)
    if not quiet:
        err.print(f"run {run_dir}: {config.model} ({trainable:,} of {total:,} parameters "
                  f"train), {len(data.train_set)} train / {len(data.val_set)} valid images at "
                  f"{config.image_size} px, classes {', '.join(data.classes)}")
    for skipped in data.skipped if primary else []:
        err.print(f"[yellow]skipped[/yellow] {skipped}")

    with warnings.catch_warnings():
        # Lightning's hints (GPU lists, tips, worker counts) are noise for our users.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*deterministic.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # on resume
        warnings.filterwarnings("ignore", message=".*in eval mode at the start of training.*")
        if primary:  # read by the processes that a DDP launch starts from here
            os.environ[RUN_DIR_VARIABLE] = str(run_dir.resolve())
        try:
            if primary:
                start_tracking(trainer.loggers, run_dir, config.model_dump(mode="json"))
            trainer.fit(module, datamodule=data,
                        ckpt_path=str(checkpoint) if checkpoint else None)
        except torch.OutOfMemoryError as exc:
            raise UserError(f"out of memory at batch size {config.batch_size}; try "
                            f"--batch-size {max(1, config.batch_size // 2)}") from exc
        finally:
            if primary:
                os.environ.pop(RUN_DIR_VARIABLE, None)
    score = best.best_model_score
    epochs, stopped = trainer.current_epoch, f1_stop.stopped_epoch is not None
    metrics_csv = RunLayout(run_dir).metrics
    if score is None and primary and metrics_csv.is_file():
        # Under --strategy ddp_spawn the epochs ran in other processes, whose callbacks kept
        # these; their metrics.csv holds the same.
        columns = read_metrics_csv(metrics_csv)
        epochs, score = len(columns["epoch"]), max(columns["val_f1_macro"])
        stopped = all(columns[f"val_f1_{name}"][-1] >= config.f1_threshold
                      for name in data.classes)
    result = TrainResult(run_dir=run_dir, epochs=epochs,
                         best_val_f1_macro=float(score) if score is not None else None,
                         stopped_by_f1=stopped, seconds=time.perf_counter() - start,
                         primary=primary, notes=[*weights_notes(config), trunk_note])
    if trainer.interrupted or not primary:  # evaluation and export are the first process's
        return result
    finish_run(result, config)
    finish_tracking(trainer.loggers, run_dir)
    return result


def use_trunk_cache(config: TrainConfig, data: SplitDataModule, module: CrystalClassifier,
                    checkpoint: Path | None, cache_dir: Path) -> str:
    """Cache the frozen trunk's outputs where that applies; the one-line note either way."""
    from crystalscope.train.trunk_cache import cache_trunk_features, why_not

    note = why_not(config, module)
    if note is None:
        if checkpoint is not None:  # resuming: the trunk's weights are the checkpoint's
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            module.load_state_dict(state["state_dict"])
        note = cache_trunk_features(data, module, config, cache_dir)
    return note


def make_trainer(config: TrainConfig, run_dir: Path, *, started: float, quiet: bool,
                 resuming: bool
                 ) -> tuple[L.Trainer, StopWhenEveryClassF1, ModelCheckpoint]:
    """The Lightning trainer with our callbacks; settings it refuses are a UserError."""
    f1_stop = StopWhenEveryClassF1(config.f1_threshold)
    layout = RunLayout(run_dir)
    best = ModelCheckpoint(dirpath=layout.checkpoints, filename=layout.checkpoint("best").stem,
                           monitor="val_f1_macro", mode="max", enable_version_counter=False)
    # Not save_last=True: since Lightning 2.6 that writes last.ckpt only in epochs that
    # improved the best one, and --resume would repeat the epochs since.
    last = ModelCheckpoint(dirpath=layout.checkpoints, filename=layout.checkpoint("last").stem,
                           monitor=None,
                           save_top_k=1, enable_version_counter=False)
    callbacks: list[L.Callback] = [
        f1_stop, MetricsCsv(layout.metrics, started), best, last,
        EarlyStopping(monitor="val_loss", mode="min", patience=config.patience),
        CheckpointOnInterrupt(layout.checkpoint("last")),
    ]
    if config.ema_decay > 0:  # before the checkpoints' hooks: they save the averaged weights
        callbacks.insert(0, EmaWeights(config.ema_decay))
    if not quiet:
        callbacks.append(EpochTable())
    show_bar = not quiet and err.is_terminal
    if show_bar:
        callbacks.append(RichProgressBar())
    # A resumed run logs to logs/resumed-<time>/: Lightning's CSV logger would otherwise
    # replace the first part's logs/metrics.csv.
    version = f"resumed-{datetime.now():%Y%m%d-%H%M%S}" if resuming else ""
    loggers = make_loggers(list(config.logger), run_dir, tracking_uri=config.tracking_uri,
                           resuming=resuming, version=version)
    try:
        trainer = L.Trainer(
            max_epochs=config.epochs, accelerator=config.accelerator,
            devices=_devices(config.devices), strategy=config.strategy,
            num_nodes=config.num_nodes, precision=config.precision, deterministic="warn",
            callbacks=callbacks, logger=loggers, default_root_dir=run_dir,
            enable_progress_bar=show_bar, enable_model_summary=False, num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
    except (ValueError, TypeError, ImportError, MisconfigurationException) as exc:
        raise UserError(
            f"--accelerator {config.accelerator} --devices {config.devices} --strategy "
            f"{config.strategy} --num-nodes {config.num_nodes} --precision {config.precision}: "
            f"Lightning refused these: {str(exc).splitlines()[0]}") from exc
    if config.compile and isinstance(trainer.accelerator, CPUAccelerator) and not (
            os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "clang++", "cl"))):
        raise UserError("--compile on the CPU needs a C++ compiler (g++, clang++ or MSVC's cl); "
                        "install one, or train without --compile")
    return trainer, f1_stop, best


def weights_notes(config: TrainConfig) -> list[str]:
    """What the run's starting weights mean for its frozen layers."""
    if config.weights != "none":
        return []
    if config.trainable >= 1.0:
        return ["weights none: every layer trained from random weights (a recipe's frozen "
                "share assumes pretrained layers, so it is not applied without them)"]
    return [f"weights none with trainable {config.trainable:g}: the frozen "
            f"{1 - config.trainable:.0%} of the backbone keeps random weights, which carry "
            "no features; train every layer (trainable 1.0) or start from pretrained weights"]


def finish_run(result: TrainResult, config: TrainConfig) -> None:
    """The stages after training: evaluate on the test split once, then export."""
    if config.evaluate:
        if any(p.is_file() for p in split_path(config.data, "test").rglob("*")):
            result.evaluation = evaluate_run(result.run_dir)
        else:
            result.notes.append(f"not evaluated: {config.data} has no test images")
    if config.export:
        result.export = export_run(result.run_dir,
                                   settings=ExportSettings(false_reject=config.false_reject))
        result.notes.extend(result.export.notes)
