"""The unknown-detector: its pieces against independent references, its calibration, and how
predict and monitor use it."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from scipy.spatial.distance import mahalanobis
from scipy.stats import binom, norm

from crystalscope.cli import main
from crystalscope.errors import UserError
from crystalscope.infer.predictor import load_predictor
from crystalscope.infer.stream import ImageResult, predict_stream
from crystalscope.monitor.run import Monitor, replay
from crystalscope.monitor.trend import UNKNOWN, AlarmRule, Trend
from crystalscope.synth.crops import SynthSettings, synthesize
from crystalscope.synth.unknown import (
    KINDS,
    NATURAL_IMAGES,
    UnknownSettings,
    parse_kinds,
    synthesize_unknown,
)
from crystalscope.unknown.calibration import conformal_threshold
from crystalscope.unknown.detector import load_detector
from crystalscope.unknown.scores import GaussianDistance, knn_distance


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


# ------------------------------------------------------------------------------ the pieces


def test_gaussian_distance_is_the_mahalanobis_distance_to_the_nearest_class() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(4, 4))
    labels = np.repeat([0, 1], 300)
    features = rng.normal(size=(600, 4)) @ mixing + np.where(labels[:, None] == 0, 0.0, 3.0)
    distance = GaussianDistance.fit(features, labels)
    means = [features[labels == c].mean(axis=0) for c in (0, 1)]
    centred = features - np.stack(means)[labels]
    inverse = np.linalg.inv(centred.T @ centred / (len(features) - 2))  # shared covariance
    queries = rng.normal(size=(20, 4)) * 3
    expected = [min(mahalanobis(q, m, inverse) for m in means) for q in queries]
    np.testing.assert_allclose(distance(queries), expected, rtol=1e-6)


def test_more_features_than_images_uses_the_leading_eigenvectors_and_a_residual() -> None:
    # The path used in practice: a stage has more channels (x2 statistics) than the training
    # split has images. Reference: the pooled covariance's eigendecomposition (scipy's eigh,
    # not the SVD the code uses), the Mahalanobis distance inside its top-K eigenvectors and
    # the length of the rest.
    from scipy.linalg import eigh

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], 20)
    features = rng.normal(size=(60, 300)) @ rng.normal(size=(300, 300)) / 10
    features += rng.normal(size=(3, 300))[labels] * 2
    for k in (20, 256):
        distance = GaussianDistance.fit(features, labels, max_components=k)
        means = np.stack([features[labels == c].mean(axis=0) for c in range(3)])
        centred = features - means[labels]
        covariance = centred.T @ centred / (len(features) - 3)
        values, vectors = eigh(covariance)
        keep = min(k, len(features) - 3)  # rank: N - C
        values, vectors = values[::-1][:keep], vectors[:, ::-1][:, :keep]
        assert len(distance.variances) == keep
        np.testing.assert_allclose(distance.variances, values, rtol=1e-8)
        queries = rng.normal(size=(10, 300)) + features[:10]
        expected = [min(np.sqrt(np.sum(((q - m) @ vectors) ** 2 / values)) for m in means)
                    for q in queries]
        np.testing.assert_allclose(distance(queries), expected, rtol=1e-6)
        origin = centred.mean(axis=0)  # zero up to rounding: each class is centred
        rest = (queries - origin) - (queries - origin) @ vectors @ vectors.T
        np.testing.assert_allclose(distance.residual(queries), np.linalg.norm(rest, axis=1),
                                   rtol=1e-6)


def test_knn_distance_matches_a_sorted_brute_force() -> None:
    rng = np.random.default_rng(1)
    bank, queries = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    unit = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    for k in (1, 5):
        expected = [1 - np.sort(unit @ (q / np.linalg.norm(q)))[-k] for q in queries]
        np.testing.assert_allclose(knn_distance(bank, queries, k), expected, rtol=1e-9)


def test_a_large_validation_split_sets_the_threshold_on_all_but_200_images() -> None:
    # The threshold's scatter shrinks with the calibration set: 200 images set the scale, every
    # other one the threshold (>= 500 wherever the split holds 700).
    # The one-part appearance score needs no scale: every crop of its bank (training and
    # validation) sets the threshold, scored leave-one-out.
    from crystalscope.unknown.detector import APPEARANCE, SCALING_IMAGES, STAGES, fit_detector

    rng = np.random.default_rng(4)
    train = rng.normal(size=(300, 6))
    for n, scaling in ((20, 10), (81, 40), (1200, SCALING_IMAGES)):
        valid = rng.normal(size=(n, 6))
        probabilities = np.full((n, 2), 0.5)
        detector = fit_detector(train, np.arange(300) % 2, valid, probabilities, [6], 0.01,
                                method=STAGES)
        calibration = detector.calibration
        assert calibration["scaling_images"] == scaling
        assert calibration["calibration_images"] == n - scaling
    assert calibration["false_reject_bound"] <= 0.01  # 1,000 calibration images hold 1%
    crops = rng.integers(0, 256, (340, 3, 16, 16), dtype=np.uint8)
    detector = fit_detector(train, np.arange(300) % 2, valid[:40], probabilities[:40], [6],
                            0.01, method=APPEARANCE, train_images=crops[:300],
                            valid_images=crops[300:])
    assert detector.calibration["scaling_images"] == 0
    assert detector.calibration["calibration_images"] == 340
    assert detector.calibration["bank_images"] == 340


def test_the_report_carries_the_measured_rate(exported_run: Path) -> None:
    # train evaluates before it exports: the export adds the detector's line to the test
    # split's report; a later evaluate measures it on the images it evaluates.
    from crystalscope.evaluate.stage import evaluate_run

    described = json.loads((exported_run / "model.json").read_text())["unknown_detector"]
    measured = described["calibration"]["test_false_reject"]
    report = json.loads((exported_run / "report.json").read_text())
    # (another test may evaluate the run again: the same images, the same counts)
    assert {**report["unknown_detector"], "split": "test"} == measured
    text = (exported_run / "report.txt").read_text()
    assert text.count("unknown-detector:") == 1
    assert f"{measured['rejected']} of {measured['images']} crystals called unknown" in text
    again = evaluate_run(exported_run, out_dir=exported_run / "evaluations" / "again")
    assert again.report["unknown_detector"]["images"] == measured["images"]
    assert again.report["unknown_detector"]["rejected"] == measured["rejected"]
    assert "unknown-detector:" in (exported_run / "evaluations" / "again" / "report.txt"
                                   ).read_text()


def test_the_false_reject_rate_is_measured_on_the_test_split(exported_run: Path) -> None:
    from scipy.stats import binomtest

    described = json.loads((exported_run / "model.json").read_text())["unknown_detector"]
    measured = described["calibration"]["test_false_reject"]
    test = sorted((exported_run.parent.parent / "splits" / "test").rglob("*.png"))
    assert measured["split"] == "test" and measured["images"] == len(test)
    interval = binomtest(measured["rejected"], measured["images"]).proportion_ci(
        0.95, method="exact")
    assert measured["interval"] == pytest.approx([interval.low, interval.high])
    assert measured["rate"] == pytest.approx(measured["rejected"] / measured["images"])
    assert sum(measured["by_reason"].values()) == measured["rejected"]
    # predict decides the same images unknown (ONNX vs torch: a borderline score may flip)
    flagged = sum(bool(r.unknown) for r in predict_stream(load_predictor(exported_run), test))
    assert abs(flagged - measured["rejected"]) <= 1


def test_conformal_threshold_holds_its_rate_on_average() -> None:
    # Exchangeable N(0,1) scores: the exact false-reject rate of a threshold t is 1 - Φ(t);
    # averaged over calibration sets it must equal the promised bound (here exactly 1%).
    rng = np.random.default_rng(2)
    rates, bounds = [], set()
    for _ in range(2000):
        threshold, bound = conformal_threshold(rng.normal(size=199), 0.01)
        rates.append(norm.sf(threshold))
        bounds.add(round(bound, 12))
    assert bounds == {0.01}
    assert np.mean(rates) == pytest.approx(0.01, abs=0.001)
    small, bound = conformal_threshold(np.arange(40.0), 0.01)  # too few for 1%: the largest
    assert small == 39.0 and bound == pytest.approx(1 / 41)
    with pytest.raises(UserError, match="false_reject"):  # the CLI says --false-reject
        conformal_threshold(np.arange(10.0), 0)


# ----------------------------------------------------------------------- synthetic unknowns


def test_synth_unknown_writes_each_kind_the_same_way_every_time(tmp_path: Path) -> None:
    for name in ("a", "b"):
        synthesize_unknown(tmp_path / name, UnknownSettings(per_kind=2, size=48, seed=4),
                           workers=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 2 * len(KINDS)
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    empty = np.asarray(Image.open(tmp_path / "a" / "empty" / "empty-0001.png"), np.float64)
    cube = np.asarray(Image.open(tmp_path / "a" / "cube" / "cube-0001.png"), np.float64)
    assert empty.std() < cube.std()  # nothing in front of the probe vs bright faceted cubes
    written = json.loads((tmp_path / "a" / "unknown.json").read_text(encoding="utf-8"))
    naturals = [f.as_posix() for f in files if f.parts[0] == "natural"]
    assert sorted(written["sources"]) == naturals  # each photograph piece says its photo
    assert set(written["sources"].values()) <= set(NATURAL_IMAGES)
    assert parse_kinds("near") == ("bubble", "empty", "defocus", "cube")
    with pytest.raises(UserError, match="not one of"):
        parse_kinds("bubble,cat")
    with pytest.raises(UserError, match="not an empty folder"):
        synthesize_unknown(tmp_path / "a", UnknownSettings(per_kind=1))


# ----------------------------------------------------- a trained model (pg_detector fixture)


@pytest.fixture(scope="module")
def unknown_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The scikit-image cat (the original project's model called it PG) and blank frames."""
    folder = tmp_path_factory.mktemp("unknown-images")
    Image.fromarray(skimage.data.chelsea()).save(folder / "cat.png")
    Image.fromarray(np.full((96, 96), 60, np.uint8)).save(folder / "blank-dark.png")
    Image.fromarray(np.full((151, 151), 200, np.uint8)).save(folder / "blank-bright.png")
    return {p.stem: p for p in folder.glob("*.png")}


def test_unknown_flags_follow_the_score_and_reject_unknown_follows_the_flags(
        pg_detector: Path, unknown_images: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # What the code guarantees, whatever a small model's training gave: unknown == score > 1,
    # forced classes without --reject-unknown, the class "unknown" with it, and the count.
    description = json.loads((pg_detector / "model.json").read_text())
    assert description["unknown_detector"]["method"] == "appearance-knn"
    assert (pg_detector / "unknown.safetensors").is_file()
    crystals = sorted((pg_detector.parent.parent / "splits" / "test").rglob("*.png"))[:6]
    paths = [str(p) for p in [*unknown_images.values(), *crystals]]
    code, out, err = _run_cli(["predict", str(pg_detector), *paths, "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == len(paths)
    flagged = [row["file"] for row in rows if row["unknown"] == "yes"]
    for row in rows:
        gated = row["unknown_reason"] in ("empty", "blurred", "saturated")
        assert (row["unknown"] == "yes") == (float(row["unknown_score"]) > 1 or gated), row
        assert (row["unknown_reason"] == "novel") == (float(row["unknown_score"]) > 1
                                                      and not gated), row
        assert row["predicted_class"] in ("cex", "pg")  # forced, without --reject-unknown
    assert f"{len(flagged)} of {len(paths)} images unknown" in err or not flagged
    code, out, _ = _run_cli(["predict", str(pg_detector), *paths, "--format", "jsonl",
                             "--reject-unknown"], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    for record in records:
        rejected = record["predicted_class"] == "unknown"
        assert rejected == (record["file"] in flagged) == record["unknown"]
        assert (record["probability_of_predicted"] is None) == rejected


def test_a_photograph_scores_above_the_crystals_and_a_blank_frame_is_empty(
        pg_detector: Path, unknown_images: dict) -> None:
    # Far out of distribution (AUROC ~0.99 in benchmarks/unknown.py): the cat scores above every
    # in-distribution test crop. Whether it crosses the line depends on the calibration: with
    # this fixture's 120 validation crops the 1% threshold is their largest score. A frame
    # without a single edge is empty whatever the limits (the gate's guarantee).
    predictor = load_predictor(pg_detector)
    crystals = sorted((pg_detector.parent.parent / "splits" / "test").rglob("*.png"))
    scores = [r.unknown_score for r in predict_stream(predictor, crystals)
              if isinstance(r, ImageResult)]
    cat = next(r for r in predict_stream(predictor, [unknown_images["cat"]])
               if isinstance(r, ImageResult))
    assert cat.unknown_score > max(scores), (cat.unknown_score, max(scores))
    blanks = [r for r in predict_stream(predictor, [unknown_images["blank-dark"],
                                                    unknown_images["blank-bright"]])
              if isinstance(r, ImageResult)]
    assert [(r.unknown, r.unknown_reason) for r in blanks] == [(True, "empty")] * 2


def test_onnx_and_torch_give_the_same_unknown_scores(pg_detector: Path,
                                                 unknown_images: dict) -> None:
    images = [*sorted((pg_detector.parent.parent / "splits" / "test").rglob("*.png"))[:6],
              *unknown_images.values()]
    onnx = list(predict_stream(load_predictor(pg_detector), images))
    torch_ = list(predict_stream(load_predictor(pg_detector, backend="torch"), images))
    for a, b in zip(onnx, torch_, strict=True):
        assert isinstance(a, ImageResult) and isinstance(b, ImageResult)
        assert a.unknown_score == pytest.approx(b.unknown_score, rel=1e-3)


def test_the_calibration_holds_on_fresh_crystals(pg_detector: Path, tmp_path: Path) -> None:
    # The same simulator, a new seed: in-distribution crystals the model never saw.
    synthesize(tmp_path / "fresh", SynthSettings(per_class=150, size=96, difficulty=0.0,
                                                 seed=1234), workers=2)
    predictor = load_predictor(pg_detector)
    results = [r for r in predict_stream(predictor, sorted((tmp_path / "fresh").rglob("*.png")))
               if isinstance(r, ImageResult)]
    rejected = sum(bool(r.unknown) for r in results)
    detector = load_detector(pg_detector / "model.json")
    assert detector is not None
    bound = detector.calibration["false_reject_bound"]
    # Not more rejections than the calibrated bound explains (one-sided binomial, 0.1%).
    assert binom.sf(rejected - 1, len(results), bound) > 1e-3, (rejected, len(results), bound)


def test_export_without_the_training_data_leaves_no_detector(pg_detector: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    run = Path(shutil.copytree(pg_detector, tmp_path / "run"))
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(pg_detector.parent.parent / "splits"),
                                                    str(tmp_path / "gone")))
    code, _, err = _run_cli(["export", str(run)], capsys)
    assert code == 0 and "no unknown-detector" in err
    assert not (run / "unknown.safetensors").exists()
    assert "unknown_detector" not in json.loads((run / "model.json").read_text())
    assert load_predictor(run).unknown_detector is None


# ------------------------------------------------------------------------------- monitor


def test_trend_keeps_unknowns_out_of_the_impurity_share() -> None:
    trend = Trend(["cex", "pg"], AlarmRule("pg", 0.05, alpha=1e-3, consecutive=2,
                                           unknown_rate=0.01))
    calls = ["cex"] * 18 + ["pg"] * 2 + [UNKNOWN] * 20
    first = trend.add(1, "t1", calls)
    assert first.crops == 20 and first.fraction == pytest.approx(0.1)
    assert first.counts == {"cex": 18, "pg": 2} and first.unknown == 20
    assert first.unknown_fraction == pytest.approx(0.5)
    assert first.unknown_p_value == pytest.approx(binom.sf(19, 40, 0.01))
    assert not first.unknown_alarm  # one window is not yet an event
    second = trend.add(2, "t2", calls)
    assert second.unknown_alarm and not second.alarm
    assert not trend.add(3, "t3", calls).unknown_alarm  # one event per episode
    assert "UNKNOWN PARTICLES" in trend.explain_unknown_alarm(second)


def test_a_clean_simulated_batch_raises_no_unknown_particles(pg_detector: Path,
                                                                 tmp_path: Path) -> None:
    # A monitor sees crops of the kind its model learnt: `synth batch` draws them as `synth`
    # does (the demo once flagged 10-37% of clean crops, drawn at another size).
    from crystalscope.synth.batch import BatchSettings, synthesize_batch

    settings = BatchSettings(windows=8, per_window=30, onset=8, rate=0.01, size=96,
                             difficulty=0.0, seed=11)
    synthesize_batch(tmp_path / "batches", settings, workers=2)
    result = replay(Monitor(load_predictor(pg_detector), AlarmRule("pg", 0.05),
                            tmp_path / "out", say=lambda _: None),
                    tmp_path / "batches" / "control")
    unknown = sum(w.unknown for w in result.windows)
    total = unknown + sum(w.crops for w in result.windows)
    assert total == 8 * 30 and result.unknown_alarms == []
    detector = load_detector(pg_detector / "model.json")
    assert detector is not None
    bound = detector.calibration["false_reject_bound"]
    reasons = {r: sum(w.unknown_reasons.get(r, 0) for w in result.windows)
               for r in ("empty", "blurred", "saturated", "novel")}
    assert binom.sf(unknown - 1, total, bound) > 1e-3, (unknown, total, bound, reasons)


def test_monitor_counts_unknowns_apart_and_raises_unknown_particles(
        pg_detector: Path, tmp_path: Path) -> None:
    predictor = load_predictor(pg_detector)
    synthesize(tmp_path / "cex", SynthSettings(per_class=24, size=96, difficulty=0.0, seed=99),
               workers=1)
    synthesize_unknown(tmp_path / "odd",
                       UnknownSettings(per_kind=24, kinds=("empty", "natural"), size=96,
                                       seed=5),
                       workers=1)
    crystals = sorted((tmp_path / "cex" / "cex").glob("*.png"))
    odd = [r.path for r in predict_stream(predictor, sorted((tmp_path / "odd").rglob("*.png")))
           if isinstance(r, ImageResult) and r.unknown]
    assert len(odd) >= 8  # enough images the detector flags to make the point
    stream = tmp_path / "stream"
    for window in range(4):  # CEX crystals throughout; unknown particles from window 3 on
        folder = stream / f"t{window + 1:04d}"
        folder.mkdir(parents=True)
        for image in crystals[6 * window:6 * window + 6]:
            shutil.copy(image, folder / image.name)
        if window >= 2:
            for image in odd[:8]:
                shutil.copy(image, folder / f"odd-{image.parent.name}-{image.name}")
    result = replay(Monitor(predictor, AlarmRule("pg", 0.05), tmp_path / "out",
                            say=lambda _: None), stream)
    rows = list(csv.DictReader((tmp_path / "out" / "trend.csv").open(newline="")))
    flagged = [sum(bool(r.unknown) for r in predict_stream(predictor, sorted(folder.iterdir())))
               for folder in sorted(stream.iterdir())]
    assert [int(r["count_unknown"]) for r in rows] == flagged
    assert flagged[2] >= 8 and flagged[3] >= 8
    for row in rows:  # the share is taken over classified crystals only
        known = int(row["count_cex"]) + int(row["count_pg"])
        assert int(row["crops"]) == known
        assert float(row["fraction"]) == pytest.approx(int(row["count_pg"]) / known, abs=1e-6)
    assert [int(r["unknown_alarm"]) for r in rows] == [0, 0, 0, 1]
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").open()]
    alarms = [e for e in events if e["event"] == "unknown_particles"]
    assert len(alarms) == 1 and alarms[0]["window"] == 4
    assert result.alarm is None  # unknowns never move the PG alarm


def test_a_backbone_without_stages_gives_its_embedding_as_statistics() -> None:
    import torch

    from crystalscope.model.backbones import Classifier
    from crystalscope.model.inference import InferenceNet
    from crystalscope.model.spec import ModelSpec

    class Plain(torch.nn.Module):  # no timm forward_intermediates
        num_features = 4

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean(dim=(2, 3))

    net = InferenceNet(Classifier(Plain(), 2, "linear"), ModelSpec(16, ("a", "b"))).eval()
    images = torch.randint(0, 256, (3, 3, 16, 16)).float()
    with torch.inference_mode():
        probabilities, embedding, statistics = net(images)
    assert probabilities.shape == (3, 2)
    torch.testing.assert_close(statistics, embedding)


def test_a_backbone_that_declines_intermediates_falls_back_and_other_errors_surface() -> None:
    import torch

    from crystalscope.model.backbones import Classifier
    from crystalscope.model.inference import InferenceNet
    from crystalscope.model.spec import ModelSpec

    class Declines(torch.nn.Module):  # timm's way of saying "no stages for this model"
        num_features = 4
        error: type[Exception] = NotImplementedError

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean(dim=(2, 3))

        def forward_intermediates(self, x: torch.Tensor) -> None:
            raise self.error("no intermediates")

    backbone = Declines()
    net = InferenceNet(Classifier(backbone, 2, "linear"), ModelSpec(16, ("a", "b"))).eval()
    images = torch.randint(0, 256, (3, 3, 16, 16)).float()
    with torch.inference_mode():
        _, embedding, statistics = net(images)
    torch.testing.assert_close(statistics, embedding)
    backbone.error = RuntimeError  # a real failure is not mistaken for "no stages"
    with pytest.raises(RuntimeError, match="no intermediates"), torch.inference_mode():
        net(images)


def test_stage_statistics_are_channel_means_and_deviations(pg_detector: Path) -> None:
    import torch

    from crystalscope.model.inference import load_run

    net = load_run(pg_detector).net
    images = torch.randint(0, 256, (2, 3, 96, 96)).float()
    with torch.inference_mode():
        _, embedding, stages = net.stages(images)
        maps = net.classifier.backbone.forward_intermediates(net.normalize(images),
                                                             intermediates_only=True)
    assert len(stages) == len(maps)
    for stage, feature_map in zip(stages, maps, strict=True):
        flat = feature_map.flatten(2).numpy()
        np.testing.assert_allclose(stage.numpy(), np.concatenate(
            [flat.mean(axis=2), flat.std(axis=2)], axis=1), rtol=1e-4, atol=1e-5)
    # the final stage's means are the pooled embedding
    channels = maps[-1].shape[1]
    torch.testing.assert_close(stages[-1][:, :channels], embedding, rtol=1e-4, atol=1e-5)
