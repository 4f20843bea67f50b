"""Test-time averaging (``tta: dihedral``): the network's outputs are the mean over the 8
rotations and flips, so they do not change when a crop is turned or mirrored — in torch, in
the rebuilt safetensors model, in the ONNX file, and in what evaluate and the unknown-detector
see."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from crystalscope.cli import main
from crystalscope.errors import UserError
from crystalscope.export.stage import ExportSettings, export_run
from crystalscope.export.weights import load_model
from crystalscope.infer.predictor import load_predictor
from crystalscope.model.backbones import Classifier, create_backbone
from crystalscope.model.inference import InferenceNet, load_run
from crystalscope.model.spec import ModelSpec


def _turned(images: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and flips of (N, 3, S, S) images, by numpy (independent of the model)."""
    rotations = [np.rot90(images, k, axes=(2, 3)) for k in range(4)]
    return [np.ascontiguousarray(v) for v in (*rotations, *(r[..., ::-1] for r in rotations))]


def _images(count: int, size: int, seed: int = 0) -> np.ndarray:
    # Structured, not symmetric: a bright bar in one corner over noise, so views differ.
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 120, (count, 3, size, size)).astype(np.float32)
    images[:, :, : size // 4, : size // 2] += 120
    return images


@pytest.fixture(scope="module")
def dihedral_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run whose config asks for dihedral test-time averaging, exported."""
    run = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("tta") / "run"))
    config_path = run / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config["tta"] = "dihedral"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    for name in ("model.onnx", "model.json", "model.safetensors", "unknown.safetensors"):
        (run / name).unlink(missing_ok=True)
    export_run(run)
    return run


def test_dihedral_outputs_are_the_mean_over_the_eight_views(trained_run: Path) -> None:
    single = load_run(trained_run).net
    averaged = InferenceNet(single.classifier, single.spec, tta="dihedral").eval()
    images = _images(3, 32)
    with torch.inference_mode():
        views = [single(torch.from_numpy(v)) for v in _turned(images)]
        got = averaged(torch.from_numpy(images))
    for index, name in enumerate(("probabilities", "embedding", "statistics")):
        expected = torch.stack([v[index] for v in views]).mean(dim=0)
        torch.testing.assert_close(got[index], expected, rtol=1e-5, atol=1e-5, msg=name)
    # and single-view outputs do depend on the view, so the averaging is not a no-op here
    assert (views[0][1] - views[1][1]).abs().max() > 1e-3


def test_a_dihedral_model_ignores_rotations_and_flips_in_every_format(
        dihedral_run: Path) -> None:
    images = _images(5, 32, seed=1)
    description = json.loads((dihedral_run / "model.json").read_text(encoding="utf-8"))
    assert description["architecture"]["tta"] == "dihedral"
    assert load_run(dihedral_run).net.views == 8
    rebuilt, _ = load_model(dihedral_run / "model.json")
    assert rebuilt.views == 8
    backends = [("onnx", "model.onnx"), ("torch", "model.json")]
    if importlib.util.find_spec("openvino") is not None:
        backends.append(("openvino", "model.onnx"))
    for backend, name in backends:
        predictor = load_predictor(dihedral_run / name, backend=backend)
        reference = predictor.predict(images)
        for view in _turned(images)[1:]:
            turned = predictor.predict(view)
            assert np.abs(turned.probabilities - reference.probabilities).max() <= 1e-4
            assert np.allclose(turned.unknown_scores, reference.unknown_scores, atol=1e-3)


def test_a_single_view_model_is_unchanged(trained_run: Path) -> None:
    # What every run without the setting gets, files written before it existed included.
    assert load_run(trained_run).net.views == 1


def test_tta_refuses_an_unknown_kind(synthetic_set: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(synthetic_set), "--tta", "d4", "--weights", "none",
              "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "tta" in err and "dihedral" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    with pytest.raises(UserError, match="tta 'd4'"):
        InferenceNet(Classifier(create_backbone("resnet18", "none"), 2, "linear"),
                     ModelSpec(32, ("a", "b")), tta="d4")


def test_tta_is_a_choice_at_export_and_predict_time(trained_run: Path, dihedral_run: Path,
                                                    tmp_path: Path) -> None:
    images = _images(4, 32, seed=2).astype(np.uint8)
    averaged_inside = load_predictor(dihedral_run)  # exported with the run's dihedral choice
    assert averaged_inside.tta == "dihedral" and averaged_inside.built_in_tta == "dihedral"
    # A single-view export of the same run: 8 times less compute, one view
    single = tmp_path / "single"
    result = export_run(dihedral_run, single, ExportSettings(tta="none"))
    assert json.loads((single / "model.json").read_text())["architecture"]["tta"] == "none"
    assert result.unknown_detector is not None
    single_view = load_predictor(single)
    assert single_view.tta == "none" and single_view.unknown_detector is not None
    turned = _turned(images)[1]
    assert np.abs(single_view.predict(turned).probabilities
                  - single_view.predict(images).probabilities).max() > 1e-4
    # ...averaged around the single-view model at predict time: the in-graph numbers
    around = load_predictor(single, tta="dihedral")
    assert around.tta == "dihedral" and around.unknown_detector is None and around.notes
    inside, outside = averaged_inside.predict(images), around.predict(images)
    assert np.abs(inside.probabilities - outside.probabilities).max() <= 1e-4
    assert np.allclose(inside.embeddings, outside.embeddings, rtol=1e-3, atol=1e-4)
    assert around.model_id.endswith(":dihedral")  # a store keeps the two spaces apart
    with pytest.raises(UserError, match="inside its graph"):
        load_predictor(dihedral_run, tta="none")


def test_evaluate_takes_the_tta_choice(trained_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    reports = {}
    for choice in ("none", "dihedral"):
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", str(trained_run), "--tta", choice, "--out",
                  str(tmp_path / choice), "--json"])
        assert exit_info.value.code in (0, None)
        capsys.readouterr()
        reports[choice] = json.loads((tmp_path / choice / "report.json").read_text())
    assert [reports[c]["tta"] for c in ("none", "dihedral")] == ["none", "dihedral"]
    p_none = [r["probabilities"] for r in reports["none"]["predictions"]]
    p_dihedral = [r["probabilities"] for r in reports["dihedral"]["predictions"]]
    assert p_none != p_dihedral


def test_the_cam_of_an_averaging_model_turns_with_the_crop(pg_detector: Path,
                                                            tmp_path: Path) -> None:
    from PIL import Image

    from crystalscope.explore.cam import explain_image

    run = load_run(pg_detector, tta="dihedral")  # 96 px: a 3x3 last stage, maps with shape
    assert run.net.views == 8
    pixels = _images(1, 96, seed=3)[0].astype(np.uint8).transpose(1, 2, 0)
    Image.fromarray(pixels).save(tmp_path / "crop.png")
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels))).save(tmp_path / "turned.png")
    crop = explain_image(run.net, tmp_path / "crop.png", target="pg")
    turned = explain_image(run.net, tmp_path / "turned.png", target="pg")
    assert crop.probability == pytest.approx(turned.probability, abs=1e-5)
    for method, cam in crop.maps.items():
        assert cam.std() > 1e-3  # not a flat map
        np.testing.assert_allclose(np.rot90(cam), turned.maps[method], atol=2e-3,
                                   err_msg=method)
