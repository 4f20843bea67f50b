"""Export: safetensors + model.json rebuild the checkpoint's model; the ONNX file carries its
classes and preprocessing, agrees with torch, and a broken export is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from crystalscope.cli import main
from crystalscope.errors import UserError
from crystalscope.export import onnx as onnx_export
from crystalscope.export.metadata import read_metadata
from crystalscope.export.onnx import ExportParityError
from crystalscope.export.stage import ExportSettings, export_run, parity_images
from crystalscope.export.weights import load_model
from crystalscope.model.inference import load_run


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported")
    export_run(trained_run, out)
    return out


def _images(run_dir: Path, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    images = parity_images(load_run(run_dir))
    noise = torch.randint(0, 256, (count, *images.shape[1:]), generator=generator)
    return torch.cat([images, noise.to(torch.uint8)])[: max(count, 1)].float()


def test_export_writes_the_model_files_with_their_description(exported: Path) -> None:
    assert {p.name for p in exported.iterdir()} == {"model.safetensors", "model.json",
                                                    "model.onnx", "unknown.safetensors",
                                                    "README.md"}  # README.md: the model card
    description = json.loads((exported / "model.json").read_text())
    assert description["classes"] == ["cex", "pg"]
    assert description["architecture"]["backbone"] == "resnet18"
    assert description["preprocessing"]["input_size"] == 32
    assert description["recipe"]["optimizer"] == "adamw"
    assert "validation" in description["metrics"]
    assert set(description["data"]["images"]) == {"train", "valid", "test"}
    assert "torch" in description["versions"] and "timm" in description["versions"]
    assert description["unknown_detector"]["file"] == "unknown.safetensors"


def test_model_rebuilt_from_safetensors_equals_the_checkpoint(trained_run: Path,
                                                              exported: Path,
                                                              tmp_path: Path) -> None:
    # Only the two files, far from the run: no pickle, no run directory.
    for name in ("model.safetensors", "model.json"):
        shutil.copy(exported / name, tmp_path / name)
    rebuilt, description = load_model(tmp_path / "model.safetensors")
    checkpoint = load_run(trained_run).net
    images = _images(trained_run, 8)
    with torch.inference_mode():
        for got, expected in zip(rebuilt(images), checkpoint(images), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert description["classes"] == load_run(trained_run).classes


def test_onnx_agrees_with_torch_for_any_batch_size(trained_run: Path, exported: Path) -> None:
    session = ort.InferenceSession(str(exported / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    net = load_run(trained_run).net
    for batch in (1, 5, 19):
        images = _images(trained_run, batch)[:batch]
        probabilities, embedding, statistics = session.run(None, {"images": images.numpy()})
        with torch.inference_mode():
            expected_p, expected_e, expected_s = net(images)
        assert probabilities.shape == (batch, 2)
        assert np.abs(probabilities - expected_p.numpy()).max() <= 1e-4
        assert np.allclose(embedding, expected_e.numpy(), rtol=1e-3, atol=1e-3)
        assert np.allclose(statistics, expected_s.numpy(), rtol=1e-3, atol=1e-3)
    metadata = read_metadata(exported / "model.onnx")
    assert metadata["classes"] == ["cex", "pg"]
    assert metadata["preprocessing"]["input_size"] == 32
    assert metadata["preprocessing"]["value_range"] == [0, 255]  # the spec, as data


def _break_weights(path: Path) -> None:
    """Scale the first large initializer: a valid ONNX file with wrong numbers."""
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.size > 1000:
            tensor.CopyFrom(numpy_helper.from_array((values * 3).astype(values.dtype),
                                                    tensor.name))
            break
    onnx.save(model, str(path))


def test_a_broken_export_fails_and_leaves_no_model_onnx(trained_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    real = onnx_export._to_onnx

    def broken(net: torch.nn.Module, path: Path, image_size: int) -> None:
        real(net, path, image_size)
        _break_weights(path)

    export_run(trained_run, tmp_path / "kept")  # a good export, then a broken one over it
    before = {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()}
    monkeypatch.setattr(onnx_export, "_to_onnx", broken)
    with pytest.raises(ExportParityError, match="disagree"):
        export_run(trained_run, tmp_path / "a")
    assert not (tmp_path / "a" / "model.onnx").exists()
    assert not list((tmp_path / "a").glob(".*partial"))
    with pytest.raises(ExportParityError, match="disagree"):
        export_run(trained_run, tmp_path / "kept")
    assert {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == before
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(trained_run), "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 1
    assert "disagree" in capsys.readouterr().err


def test_every_file_of_an_export_carries_one_export_id(trained_run: Path,
                                                       exported: Path) -> None:
    from safetensors import safe_open

    from crystalscope.data.dedupe import file_sha256
    from crystalscope.infer.predictor import load_predictor

    description = json.loads((exported / "model.json").read_text())
    export_id = description["export_id"]
    assert len(export_id) == 32
    assert description["checkpoint_sha256"] == file_sha256(
        trained_run / "checkpoints" / "best.ckpt")
    onnx_metadata = read_metadata(exported / "model.onnx")
    assert onnx_metadata["export_id"] == export_id
    assert onnx_metadata["checkpoint_sha256"] == description["checkpoint_sha256"]
    assert description["unknown_detector"]["export_id"] == export_id
    with safe_open(str(exported / "unknown.safetensors"), framework="numpy") as handle:
        assert handle.metadata()["export_id"] == export_id
    assert load_predictor(exported).export_id == export_id


def test_files_of_two_exports_side_by_side_are_refused(trained_run: Path, exported: Path,
                                                       tmp_path: Path) -> None:
    from crystalscope.infer.predictor import load_predictor

    other = tmp_path / "other"
    export_run(trained_run, other)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(other / "model.onnx", mixed / "model.onnx")  # a new ONNX, the old rest
    for name in ("model.json", "model.safetensors", "unknown.safetensors"):
        shutil.copy(exported / name, mixed / name)
    with pytest.raises(UserError, match="come from different exports"):
        load_predictor(mixed)
    shutil.copy(exported / "model.onnx", mixed / "model.onnx")
    shutil.copy(other / "unknown.safetensors", mixed / "unknown.safetensors")  # the detector
    with pytest.raises(UserError, match="from another export"):
        load_predictor(mixed)


def test_load_model_refuses_incomplete_or_foreign_files(exported: Path, tmp_path: Path) -> None:
    shutil.copy(exported / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.json"):
        load_model(tmp_path / "model.safetensors")
    (tmp_path / "model.json").write_text(json.dumps({"format": "keras"}))
    with pytest.raises(UserError, match=r"not a crystalscope model\.json"):
        load_model(tmp_path)
    description = json.loads((exported / "model.json").read_text())
    description["architecture"]["backbone"] = "resnet34"
    (tmp_path / "model.json").write_text(json.dumps(description))
    with pytest.raises(UserError, match="does not fit"):
        load_model(tmp_path)


def test_int8_export_is_quantised_close_and_usable(trained_run: Path, tmp_path: Path) -> None:
    from crystalscope.data.decoded import build_cache
    from crystalscope.export.stage import int8_comparison
    from crystalscope.infer.predictor import load_predictor

    result = export_run(trained_run, tmp_path, ExportSettings(int8=True))
    int8_path = result.files["model.int8.onnx"]
    model = onnx.load(str(int8_path))
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)
    assert read_metadata(int8_path)["classes"] == ["cex", "pg"]
    assert result.int8 is not None and result.int8["images"] > 0
    # Every image of the run's splits (120): int8 must agree with fp32 almost everywhere.
    splits = Path(load_run(trained_run).config.data)
    items = [(p, 0) for p in sorted(splits.rglob("*.png"))]
    decoded = build_cache(items, load_run(trained_run).spec)
    change = int8_comparison(tmp_path / "model.onnx", int8_path, decoded.images,
                             decoded.labels)
    assert change["images"] == len(items) >= 100
    # A tiny 3-epoch model puts many images near 0.5, where int8's small changes may flip the
    # class; what quantisation must keep: small changes, and no flip of a clear decision.
    assert 0 < change["mean_abs_probability_difference"] <= 0.03
    assert change["max_abs_probability_difference"] < 0.5
    assert change["most_confident_change"] < 0.8
    assert change["class_changes"] == round((1 - change["same_class"]) * len(items))
    predictor = load_predictor(int8_path)
    assert predictor.classes == ["cex", "pg"] and predictor.input_size == 32
