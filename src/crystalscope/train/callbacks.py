"""Lightning callbacks: the per-epoch table, metrics.csv, the F1 stop, Ctrl-C checkpoints."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
from rich.table import Table

from crystalscope.console import err


def _results(module: L.LightningModule) -> dict:
    return dict(getattr(module, "epoch_results", {}) or {})


class StopWhenEveryClassF1(L.Callback):
    """Stop as soon as every class's validation F1 reaches ``threshold`` (the original rule)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.stopped_epoch: int | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        results = _results(module)
        f1 = [results.get(f"val_f1_{name}") for name in module.classes]
        if f1 and all(v is not None and v >= self.threshold for v in f1):
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True
            err.print(f"every class's validation F1 >= {self.threshold}: stopping after epoch "
                      f"{trainer.current_epoch + 1}")


class MetricsCsv(L.Callback):
    """One row per epoch in ``metrics.csv`` (kept across resumes; rank 0 only)."""

    def __init__(self, path: Path, started: float) -> None:
        # ``started`` is a time.time(): a plain number survives DDP-spawn's pickling, and the
        # wall clock is shared by all of a machine's processes.
        self.path, self.started = Path(path), started

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        results = _results(module)
        if not trainer.is_global_zero or not results:
            return
        row = {"epoch": trainer.current_epoch + 1,
               **{k: round(v, 6) for k, v in results.items() if k != "epoch"},
               "lr": trainer.optimizers[0].param_groups[0]["lr"],
               "elapsed_s": round(time.time() - self.started, 3)}
        rows = []
        if self.path.exists():  # after a resume, drop rows of epochs that are run again
            with self.path.open(newline="", encoding="utf-8") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) < row["epoch"]]
        # Write beside, then rename: a Ctrl-C or kill mid-write never leaves a cut file.
        partial = self.path.with_name(f".{self.path.name}.partial")
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerows([*rows, row])
        partial.replace(self.path)


class EpochTable(L.Callback):
    """After each epoch: precision, recall, F1 per class and averages, train and validation."""

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        r = _results(module)
        if not trainer.is_global_zero or not r:
            return
        table = Table(
            caption="P = precision, R = recall",
            title=f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: "
            f"loss {r['train_loss']:.4f} / {r['val_loss']:.4f}, accuracy "
            f"{r['train_acc']:.4f} / {r['val_acc']:.4f} (train / valid)")
        table.add_column("")
        for column in ("train P", "train R", "train F1", "valid P", "valid R", "valid F1"):
            table.add_column(column, justify="right")
        rows = [(name, f"_{name}") for name in module.classes]
        rows += [("macro", "_macro"), ("weighted", "_weighted")]
        for label, suffix in rows:
            cells = [f"{r[f'{split}_{metric}{suffix}']:.4f}" for split in ("train", "val")
                     for metric in ("precision", "recall", "f1")]
            table.add_row(label, *cells)
        err.print(table)


class CheckpointOnInterrupt(L.Callback):
    """On Ctrl-C, save ``last.ckpt`` before Lightning stops, so ``--resume`` loses little."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            trainer.save_checkpoint(self.path)
            err.print(f"interrupted: checkpoint saved to {self.path}; continue with "
                      f"`crystalscope train --resume {self.path.parent.parent}`")
