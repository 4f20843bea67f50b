"""Training: learnability, F1 early stop, determinism, freezing, resume after kill, bad input."""

from __future__ import annotations

import copy
import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from crystalscope.config import TrainConfig, resolve_train_config
from crystalscope.data.decoded import available_memory, choose_cache
from crystalscope.data.split import split_dataset
from crystalscope.errors import UserError
from crystalscope.model.backbones import create_backbone, freeze_fraction, parameter_layers
from crystalscope.model.classifier import CrystalClassifier
from crystalscope.settings import SettingsError
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.train.data import SplitDataModule
from crystalscope.train.run import class_weights, train, weights_notes

TINY = {"model": "resnet18", "weights": "none", "image_size": 64, "trainable": 1.0,
        "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "scheduler": "none",
        "augmentation": "dihedral", "num_workers": 0, "accelerator": "cpu", "devices": "1",
        "evaluate": False, "export": False}  # tests of the later stages switch these on


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    synthesize(root / "images", SynthSettings(per_class=120, size=64, difficulty=0.0, seed=2),
               workers=2)
    split_dataset(root / "images", root / "splits", workers=2)
    return root / "splits"


def _config(data: Path, runs: Path, **overrides: object) -> TrainConfig:
    return resolve_train_config({"data": data, "runs_dir": runs, **TINY, **overrides})


def _cli_options(options: dict) -> list[str]:
    """The same settings as command-line options (booleans as --flag / --no-flag)."""
    flags = []
    for key, value in options.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags.append(f"--{name}={value}")
    return flags


def _rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_model_learns_and_stops_on_the_f1_threshold(split_folder: Path,
                                                         tmp_path: Path) -> None:
    # The randomised crops at 64 px: measured every class >= 0.85 at epoch 8 (of 20), best
    # macro F1 0.90; so 0.8 is reached well before the 20th epoch.
    config = _config(split_folder, tmp_path, epochs=20, f1_threshold=0.8, name="learn",
                     evaluate=True, export=True)
    result = train(config, quiet=True)
    rows = _rows(result.run_dir)
    assert result.best_val_f1_macro is not None and result.best_val_f1_macro >= 0.8
    assert result.stopped_by_f1 and len(rows) < 20
    last = rows[-1]  # stopped at the first epoch where every class reached the threshold
    assert float(last["val_f1_cex"]) >= 0.8 and float(last["val_f1_pg"]) >= 0.8
    assert all(min(float(r["val_f1_cex"]), float(r["val_f1_pg"])) < 0.8 for r in rows[:-1])
    assert (result.run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (result.run_dir / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["model"] == "resnet18" and saved["f1_threshold"] == 0.8
    assert (result.run_dir / "logs" / "metrics.csv").is_file()
    # Then the test split, once, and the export (their own tests check the contents).
    assert result.evaluation is not None and result.export is not None
    assert result.evaluation.report["images"] == len(list((split_folder / "test").rglob("*.png")))
    for name in ("report.txt", "report.json", "confusion_matrix.png", "model.onnx",
                 "model.safetensors", "model.json"):
        assert (result.run_dir / name).is_file(), name


def test_same_seed_same_metrics(split_folder: Path, tmp_path: Path) -> None:
    runs = [train(_config(split_folder, tmp_path, epochs=2, fraction=0.5, name=f"r{i}",
                          seed=7), quiet=True) for i in range(2)]
    first, second = (_rows(r.run_dir) for r in runs)
    strip = [{k: v for k, v in row.items() if k != "elapsed_s"} for row in first]
    assert strip == [{k: v for k, v in row.items() if k != "elapsed_s"} for row in second]
    other = train(_config(split_folder, tmp_path, epochs=2, fraction=0.5, name="r3", seed=8),
                  quiet=True)
    assert _rows(other.run_dir)[0]["train_loss"] != first[0]["train_loss"]


def test_trainable_fraction_of_resnet101_is_about_its_last_stage() -> None:
    backbone = create_backbone("resnet101", "none")
    names = freeze_fraction(backbone, 0.10)
    layers = parameter_layers(backbone)
    assert len(layers) == 208 and len(names) == 21
    assert all(n.startswith("layer4.") for n in names[1:]) and names[0] == "layer3.22.bn3"
    assert sum(n.startswith("layer4.") for n, _ in layers) == 20  # all of stage 5 trains
    frozen = [p for n, m in layers if n not in names for p in m.parameters(recurse=False)]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert freeze_fraction(create_backbone("resnet18", "none"), 0.0) == []


def test_frozen_layers_and_their_batchnorm_stay_fixed_while_training() -> None:
    module = CrystalClassifier(model="resnet18", classes=["a", "b"], trainable=0.25,
                               optimizer="sgd", lr=0.1, channels_last=False)
    module.train()
    stem_bn = module.net.backbone.bn1
    assert not stem_bn.training and module.net.backbone.layer4[1].bn2.training
    before = {k: v.clone() for k, v in module.net.backbone.state_dict().items()}
    optimizer = module.configure_optimizers()
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    loss = module.loss(module(images), torch.tensor([0, 1] * 4))
    loss.backward()
    optimizer.step()
    after = module.net.backbone.state_dict()
    for key in ("conv1.weight", "bn1.weight", "bn1.running_mean", "layer1.0.conv1.weight"):
        assert torch.equal(before[key], after[key]), key
    # timm zero-initialises the last BN of each block, so its weight is what moves first
    assert not torch.equal(before["layer4.1.bn2.weight"], after["layer4.1.bn2.weight"])


def _start_training(split_folder: Path, runs: Path, name: str, epochs: int, **popen: object
                    ) -> subprocess.Popen:
    command = [sys.executable, "-m", "crystalscope.cli", "train", str(split_folder),
               "--runs-dir", str(runs), "--name", name, "--epochs", str(epochs),
               "--f1-threshold", "1.0", "--patience", "50", "--fraction", "0.25",
               *_cli_options(TINY)]
    # Ctrl-C reaches the run even when the suite itself runs as a background job, whose
    # children inherit an ignored SIGINT (and Python then installs no KeyboardInterrupt).
    return subprocess.Popen(command, **popen,  # type: ignore[call-overload]
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_epochs(process: subprocess.Popen, metrics: Path, rows: int) -> None:
    """Wait for a state (``rows`` epochs written, the process still training), not a time."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach {rows} epochs (exit {process.poll()})")


def _resume_recording_the_start(run_dir: Path, monkeypatch: pytest.MonkeyPatch
                                ) -> tuple[object, dict]:
    """Resume in this process; record the weights and optimizer state when training starts
    (after Lightning has restored the checkpoint, before the first resumed step)."""
    seen: dict = {}

    def on_train_start(module: CrystalClassifier) -> None:
        seen["weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        seen["optimizer"] = copy.deepcopy(module.trainer.optimizers[0].state_dict())
        seen["epoch"] = module.trainer.current_epoch

    monkeypatch.setattr(CrystalClassifier, "on_train_start", on_train_start, raising=False)
    return train(None, resume=run_dir, quiet=True), seen


def _assert_continues_from(checkpoint: dict, seen: dict) -> None:
    """The resumed run starts from the checkpoint: same weights, optimizer moments, epoch."""
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(seen["weights"][key], value), key
    saved, resumed = checkpoint["optimizer_states"][0]["state"], seen["optimizer"]["state"]
    assert saved.keys() == resumed.keys() and saved
    for index, moments in saved.items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(resumed[index][name], moments[name]), (index, name)
    assert seen["epoch"] == checkpoint["epoch"] + 1
    # A restart from scratch would start with an empty optimizer state: the comparison of
    # Adam's moments above is what fails then.


def test_resume_after_kill_continues_from_the_last_checkpoint(
        split_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    process = _start_training(split_folder, tmp_path, "killed", 12,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_epochs(process, tmp_path / "killed" / "metrics.csv", 2)
    process.send_signal(signal.SIGKILL)  # 10 epochs still to go: it cannot have finished
    process.wait()
    done_before = len(_rows(tmp_path / "killed"))
    assert 2 <= done_before < 12, "the kill should land mid-run"
    checkpoint = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt",
                            map_location="cpu", weights_only=False)
    first_log = (tmp_path / "killed" / "logs" / "metrics.csv").read_text()
    result, seen = _resume_recording_the_start(tmp_path / "killed", monkeypatch)
    _assert_continues_from(checkpoint, seen)
    epochs = [int(r["epoch"]) for r in _rows(result.run_dir)]
    assert epochs == list(range(1, 13))
    # Lightning's own log of the first part survives; the resumed part logs beside it.
    assert (tmp_path / "killed" / "logs" / "metrics.csv").read_text() == first_log
    assert len(list((tmp_path / "killed" / "logs").glob("resumed-*/metrics.csv"))) == 1


def test_trainer_keeps_frozen_batchnorm_statistics(split_folder: Path, tmp_path: Path) -> None:
    # Through Lightning's loop, not only module.train(): Lightning 2.x never calls .train().
    result = train(_config(split_folder, tmp_path, epochs=1, fraction=0.25, image_size=32,
                           trainable=0.25, name="frozen"), quiet=True)
    state = torch.load(result.run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    fresh = CrystalClassifier(model="resnet18", classes=["cex", "pg"], trainable=0.25)
    assert not fresh.net.backbone.bn1.training  # frozen norms in eval mode from the start
    initial = fresh.state_dict()
    for key in ("net.backbone.bn1.running_mean", "net.backbone.bn1.running_var",
                "net.backbone.layer2.0.bn1.running_mean"):
        assert torch.equal(state[key], initial[key]), key
    assert not torch.equal(state["net.backbone.layer4.1.bn1.running_mean"],
                           initial["net.backbone.layer4.1.bn1.running_mean"])


def test_last_checkpoint_is_the_last_epoch_even_when_it_is_not_the_best(
        split_folder: Path, tmp_path: Path) -> None:
    # A frozen backbone, a linear head and a vanishing learning rate: validation F1 stays the
    # same, so only the first epoch is "best"; last.ckpt must still follow every epoch.
    result = train(_config(split_folder, tmp_path, epochs=3, fraction=0.25, image_size=32,
                           trainable=0.0, head="linear", lr=1e-12, f1_threshold=1.0,
                           name="flat"), quiet=True)
    f1 = {row["val_f1_macro"] for row in _rows(result.run_dir)}
    assert len(f1) == 1, f1
    epoch = {name: torch.load(result.run_dir / "checkpoints" / f"{name}.ckpt",
                              map_location="cpu", weights_only=False)["epoch"]
             for name in ("best", "last")}
    assert epoch == {"best": 0, "last": 2}


def test_class_weights_auto() -> None:
    assert class_weights([30, 10]) == [40 / 60, 40 / 20]
    assert class_weights([5, 5, 5]) == [1.0, 1.0, 1.0]


def test_config_file_and_recipes(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"recipe": "georgia", "epochs": 3}))
    config = resolve_train_config({"data": tmp_path, "lr": 0.05}, path)
    assert (config.model, config.image_size, config.trainable, config.optimizer) == \
           ("resnet101", 224, 0.10, "sgd")
    assert config.epochs == 3 and config.lr == 0.05 and config.augmentation == "georgia"
    assert resolve_train_config({"data": tmp_path}).model == "resnet50"
    with pytest.raises(SettingsError, match="recipe") as error:
        resolve_train_config({"data": tmp_path, "recipe": "nope"})
    assert error.value.for_flags().startswith("--recipe nope: use one of")
    with pytest.raises(SettingsError, match="batch_size") as error:
        resolve_train_config({"data": tmp_path, "batch_size": 0})
    assert error.value.for_flags().startswith("--batch-size 0:")
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="mapping"):
        resolve_train_config({"data": tmp_path}, path)


def test_defaults_fine_tune_pretrained_weights_and_random_weights_train_every_layer(
        tmp_path: Path) -> None:
    default = resolve_train_config({"data": tmp_path})
    assert (default.weights, default.trainable) == ("imagenet", 0.25)  # the fast recipe
    random = resolve_train_config({"data": tmp_path, "weights": "none"})
    assert random.trainable == 1.0  # frozen random layers would be noise
    assert "every layer" in weights_notes(random)[0]
    asked = resolve_train_config({"data": tmp_path, "weights": "none", "trainable": 0.5})
    assert asked.trainable == 0.5 and "random weights" in weights_notes(asked)[0]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"weights": "none", "trainable": 0.3}))
    assert resolve_train_config({"data": tmp_path}, path).trainable == 0.3  # the file says so
    assert weights_notes(default) == []


def test_bad_inputs(split_folder: Path, tmp_path: Path) -> None:
    no_valid = tmp_path / "no_valid"
    shutil.copytree(split_folder / "train", no_valid / "train")
    with pytest.raises(UserError, match=r"no valid/ \(or val/\) folder"):
        train(_config(no_valid, tmp_path), quiet=True)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(split_folder, mismatch)
    (mismatch / "valid" / "pg").rename(mismatch / "valid" / "phenylglycine")
    with pytest.raises(UserError, match="class folders differ"):
        train(_config(mismatch, tmp_path), quiet=True)
    with pytest.raises(UserError, match="not a timm model"):
        train(_config(split_folder, tmp_path, model="resnet9999"), quiet=True)
    with pytest.raises(UserError, match="fewer than the batch size"):
        train(_config(split_folder, tmp_path, batch_size=10_000), quiet=True)
    with pytest.raises(UserError, match="not a run directory"):
        train(None, resume=tmp_path / "nothing", quiet=True)
    bad_weights = tmp_path / "w.safetensors"
    bad_weights.write_bytes(b"not weights")
    with pytest.raises(UserError, match="not loadable"):
        create_backbone("resnet18", str(bad_weights))
    assert not any((tmp_path / name).exists() for name in ("resnet18",))


def test_out_of_memory_suggests_a_smaller_batch(split_folder: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*_args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(CrystalClassifier, "training_step", no_memory)
    with pytest.raises(UserError, match="out of memory at batch size 32; try --batch-size 16"):
        train(_config(split_folder, tmp_path, name="oom"), quiet=True)


def test_disk_cache_holds_the_same_images_and_trains_the_same(split_folder: Path,
                                                              tmp_path: Path) -> None:
    ram = SplitDataModule(split_folder, image_size=32, batch_size=8, augmentation="none",
                          cache="ram")
    disk = SplitDataModule(split_folder, image_size=32, batch_size=8, augmentation="none",
                           cache="disk", cache_dir=tmp_path / "cache")
    ram.setup()
    disk.setup()
    assert disk.cache_used == "disk" and ram.cache_used == "ram"
    assert (tmp_path / "cache" / "train-32px.npy").is_file()
    assert torch.equal(ram.train_set.images, disk.train_set.images)
    assert torch.equal(ram.val_set.labels, disk.val_set.labels)
    assert choose_cache("auto", 10) == "ram"
    assert choose_cache("auto", 1 << 60) == ("disk" if available_memory() else "ram")
    runs = [train(_config(split_folder, tmp_path / "runs", epochs=1, fraction=0.3, cache=kind,
                          name=kind), quiet=True) for kind in ("ram", "disk")]
    first, second = (_rows(r.run_dir) for r in runs)
    assert [{k: v for k, v in row.items() if k != "elapsed_s"} for row in first] == \
        [{k: v for k, v in row.items() if k != "elapsed_s"} for row in second]
    assert not (tmp_path / "runs" / ".cache").exists()  # the disk cache is removed afterwards


def test_imagenet_weights_offline_say_how_to_pass_a_local_file(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-crystalscope-cache")
    with pytest.raises(UserError, match=r"--weights path/to/model\.safetensors"):
        create_backbone("resnet18", "imagenet")


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = create_backbone("resnet18", "none")
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_backbone("resnet18", str(path))
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)


def test_existing_run_is_never_overwritten(split_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "note.txt").write_text("mine")
    with pytest.raises(UserError, match="exists; choose another name"):
        train(_config(split_folder, tmp_path, name="taken"), quiet=True)
    assert (tmp_path / "taken" / "note.txt").read_text() == "mine"
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["note.txt"]


def test_ctrl_c_saves_a_checkpoint_then_resume_continues(
        split_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    process = _start_training(split_folder, tmp_path, "interrupted", 12,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epochs(process, tmp_path / "interrupted" / "metrics.csv", 1)
    # Frozen until Ctrl-C is on its way, so that it cannot run on (or stop early, on a perfect
    # validation F1) between the check above and the signal, however loaded the machine is.
    process.send_signal(signal.SIGSTOP)
    assert process.poll() is None, "training ended before it could be interrupted"
    checkpoint_path = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    checkpoint_path.unlink(missing_ok=True)  # so only the Ctrl-C handler can write it again
    process.send_signal(signal.SIGINT)  # 11 epochs still to go: it cannot have finished
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0, stderr[-3000:]
    assert checkpoint_path.is_file(), stderr
    assert "interrupted: checkpoint saved" in stderr and "Traceback" not in stderr
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    result, seen = _resume_recording_the_start(tmp_path / "interrupted", monkeypatch)
    for key, value in checkpoint["state_dict"].items():  # mid-epoch: the weights carry on
        assert torch.equal(seen["weights"][key], value), key
    epochs = [int(r["epoch"]) for r in _rows(result.run_dir)]
    assert epochs == list(range(1, len(epochs) + 1)) and epochs[-1] == 12


def test_splits_sharing_crops_are_refused_unless_allowed(split_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    from PIL import Image

    from crystalscope.cli import main
    from crystalscope.data.leakage import find_split_overlap
    from crystalscope.train.run import check_overlap

    assert find_split_overlap(split_folder) == []  # `split` keeps every group in one split
    leaky = tmp_path / "leaky"
    shutil.copytree(split_folder, leaky)
    train_crops = sorted((leaky / "train" / "pg").glob("*.png"))
    shutil.copy(train_crops[0], leaky / "test" / "pg" / "copied.png")  # the same bytes
    with Image.open(train_crops[1]) as image:  # labelled again, turned, into valid/
        image.transpose(Image.Transpose.ROTATE_90).save(leaky / "valid" / "pg" / "turned.png")
    groups = find_split_overlap(leaky)
    assert sorted(g.splits for g in groups) == [("train", "test"), ("train", "valid")]
    assert {g.exact for g in groups} == {True, False}
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(leaky), "--runs-dir", str(tmp_path / "runs"), "--weights", "none",
              "--model", "resnet18", "--epochs", "1"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "2 crop(s) appear in more than one split" in message and "--allow-overlap" in message
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made
    note = check_overlap(_config(leaky, tmp_path, allow_overlap=True))
    assert note is not None and "2 crop(s)" in note
