"""The model contract: a model exported with a non-default spec (another mean/std, another
input size) is fed correctly by predict, serve, monitor and CAMs, none of which knows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crystalscope.errors import UserError
from crystalscope.model.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    RunLayout,
    decode,
    resolve_model,
)

ODD_MEAN = (0.3, 0.5, 0.7)
ODD_STD = (0.2, 0.3, 0.4)
ODD_SIZE = 40


@pytest.fixture(scope="module")
def odd_run(synthetic_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run whose backbone says it wants ODD_MEAN/ODD_STD, at ODD_SIZE px, exported."""
    import crystalscope.model.classifier as classifier
    from crystalscope.config import resolve_train_config
    from crystalscope.data.split import split_dataset
    from crystalscope.train.run import train

    root = tmp_path_factory.mktemp("odd")
    split_dataset(synthetic_set, root / "splits", workers=1)
    config = resolve_train_config({
        "data": root / "splits", "runs_dir": root / "runs", "name": "odd", "model": "resnet18",
        "weights": "none", "image_size": ODD_SIZE, "trainable": 1.0, "batch_size": 16,
        "optimizer": "adamw", "lr": 1e-3, "scheduler": "none", "augmentation": "none",
        "epochs": 1, "accelerator": "cpu", "devices": "1", "evaluate": True, "export": True})
    with pytest.MonkeyPatch.context() as patch:  # as timm would say for such a backbone
        patch.setattr(classifier, "backbone_normalization", lambda _: (ODD_MEAN, ODD_STD))
        return train(config, quiet=True).run_dir


def _reference(run_dir: Path, paths: list[Path], mean: tuple, std: tuple) -> np.ndarray:
    """Probabilities computed by hand: PIL's bilinear squash, then (x/255 - mean)/std, then the
    checkpoint's backbone + head and a softmax."""
    from crystalscope.model.inference import load_run

    classifier = load_run(run_dir).net.classifier
    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((ODD_SIZE, ODD_SIZE),
                                                       Image.Resampling.BILINEAR)
        x = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
        x = (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None,
                                                                                       None]
        with torch.no_grad():
            rows.append(torch.softmax(classifier(torch.from_numpy(x)[None]), dim=1)[0].numpy())
    return np.stack(rows)


def _test_images(run_dir: Path) -> list[Path]:
    splits = run_dir.parent.parent / "splits"
    return sorted((splits / "test").rglob("*.png"))[:6]


def test_the_spec_is_written_as_data(odd_run: Path) -> None:
    from crystalscope.export.metadata import read_metadata

    layout = RunLayout(odd_run)
    described = json.loads(layout.model_json.read_text(encoding="utf-8"))["preprocessing"]
    from_onnx = read_metadata(layout.onnx)["preprocessing"]
    for spec in (ModelSpec.from_dict(described), ModelSpec.from_dict(from_onnx)):
        assert spec.input_size == ODD_SIZE
        assert spec.mean == pytest.approx(ODD_MEAN) and spec.std == pytest.approx(ODD_STD)
        assert spec.classes == ("cex", "pg")


def test_predict_serve_monitor_and_cams_feed_the_model_as_its_spec_says(
        odd_run: Path, tmp_path: Path) -> None:
    from crystalscope.explore.cam import explain_image, load_torch_model
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.infer.stream import ImageResult, predict_stream
    from crystalscope.monitor.cutting import cut_frame
    from crystalscope.serve.app import ServeSettings, create_app
    from crystalscope.serve.server import running
    from test_serve import _post  # the tests folder is on sys.path (rootdir-relative imports)

    images = _test_images(odd_run)
    expected = _reference(odd_run, images, ODD_MEAN, ODD_STD)
    # The test can fail: fed with ImageNet's mean/std the same network answers otherwise.
    assert np.abs(_reference(odd_run, images, IMAGENET_MEAN, IMAGENET_STD)
                  - expected).max() > 1e-3

    layout = RunLayout(odd_run)
    for model, backend in ((odd_run, "onnx"), (layout.onnx, "onnx"), (odd_run, "torch"),
                           (layout.weights, "torch")):
        predictor = load_predictor(model, backend=backend)  # type: ignore[arg-type]
        got = np.stack([r.probabilities for r in predict_stream(predictor, images)
                        if isinstance(r, ImageResult)])
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"{model} {backend}")

    predictor = load_predictor(layout.onnx)
    with running(create_app(ServeSettings(predictor=predictor))) as url:
        code, body = _post(f"{url}/predict", [("files", p.name, p.read_bytes())
                                              for p in images])
    assert code == 200
    served = np.array([[r["probabilities"][c] for c in ("cex", "pg")] for r in body["results"]])
    np.testing.assert_allclose(served, expected, atol=1e-4)

    # monitor --frames: two crops side by side, cut into tiles, fed to the model
    crops = [Image.open(p).convert("RGB").resize((48, 48)) for p in images[:2]]
    frame = Image.new("RGB", (96, 48))
    for i, crop in enumerate(crops):
        frame.paste(crop, (48 * i, 0))
        crop.save(tmp_path / f"crop-{i}.png")
    frame.save(tmp_path / "frame.png")
    pieces = cut_frame(tmp_path / "frame.png", 48, "tiles", predictor.spec)
    np.testing.assert_allclose(
        predictor.predict(pieces).probabilities,
        _reference(odd_run, [tmp_path / "crop-0.png", tmp_path / "crop-1.png"], ODD_MEAN,
                   ODD_STD), atol=1e-4)

    for model in (odd_run, layout.weights):  # CAMs: the run, or the exported weights
        net = load_torch_model(model)
        explanation = explain_image(net, images[0], methods=("gradcam",))
        assert net.spec.input_size == ODD_SIZE
        assert explanation.probability == pytest.approx(float(expected[0].max()), abs=1e-4)


def test_resolve_model_names_every_kind_of_model(odd_run: Path, tmp_path: Path) -> None:
    layout = RunLayout(odd_run)
    assert resolve_model(odd_run).kind == "run"
    assert resolve_model(layout.onnx).kind == "onnx"
    assert resolve_model(layout.model_json).path == layout.weights
    assert resolve_model(layout.onnx).layout.report == layout.report
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "model.onnx").write_bytes(layout.onnx.read_bytes())
    assert resolve_model(exported).kind == "folder"
    with pytest.raises(UserError, match="no such model"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(UserError, match="neither a run directory"):
        resolve_model(tmp_path)
    with pytest.raises(UserError, match="not a model file"):
        resolve_model(layout.config)


def test_decode_squashes_without_a_crop(tmp_path: Path) -> None:
    image = Image.new("L", (30, 10), 0)
    image.paste(255, (20, 0, 30, 10))  # the right third white
    image.save(tmp_path / "a.png")
    pixels, width, height = decode(tmp_path / "a.png", ModelSpec(12, ("a", "b")))
    assert pixels.shape == (3, 12, 12) and pixels.dtype == np.uint8
    assert (width, height) == (30, 10)
    assert (pixels[0] == pixels[2]).all()  # grayscale repeated
    assert pixels[0, :, -1].min() == 255 and pixels[0, :, 0].max() == 0  # nothing cut away


def test_decode_honours_the_specs_resize_filter(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    source = Image.open(tmp_path / "a.png").convert("RGB")
    decoded = {}
    for name, pil_filter in (("bilinear", Image.Resampling.BILINEAR),
                             ("bicubic", Image.Resampling.BICUBIC),
                             ("nearest", Image.Resampling.NEAREST),
                             ("lanczos", Image.Resampling.LANCZOS)):
        spec = ModelSpec(20, ("a", "b"), resize=name)
        decoded[name] = decode(tmp_path / "a.png", spec)[0]
        expected = np.asarray(source.resize((20, 20), pil_filter)).transpose(2, 0, 1)
        np.testing.assert_array_equal(decoded[name], expected, err_msg=name)
        assert ModelSpec.from_dict(spec.to_dict()) == spec  # written and read back whole
    assert not np.array_equal(decoded["nearest"], decoded["bilinear"])


@pytest.mark.parametrize(("change", "message"), [
    ({"resize": "area"}, "resize 'area': not one of bilinear"),
    ({"channels": "BGR"}, "channels 'BGR': not one of RGB"),
    ({"layout": "NHWC"}, "layout 'NHWC': not one of NCHW"),
    ({"value_range": [0, 1]}, r"value_range \(0, 1\): not one of \(0, 255\)"),
    ({"normalization": "before"}, "normalization 'before': not one of inside, outside"),
    ({"crop": "center"}, "preprocessing field.s. crop: not known"),
    ({"outputs": {"logits": "raw scores"}}, r"outputs \['logits'\]: only probabilities"),
    ({"input_size": 4}, "input_size 4: give a whole number of at least 8"),
    ({"input_size": "64"}, "input_size '64'"),
    ({"mean": [0.5, 0.5]}, "give three values each"),
])
def test_a_spec_this_version_cannot_honour_is_refused(change: dict, message: str) -> None:
    data = {**ModelSpec(32, ("cex", "pg")).to_dict(), **change}
    with pytest.raises(UserError, match=message):
        ModelSpec.from_dict(data)


def test_an_early_model_json_without_the_later_fields_still_reads() -> None:
    spec = ModelSpec.from_dict({"input_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3},
                               ["cex", "pg"])
    assert spec == ModelSpec(64, ("cex", "pg"), mean=(0.5,) * 3, std=(0.25,) * 3)


def test_one_normalisation_in_training_inference_and_cams(odd_run: Path) -> None:
    from crystalscope.explore.cam import Logits
    from crystalscope.model.classifier import CrystalClassifier
    from crystalscope.model.inference import load_run
    from crystalscope.model.normalize import Normalize

    run = load_run(odd_run)
    module = CrystalClassifier.load_from_checkpoint(run.checkpoint, map_location="cpu",
                                                    weights="none")
    images = torch.randint(0, 256, (2, 3, ODD_SIZE, ODD_SIZE), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(ODD_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(ODD_STD).view(1, 3, 1, 1)
    for normalize in (run.net.normalize, module.normalizer, Logits(run.net).inner.normalize):
        assert isinstance(normalize, Normalize)
        torch.testing.assert_close(normalize(images), expected, rtol=1e-5, atol=1e-5)
    # mean and std live in the spec, not in the saved weights
    assert not any(key.endswith(("mean", "std")) and "normal" in key
                   for key in module.state_dict())


def test_a_checkpoint_from_before_normalize_still_loads(odd_run: Path, tmp_path: Path) -> None:
    """Checkpoints written before model/normalize.py held the buffers ``mean`` and ``std``."""
    import shutil

    from crystalscope.model.inference import load_run

    run_copy = Path(shutil.copytree(odd_run, tmp_path / "run"))
    checkpoint = RunLayout(run_copy).checkpoint()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved["state_dict"]["mean"] = torch.tensor(ODD_MEAN).view(1, 3, 1, 1) * 255
    saved["state_dict"]["std"] = torch.tensor(ODD_STD).view(1, 3, 1, 1) * 255
    torch.save(saved, checkpoint)
    old, new = load_run(run_copy), load_run(odd_run)
    images = torch.randint(0, 256, (2, 3, ODD_SIZE, ODD_SIZE), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(old.net(images)[0], new.net(images)[0])
    assert old.spec == new.spec
