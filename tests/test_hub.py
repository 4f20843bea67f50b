"""The hub: ``local-dir:`` and ``hf-hub:`` backbones through timm, the model card, and
``export --push-to-hub`` — offline (no network in tests): the hub is made unreachable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml

from crystalscope.cli.app import main
from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.errors import UserError
from crystalscope.export.hub import check_repo_id, hub_files, push_to_hub
from crystalscope.model.backbones import create_backbone
from crystalscope.model.sources import resolve_source
from crystalscope.settings import SettingsError


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's own offline mode: every hub call fails at once, as without network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A resnet18 saved in timm's hub layout (what `hf download` of a timm repo gives)."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    folder = tmp_path_factory.mktemp("hub") / "my-resnet"
    save_for_hf(model, folder, safe_serialization=True)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def test_local_dir_backbone_brings_its_weights(timm_folder: tuple[Path, dict]) -> None:
    folder, weights = timm_folder
    own = create_backbone(f"local-dir:{folder}", "imagenet").state_dict()
    assert all(torch.equal(own[k], weights[k]) for k in weights)
    fresh = create_backbone(f"local-dir:{folder}", "none").state_dict()
    assert not all(torch.equal(fresh[k], weights[k]) for k in weights)
    source = resolve_source(f"local-dir:{folder}")
    assert source.architecture == "resnet18" and source.mean and source.std


def test_bad_sources_get_one_line_errors(tmp_path: Path, offline: None) -> None:
    with pytest.raises(SettingsError, match=r"has no config\.json"):
        resolve_source(f"local-dir:{tmp_path}")
    with pytest.raises(SettingsError, match=r"give --model local-dir:DIR"):
        resolve_source("hf-hub:some-lab/some-model")
    with pytest.raises(SettingsError, match="give what follows hf-hub"):
        resolve_source("hf-hub:")


@pytest.mark.slow
def test_a_local_dir_run_exports_a_model_that_loads_without_the_folder(
        timm_folder: tuple[Path, dict], synthetic_set: Path, tmp_path: Path,
        offline: None) -> None:
    from crystalscope.export.weights import load_model
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.train.run import train

    folder, _ = timm_folder
    moved = Path(shutil.copytree(folder, tmp_path / "model-folder"))
    split_dataset(synthetic_set, tmp_path / "splits", workers=1)
    (tmp_path / "splits" / "LICENSE").write_text("CC BY-SA 4.0\n\nAttribution: …\n")
    config = resolve_train_config({
        "data": tmp_path / "splits", "runs_dir": tmp_path / "runs",
        "model": f"local-dir:{moved}", "image_size": 32, "trainable": 1.0, "batch_size": 16,
        "epochs": 1, "accelerator": "cpu", "devices": "1"})
    result = train(config, quiet=True)
    assert result.run_dir.name.startswith("model-folder-")  # no ':' or '/' in the run's name
    shutil.rmtree(moved)  # the export must not need the folder any more
    _, description = load_model(result.run_dir)
    assert description["architecture"]["source"]["architecture"] == "resnet18"
    predictor = load_predictor(result.run_dir, backend="torch")  # the checkpoint, too
    assert predictor.classes == ["cex", "pg"]

    card = (result.run_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "crystalscope"
    assert front["pipeline_tag"] == "image-classification"
    for expected in ("- `pg` (output 1)", "Licence of the data: CC BY-SA 4.0",
                     "## Intended use and limits", "input `images`: float32 N×3×32×32",
                     f"accuracy | {description['metrics']['test']['accuracy']['value']:.4f}",
                     "| train | "):
        assert expected in card, expected


def test_push_to_hub_fails_cleanly_offline_and_sends_only_the_export(
        exported_run: Path, offline: None) -> None:
    names = sorted(p.name for p in hub_files(exported_run))
    assert names == sorted(["README.md", "model.json", "model.onnx", "model.safetensors",
                            "unknown.safetensors"])
    before = {p.name: p.read_bytes() for p in hub_files(exported_run)}
    with pytest.raises(UserError, match=r"could not push to the Hugging Face hub repository "
                                        r"my-lab/cex-pg .*hf auth login"):
        push_to_hub(exported_run, "my-lab/cex-pg")
    assert {p.name: p.read_bytes() for p in hub_files(exported_run)} == before
    for bad in ("no-slash", "a/b/c", "my lab/x", "org/../x", "org/x.git"):
        with pytest.raises(SettingsError, match="ORG/NAME"):
            check_repo_id(bad)


def test_export_keeps_a_readme_that_is_not_its_card(exported_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("# our lab notes\n")
    for args in (["--out", str(out)], ["--push-to-hub", "bad"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(exported_run), *args])
        assert exit_info.value.code in (1, 2)
    said = capsys.readouterr().err.replace("\n", " ")
    assert "is not a crystalscope model card" in said and "ORG/NAME" in said
    assert "Traceback" not in said
    assert (out / "README.md").read_text() == "# our lab notes\n"
