"""`crystalscope demo`: every stage on a small synthetic data set, on a laptop CPU, in minutes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from crystalscope.data.check import scan_dataset, summarize
from crystalscope.data.layout import split_path
from crystalscope.data.split import split_dataset
from crystalscope.data.split_settings import SplitSettings
from crystalscope.errors import UserError
from crystalscope.model.spec import RunLayout
from crystalscope.synth.crops import SynthSettings, synthesize

if TYPE_CHECKING:
    from crystalscope.infer.predictor import Predictor

# Small and fast: timm's ResNet-10-T (lighter than ResNet-18) from random weights at
# 64 px; small batches and a cosine schedule, because random weights need many steps and 240
# training crops give few. About 45 s of training on 2 cores (measured, see the README).
DEMO_TRAINING = {"model": "resnet10t", "weights": "none", "image_size": 64, "trainable": 1.0,
                 "batch_size": 16, "optimizer": "adamw", "lr": 2e-3, "scheduler": "cosine",
                 "augmentation": "dihedral", "epochs": 25, "f1_threshold": 0.99,
                 "accelerator": "cpu", "devices": "1"}


DEMO_PER_CLASS = 200
DEMO_RATIOS = "0.6,0.2,0.2"  # a test split that says something: 40 crops per class
DEMO_DIFFICULTY = 0.0


def run_demo(folder: Path, *, per_class: int = DEMO_PER_CLASS, seed: int = 0,
             say: Callable[[str], None] = print) -> dict[str, Path]:
    """Run synth -> data check -> split -> train under ``folder``; return what was written."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder}: is not empty; give a new folder for the demo")
    images, splits = folder / "images", folder / "splits"

    say(f"1/8 synth: {per_class} CEX and {per_class} PG crops (PG with rotated copies) -> {images}")
    synthesize(images, SynthSettings(per_class=per_class, difficulty=DEMO_DIFFICULTY,
                                     dihedral_copies=2, seed=seed))

    say(f"2/8 data check: {images}")
    report = summarize(scan_dataset(images))
    say(f"    {report['readable']} readable images, {len(report['duplicate_groups'])} duplicate "
        f"groups holding {report['duplicate_files']} extra copies, "
        f"{report['label_conflicts']} label conflicts")

    say(f"3/8 split 60/20/20, duplicate groups kept together -> {splits}")
    result = split_dataset(images, splits, SplitSettings(ratios=DEMO_RATIOS, seed=seed))
    for name, counts in result.report["counts"].items():
        say(f"    {name}: " + ", ".join(f"{split} {n}" for split, n in counts.items()))

    from crystalscope.config import resolve_train_config
    from crystalscope.evaluate.report import format_value
    from crystalscope.train.run import train

    say("4/8 train: ResNet-10-T (random init) at 64 px, until every class's validation F1 >= 0.99;"
        " then evaluate on the test split and export")
    config = resolve_train_config({"data": splits, "runs_dir": folder / "runs", "name": "demo",
                                   "seed": seed, **DEMO_TRAINING})
    result = train(config, quiet=True)
    say(f"    {result.epochs} epochs in {result.seconds:.0f} s, best validation macro F1 "
        f"{result.best_val_f1_macro:.4f}")
    written = {"images": images, "splits": splits, "manifest": splits / "manifest.csv",
               "run": result.run_dir, "metrics": RunLayout(result.run_dir).metrics}
    if result.evaluation is not None:
        report = result.evaluation.report
        say(f"    test: {report['images']} images, {report['misclassified']} misclassified, "
            f"macro F1 {format_value(report['macro']['f1']['value'])} (95% interval "
            + ", ".join(format_value(v) for v in report["macro"]["f1"]["ci95"]) + ")")
        report_text = RunLayout(result.evaluation.out_dir).report_text.name
        written.update({name: result.evaluation.files[name]
                        for name in (report_text, "confusion_matrix.png", "errors.png")})
    if result.export is not None:
        written.update(result.export.files)
        written.update(_predict_index_similar(result.run_dir, splits, folder, say))
        written.update(_explore_explain(result.run_dir, splits, folder, say))
        written.update(_monitor_batch(result.run_dir, folder, seed, say))
        say(f"next: label crops of your own, most informative first: crystalscope label "
            f"YOUR-CROPS/ --out labelled/ --classes cex,pg --model {result.run_dir}")
    return written


def _monitor_batch(run_dir: Path, folder: Path, seed: int,
                   say: Callable[[str], None]) -> dict[str, Path]:
    """Replay a simulated batch in which PG appears, with the alarm calibrated on a clean one."""
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.monitor.rule_setup import build_alarm_rule
    from crystalscope.monitor.run import Monitor, replay
    from crystalscope.monitor.settings import AlarmSettings
    from crystalscope.synth.batch import BatchSettings, synthesize_batch

    settings = BatchSettings(windows=24, per_window=24, onset=12, rate=0.06,
                             difficulty=DEMO_DIFFICULTY, seed=seed)
    batches = folder / "batches"
    summary = synthesize_batch(batches, settings)
    predictor = load_predictor(RunLayout(run_dir).onnx)
    rule = build_alarm_rule(predictor, run_dir,
                            AlarmSettings(positive="pg", calibrate=batches / "calibration"))
    result = replay(Monitor(predictor, rule, folder / "monitor", say=lambda _: None),
                    batches / "pg-batch")
    first_pg = summary["batches"]["pg-batch"]["first_pg_window"]
    say(f"8/8 monitor: simulated batch, PG from window {first_pg}; false-positive rate "
        f"{rule.false_positive_rate:.3f} measured on a clean batch; "
        + (f"alarm at window {result.alarm.index}" if result.alarm else "no alarm")
        + f" -> {folder / 'monitor' / 'timeline.png'}")
    return {"batches": batches, "timeline": result.files["timeline.png"]}


def _explore_explain(run_dir: Path, splits: Path, folder: Path,
                     say: Callable[[str], None]) -> dict[str, Path]:
    """Map the validation + test embeddings; class activation maps for a few test crops."""
    from crystalscope.data.layout import expand_paths
    from crystalscope.explore.explain import explain
    from crystalscope.explore.stage import explore
    from crystalscope.infer.predictor import load_predictor

    shown = expand_paths([split_path(splits, "valid"), split_path(splits, "test")])
    maps = explore(folder / "maps", predictor=load_predictor(RunLayout(run_dir).onnx),
                   files=shown, k=4)
    say(f"7/8 explore: {len(maps.points.paths)} images, {maps.projection.k} clusters (purity "
        + ", ".join(f"{c['purity']:.2f}" for c in maps.clusters) + f") -> {folder / 'maps'}")
    test_images = expand_paths([split_path(splits, "test")])
    crops = test_images[:2] + test_images[-2:]  # two of each class (folders sort by class)
    _, cams, _ = explain(run_dir, crops, folder / "cams")
    say(f"    explain: Grad-CAM and LayerCAM for {len(crops)} test crops -> "
        f"{cams['sheet.png']}")
    return {"map": maps.files["map.png"], "map.html": maps.files["map.html"],
            "graph.html": maps.files["graph.html"], "cams": cams["sheet.png"]}


def _predict_index_similar(run_dir: Path, splits: Path, folder: Path,
                           say: Callable[[str], None]) -> dict[str, Path]:
    """predict the test images, index train + valid, and ask for the neighbours of one."""
    from crystalscope.data.layout import expand_paths
    from crystalscope.infer.output import PredictionWriter
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.infer.stream import predict_stream
    from crystalscope.vectors.backends import open_store
    from crystalscope.vectors.indexing import find_similar, index_images, similar_html

    predictor = load_predictor(RunLayout(run_dir).onnx)
    test_images = expand_paths([split_path(splits, "test")])
    predictions = folder / "predictions.csv"
    with predictions.open("w", encoding="utf-8", newline="") as handle:
        writer = PredictionWriter(handle, "csv", predictor.classes,
                                  with_unknown=predictor.unknown_detector is not None)
        for item in predict_stream(predictor, test_images):
            writer.write(item)
        writer.close()
    say(f"5/8 predict (ONNX Runtime): {writer.count} test images -> {predictions}; "
        f"{writer.unknown} of them unknown")
    flagged = _flag_unknown(predictor, folder, say) if predictor.unknown_detector else None

    store = open_store(folder / "crystalscope.lance")
    try:
        indexed = index_images(predictor, expand_paths([split_path(splits, "train"),
                                              split_path(splits, "valid")]),
                               store)
        query, neighbours = find_similar(predictor, test_images[-1], store, 5)
    finally:
        store.close()
    page = folder / "similar.html"
    page.write_text(similar_html(query, neighbours, predictor.classes), encoding="utf-8")
    say(f"6/8 index {indexed.indexed} train + valid embeddings -> {folder / 'crystalscope.lance'};"
        f" nearest to {test_images[-1].name}: "
        + ", ".join(f"{Path(n.record.path).name} ({n.distance:.3f})" for n in neighbours[:3])
        + f" … -> {page}")
    written = {"predictions": predictions, "store": folder / "crystalscope.lance",
               "similar": page}
    return written | ({"unknown_images": flagged} if flagged else {})


def _flag_unknown(predictor: Predictor, folder: Path, say: Callable[[str], None]) -> Path:
    """predict --reject-unknown on images that are neither CEX nor PG."""
    from crystalscope.infer.output import PredictionWriter
    from crystalscope.infer.stream import ImageResult, predict_stream

    images = _unknown_images(folder / "unknown-images")
    flagged = folder / "unknown-images.csv"
    with flagged.open("w", encoding="utf-8", newline="") as handle:
        writer = PredictionWriter(handle, "csv", predictor.classes, with_unknown=True,
                                  reject_unknown=True)
        for item in predict_stream(predictor, images):
            writer.write(item)
            if isinstance(item, ImageResult):
                forced = predictor.classes[item.best]
                say(f"    {item.path.name}: " + (
                    f"unknown, {item.unknown_reason} (unknown_score {item.unknown_score:.1f}; "
                    f"forced, it would be {forced})" if item.unknown
                    else f"{forced} (unknown_score {item.unknown_score:.2f}, not flagged)"))
        writer.close()
    say(f"    unknown images: {writer.unknown} of {writer.count} flagged unknown -> {flagged}")
    return flagged


def _unknown_images(folder: Path) -> list[Path]:
    """The cat the original project's model called PG, a blank frame, a bubble and cubes."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from crystalscope.synth.unknown import UnknownSettings, synthesize_unknown

    synthesize_unknown(folder, UnknownSettings(per_kind=1, kinds=("bubble", "cube"), seed=1))
    Image.fromarray(skimage.data.chelsea()).save(folder / "cat.png")
    Image.fromarray(np.full((151, 151), 60, np.uint8)).save(folder / "blank-frame.png")
    return [folder / "cat.png", folder / "blank-frame.png", folder / "bubble" / "bubble-0001.png",
            folder / "cube" / "cube-0001.png"]
