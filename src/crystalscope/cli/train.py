"""`crystalscope train`, `evaluate` and `export`: a run from split folder to exported model."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel

from crystalscope.cli.app import app
from crystalscope.cli.options import AsJson, TtaOption
from crystalscope.config import TrainConfig
from crystalscope.console import err, out, progress_bar

if TYPE_CHECKING:
    from crystalscope.evaluate.stage import Evaluation

def _option_type(annotation: Any) -> Any:
    """The command-line type of a settings field: choices (Literal) are read as text and
    checked by the settings, with the same message as in a config file."""
    kind = annotation
    if get_origin(annotation) in (Union, UnionType):  # X | None: X
        kind = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(kind) is list:  # repeatable: --logger mlflow --logger wandb
        return list[str]
    return str if get_origin(kind) is Literal else kind


def setting_options(settings: type[BaseModel], skip: tuple[str, ...] = ()
                    ) -> list[inspect.Parameter]:
    """One ``--flag`` per field of ``settings`` (``--flag/--no-flag`` for a yes/no field),
    its description as help, ``None`` when not given (then the recipe or file decides)."""
    options = []
    for name, field in settings.model_fields.items():
        if name in skip:
            continue
        kind = _option_type(field.annotation)
        flag = name.replace("_", "-")
        declared = [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]
        shown = {"metavar": name.upper()} if get_origin(kind) is list else {}
        options.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[kind | None, typer.Option(*declared, help=field.description,
                                                           **shown)]))
    return options


def train(**given: Any) -> None:
    """Fine-tune a timm backbone on a split folder; write runs/<name>/.

    Every epoch prints precision, recall and F1 per class (train and valid) and appends a row
    to metrics.csv. Training stops when every class's validation F1 reaches --f1-threshold or
    the validation loss stops improving; the checkpoint with the best validation macro F1 is
    kept. Then the test split is used once (`crystalscope evaluate`) and the model exported
    (`crystalscope export`), unless --no-evaluate / --no-export.
    """
    from crystalscope.config import resolve_train_config
    from crystalscope.train.run import train as train_run

    config, resume, as_json = given.pop("config"), given.pop("resume"), given.pop("as_json")
    if resume is None and given["data"] is None:
        raise typer.BadParameter("give the split folder, or --resume RUN", param_hint="DATA")
    settings = None if resume is not None else resolve_train_config(given, config)
    result = train_run(settings, resume=resume)  # type: ignore[arg-type]
    if not result.primary:
        return  # a helper process of a DDP run: the first process reports
    summary = {"run": str(result.run_dir), "epochs": result.epochs,
               "best_val_f1_macro": result.best_val_f1_macro,
               "stopped_by_f1_threshold": result.stopped_by_f1, "seconds": round(result.seconds, 1),
               "test": ({"accuracy": result.evaluation.report["accuracy"],
                         "macro_f1": result.evaluation.report["macro"]["f1"],
                         "misclassified": result.evaluation.report["misclassified"]}
                        if result.evaluation else None),
               "exported": ({k: str(v) for k, v in result.export.files.items()}
                            if result.export else None),
               "notes": result.notes}
    if as_json:
        out.print_json(json.dumps(summary))
        return
    best = result.best_val_f1_macro
    out.print(f"run {result.run_dir}: {result.epochs} epochs in {result.seconds:.1f} s, best "
              f"validation macro F1 {best:.4f}" if best is not None else
              f"run {result.run_dir}: {result.epochs} epochs")
    if result.evaluation:
        _print_evaluation(result.evaluation)
    if result.export:
        from crystalscope.unknown.detector import unknown_summary

        out.print("exported " + ", ".join(str(p) for p in result.export.files.values()))
        if result.export.unknown_detector:
            out.print(unknown_summary(result.export.unknown_detector))
    for note in result.notes:
        out.print(note)




train.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                      annotation=Annotated[Path | None, typer.Argument(
                          metavar="DATA", help=TrainConfig.model_fields["data"].description)]),
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[Path | None, typer.Option(
                          help="YAML file with any of these options.")]),
    *setting_options(TrainConfig, skip=("data",)),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[Path | None, typer.Option(
                          help="Continue this run directory from its last checkpoint.")]),
    inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
                      annotation=AsJson),
])
app.command(epilog="Example: crystalscope train splits/ --model resnet18 --image-size 64 "
                   "--weights none --epochs 5 --name quick")(train)


def _print_evaluation(evaluation: Evaluation) -> None:
    from crystalscope.model.spec import RunLayout

    out.print(RunLayout(evaluation.out_dir).report_text.read_text(encoding="utf-8"),
              highlight=False, markup=False)
    out.print(f"wrote {', '.join(evaluation.files)} to {evaluation.out_dir}")


@app.command(epilog="Example: crystalscope evaluate runs/resnet50-20261128-101500  "
                    "(or: crystalscope evaluate RUN new-batch/ for another labelled folder)")
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory written by `crystalscope train`.")],
    data: Annotated[Path | None, typer.Argument(
        help="Labelled folder (class sub-folders, or a split folder: its test/). Default: the "
             "run's own test split.")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Folder for the report and plots (default: the run directory, or "
                      "RUN/evaluations/<folder> for another folder).")] = None,
    tta: TtaOption = None,
    as_json: AsJson = False,
) -> None:
    """Test the run's best checkpoint: report.txt/json with 95% intervals, and plots.

    Writes report.txt, report.json (with every image's probabilities), confusion_matrix.png,
    curves.png, errors.png (misclassified images), roc.png and reliability.png.
    """
    from crystalscope.evaluate.stage import evaluate_run

    with progress_bar() as progress:
        task = progress.add_task("evaluate", total=None)
        evaluation = evaluate_run(run, data, out_dir=out_dir, tta=tta.value if tta else None,
                                  progress=lambda done, total: progress.update(
                                      task, completed=done, total=total))
    if as_json:
        out.print_json(json.dumps(evaluation.report))
    else:
        _print_evaluation(evaluation)




@app.command(epilog="Example: crystalscope export runs/resnet50-20261128-101500")
def export(
    run: Annotated[Path, typer.Argument(help="Run directory written by `crystalscope train`.")],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Folder for the model files (default: the run directory).")] = None,
    int8: Annotated[bool, typer.Option(
        "--int8", help="Also write model.int8.onnx (static int8, calibrated on validation "
                       "images) and report how its predictions differ on the test split.")]
    = False,
    false_reject: Annotated[float, typer.Option(
        help="Share of validation crystals the unknown-detector may call unknown: its "
             "threshold.")] = 0.01,
    tta: TtaOption = None,
    calibrate: Annotated[str, typer.Option(
        help="temperature: scale the logits by one number fitted on the validation split, so "
             "that the probabilities mean what they say (ECE before/after in the report); "
             "none: as trained.")] = "none",
    threshold: Annotated[str | None, typer.Option(
        help="The operating point, chosen on the validation split: CLASS=recall:R (call "
             "CLASS for at least R of its images, e.g. pg=recall:0.99) or CLASS=precision:P "
             "(at most 1-P of CLASS calls wrong). Predict, monitor and serve use it.")] = None,
    data_licence: Annotated[str | None, typer.Option(
        help="The training data's licence for the model card (README.md), e.g. 'CC BY-SA 4.0'; "
             "default: a LICENSE file in the data folder or its parent.")] = None,
    push_to_hub: Annotated[str | None, typer.Option(
        metavar="ORG/NAME", help="Afterwards, upload the export (card, model files) to this "
                                 "Hugging Face hub model repository (created private when "
                                 "missing; needs `hf auth login` or HF_TOKEN).")] = None,
    public: Annotated[bool, typer.Option(
        help="With --push-to-hub, create the repository public.")] = False,
    register: Annotated[str | None, typer.Option(
        metavar="NAME", help="Afterwards, register model.onnx (with model.json and its card) "
                             "as a new version of this MLflow registered model, in the run's "
                             "MLflow run when it was trained with --logger mlflow.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        help="With --register: the MLflow tracking URI (default: the run's, else "
             "<runs folder>/mlflow.db).")] = None,
    as_json: AsJson = False,
) -> None:
    """Write model.safetensors + model.json and model.onnx, checked against the checkpoint,
    and unknown.safetensors: the unknown-detector fitted on the training split and calibrated on
    the validation split. With --calibrate or --threshold, the run's test report is written
    again with them.

    ONNX Runtime and torch must agree on every probability within 1e-4, and the model rebuilt
    from safetensors + json must match the checkpoint; otherwise export fails (exit 1).
    """
    from crystalscope.export.hub import check_repo_id
    from crystalscope.export.hub import push_to_hub as push_to_hub_
    from crystalscope.export.stage import ExportSettings, export_run
    from crystalscope.unknown.detector import unknown_summary

    settings = ExportSettings(int8=int8, false_reject=false_reject,
                              tta=tta.value if tta else None, calibrate=calibrate,
                              threshold=threshold, data_licence=data_licence)
    if push_to_hub:
        check_repo_id(push_to_hub)  # before the work, not after it
    with err.status("exporting (ONNX export and parity check)"):
        result = export_run(run, out_dir, settings)
    registered = None
    if register:
        from crystalscope.train.tracking import register_model

        with err.status(f"registering {register} in MLflow"):
            version, uri = register_model(Path(run), Path(out_dir or run), register,
                                          tracking_uri)
        registered = {"name": register, "version": version, "tracking_uri": uri}
    pushed = None
    if push_to_hub:
        with err.status(f"pushing to the Hugging Face hub: {push_to_hub}"):
            pushed = push_to_hub_(Path(out_dir or run), push_to_hub, private=not public)
    summary = {"files": {k: str(v) for k, v in result.files.items()},
               "onnx_max_abs_difference": result.onnx_max_difference,
               "rebuilt_max_abs_difference": result.rebuilt_max_difference,
               "int8": result.int8, "unknown_detector": result.unknown_detector,
               "temperature_scaling": result.temperature_scaling,
               "operating_point": (result.operating_point.to_dict()
                                   if result.operating_point else None),
               "notes": result.notes, "pushed": pushed, "registered": registered}
    if as_json:
        out.print_json(json.dumps(summary))
        return
    for name, path in result.files.items():
        out.print(f"wrote {name}: {path}")
    out.print(f"parity: ONNX Runtime vs torch max |Δ probability| "
              f"{result.onnx_max_difference:.1e}; rebuilt from safetensors "
              f"{result.rebuilt_max_difference:.1e} (limit 1e-4)")
    if result.temperature_scaling:
        scaling = result.temperature_scaling
        fitted = scaling["validation"]
        out.print(f"temperature scaling: T = {scaling['temperature']:.4g}; validation ECE "
                  f"{fitted['ece_before']:.4f} -> {fitted['ece_after']:.4f}" + (
                      f", test ECE {scaling['test']['ece_before']:.4f} -> "
                      f"{scaling['test']['ece_after']:.4f}" if scaling.get("test") else ""))
    if result.operating_point:
        out.print(result.operating_point.describe(), highlight=False)
    if result.unknown_detector:
        out.print(unknown_summary(result.unknown_detector))
    for note in result.notes:
        err.print(f"[yellow]{note}[/yellow]", highlight=False)
    if registered:
        out.print(f"registered {register} version {registered['version']} in MLflow "
                  f"({registered['tracking_uri']})")
    if pushed:
        out.print(f"pushed to the Hugging Face hub: {pushed}")
    if result.int8:
        change = result.int8
        out.print(f"int8 vs fp32 on {change['images']} test images: same class for "
                  f"{100 * change['same_class']:.1f}%, max |Δ probability| "
                  f"{change['max_abs_probability_difference']:.4f}, accuracy "
                  f"{change['accuracy_fp32']:.4f} -> {change['accuracy_int8']:.4f}")
