"""Tracking: a real run logged to MLflow (the local SQLite store, read back with MLflow's own
client, no server) and to W&B offline, and the export registered in MLflow's registry."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from crystalscope.config import resolve_train_config
from crystalscope.data.split import split_dataset
from crystalscope.settings import SettingsError
from crystalscope.train.tracking import default_tracking_uri, register_model

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def tracked_run(synthetic_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained with --logger csv,mlflow,wandb (W&B offline: no key, no ~/.netrc)."""
    from crystalscope.train.run import train

    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WANDB_API_KEY", raising=False)
        patch.setenv("HOME", str(root))  # no ~/.netrc with a W&B key
        patch.setenv("WANDB_SILENT", "true")
        split_dataset(synthetic_set, root / "splits", workers=1)
        config = resolve_train_config({
            "data": root / "splits", "runs_dir": root / "runs", "name": "tracked",
            "model": "resnet18", "weights": "none", "image_size": 32, "batch_size": 16,
            "epochs": 2, "f1_threshold": 1.0, "accelerator": "cpu", "devices": "1",
            "logger": ["csv,mlflow", "wandb"]})
        return train(config, quiet=True).run_dir


def test_mlflow_holds_the_settings_every_epochs_metrics_and_the_files(tracked_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    tracking = json.loads((tracked_run / "tracking.json").read_text())
    uri = tracking["mlflow"]["tracking_uri"]
    assert uri == default_tracking_uri(tracked_run.parent)  # the store inside the runs folder
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracking["mlflow"]["run_id"])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == "resnet18" and params["image_size"] == "32"
    assert params["logger"] == "csv,mlflow,wandb" and params["recipe"] == "fast"
    with (tracked_run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for name in ("val_f1_cex", "val_f1_pg", "val_recall_pg", "val_precision_cex",
                 "train_f1_pg", "val_loss"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.value for m in history] == pytest.approx([float(r[name]) for r in rows],
                                                           abs=1e-6), name
    artifacts = {f.path for folder in ("report", "plots", "model")
                 for f in client.list_artifacts(run.info.run_id, folder)}
    for expected in ("report/report.json", "report/config.yaml", "plots/roc.png",
                     "model/model.onnx", "model/model.json", "model/README.md"):
        assert expected in artifacts
    local = Path(client.download_artifacts(run.info.run_id, "model/model.onnx"))
    assert local.read_bytes() == (tracked_run / "model.onnx").read_bytes()


def test_wandb_ran_offline_inside_the_run_folder(tracked_run: Path) -> None:
    tracking = json.loads((tracked_run / "tracking.json").read_text())["wandb"]
    assert tracking["offline"] is True
    runs = list((tracked_run / "wandb").glob(f"offline-run-*-{tracking['id']}"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the run's record, for `wandb sync`


def test_export_register_adds_versions_in_the_runs_mlflow_run(tracked_run: Path,
                                                               tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from crystalscope.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tracked_run), "--register", "cex-pg"])
    assert exit_info.value.code in (0, None)
    tracking = json.loads((tracked_run / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    version, _ = register_model(tracked_run, tracked_run, "cex-pg")
    assert version == "2"
    versions = sorted(client.search_model_versions("name = 'cex-pg'"),
                      key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    exported = json.loads((tracked_run / "model.json").read_text())
    assert all(v.run_id == tracking["run_id"] for v in versions)
    assert versions[-1].tags["export_id"] == exported["export_id"]
    assert versions[-1].tags["format"] == "onnx"
    files = Path(mlflow.artifacts.download_artifacts(f"models:/cex-pg/{versions[-1].version}",
                                                     tracking_uri=tracking["tracking_uri"]))
    assert (files / "model.onnx").read_bytes() == (tracked_run / "model.onnx").read_bytes()


def test_a_run_without_mlflow_registers_into_a_new_run(exported_run: Path,
                                                       tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = Path(shutil.copytree(exported_run, tmp_path / "runs" / "plain"))
    version, uri = register_model(run, run, "plain-model")
    assert version == "1" and uri == default_tracking_uri(tmp_path / "runs")
    (model,) = MlflowClient(tracking_uri=uri).search_model_versions("name = 'plain-model'")
    assert MlflowClient(tracking_uri=uri).get_run(model.run_id).info.run_name == "plain-export"


def test_logger_names_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from crystalscope.cli.app import main

    with pytest.raises(SettingsError, match="logger"):
        resolve_train_config({"data": Path("x"), "model": "resnet18", "logger": "mlflow,neptune"})
    with pytest.raises(SystemExit) as exit_info:  # the option, repeated, from the command line
        main(["train", str(tmp_path), "--logger", "mlflow", "--logger", "neptune"])
    said = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--logger" in said and "neptune" in said
    assert "Traceback" not in said
