"""`crystalscope train`, `evaluate` and `export`: a run from split folder to exported model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from crystalscope.cli.app import app
from crystalscope.cli.options import AsJson, TtaOption
from crystalscope.console import err, out, progress_bar
from crystalscope.errors import UserError

if TYPE_CHECKING:
    from crystalscope.evaluate.stage import Evaluation

@app.command(epilog="Example: crystalscope train splits/ --model resnet18 --image-size 64 "
                    "--weights none --epochs 5 --name quick")
def train(
    data: Annotated[Path | None, typer.Argument(
        metavar="DATA", help="Split folder with train/ and valid/ (from `crystalscope split`).")]
    = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with any of these options.")]
    = None,
    recipe: Annotated[str | None, typer.Option(
        help="fast (default: ours) or georgia (the original project's settings).")] = None,
    model: Annotated[str | None, typer.Option(help="Any timm model name, e.g. resnet101.")]
    = None,
    weights: Annotated[str | None, typer.Option(
        help="imagenet (needs internet), none (random init) or a local weights file.")] = None,
    trainable: Annotated[float | None, typer.Option(
        help="Fraction of the backbone's layers, from the top, that train.")] = None,
    head: Annotated[str | None, typer.Option(help="mlp (the original's) or linear.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input side in pixels.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd or adamw.")] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="none or cosine.")] = None,
    augmentation: Annotated[str | None, typer.Option(help="none, dihedral or georgia.")] = None,
    tta: Annotated[str | None, typer.Option(
        help="Test-time averaging in the trained model (evaluate, export, predict): none, or "
             "dihedral (the mean over the 8 rotations and flips; 8x the inference compute).")]
    = None,
    epochs: Annotated[int | None, typer.Option(help="Most epochs to train.")] = None,
    f1_threshold: Annotated[float | None, typer.Option(
        help="Stop once every class's validation F1 reaches this.")] = None,
    patience: Annotated[int | None, typer.Option(help="Epochs without a lower val loss "
                                                      "before stopping.")] = None,
    fraction: Annotated[float | None, typer.Option(
        help="Train on this fraction of the images (a quick rehearsal).")] = None,
    class_weights: Annotated[str | None, typer.Option(help="none or auto (inverse frequency).")]
    = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, data and machine: same "
                                                  "metrics.")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader worker processes.")] = None,
    cache: Annotated[str | None, typer.Option(
        help="Decoded images in ram, on disk (memory-mapped, for sets larger than RAM) or "
             "auto (disk when they would fill half the free memory).")] = None,
    trunk_cache: Annotated[str | None, typer.Option(
        help="auto: with --trainable below 1 and dihedral or no augmentation, compute the "
             "frozen layers' outputs once and train only the top (much faster epochs); off.")]
    = None,
    accelerator: Annotated[str | None, typer.Option(help="cpu, gpu, auto … (Lightning).")]
    = None,
    devices: Annotated[str | None, typer.Option(
        help="Number of devices (one process each under --strategy ddp) or auto.")] = None,
    strategy: Annotated[str | None, typer.Option(help="auto, ddp, fsdp … (Lightning).")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Machines (Lightning).")] = None,
    precision: Annotated[str | None, typer.Option(help="32-true, bf16-mixed, 16-mixed.")]
    = None,
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile",
        help="torch.compile the network (slower first epoch; on a CPU needs a C++ compiler).")]
    = None,
    runs_dir: Annotated[Path | None, typer.Option(help="Parent folder of runs.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default <model>-<date>-<time>).")]
    = None,
    evaluate: Annotated[bool | None, typer.Option(
        "--evaluate/--no-evaluate", help="Afterwards, evaluate on the test split.")] = None,
    export: Annotated[bool | None, typer.Option(
        "--export/--no-export", help="Afterwards, export safetensors + ONNX.")] = None,
    false_reject: Annotated[float | None, typer.Option(
        help="Export: share of validation crystals the unknown-detector may call unknown "
             "(default 0.01).")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue this run directory from its last checkpoint.")] = None,
    allow_overlap: Annotated[bool | None, typer.Option(
        "--allow-overlap", help="Train even when the same crop (or a rotated or near copy) "
                                "lies in two splits; it is counted and reported.")] = None,
    as_json: AsJson = False,
) -> None:
    """Fine-tune a timm backbone on a split folder; write runs/<name>/.

    Every epoch prints precision, recall and F1 per class (train and valid) and appends a row
    to metrics.csv. Training stops when every class's validation F1 reaches --f1-threshold or
    the validation loss stops improving; the checkpoint with the best validation macro F1 is
    kept. Then the test split is used once (`crystalscope evaluate`) and the model exported
    (`crystalscope export`), unless --no-evaluate / --no-export.
    """
    from crystalscope.config import resolve_train_config
    from crystalscope.train.run import train as train_run

    options = dict(  # every TrainConfig field that has a flag (tests/test_cli.py checks it)
        data=data, recipe=recipe, model=model, weights=weights, trainable=trainable, head=head,
        image_size=image_size, batch_size=batch_size, lr=lr, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, scheduler=scheduler,
        augmentation=augmentation, tta=tta, epochs=epochs, f1_threshold=f1_threshold,
        patience=patience, fraction=fraction, class_weights=class_weights, seed=seed,
        num_workers=num_workers, cache=cache, trunk_cache=trunk_cache, accelerator=accelerator,
        devices=devices, strategy=strategy, num_nodes=num_nodes, precision=precision,
        compile=compile, runs_dir=runs_dir, name=name, evaluate=evaluate, export=export,
        false_reject=false_reject, allow_overlap=allow_overlap)
    if resume is None:
        if data is None:
            raise UserError("give the split folder DATA, or --resume RUN")
        settings = resolve_train_config(options, config)
    else:
        settings = None
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
    as_json: AsJson = False,
) -> None:
    """Write model.safetensors + model.json and model.onnx, checked against the checkpoint,
    and unknown.safetensors: the unknown-detector fitted on the training split and calibrated on
    the validation split.

    ONNX Runtime and torch must agree on every probability within 1e-4, and the model rebuilt
    from safetensors + json must match the checkpoint; otherwise export fails (exit 1).
    """
    from crystalscope.export.stage import export_run
    from crystalscope.unknown.detector import unknown_summary

    if not 0 < false_reject < 1:
        raise UserError(f"--false-reject {false_reject}: give a rate between 0 and 1, e.g. 0.01")
    with err.status("exporting (ONNX export and parity check)"):
        result = export_run(run, out_dir, int8=int8, false_reject=false_reject,
                            tta=tta.value if tta else None)
    summary = {"files": {k: str(v) for k, v in result.files.items()},
               "onnx_max_abs_difference": result.onnx_max_difference,
               "rebuilt_max_abs_difference": result.rebuilt_max_difference,
               "int8": result.int8, "unknown_detector": result.unknown_detector,
               "notes": result.notes}
    if as_json:
        out.print_json(json.dumps(summary))
        return
    for name, path in result.files.items():
        out.print(f"wrote {name}: {path}")
    out.print(f"parity: ONNX Runtime vs torch max |Δ probability| "
              f"{result.onnx_max_difference:.1e}; rebuilt from safetensors "
              f"{result.rebuilt_max_difference:.1e} (limit 1e-4)")
    if result.unknown_detector:
        out.print(unknown_summary(result.unknown_detector))
    for note in result.notes:
        err.print(f"[yellow]{note}[/yellow]", highlight=False)
    if result.int8:
        change = result.int8
        out.print(f"int8 vs fp32 on {change['images']} test images: same class for "
                  f"{100 * change['same_class']:.1f}%, max |Δ probability| "
                  f"{change['max_abs_probability_difference']:.4f}, accuracy "
                  f"{change['accuracy_fp32']:.4f} -> {change['accuracy_int8']:.4f}")
