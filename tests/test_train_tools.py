"""timm's training tools as train settings: RandAugment, mixup/CutMix, label smoothing and EMA
weights — each checked for its effect, and a run with all of them exported from its EMA."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.errors import UserError
from crystalscope.model.classifier import CrystalClassifier
from crystalscope.settings import SettingsError
from crystalscope.train.data import make_augmentation
from crystalscope.train.ema import EmaWeights


def _module(**options: float) -> CrystalClassifier:
    return CrystalClassifier(model="resnet18", classes=["cex", "pg"], weights="none",
                             channels_last=False, **options)


def test_randaugment_changes_crops_and_keeps_their_form() -> None:
    torch.manual_seed(0)
    crop = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    augment = make_augmentation("none", "rand-m9-n2-mstd0.5", 48)
    outputs = [augment(crop) for _ in range(20)]
    assert all(o.shape == crop.shape and o.dtype == torch.uint8 for o in outputs)
    assert sum(not torch.equal(o, crop) for o in outputs) >= 10
    assert make_augmentation("dihedral", "none", 48).__class__.__name__ == "Dihedral"
    with pytest.raises(UserError, match="not a timm RandAugment config"):
        make_augmentation("none", "rand-x5", 48)


def test_mixup_mixes_pairs_into_soft_targets() -> None:
    module = _module(mixup=1.0, label_smoothing=0.1)  # alpha 1: lambda uniform
    torch.manual_seed(1)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 1])  # timm pairs row i with row 3 - i: other classes
    for seed in range(20):  # timm draws lambda with numpy: take a clearly mixed draw
        np.random.seed(seed)
        mixed, targets = module.mix(images, labels)
        lam = (float(targets[0, 0]) - 0.05) / 0.9
        if 0.1 < lam < 0.9:
            break
    assert mixed.dtype == torch.float32 and targets.shape == (5, 2)
    assert torch.allclose(targets.sum(1), torch.ones(5))
    original = images.float()
    # rows 0-3: lam * own + (1 - lam) * the row mirrored in the batch, targets likewise
    assert torch.allclose(mixed[:4], lam * original[:4] + (1 - lam) * original[:4].flip(0),
                          atol=1e-3)
    smooth = nn.functional.one_hot(labels[:4], 2).float() * 0.9 + 0.05
    assert torch.allclose(targets[:4], lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-5)
    assert torch.equal(mixed[4], original[4])  # the odd one out: unmixed, smoothed
    assert targets[4].tolist() == pytest.approx([0.05, 0.95])


def test_cutmix_pastes_a_box_and_says_so_in_the_target() -> None:
    module = _module(cutmix=1.0)
    torch.manual_seed(2)
    np.random.seed(2)
    images = torch.stack([torch.full((3, 32, 32), float(v)) for v in (0, 255)]).to(torch.uint8)
    mixed, targets = module.mix(images, torch.tensor([0, 1]))
    pasted = (mixed[0, 0] == 255).float().mean()  # row 0 got row 1's pixels in the box
    assert 0 < pasted < 1
    assert float(targets[0, 1]) == pytest.approx(float(pasted), abs=1e-6)


def test_label_smoothing_is_the_training_loss_only() -> None:
    module = _module(label_smoothing=0.2)
    logits = torch.tensor([[4.0, -4.0], [1.0, 0.5]])
    labels = torch.tensor([0, 1])
    log_p = torch.log_softmax(logits, 1)
    by_hand = (-(0.8 * log_p[torch.arange(2), labels]) - 0.2 * log_p.mean(1)).mean()
    assert float(module.train_criterion(logits, labels)) == pytest.approx(float(by_hand))
    assert float(module.loss(logits, labels)) == pytest.approx(
        float(nn.functional.cross_entropy(logits, labels)))  # validation: plain


class _Tiny(L.LightningModule):
    """A linear ``net`` trained by SGD, recording its raw weights after every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 2)
        self.raw_after_step: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, *_: object) -> None:
        self.raw_after_step.append({k: v.clone() for k, v in self.net.state_dict().items()})

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_ema_weights_are_timms_average_and_sit_in_the_net_for_validation(
        tmp_path: Path) -> None:
    from timm.utils import ModelEmaV3

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 4, generator=generator),
                         torch.randint(0, 2, (24,), generator=generator))
    module = _Tiny()
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    ema = EmaWeights(0.9)
    trainer = L.Trainer(max_epochs=1, callbacks=[ema], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    schedule = ModelEmaV3(nn.Linear(1, 1), decay=0.9, use_warmup=True)
    expected = start
    for step, raw in enumerate(module.raw_after_step, start=1):
        decay = schedule.get_decay(step)
        expected = {k: decay * expected[k] + (1 - decay) * raw[k] for k in expected}
    for key, value in module.net.state_dict().items():  # after validation: the average
        assert torch.allclose(value, expected[key], atol=1e-6)
        assert not torch.allclose(value, module.raw_after_step[-1][key])
    assert ema.raw is not None and all(torch.equal(ema.raw[k], module.raw_after_step[-1][k])
                                       for k in ema.raw)  # the raw weights, kept for resume


class _Resumable(_Tiny):
    """_Tiny that notes its weights when each epoch starts (after the callbacks' hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.at_epoch_start: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self) -> None:
        self.at_epoch_start.append({k: v.clone() for k, v in self.net.state_dict().items()})


def test_resume_continues_from_the_raw_weights_not_the_average(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 4, generator=generator),
                         torch.randint(0, 2, (24,), generator=generator))

    def fit(epochs: int, module: _Resumable, resume: str | None = None) -> None:
        checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None,
                                      enable_version_counter=False)
        trainer = L.Trainer(max_epochs=epochs, callbacks=[EmaWeights(0.9), checkpoints],
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, default_root_dir=tmp_path)
        trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4),
                    ckpt_path=resume)

    first = _Resumable()
    fit(1, first)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    raw = next(v for k, v in saved["callbacks"].items() if k.startswith("EmaWeights"))["raw"]
    average = {k[len("net."):]: v for k, v in saved["state_dict"].items()}
    assert any(not torch.equal(raw[k], average[k]) for k in raw)  # the checkpoint: the average
    second = _Resumable()
    fit(2, second, str(tmp_path / "last.ckpt"))
    assert all(torch.equal(second.at_epoch_start[0][k], raw[k]) for k in raw)  # trains on raw


def test_mixup_refuses_class_weights(synthetic_set: Path, tmp_path: Path) -> None:
    from crystalscope.train.run import train

    split_dataset(synthetic_set, tmp_path / "splits", workers=1)
    config = resolve_train_config({"data": tmp_path / "splits", "runs_dir": tmp_path / "runs",
                                   "model": "resnet18", "weights": "none", "mixup": 0.2,
                                   "class_weights": "auto"})
    with pytest.raises(SettingsError, match="auto cannot weigh mixed images"):
        train(config, quiet=True)


@pytest.mark.slow
def test_a_run_with_all_of_timms_tools_exports_its_ema_weights(synthetic_set: Path,
                                                                tmp_path: Path) -> None:
    from crystalscope.train.run import train

    split_dataset(synthetic_set, tmp_path / "splits", workers=1)
    config = resolve_train_config({
        "data": tmp_path / "splits", "runs_dir": tmp_path / "runs", "name": "timm",
        "recipe": "timm", "model": "resnet18", "weights": "none", "image_size": 32,
        "batch_size": 16, "epochs": 2, "ema_decay": 0.9, "accelerator": "cpu", "devices": "1",
        "evaluate": False})
    assert (config.randaugment, config.mixup, config.cutmix, config.label_smoothing) == (
        "rand-m7-mstd0.5", 0.2, 1.0, 0.1)  # the recipe's
    result = train(config, quiet=True)
    checkpoint = torch.load(result.run_dir / "checkpoints" / "best.ckpt", map_location="cpu",
                            weights_only=False)
    state = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items()
             if k.startswith("net.")}
    raw = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("EmaWeights"))["raw"]
    exported = load_file(result.run_dir / "model.safetensors")
    trained = [k for k in exported if exported[k].is_floating_point() and "running" not in k]
    assert all(torch.equal(exported[k], state[k]) for k in trained)  # the checkpoint's: EMA
    assert any(not torch.allclose(exported[k], raw[k]) for k in trained)  # not the raw ones
    saved = json.loads((result.run_dir / "model.json").read_text())["recipe"]
    assert saved["ema_decay"] == 0.9 and saved["randaugment"] == "rand-m7-mstd0.5"
