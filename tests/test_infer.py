"""predict: the same probabilities as evaluate, every output format, foreign ONNX models with
their own preprocessing, streaming, and clear errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crystalscope.cli import main
from crystalscope.errors import UserError
from crystalscope.infer import stream
from crystalscope.infer.predictor import Preprocessing, load_predictor, to_probabilities
from crystalscope.infer.stream import predict_stream
from crystalscope.model.spec import ModelSpec, decode
from crystalscope.unknown.quality import REASONS as GATE_REASONS


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


@pytest.mark.parametrize("backend", ["onnx", "openvino", "torch"])
def test_predictions_equal_the_evaluate_stage(exported_run: Path, backend: str) -> None:
    report = json.loads((exported_run / "report.json").read_text())
    expected = {row["path"]: row["probabilities"] for row in report["predictions"]}
    predictor = load_predictor(exported_run, backend=backend)  # type: ignore[arg-type]
    results = list(predict_stream(predictor, [Path(p) for p in expected], batch_size=5))
    assert len(results) == len(expected)
    for result in results:
        want = [expected[str(result.path)][c] for c in predictor.classes]
        assert np.abs(result.probabilities - want).max() <= 1e-4


def test_exported_files_predict_like_the_run(exported_run: Path) -> None:
    images = sorted((exported_run.parent.parent / "splits" / "test").rglob("*.png"))[:6]
    runs = [list(predict_stream(load_predictor(model, backend=backend), images))
            for model, backend in ((exported_run / "model.onnx", "onnx"),
                                   (exported_run / "model.safetensors", "torch"),
                                   (exported_run, "torch"))]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert np.abs(a.probabilities - b.probabilities).max() <= 1e-4


def test_openvino_runs_the_same_model_as_onnx_runtime(exported_run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from crystalscope.export.stage import ExportSettings, export_run

    images = sorted((exported_run.parent.parent / "splits").rglob("*.png"))[:19]  # 8 + 8 + 3
    fp32 = {backend: list(predict_stream(load_predictor(exported_run, backend=backend), images,
                                         batch_size=19)) for backend in ("onnx", "openvino")}
    for a, b in zip(fp32["onnx"], fp32["openvino"], strict=True):
        assert np.abs(a.probabilities - b.probabilities).max() <= 1e-4
        assert np.abs(a.embedding - b.embedding).max() <= 1e-3 * max(1, np.abs(a.embedding).max())
        assert a.unknown_score == pytest.approx(b.unknown_score, rel=1e-3, abs=1e-4)
    # int8: the two runtimes round differently, but run the same quantised model
    int8 = export_run(exported_run, tmp_path, ExportSettings(int8=True)).files["model.int8.onnx"]
    runs = [list(predict_stream(load_predictor(int8, backend=backend), images))
            for backend in ("onnx", "openvino")]
    for a, b in zip(*runs, strict=True):
        assert np.abs(a.probabilities - b.probabilities).max() <= 0.05
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # not installed
    with pytest.raises(UserError, match=r"pip install 'crystalscope\[openvino\]'"):
        load_predictor(exported_run, backend="openvino")


def test_output_formats_name_every_number(exported_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = exported_run.parent.parent / "splits" / "test"
    count = len(list(folder.rglob("*.png")))
    code, out, _ = _run_cli(["predict", str(exported_run), str(folder), "--format", "csv"],
                            capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == count
    assert list(rows[0]) == ["file", "predicted_class", "probability_of_predicted",
                             "probability_cex", "probability_pg", "unknown", "unknown_score",
                             "unknown_reason"]
    for row in rows:
        p = {"cex": float(row["probability_cex"]), "pg": float(row["probability_pg"])}
        assert row["predicted_class"] == max(p, key=p.get)  # type: ignore[arg-type]
        assert float(row["probability_of_predicted"]) == p[row["predicted_class"]]
        assert abs(sum(p.values()) - 1) < 1e-5
        reason, score = row["unknown_reason"], float(row["unknown_score"])
        assert row["unknown"] == ("yes" if reason else "no")
        assert reason in ("", "novel", *GATE_REASONS)
        assert (reason == "novel") == (score > 1 and reason not in GATE_REASONS)
    code, out, _ = _run_cli(["predict", str(exported_run), str(folder), "--format", "json"],
                            capsys)
    records = json.loads(out)
    assert [r["file"] for r in records] == [r["file"] for r in rows]
    assert [r["unknown"] for r in records] == [r["unknown"] == "yes" for r in rows]
    assert all(isinstance(r["unknown"], bool) for r in records)  # JSON true/false, not a word
    output = tmp_path / "p.jsonl"
    code, _, err = _run_cli(["predict", str(exported_run), str(folder), "--format", "jsonl",
                             "--output", str(output)], capsys)
    assert code == 0 and len(output.read_text().splitlines()) == count
    assert f"wrote {count} predictions" in err
    code, _, err = _run_cli(["predict", str(exported_run), str(folder), "--output",
                             str(output)], capsys)
    assert code == 2 and "exists" in err  # never overwritten
    code, out, err = _run_cli(["predict", str(exported_run), str(folder)], capsys)
    assert "probability_of_predicted" in out.splitlines()[0] and "sum to 1" in err


def test_unreadable_files_are_listed_and_the_rest_predicted(
        exported_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = next((exported_run.parent.parent / "splits" / "test").rglob("*.png"))
    (tmp_path / "good.png").write_bytes(good.read_bytes())
    (tmp_path / "broken.png").write_bytes(good.read_bytes()[:100])
    (tmp_path / "empty.png").write_bytes(b"")
    code, out, err = _run_cli(["predict", str(exported_run), str(tmp_path), "--format",
                               "jsonl"], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [r.get("error") is None for r in records].count(True) == 1
    assert "broken.png" in err and "empty.png" in err and "2 of 3" in err


def test_bad_inputs_give_one_line(exported_run: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    image = next((exported_run.parent.parent / "splits" / "test").rglob("*.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.onnx").write_bytes(b"not onnx")
    for argv, expected in (
        (["predict", str(tmp_path / "nope"), str(image)], "no such model"),
        (["predict", str(image), str(image)], "not a model file"),
        (["predict", str(tmp_path / "fake.onnx"), str(image)], "not a loadable ONNX model"),
        (["predict", str(tmp_path), str(image)], "neither a run directory"),
        (["predict", str(exported_run), str(tmp_path / "empty")], "no images found"),
        (["predict", str(exported_run), str(tmp_path / "missing.png")], "no such file"),
        (["predict", str(exported_run), str(tmp_path / "*.tif")], "matches no files"),
    ):
        code, _, err = _run_cli(argv, capsys)
        assert code == 2, argv
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


class KerasLikeNet(torch.nn.Module):
    """NHWC input, caffe preprocessing expected, one sigmoid output (like the original's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weights = torch.nn.Parameter(torch.randn(3) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x.mean(dim=(1, 2)) * self.weights).sum(dim=1, keepdim=True)
        return torch.sigmoid(score)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, on purpose
def test_a_foreign_onnx_model_with_its_own_preprocessing(tmp_path: Path, samples: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    net = KerasLikeNet().eval()
    path = tmp_path / "keras_resnet.onnx"
    torch.onnx.export(net, (torch.zeros(1, 48, 48, 3),), str(path), dynamo=False,
                      input_names=["input_1"], output_names=["dense"],
                      dynamic_axes={"input_1": {0: "n"}, "dense": {0: "n"}})
    images = sorted(samples.glob("*.png"))[:4]
    for backend in ("onnx", "openvino"):
        code, out, _ = _run_cli(["predict", str(path), *map(str, images), "--format", "jsonl",
                                 "--input-size", "48", "--layout", "nhwc", "--preprocess",
                                 "caffe", "--classes", "cex,pg", "--outputs", "probabilities",
                                 "--backend", backend], capsys)
        assert code == 0
        for image, line in zip(images, out.splitlines(), strict=True):
            pixels, _, _ = decode(image, ModelSpec(48, ("a", "b")))  # (3, 48, 48) RGB
            bgr = pixels[::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68],
                                                             np.float32)[:, None, None]
            with torch.no_grad():
                p_pg = float(net(torch.from_numpy(bgr.transpose(1, 2, 0)[None].copy())))
            record = json.loads(line)
            assert "unknown" not in record and "unknown_score" not in record  # no detector
            assert record["probability_pg"] == pytest.approx(p_pg, abs=1e-5)
            assert record["probability_cex"] == pytest.approx(1 - p_pg, abs=1e-5)
    with pytest.raises(UserError, match="class names"):
        load_predictor(path, preprocessing=Preprocessing(input_size=48, layout="nhwc"))
    with pytest.raises(UserError, match=r"outputs: .* say what its output"):  # never guessed
        load_predictor(path, classes=["cex", "pg"],
                       preprocessing=Preprocessing(input_size=48, layout="nhwc"))
    code, _, err = _run_cli(["predict", str(path), str(images[0]), "--input-size", "48",
                             "--classes", "cex,pg", "--outputs", "logits", "--reject-unknown"],
                            capsys)
    assert code == 2 and "has no unknown-detector" in err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, on purpose
def test_a_foreign_model_with_a_fixed_batch_predicts_a_partial_last_batch(
        tmp_path: Path, samples: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = KerasLikeNet().eval()
    path = tmp_path / "fixed_batch.onnx"
    torch.onnx.export(net, (torch.zeros(4, 32, 32, 3),), str(path), dynamo=False,
                      input_names=["input_1"], output_names=["dense"])  # batch fixed at 4
    images = sorted(samples.glob("*.png"))[:6]  # one run of 4, then 2 (padded to 4)
    lines = {}
    for backend in ("onnx", "openvino"):
        code, out, err = _run_cli(["predict", str(path), *map(str, images), "--format",
                                   "jsonl", "--input-size", "32", "--layout", "nhwc",
                                   "--classes", "cex,pg", "--outputs", "probabilities",
                                   "--backend", backend], capsys)
        assert code == 0, err
        lines[backend] = [json.loads(line)["probability_pg"] for line in out.splitlines()]
        assert len(lines[backend]) == len(images)
    assert lines["onnx"] == pytest.approx(lines["openvino"], abs=1e-5)


def test_prediction_streams_a_batch_at_a_time(exported_run: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (20, 20), "gray").save(image)
    decoded = []
    real = stream.decode

    def counting(path: Path, spec: ModelSpec) -> tuple[np.ndarray, int, int]:
        decoded.append(path)
        return real(path, spec)

    monkeypatch.setattr(stream, "decode", counting)
    predictor = load_predictor(exported_run)
    results = predict_stream(predictor, [image] * 10_000, batch_size=16)
    next(results)
    # 10,000 images asked for: the first batch decoded, and the next decoding meanwhile
    assert 16 <= len(decoded) <= 32
    results.close()


@pytest.mark.parametrize("kind", ["probabilities", "logits"])
def test_an_images_probabilities_do_not_depend_on_its_batch_mates(kind: str) -> None:
    # The old per-batch guess took a batch of sigmoid outputs for logits as soon as one value
    # fell outside 0..1, and a softmax row for raw scores when another row did not sum to 1.
    one = np.array([[0.3]])  # as a logit it lies in 0..1 too: the old guess took it for a p
    mates = np.array([[0.9], [0.1]]) if kind == "probabilities" else np.array([[2.5], [-3.0]])
    alone = to_probabilities(one, 2, kind)
    together = to_probabilities(np.vstack([one, mates]), 2, kind)
    assert together[0] == pytest.approx(alone[0])
    rows = np.array([[2.0, -1.0, 0.5]])
    mate = np.array([[0.2, 0.3, 0.5]])  # sums to 1 and is >= 0: looks like probabilities
    assert to_probabilities(np.vstack([rows, mate]), 3, kind)[0] == pytest.approx(
        to_probabilities(rows, 3, kind)[0])
    if kind == "logits":
        assert to_probabilities(one, 2, kind)[0, 1] == pytest.approx(1 / (1 + np.exp(-0.3)))
        expected = np.exp(rows[0]) / np.exp(rows[0]).sum()
        assert to_probabilities(rows, 3, kind)[0] == pytest.approx(expected)


def test_our_export_says_its_output_is_probabilities(exported_run: Path) -> None:
    from crystalscope.export.metadata import read_metadata

    assert read_metadata(exported_run / "model.onnx")["outputs"] == "probabilities"
    assert load_predictor(exported_run).outputs == "probabilities"
