"""The frozen trunk: cut where the frozen blocks end, folded BatchNorms give the same outputs,
and training through the copy changes exactly the parameters plain training changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from crystalscope.config import TrainConfig, resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.evaluate.plots import read_metrics_csv
from crystalscope.model.backbones import create_backbone, freeze_fraction
from crystalscope.model.classifier import CrystalClassifier
from crystalscope.model.inference import load_run
from crystalscope.model.trunk import fold_batch_norms, inference_copy, split_backbone
from crystalscope.train.data import SplitDataModule
from crystalscope.train.run import train
from crystalscope.train.trunk_cache import cache_trunk_features, dihedral, why_not


def _randomise_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so folding has work to do."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            n = layer.num_features
            layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
            layer.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            layer.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)


@pytest.mark.parametrize("name", ["resnet10t", "resnet18"])  # deep stem + avg-down; plain
def test_folding_keeps_the_outputs_and_removes_every_batchnorm(name: str) -> None:
    backbone = create_backbone(name).eval()
    _randomise_norms(backbone)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    x = torch.randn(2, 3, 64, 64)
    twin = inference_copy(backbone)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in twin.modules()) == 0
    assert fold_batch_norms(create_backbone(name).eval()) == norms
    with torch.no_grad():
        torch.testing.assert_close(twin(x), backbone(x), rtol=1e-4, atol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()) == norms  # untouched


@pytest.mark.parametrize("trainable", [0.1, 0.5])
def test_the_trunk_ends_at_the_last_fully_frozen_block(trainable: float) -> None:
    backbone = create_backbone("resnet18")
    freeze_fraction(backbone, trainable)
    split = split_backbone(backbone)
    assert not isinstance(split, str)
    assert all(not p.requires_grad for p in split.trunk.parameters())
    assert any(p.requires_grad for p in split.top[0].parameters())  # the next block trains
    assert 0 < split.trunk_blocks < split.blocks
    backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(split.top(split.trunk(x)), backbone(x))


def test_no_cut_says_why_in_one_line() -> None:
    backbone = create_backbone("resnet18")
    reason = split_backbone(backbone)  # nothing frozen
    assert isinstance(reason, str) and "trainable" in reason and "\n" not in reason
    other = create_backbone("mobilenetv3_small_050")
    freeze_fraction(other, 0.1)
    reason = split_backbone(other)
    assert isinstance(reason, str) and "ResNet" in reason


def _classifier(seed: int) -> CrystalClassifier:
    torch.manual_seed(seed)
    module = CrystalClassifier(model="resnet10t", classes=["cex", "pg"], trainable=0.3,
                               optimizer="sgd", lr=0.05)
    _randomise_norms(module.net.backbone, seed)
    return module


def test_training_through_the_trunk_copy_gives_plain_training_gradients() -> None:
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 4)
    gradients, states = [], []
    for use_copy in (False, True):
        module = _classifier(seed=3).train()
        module.use_trunk_copy = use_copy
        torch.manual_seed(5)  # the same dropout masks in the head
        module.loss(module.training_forward(images), labels).backward()
        gradients.append({name: p.grad for name, p in module.named_parameters()
                          if p.grad is not None})
        states.append(module.state_dict())
    plain, copied = gradients
    assert plain.keys() == copied.keys() and plain  # the same parameters learn
    assert all(name.startswith(("net.head", "net.backbone.layer3", "net.backbone.layer4"))
               for name in plain)  # nothing in the trunk
    for name in plain:  # equal up to float rounding (folding reorders the sums)
        scale = float(plain[name].abs().max())
        torch.testing.assert_close(copied[name], plain[name], rtol=0, atol=1e-3 * scale)
    assert states[0].keys() == states[1].keys()  # the copy adds nothing to the checkpoint
    for key in states[0]:  # BatchNorm statistics of the top moved alike
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-5)


def test_the_copy_is_rebuilt_on_another_device_and_after_a_restore() -> None:
    module = _classifier(seed=1).train()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    module.training_forward(images)
    first = module._trunk_copy
    assert first is not None and first[0] == torch.device("cpu")
    assert not any(p is q for p in module.parameters() for q in first[1].parameters())
    module.on_train_start()
    assert module._trunk_copy is None


def test_the_eight_transforms_are_the_dihedral_group() -> None:
    image = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    produced = [dihedral(image, i) for i in range(8)]
    assert torch.equal(produced[0], image)
    expected = [torch.flip(torch.rot90(image, k, dims=(-2, -1)), dims=(-1,)) if f
                else torch.rot90(image, k, dims=(-2, -1)) for k in range(4) for f in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(produced, expected, strict=True))
    assert len({tuple(p.flatten().tolist()) for p in produced}) == 8


def _config(splits: Path, runs: Path, **overrides: object) -> TrainConfig:
    return resolve_train_config({
        "data": splits, "runs_dir": runs, "model": "resnet18", "weights": "none",
        "image_size": 32, "trainable": 0.5, "batch_size": 16, "optimizer": "adamw",
        "lr": 1e-3, "scheduler": "none", "augmentation": "dihedral", "epochs": 2,
        "accelerator": "cpu", "devices": "1", "evaluate": False, "export": False,
        **overrides})


@pytest.fixture(scope="module")
def splits(synthetic_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trunk") / "splits"
    split_dataset(synthetic_set, out, workers=1)
    return out


def test_cached_features_are_the_trunk_outputs_of_each_transform(splits: Path,
                                                                 tmp_path: Path) -> None:
    config = _config(splits, tmp_path)
    data = SplitDataModule(splits, image_size=32, batch_size=16, augmentation="dihedral")
    data.setup()
    images = data.train_set.images.clone()
    module = CrystalClassifier(model="resnet18", classes=data.classes, trainable=0.5)
    _randomise_norms(module.net.backbone)
    assert why_not(config, module) is None
    note = cache_trunk_features(data, module, config, tmp_path / "cache")
    assert "computed once" in note and module.inputs == "trunk_features"
    features = data.train_set.features
    assert features.dtype == torch.float16 and features.shape[:2] == (len(images), 8)
    trunk = module.split.trunk.eval()
    with torch.no_grad():
        for index in (0, 3, 7):
            expected = trunk(module.normalize(dihedral(images[:5], index)))
            torch.testing.assert_close(features[:5, index].float(), expected,
                                       rtol=2e-3, atol=2e-3)
    item, label = data.train_set[0]
    assert item.shape == features.shape[2:] and int(label) == int(data.train_set.labels[0])


def test_a_cached_run_saves_a_model_that_reproduces_its_validation(splits: Path,
                                                                   tmp_path: Path) -> None:
    result = train(_config(splits, tmp_path, name="cached"), quiet=True)
    assert any(note.startswith("frozen-trunk cache: ") and "computed once" in note
               for note in result.notes)
    run = load_run(result.run_dir)  # the usual checkpoint: loads and runs on images
    data = SplitDataModule(splits, image_size=32, batch_size=16, augmentation="none")
    data.setup()
    with torch.no_grad():
        probabilities = run.net(data.val_set.images)[0]
    best = max(read_metrics_csv(result.run_dir / "metrics.csv")["val_f1_macro"])
    assert best == pytest.approx(result.best_val_f1_macro)
    # Validation ran on fp16 features; on the images the same checkpoint scores the same
    # (a borderline image may flip: one image is worth about 0.05 of F1 here).
    recomputed = f1_score(data.val_set.labels.numpy(), probabilities.argmax(1).numpy(),
                          average="macro")
    assert recomputed == pytest.approx(best, abs=0.06)


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"augmentation": "georgia"}, "random warps"),
    ({"trainable": 1.0}, "trainable"),
    ({"compile": True}, "--compile"),
    ({"trunk_cache": "off"}, "--trunk-cache off"),
])
def test_the_run_says_in_one_line_why_there_is_no_cache(splits: Path, tmp_path: Path,
                                                        overrides: dict, reason: str) -> None:
    config = _config(splits, tmp_path, **overrides)
    module = CrystalClassifier(model="resnet18", classes=["cex", "pg"],
                               trainable=config.trainable)
    note = why_not(config, module)
    assert note is not None and reason in note and "\n" not in note
