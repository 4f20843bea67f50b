"""The scale-out paths of training, checked on this CPU: DDP over two processes (gloo),
bf16 autocast and torch.compile. GPUs take the same code paths with another backend."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss

from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.errors import UserError
from crystalscope.model.classifier import CrystalClassifier
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.train.data import SplitDataModule
from crystalscope.train.run import (
    RUN_DIR_VARIABLE,
    is_primary_process,
    joined_run_dir,
    train,
)

SMALL = {"model": "resnet18", "weights": "none", "image_size": 32, "trainable": 1.0,
         "batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "scheduler": "none",
         "augmentation": "dihedral", "num_workers": 0, "accelerator": "cpu", "devices": "1",
         "evaluate": False, "export": False, "seed": 5}


@pytest.fixture(scope="module")
def odd_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split folder whose validation split has an odd number of images."""
    root = tmp_path_factory.mktemp("scale")
    synthesize(root / "images", SynthSettings(per_class=30, size=48, seed=4), workers=2)
    split_dataset(root / "images", root / "splits", workers=2)
    valid = sorted((root / "splits" / "valid").rglob("*.png"))
    if len(valid) % 2 == 0:
        valid[0].unlink()
    return root / "splits"


def _rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _validation_in_one_process(run_dir: Path, data: Path) -> dict[str, float]:
    """Score checkpoints/last.ckpt on the validation split here, with scikit-learn."""
    module = CrystalClassifier.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt",
                                                    map_location="cpu", weights="none").eval()
    images = SplitDataModule(data, image_size=32, batch_size=8, augmentation="none")
    images.setup()
    assert images.val_set is not None
    with torch.inference_mode():
        logits = module(images.val_set.images)
    labels = images.val_set.labels.numpy()
    probabilities = torch.softmax(logits.float(), dim=1).numpy().astype(np.float64)
    predicted = probabilities.argmax(axis=1)
    per_class = f1_score(labels, predicted, average=None, labels=[0, 1], zero_division=0)
    return {"val_acc": accuracy_score(labels, predicted), "val_f1_cex": per_class[0],
            "val_f1_pg": per_class[1],
            "val_loss": log_loss(labels, probabilities, labels=[0, 1]),
            "images": len(labels)}


def test_ddp_on_two_processes_writes_one_run_and_counts_each_validation_image_once(
        odd_split: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    options = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()
               if not isinstance(value, bool)]
    command = [sys.executable, "-m", "crystalscope.cli", "train", str(odd_split), *options,
               "--devices=2", "--strategy=ddp", "--epochs=2", "--f1-threshold=1.0",
               "--runs-dir", str(runs), "--name", "ddp", "--no-evaluate", "--export"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # The second process joined the first one's run and reported nothing itself.
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    assert done.stdout.count("best validation macro F1") == 1
    assert done.stdout.count("exported ") == 1
    assert (runs / "ddp" / "model.onnx").is_file()
    rows = _rows(runs / "ddp")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    last_checkpoint = torch.load(runs / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu",
                                 weights_only=False)
    assert last_checkpoint["epoch"] == 1  # 0-based: the second epoch
    # The metrics of the last epoch, gathered from both processes, are those of the saved
    # model on the whole validation split: every image counted once (Lightning's default
    # sampler would pad the odd split with a repeated image and shift the loss and counts).
    here = _validation_in_one_process(runs / "ddp", odd_split)
    assert here["images"] % 2 == 1
    last = rows[-1]
    for name in ("val_acc", "val_f1_cex", "val_f1_pg"):
        assert float(last[name]) == pytest.approx(here[name], abs=2e-6), name
    assert float(last["val_loss"]) == pytest.approx(here["val_loss"], rel=1e-4)


def test_two_node_launch_on_loopback_trains_one_run(odd_split: Path, tmp_path: Path) -> None:
    """docs/scale.md's two-machine launch, both "machines" on this one: the same command on
    each, NODE_RANK 0 and 1, MASTER_ADDR/MASTER_PORT of the first, one shared run name."""
    import os
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runs = tmp_path / "runs"
    options = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()
               if not isinstance(value, bool)]
    command = [sys.executable, "-m", "crystalscope.cli", "train", str(odd_split), *options,
               "--devices=1", "--num-nodes=2", "--strategy=ddp", "--epochs=1",
               "--f1-threshold=1.0", "--runs-dir", str(runs), "--name", "two-node",
               "--no-evaluate", "--no-export"]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "NODE_RANK": str(rank)})
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    assert [p.name for p in runs.iterdir()] == ["two-node"]
    assert outputs[0][0].count("best validation macro F1") == 1
    assert "best validation macro F1" not in outputs[1][0]  # the second node reports nothing
    here = _validation_in_one_process(runs / "two-node", odd_split)
    last = _rows(runs / "two-node")[-1]
    assert float(last["val_acc"]) == pytest.approx(here["val_acc"], abs=2e-6)


def test_helper_processes_of_a_ddp_run_join_the_first_ones_run(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID",
                 RUN_DIR_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    config = resolve_train_config({"data": tmp_path, "runs_dir": tmp_path / "runs", **SMALL})
    assert is_primary_process()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert is_primary_process()
    monkeypatch.setenv("NODE_RANK", "1")  # local rank 0 of the second machine
    assert not is_primary_process()
    with pytest.raises(UserError, match="give every process the same name"):
        joined_run_dir(config)  # torchrun/SLURM: a timestamped name would differ per process
    named = config.model_copy(update={"name": "shared"})
    assert joined_run_dir(named) == tmp_path / "runs" / "shared"
    monkeypatch.setenv(RUN_DIR_VARIABLE, str(tmp_path / "runs" / "first"))
    assert joined_run_dir(config) == tmp_path / "runs" / "first"
    assert not (tmp_path / "runs").exists()  # joining creates nothing


def test_lightning_settings_it_refuses_are_one_line_errors_and_leave_no_run(
        odd_split: Path, tmp_path: Path) -> None:
    for bad, message in ({"precision": "bf15"}, "Precision 'bf15' is invalid"), \
                        ({"strategy": "carrier-pigeon"}, "invalid strategy"), \
                        ({"devices": "many"}, "should be an int"):
        config = resolve_train_config({"data": odd_split, "runs_dir": tmp_path, **SMALL,
                                       "epochs": 1, **bad})
        with pytest.raises(UserError, match=message):
            train(config, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_bf16_autocast_on_cpu_trains_fp32_weights_close_to_fp32(odd_split: Path,
                                                               tmp_path: Path) -> None:
    runs = {precision: train(resolve_train_config({
        "data": odd_split, "runs_dir": tmp_path, **SMALL, "epochs": 1, "name": precision,
        "precision": precision, "export": True}), quiet=True) for precision in
        ("32-true", "bf16-mixed")}
    full, mixed = (_rows(runs[p].run_dir)[0] for p in ("32-true", "bf16-mixed"))
    # Autocast was on (bf16 rounding changes the numbers) and changed them only a little.
    assert full["train_loss"] != mixed["train_loss"]
    # One epoch from the same start: within 15% (measured 0.80 vs 0.73 on the randomised
    # crops, 0.05 apart on the old ones); a broken autocast would diverge or fail outright.
    assert float(mixed["train_loss"]) == pytest.approx(float(full["train_loss"]), rel=0.15)
    state = torch.load(runs["bf16-mixed"].run_dir / "checkpoints" / "last.ckpt",
                       map_location="cpu", weights_only=False)["state_dict"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    assert (runs["bf16-mixed"].run_dir / "model.onnx").is_file()  # export checks parity


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compile_keeps_checkpoint_names_and_the_numbers(odd_split: Path,
                                                        tmp_path: Path) -> None:
    # A linear head: compiled dropout draws its masks from another random stream.
    runs = {compiled: train(resolve_train_config({
        "data": odd_split, "runs_dir": tmp_path, **SMALL, "epochs": 1, "head": "linear",
        "name": f"compile-{compiled}", "compile": compiled, "export": compiled}), quiet=True)
        for compiled in (False, True)}
    states = {compiled: torch.load(run.run_dir / "checkpoints" / "last.ckpt",
                                   map_location="cpu", weights_only=False)["state_dict"]
              for compiled, run in runs.items()}
    assert list(states[True]) == list(states[False])  # no _orig_mod. prefixes
    assert (runs[True].run_dir / "model.onnx").is_file()  # export loads it and checks parity
    # Compiled kernels round differently, and Adam carries that through the epoch: close,
    # not equal.
    plain, compiled = (_rows(runs[c].run_dir)[0] for c in (False, True))
    assert float(compiled["train_loss"]) == pytest.approx(float(plain["train_loss"]), rel=2e-2)
    assert float(compiled["val_loss"]) == pytest.approx(float(plain["val_loss"]), rel=2e-2)


def test_compile_without_a_compiler_is_a_clear_error(odd_split: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    config = resolve_train_config({"data": odd_split, "runs_dir": tmp_path, **SMALL,
                                   "epochs": 1, "compile": True})
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        train(config, quiet=True)
    assert list(tmp_path.iterdir()) == []
