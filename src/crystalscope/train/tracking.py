"""Where a run's numbers go besides ``metrics.csv``: Lightning's CSV and TensorBoard loggers,
MLflow and Weights & Biases (``train --logger``, several allowed).

- MLflow (Lightning's ``MLFlowLogger``): by default a local store inside the runs folder
  (``<runs>/mlflow.db``, SQLite, artifacts in ``<runs>/mlartifacts``); ``--tracking-uri`` for a
  server. The resolved train settings are the run's params, every per-class metric is logged
  per epoch, and after evaluation and export the report, the plots and the exported model are
  the run's artifacts. ``export --register NAME`` adds the ONNX model to the model registry.
- W&B (``WandbLogger``): offline (files under the run folder, ``wandb sync`` later) when no API
  key is set (``WANDB_API_KEY`` or ``wandb login``).

``tracking.json`` in the run folder records which MLflow / W&B run it is, so ``--resume`` and
``export --register`` continue that run.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
from pathlib import Path
from typing import Any

from crystalscope.errors import UserError
from crystalscope.model.spec import RunLayout

LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")
DEFAULT_LOGGERS = ("csv", "tensorboard")
EXPERIMENT = "crystalscope"
PLOTS = ("confusion_matrix.png", "curves.png", "errors.png", "roc.png", "reliability.png")


def default_tracking_uri(runs_dir: Path) -> str:
    """The local MLflow store of a runs folder: ``sqlite:///<runs>/mlflow.db``."""
    return "sqlite:///" + (Path(runs_dir).resolve() / "mlflow.db").as_posix()


def _require(module: str) -> None:
    """A missing tracking library: the extras message (cli/app.py), not a traceback."""
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def read_tracking(run_dir: Path) -> dict[str, Any]:
    """The run's ``tracking.json`` (empty when it has none)."""
    path = RunLayout(Path(run_dir)).tracking
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def wandb_has_key() -> bool:
    """Whether W&B can go online: WANDB_API_KEY, or api.wandb.ai in ~/.netrc (wandb login)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_loggers(names: list[str], run_dir: Path, *, tracking_uri: str | None,
                 resuming: bool, version: str) -> list:
    """Lightning loggers for ``names``; a resumed run continues its MLflow and W&B runs."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list = []
    known = read_tracking(run_dir) if resuming else {}
    if "csv" in names:
        loggers.append(CSVLogger(run_dir, name="logs", version=version))
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    if "mlflow" in names:
        _require("mlflow")
        from lightning.pytorch.loggers import MLFlowLogger

        previous = known.get("mlflow", {})
        uri = previous.get("tracking_uri") or tracking_uri or default_tracking_uri(run_dir.parent)
        local = uri.startswith("sqlite:///") and tracking_uri is None
        loggers.append(MLFlowLogger(
            experiment_name=EXPERIMENT, run_name=run_dir.name, tracking_uri=uri,
            run_id=previous.get("run_id"), tags={"crystalscope.run_dir": str(run_dir.resolve())},
            artifact_location=(run_dir.parent / "mlartifacts").resolve().as_uri()
            if local else None))
    if "wandb" in names:
        _require("wandb")
        from lightning.pytorch.loggers import WandbLogger

        previous = known.get("wandb", {})
        loggers.append(WandbLogger(project=EXPERIMENT, name=run_dir.name, save_dir=str(run_dir),
                                   offline=not wandb_has_key(), id=previous.get("id"),
                                   resume="allow" if previous.get("id") else None))
    return loggers


def flat_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as params: lists joined by commas, None as "none" (MLflow keeps text)."""
    return {k: ",".join(map(str, v)) if isinstance(v, list | tuple) else
            ("none" if v is None else v) for k, v in settings.items()}


def start_tracking(loggers: list, run_dir: Path, settings: dict[str, Any]) -> None:
    """Log the resolved settings to every logger; write tracking.json (MLflow and W&B ids)."""
    params = flat_settings(settings)
    record: dict[str, Any] = {}
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "MLFlowLogger":
            already = logger.experiment.get_run(logger.run_id).data.params
            logger.log_hyperparams({k: v for k, v in params.items() if k not in already})
            record["mlflow"] = {"tracking_uri": logger._tracking_uri, "run_id": logger.run_id,
                                "experiment_id": logger.experiment_id}
        elif kind == "WandbLogger":
            logger.log_hyperparams(params)
            experiment = logger.experiment
            record["wandb"] = {"id": experiment.id, "project": EXPERIMENT,
                               "offline": bool(getattr(experiment, "offline", False)) or (
                                   experiment.settings.mode == "offline"),
                               "dir": str(Path(experiment.dir).parent)}
        else:
            logger.log_hyperparams(params)
    if record:
        RunLayout(Path(run_dir)).tracking.write_text(json.dumps(record, indent=2),
                                                   encoding="utf-8")


def run_files(run_dir: Path) -> dict[str, list[Path]]:
    """The run folder's report, plots and exported model files that exist, by the artifact
    folder they go to."""
    layout = RunLayout(Path(run_dir))
    groups = {"report": [layout.report_text, layout.report, layout.config, layout.metrics],
              "plots": [Path(run_dir) / name for name in PLOTS],
              "model": list(layout.exported)}
    return {folder: [p for p in paths if p.is_file()] for folder, paths in groups.items()}


def finish_tracking(loggers: list, run_dir: Path) -> None:
    """After evaluation and export: the report, plots and model as artifacts; close W&B."""
    files = run_files(run_dir)
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "MLFlowLogger":
            for folder, paths in files.items():
                for path in paths:
                    logger.experiment.log_artifact(logger.run_id, str(path), folder)
        elif kind == "WandbLogger":
            import wandb

            artifact = wandb.Artifact(name=f"{run_dir.name}-files", type="model")
            for folder, paths in files.items():
                for path in paths:
                    artifact.add_file(str(path), name=f"{folder}/{path.name}")
            logger.experiment.log_artifact(artifact)
            logger.experiment.finish()


def register_model(run_dir: Path, model_dir: Path, name: str,
                   tracking_uri: str | None = None) -> tuple[str, str]:
    """Register the export in ``model_dir`` as a new version of MLflow model ``name``: its
    files become the ``model`` artifacts of the run's MLflow run (a new run when it was trained
    without ``--logger mlflow``). Returns (version, the tracking URI)."""
    _require("mlflow")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    previous = read_tracking(run_dir).get("mlflow", {})
    uri = tracking_uri or previous.get("tracking_uri") or default_tracking_uri(run_dir.parent)
    layout = RunLayout(Path(model_dir))
    paths = run_files(model_dir)["model"]
    if not layout.onnx.is_file():
        raise UserError(f"{model_dir}: holds no exported ONNX model to register")
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
        if run_id is None:
            experiment = client.get_experiment_by_name(EXPERIMENT)
            experiment_id = (experiment.experiment_id if experiment else client.create_experiment(
                EXPERIMENT, artifact_location=(run_dir.parent / "mlartifacts").resolve().as_uri()
                if tracking_uri is None else None))
            run_id = client.create_run(experiment_id, run_name=f"{run_dir.name}-export").info.run_id
            client.set_terminated(run_id)
        for path in paths:
            client.log_artifact(run_id, str(path), "model")
        try:
            client.get_registered_model(name)
        except MlflowException:  # not there yet
            client.create_registered_model(name, description="crystalscope ONNX model "
                                           "(model.onnx with model.json and its card)")
        description = json.loads(layout.model_json.read_text(encoding="utf-8"))
        version = client.create_model_version(
            name, source=f"runs:/{run_id}/model", run_id=run_id,
            tags={"format": "onnx", "export_id": description.get("export_id", ""),
                  "classes": ",".join(description.get("classes", []))})
    except MlflowException as exc:
        raise UserError(f"could not register {name} in MLflow at {uri} "
                        f"({str(exc).splitlines()[0][:200]})") from exc
    return str(version.version), uri
