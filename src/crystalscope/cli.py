"""The `crystalscope` command line: parses options, calls one function per command, prints.

No logic lives here. Errors become one line and an exit code: 2 for a usage or input mistake,
1 for a failure; the traceback only with ``--debug`` (or CRYSTALSCOPE_DEBUG=1).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from crystalscope import __version__
from crystalscope.console import err, out, progress_bar
from crystalscope.errors import CrystalscopeError, UserError
from crystalscope.monitor.frames import DEFAULT_TIME_PATTERN  # light: the option's default

if TYPE_CHECKING:  # the heavy stages load only when their command runs
    from crystalscope.evaluate.stage import Evaluation
    from crystalscope.infer.predictor import Preprocessing

app = typer.Typer(
    name="crystalscope",
    help="Classify in-situ crystallization images: synthesize, check and split data; train, "
         "evaluate, export and serve models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Inspect and fetch data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_state = {"debug": os.environ.get("CRYSTALSCOPE_DEBUG") == "1"}


def _version(value: bool) -> None:
    if value:
        out.print(f"crystalscope {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    if debug:
        _state["debug"] = True


# ------------------------------------------------------------------------------- synth


@app.command(epilog="Example: crystalscope synth data/synthetic --per-class 500 "
                    "--difficulty hard --uniform-size 151 --dihedral-copies 3.   A simulated "
                    "batch over time: crystalscope synth batch OUT; images that are neither "
                    "CEX nor PG: crystalscope synth ood OUT (see --help there).")
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New folder for the crops.")],
    per_class: Annotated[int, typer.Option(help="Images per class (copies included).")] = 200,
    size: Annotated[int, typer.Option(help="CEX crop side in pixels; PG sides vary from "
                                           "0.87x to 1.52x of it, as in the public set.")] = 151,
    uniform_size: Annotated[int | None, typer.Option(
        help="Make every crop SxS, so image size is no shortcut to the class.")] = None,
    difficulty: Annotated[str, typer.Option(
        help="easy, medium, hard or 0..1: blur, noise, low contrast and a share of "
             "ambiguous crops.")] = "0.3",
    dihedral_copies: Annotated[int, typer.Option(
        help="Rotated/flipped copies stored after each PG crop under the next numbers, "
             "like the public PG data (0..7).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same images.")] = 0,
    workers: Annotated[int | None, typer.Option(help="Processes (default: CPU cores).")] = None,
) -> None:
    """Write synthetic particle-vision-probe crops: CEX needles and PG agglomerates.

    Files are named like the public data: OUT/cex/CEX (n).png and OUT/pg/PG (n).png, 8-bit
    grayscale PNG, plus OUT/synth.json (settings and duplicate groups).
    """
    from crystalscope.synth.crops import SynthSettings, parse_difficulty, synthesize

    settings = SynthSettings(per_class=per_class, size=size, uniform_size=uniform_size,
                             difficulty=parse_difficulty(difficulty),
                             dihedral_copies=dihedral_copies, seed=seed)
    settings.validate()
    with progress_bar() as progress:
        task = progress.add_task("synth", total=2 * per_class)
        summary = synthesize(out_dir, settings, workers=workers,
                             progress=lambda n: progress.advance(task, n))
    err.print(f"wrote {len(summary['files'])} crops to {out_dir} "
              f"({', '.join(summary['classes'])}) and {out_dir / 'synth.json'}")


@app.command(name="synth-ood", hidden=True,
             epilog="Example: crystalscope synth ood unfamiliar/ --per-kind 100 --size 151")
def synth_ood(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New folder for the images.")],
    per_kind: Annotated[int, typer.Option(help="Images of each kind.")] = 50,
    kinds: Annotated[str, typer.Option(
        help="Comma-separated: bubble, empty, defocus, cube (near), natural (far), or near, "
             "far, all.")] = "all",
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 151,
    difficulty: Annotated[str, typer.Option(
        help="easy, medium, hard or 0..1, as for CEX/PG crops.")] = "medium",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same images.")] = 0,
    workers: Annotated[int | None, typer.Option(help="Processes (default: CPU cores).")] = None,
) -> None:
    """Images a CEX/PG model never saw, to test its unknown flag: bubbles, empty frames,
    heavy defocus, cubes (a third habit) drawn like probe crops, and pieces of scikit-image's
    bundled photographs (the cat, the astronaut, …).

    Writes OUT/<kind>/<kind>-0001.png … and OUT/ood.json.
    """
    from crystalscope.synth.crops import parse_difficulty
    from crystalscope.synth.unknown import parse_kinds, synthesize_unfamiliar

    chosen = parse_kinds(kinds)
    with progress_bar() as progress:
        task = progress.add_task("synth ood", total=per_kind * len(chosen))
        summary = synthesize_unfamiliar(out_dir, per_kind=per_kind, kinds=chosen, size=size,
                                        difficulty=parse_difficulty(difficulty), seed=seed,
                                        workers=workers,
                                        progress=lambda n: progress.advance(task, n))
    err.print(f"wrote {len(summary['files'])} images to {out_dir} "
              f"({', '.join(f'{k}: {v}' for k, v in summary['kinds'].items())}) and "
              f"{out_dir / 'ood.json'}")


# -------------------------------------------------------------------------------- data


@data_app.command("check", epilog="Example: crystalscope data check archive/ --json > check.json")
def data_check(
    folder: Annotated[Path, typer.Argument(metavar="DIR",
                                           help="Folder with one sub-folder per class.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
    = False,
    strict: Annotated[bool, typer.Option(
        help="Exit 1 if any file is unreadable or a duplicate group spans classes.")] = False,
    workers: Annotated[int | None, typer.Option(help="Processes (default: CPU cores).")] = None,
) -> int:
    """Count images per class; list unreadable files, duplicates and label conflicts.

    Duplicates are exact (same bytes) or rotated/flipped copies (a hash that is the same for
    all 8 rotations and flips). A group whose files sit in two classes is a label conflict.
    """
    from crystalscope.data.check import scan_dataset, summarize
    from crystalscope.data.layout import count_files

    with progress_bar() as progress:
        task = progress.add_task("check", total=count_files(folder))
        report = summarize(scan_dataset(folder, workers=workers,
                                        progress=lambda n: progress.advance(task, n)))
    if as_json:
        out.print_json(json.dumps(report))
    else:
        _print_check(report)
    problems = len(report["unreadable"]) + report["label_conflicts"]
    return 1 if strict and problems else 0


def _print_check(report: dict) -> None:
    table = Table(title=f"{report['root']}: {report['readable']} readable of "
                        f"{report['files']} files")
    for column in ("class", "files", "readable", "unreadable", "share", "sizes (top 3)", "modes"):
        table.add_column(column, justify="right" if column in ("files", "readable", "unreadable",
                                                                "share") else "left")
    for name, info in report["per_class"].items():
        sizes = ", ".join(f"{k} ({v})" for k, v in list(info["sizes"].items())[:3])
        if info["distinct_sizes"] > 3:
            sizes += f", … {info['distinct_sizes']} sizes"
        table.add_row(name, str(info["files"]), str(info["readable"]), str(info["unreadable"]),
                      f"{info['share']:.4f}", sizes,
                      ", ".join(f"{k} ({v})" for k, v in info["modes"].items()))
    out.print(table)
    out.print(f"class imbalance (largest/smallest): {report['imbalance_ratio']}")
    for item in report["unreadable"]:
        out.print(f"[red]unreadable[/red] {item['file']}: {item['reason']}")
    for warning in report["format_warnings"]:
        out.print(f"[yellow]format[/yellow] {warning}")
    groups = report["duplicate_groups"]
    out.print(f"duplicate groups: {len(groups)} ({report['duplicate_files']} extra copies), "
              f"label conflicts: {report['label_conflicts']}")
    for group in groups[:10]:
        flag = " [red]LABEL CONFLICT[/red]" if group["label_conflict"] else ""
        names = ", ".join(Path(f).name for f in group["files"][:6])
        out.print(f"  {group['kind']}, {len(group['files'])} files ({names}){flag}")
    if len(groups) > 10:
        out.print(f"  … and {len(groups) - 10} more groups (see --json)")


@data_app.command("download",
                  epilog="Example: crystalscope data download data/opencrystal   (with "
                         "KAGGLE_USERNAME and KAGGLE_KEY set)")
def data_download(
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="New folder for the data set.")],
) -> None:
    """Download the public OpenCrystalData cephalexin crops (Kaggle, CC BY-SA 4.0).

    Needs Kaggle credentials (KAGGLE_USERNAME + KAGGLE_KEY, or ~/.kaggle/kaggle.json); without
    them it prints the manual steps. The folder appears only once the download is complete.
    """
    from crystalscope.data.download import download_dataset

    root = download_dataset(dest)
    err.print(f"downloaded to {dest}; class folders are in {root}")


# ------------------------------------------------------------------------------- split


class SplitOrder(StrEnum):
    shuffle = "shuffle"
    sorted = "sorted"


@app.command(epilog="Example: crystalscope split archive/ splits/ --seed 1   (then: crystalscope "
                    "train splits/)")
def split(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="Folder with one sub-folder per "
                                                            "class (the Kaggle archive works).")],
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="New or empty folder.")],
    ratios: Annotated[str, typer.Option(help="train,valid,test fractions.")] = "0.70,0.25,0.05",
    seed: Annotated[int, typer.Option(help="Seed of the shuffle.")] = 0,
    order: Annotated[SplitOrder, typer.Option(
        help="shuffle (seeded) or sorted (the original project's lexicographic order).")]
    = SplitOrder.shuffle,
    link: Annotated[bool, typer.Option("--link", help="Hard-link instead of copying.")] = False,
    move: Annotated[bool, typer.Option("--move", help="Move instead of copying.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Finish an interrupted split recorded in DEST/manifest.csv.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    workers: Annotated[int | None, typer.Option(help="Processes (default: CPU cores).")] = None,
) -> None:
    """Split class folders into DEST/{train,valid,test}/<class>/, stratified per class.

    Rotated/flipped and exact copies of one crop stay in one split. Writes DEST/manifest.csv
    (source, dest, sha256, group, split) before any file moves, and DEST/split.json.
    Nothing is overwritten; a killed run is finished with --resume.
    """
    from crystalscope.data.split import split_dataset

    if link and move:
        raise UserError("--link and --move: choose one (the default is to copy)")
    mode = "link" if link else "move" if move else "copy"
    with progress_bar() as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        result = split_dataset(src, dest, ratios=ratios, seed=seed, order=order.value, mode=mode,
                               resume=resume, workers=workers, progress=report)
    if as_json:
        out.print_json(json.dumps(result.report))
        return
    summary = result.report
    table = Table(title=f"{dest}: {summary['files']} files ({summary['mode']})")
    table.add_column("class")
    for name in ("train", "valid", "test"):
        table.add_column(name, justify="right")
    for name, counts in summary["counts"].items():
        targets = summary.get("targets", {}).get(name, counts)
        table.add_row(name, *(f"{counts[s]}" + (f" (ideal {targets[s]})"
                                                 if counts[s] != targets[s] else "")
                              for s in ("train", "valid", "test")))
    out.print(table)
    out.print(f"duplicate groups kept together: {summary['duplicate_groups']} "
              f"({summary['files_in_duplicate_groups']} files); files moved from the ideal "
              f"counts by groups: {summary.get('files_moved_by_groups', 0)}")
    for item in summary.get("skipped", []):
        out.print(f"[yellow]skipped[/yellow] {item['file']}: {item['reason']}")
    if summary.get("label_conflicts"):
        out.print(f"[red]{summary['label_conflicts']} duplicate group(s) span classes[/red]; "
                  "run `crystalscope data check` to see them")
    out.print(f"manifest: {dest / 'manifest.csv'}")


# ------------------------------------------------------------------------------- train


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
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

    options = {k: v for k, v in locals().items()
               if k not in ("config", "resume", "as_json", "resolve_train_config", "train_run")}
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
        from crystalscope.ood.detector import ood_summary

        out.print("exported " + ", ".join(str(p) for p in result.export.files.values()))
        if result.export.ood:
            out.print(ood_summary(result.export.ood))
    for note in result.notes:
        out.print(note)


# ---------------------------------------------------------------------------- evaluate


def _print_evaluation(evaluation: Evaluation) -> None:
    out.print(evaluation.files["report.txt"].read_text(encoding="utf-8"), highlight=False,
              markup=False)
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
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json's numbers as JSON "
                                                         "(without per-image rows).")] = False,
) -> None:
    """Test the run's best checkpoint: report.txt/json with 95% intervals, and plots.

    Writes report.txt, report.json (with every image's probabilities), confusion_matrix.png,
    curves.png, errors.png (misclassified images), roc.png and reliability.png.
    """
    from crystalscope.evaluate.stage import evaluate_run

    with progress_bar() as progress:
        task = progress.add_task("evaluate", total=None)
        evaluation = evaluate_run(run, data, out_dir=out_dir,
                                  progress=lambda done, total: progress.update(
                                      task, completed=done, total=total))
    if as_json:
        out.print_json(json.dumps(evaluation.report))
    else:
        _print_evaluation(evaluation)


# ------------------------------------------------------------------------------ export


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
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")]
    = False,
) -> None:
    """Write model.safetensors + model.json and model.onnx, checked against the checkpoint,
    and ood.safetensors: the unknown-detector fitted on the training split and calibrated on
    the validation split.

    ONNX Runtime and torch must agree on every probability within 1e-4, and the model rebuilt
    from safetensors + json must match the checkpoint; otherwise export fails (exit 1).
    """
    from crystalscope.export.stage import export_run
    from crystalscope.ood.detector import ood_summary

    if not 0 < false_reject < 1:
        raise UserError(f"--false-reject {false_reject}: give a rate between 0 and 1, e.g. 0.01")
    with err.status("exporting (ONNX export and parity check)"):
        result = export_run(run, out_dir, int8=int8, false_reject=false_reject)
    summary = {"files": {k: str(v) for k, v in result.files.items()},
               "onnx_max_abs_difference": result.onnx_max_difference,
               "rebuilt_max_abs_difference": result.rebuilt_max_difference,
               "int8": result.int8, "ood": result.ood, "notes": result.notes}
    if as_json:
        out.print_json(json.dumps(summary))
        return
    for name, path in result.files.items():
        out.print(f"wrote {name}: {path}")
    out.print(f"parity: ONNX Runtime vs torch max |Δ probability| "
              f"{result.onnx_max_difference:.1e}; rebuilt from safetensors "
              f"{result.rebuilt_max_difference:.1e} (limit 1e-4)")
    if result.ood:
        out.print(ood_summary(result.ood))
    for note in result.notes:
        err.print(f"[yellow]{note}[/yellow]", highlight=False)
    if result.int8:
        change = result.int8
        out.print(f"int8 vs fp32 on {change['images']} test images: same class for "
                  f"{100 * change['same_class']:.1f}%, max |Δ probability| "
                  f"{change['max_abs_probability_difference']:.4f}, accuracy "
                  f"{change['accuracy_fp32']:.4f} -> {change['accuracy_int8']:.4f}")


# ----------------------------------------------------------------------------- predict


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    jsonl = "jsonl"


class Backend(StrEnum):
    onnx = "onnx"
    torch = "torch"


def _preprocessing(input_size: int | None, layout: str | None, preprocess: str | None,
                   mean: str | None, std: str | None) -> Preprocessing | None:
    """Preprocessing for a foreign ONNX model from the command line (None: the model's own)."""
    from crystalscope.infer.predictor import Preprocessing

    if input_size is None:
        if any(v is not None for v in (layout, preprocess, mean, std)):
            raise UserError("--layout/--preprocess/--mean/--std need --input-size as well")
        return None

    def triple(text: str | None, name: str, default: tuple) -> tuple[float, ...]:
        if text is None:
            return default
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != 3:
            raise UserError(f"--{name} {text}: give three numbers, e.g. 0.485,0.456,0.406")
        return values

    mode = preprocess or ("imagenet" if mean or std else "raw")
    if mode not in ("raw", "imagenet", "caffe", "tf"):
        raise UserError(f"--preprocess {mode}: use raw, imagenet, caffe or tf")
    if layout not in (None, "nchw", "nhwc"):
        raise UserError(f"--layout {layout}: use nchw or nhwc")
    defaults = Preprocessing(input_size=input_size)
    return Preprocessing(input_size=input_size, layout=layout or "nchw", mode=mode,
                         mean=triple(mean, "mean", defaults.mean),
                         std=triple(std, "std", defaults.std))


@app.command(epilog="Example: crystalscope predict runs/demo frames/ 'more/*.png' --format csv "
                    "--output predictions.csv")
def predict(
    model: Annotated[Path, typer.Argument(
        help="Run directory, model.onnx, or model.safetensors (with model.json beside it).")],
    paths: Annotated[list[str], typer.Argument(
        help="Image files, folders (searched recursively) or quoted globs.")],
    output_format: Annotated[OutputFormat, typer.Option(
        "--format", help="table, csv, json or jsonl.")] = OutputFormat.table,
    output: Annotated[Path | None, typer.Option(
        help="Write to this new file instead of the screen.")] = None,
    backend: Annotated[Backend, typer.Option(help="onnx (ONNX Runtime) or torch.")]
    = Backend.onnx,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    classes: Annotated[str | None, typer.Option(
        help="Class names of a foreign ONNX model, in output order, e.g. cex,pg.")] = None,
    input_size: Annotated[int | None, typer.Option(
        help="Foreign ONNX model: square input side in pixels.")] = None,
    layout: Annotated[str | None, typer.Option(help="Foreign ONNX model: nchw or nhwc.")]
    = None,
    preprocess: Annotated[str | None, typer.Option(
        help="Foreign ONNX model: raw (0-255), imagenet ((x/255-mean)/std), caffe (BGR minus "
             "means, Keras) or tf (x/127.5-1).")] = None,
    mean: Annotated[str | None, typer.Option(help="Per-channel mean for imagenet mode.")]
    = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std for imagenet mode.")] = None,
    reject_unknown: Annotated[bool, typer.Option(
        "--reject-unknown", help="Give the class 'unknown' to images the unknown-detector "
                                 "flags (ood_score > 1) instead of forcing a class.")] = False,
    outputs: Annotated[str | None, typer.Option(
        help="Foreign ONNX model: what its output holds, probabilities (softmax or sigmoid "
             "applied) or logits.")] = None,
) -> int:
    """Classify images: the predicted class, its probability, and every class's probability.

    A model exported with its unknown-detector (crystalscope export) adds the columns
    unknown (yes/no) and ood_score (above 1: unlike the training images). Streams in
    batches, so memory stays bounded however many images. Unreadable files are listed on
    stderr and skipped; the exit code is then 1.
    """
    from crystalscope.data.layout import expand_paths
    from crystalscope.infer.output import LEGEND, OOD_LEGEND, PredictionWriter, open_output
    from crystalscope.infer.predictor import OUTPUT_KINDS, load_predictor, parse_classes
    from crystalscope.infer.stream import Failure, predict_stream

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give at least 1")
    if outputs not in (None, *OUTPUT_KINDS):
        raise UserError(f"--outputs {outputs}: use probabilities or logits")
    predictor = load_predictor(
        model, backend=backend.value, classes=parse_classes(classes),
        preprocessing=_preprocessing(input_size, layout, preprocess, mean, std),
        outputs=outputs)  # type: ignore[arg-type]
    if reject_unknown and predictor.ood is None:
        raise UserError(f"--reject-unknown: {model} has no unknown-detector; export the run "
                        "again (crystalscope export RUN) to fit one")
    files = expand_paths(paths)
    handle = open_output(output)
    has_ood = predictor.ood is not None
    writer = PredictionWriter(handle or sys.stdout, output_format.value, predictor.classes,
                              ood=has_ood, reject_unknown=reject_unknown)
    if output_format == OutputFormat.table:
        err.print(LEGEND + (OOD_LEGEND if has_ood else ""), highlight=False)
    failures: list[Failure] = []
    try:
        with progress_bar() as progress:
            task = progress.add_task("predict", total=len(files))
            for item in predict_stream(predictor, files, batch_size=batch_size,
                                       progress=lambda n: progress.advance(task, n)):
                writer.write(item)
                if isinstance(item, Failure):
                    failures.append(item)
        writer.close()
    finally:
        if handle:
            handle.close()
    for failure in failures:
        err.print(f"[yellow]skipped[/yellow] {failure.reason}", highlight=False)
    if output:
        err.print(f"wrote {writer.count} predictions to {output}")
    if has_ood:
        err.print(f"{writer.unknown} of {writer.count} images unknown (unlike the training "
                  "images)")
    if failures:
        err.print(f"{len(failures)} of {len(files)} images could not be read")
        return 1
    return 0


# ------------------------------------------------------------------------ index, similar

STORE_HELP = ("LanceDB folder (default ./crystalscope.lance) or a Weaviate server URL, "
              "e.g. http://localhost:8080.")


@app.command(name="index", epilog="Example: crystalscope index runs/demo splits/train "
                                  "--store crystals.lance")
def index_command(
    model: Annotated[Path, typer.Argument(help="Run directory, model.onnx or model.safetensors.")],
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or quoted globs.")],
    store: Annotated[str, typer.Option(help=STORE_HELP)] = "crystalscope.lance",
    backend: Annotated[Backend, typer.Option(help="onnx (ONNX Runtime) or torch.")]
    = Backend.onnx,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> int:
    """Store one embedding per image (pooled backbone features) with its prediction.

    Each record: path, sha256, predicted class and probabilities, true class (when the image
    lies in a folder named after a class), image size, time added. Indexing a file again
    updates its record.
    """
    from crystalscope.data.layout import expand_paths
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.vectors.backends import open_store
    from crystalscope.vectors.indexing import index_images

    predictor = load_predictor(model, backend=backend.value)
    files = expand_paths(paths)
    vector_store = open_store(store)
    try:
        with progress_bar() as progress:
            task = progress.add_task("index", total=len(files))
            result = index_images(predictor, files, vector_store, batch_size=batch_size,
                                  progress=lambda n: progress.advance(task, n))
        info = vector_store.info()
    finally:
        vector_store.close()
    summary = {"store": info.uri, "indexed": result.indexed, "new": result.new,
               "updated": result.indexed - result.new, "total": info.count,
               "ann_index": info.indexed, "failed": [f.reason for f in result.failures]}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(f"{info.uri}: indexed {result.indexed} images ({result.new} new, "
                  f"{result.indexed - result.new} updated); the store holds {info.count}"
                  + (" (ANN index)" if info.indexed else " (exact search)"))
    for failure in result.failures:
        err.print(f"[yellow]skipped[/yellow] {failure.reason}", highlight=False)
    return 1 if result.failures else 0


@app.command(epilog="Example: crystalscope similar runs/demo new-crystal.png -k 5 "
                    "--html similar.html")
def similar(
    model: Annotated[Path, typer.Argument(help="The model the store was indexed with.")],
    image: Annotated[Path, typer.Argument(help="The query image.")],
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 5,
    store: Annotated[str, typer.Option(help=STORE_HELP)] = "crystalscope.lance",
    only_class: Annotated[str | None, typer.Option(
        "--class", help="Only stored images predicted as this class.")] = None,
    backend: Annotated[Backend, typer.Option(help="onnx (ONNX Runtime) or torch.")]
    = Backend.onnx,
    html_path: Annotated[Path | None, typer.Option(
        "--html", help="Also write a page with thumbnails to this new file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """The stored crystals nearest to IMAGE (cosine distance of embeddings)."""
    from crystalscope.infer.output import open_output
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.vectors.backends import open_store
    from crystalscope.vectors.indexing import find_similar, similar_html

    if not image.is_file():
        raise UserError(f"{image}: no such image")
    predictor = load_predictor(model, backend=backend.value)
    handle = open_output(html_path)  # refuse an existing file before any work
    vector_store = open_store(store)
    try:
        query, neighbours = find_similar(predictor, image, vector_store, k,
                                         predicted=only_class)
    finally:
        vector_store.close()
    rows = [{"rank": rank, "distance": round(n.distance, 6), "predicted": n.record.predicted,
             "true_class": n.record.true_class, "path": n.record.path}
            for rank, n in enumerate(neighbours, 1)]
    if handle:
        with handle:
            handle.write(similar_html(query, neighbours, predictor.classes))
    if as_json:
        out.print_json(json.dumps({"query": str(image), "neighbours": rows}))
    else:
        best = int(query.probabilities.argmax())
        table = Table(title=f"{image}: predicted {predictor.classes[best]} "
                            f"({query.probabilities[best]:.4f}); nearest {len(rows)} in {store}")
        for column in ("rank", "cosine distance", "predicted", "true class"):
            table.add_column(column, no_wrap=True)
        table.add_column("path", overflow="fold")
        for row in rows:
            table.add_row(str(row["rank"]), f"{row['distance']:.4f}", row["predicted"],
                          row["true_class"] or "-", row["path"])
        out.print(table)
    if html_path:
        err.print(f"wrote {html_path}")


# ----------------------------------------------------------------------------- explore


def _parse_k(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--k {text}: give a number of clusters or auto") from None


def _parse_zoom(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        x0, x1, y0, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--zoom {text}: give x0,x1,y0,y1 in map units, e.g. "
                        "-0.2,0.3,-0.1,0.4") from None
    if x0 >= x1 or y0 >= y1:
        raise UserError(f"--zoom {text}: give x0 < x1 and y0 < y1")
    return x0, x1, y0, y1


@app.command(epilog="Example: crystalscope explore runs/demo splits/valid splits/test "
                    "--out maps/ --k auto  (or: crystalscope explore runs/demo --store "
                    "crystals.lance --out maps/)")
def explore(
    model: Annotated[Path, typer.Argument(help="Run directory, model.onnx or model.safetensors.")],
    paths: Annotated[list[str] | None, typer.Argument(
        help="Image files, folders or quoted globs (or use --store).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the maps.")]
    = Path("explore"),
    store: Annotated[str | None, typer.Option(
        help="Map every image of this vector store instead of embedding PATHS.")] = None,
    k: Annotated[str, typer.Option("--k", help="k-means clusters, or auto (silhouette).")]
    = "4",
    neighbours: Annotated[int, typer.Option(
        help="Links per image in graph.html (its most similar images).")] = 5,
    zoom: Annotated[str | None, typer.Option(
        help="map.png shows only x0,x1,y0,y1 (map units, see the axes).")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same map and clusters.")] = 0,
    backend: Annotated[Backend, typer.Option(help="onnx (ONNX Runtime) or torch.")]
    = Backend.onnx,
    as_json: Annotated[bool, typer.Option("--json", help="Print the cluster summary as JSON.")]
    = False,
) -> int:
    """Map the embeddings: PCA to 2-D, k-means clusters, thumbnails, interactive pages.

    Writes map.png (thumbnails up to 300 images, else dots coloured by cluster with the class
    as marker), map.html (scatter with tooltips), graph.html (each image linked to its most
    similar images, slider on the similarity) and clusters.json. The pages work offline.
    """
    from crystalscope.data.layout import expand_paths
    from crystalscope.explore.stage import explore as run_explore
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.vectors.backends import open_store

    if neighbours < 1:
        raise UserError(f"--neighbours {neighbours}: give at least 1")
    chosen_k, chosen_zoom = _parse_k(k), _parse_zoom(zoom)
    if store is not None:
        vector_store = open_store(store)
        try:
            result = run_explore(out_dir, store=vector_store, k=chosen_k, seed=seed,
                                 neighbours=neighbours, zoom=chosen_zoom)
        finally:
            vector_store.close()
    else:
        if not paths:
            raise UserError("give images (PATHS) or --store")
        predictor = load_predictor(model, backend=backend.value)
        files = expand_paths(paths)
        with progress_bar() as progress:
            task = progress.add_task("embed", total=len(files))
            result = run_explore(out_dir, predictor=predictor, files=files, k=chosen_k,
                                 seed=seed, neighbours=neighbours, zoom=chosen_zoom,
                                 progress=lambda n: progress.advance(task, n))
    if as_json:
        out.print_json(json.dumps(result.clusters))
    else:
        explained = result.projection.explained
        table = Table(title=f"{len(result.points.paths)} images, {result.projection.k} clusters "
                            f"(PC1 {100 * explained[0]:.1f}%, PC2 {100 * explained[1]:.1f}% of "
                            "variance)")
        for column in ("cluster", "size", "classes", "purity"):
            table.add_column(column, no_wrap=True)
        table.add_column("nearest the centre", overflow="fold")
        for c in result.clusters:
            table.add_row(str(c["cluster"]), str(c["size"]),
                          ", ".join(f"{n} {v}" for n, v in c["composition"].items()),
                          f"{c['purity']:.4f}",
                          ", ".join(Path(p).name for p in c["nearest_to_centroid"]))
        out.print(table)
        out.print(f"wrote {', '.join(result.files)} to {out_dir}")
    for failure in result.failures:
        err.print(f"[yellow]skipped[/yellow] {failure.reason}", highlight=False)
    return 1 if result.failures else 0


@app.command(epilog="Example: crystalscope explain runs/demo 'splits/test/pg/*.png' --out cams/")
def explain(
    model: Annotated[Path, typer.Argument(
        help="Run directory or model.safetensors (CAMs need gradients: not ONNX).")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders or quoted globs.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the overlays.")]
    = Path("explain"),
    target: Annotated[str | None, typer.Option(
        "--class", help="Explain this class (default: the predicted one).")] = None,
    layer: Annotated[str | None, typer.Option(
        help="Backbone module to explain (default: its last stage, e.g. layer4).")] = None,
) -> int:
    """Where the model looked: Grad-CAM and LayerCAM overlays and a side-by-side sheet.

    Writes <n>-<image>-gradcam.png and -layercam.png (at the crop's own size), sheet.png
    (original and overlays with 70/80/90th percentile contours) and explanations.json.
    """
    from crystalscope.data.layout import expand_paths
    from crystalscope.explore.explain import explain as run_explain

    files = expand_paths(images)
    with progress_bar() as progress:
        task = progress.add_task("explain", total=len(files))
        explanations, written, skipped = run_explain(
            model, files, out_dir, target=target, layer=layer,
            progress=lambda n: progress.advance(task, n))
    for item in explanations:
        out.print(f"{item.path}: predicted {item.predicted} ({item.probability:.4f}); maps for "
                  f"{item.target}")
    out.print(f"wrote {len(written)} files to {out_dir} (sheet.png, explanations.json, "
              "overlays)")
    for reason in skipped:
        err.print(f"[yellow]skipped[/yellow] {reason}", highlight=False)
    return 1 if skipped else 0


# ----------------------------------------------------------------------------- monitor


@app.command(name="synth-batch", hidden=True,
             epilog="Example: crystalscope synth batch batches/ --windows 60 --onset 30")
def synth_batch(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New folder for the batches.")],
    windows: Annotated[int, typer.Option(help="Time windows.")] = 60,
    per_window: Annotated[int, typer.Option(help="Crops per window.")] = 40,
    onset: Annotated[int, typer.Option(help="First window in which PG can appear.")] = 30,
    rate: Annotated[float, typer.Option(help="PG share added per window after the onset.")]
    = 0.02,
    max_fraction: Annotated[float, typer.Option(help="Largest PG share.")] = 0.5,
    size: Annotated[int, typer.Option(
        help="CEX crop side in pixels; PG crops vary around it, drawn as `synth` draws them. "
             "With --frames: the crop side in the frame.")] = 151,
    difficulty: Annotated[float, typer.Option(help="0 (easy) to 1 (hard).")] = 0.3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    frames: Annotated[int, typer.Option(
        help="Write this many full probe frames per window instead of crops (0: crops).")]
    = 0,
    frame_size: Annotated[int, typer.Option(help="--frames: frame side in pixels.")] = 604,
) -> None:
    """A simulated batch: crops over time with PG from a known onset, plus a control batch
    and a calibration batch (both PG-free).

    Writes OUT/pg-batch/t0001/…, OUT/control/t0001/… and OUT/calibration/t0001/…, each with
    truth.csv, and batch.json.
    """
    from crystalscope.synth.batch import BatchSettings, synthesize_batch

    settings = BatchSettings(windows=windows, per_window=per_window, onset=onset, rate=rate,
                             max_fraction=max_fraction, size=size, difficulty=difficulty,
                             seed=seed, frames=frames, frame_size=frame_size)
    with progress_bar() as progress:
        task = progress.add_task("synth batch", total=3 * windows * per_window)
        summary = synthesize_batch(out_dir, settings,
                                   progress=lambda n: progress.advance(task, n))
    for batch in summary["batches"].values():
        out.print(f"{batch['folder']}: {windows} windows of {per_window} crops; first PG in "
                  f"window {batch['first_pg_window'] or '-'}")


@app.command(epilog="Example: crystalscope monitor runs/demo batches/pg-batch --positive pg "
                    "--out monitor/  (live: add --watch)")
def monitor(
    model: Annotated[Path, typer.Argument(help="Run directory or model.onnx.")],
    stream: Annotated[Path, typer.Argument(
        help="Folder of time folders (t0001/ …) or a CSV of time,path.")],
    positive: Annotated[str, typer.Option(
        help="The impurity class to watch, e.g. pg.")] = "",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the outputs.")]
    = Path("monitor"),
    false_positive_rate: Annotated[float | None, typer.Option(
        help="The model's rate of false impurity calls (default: measured with --calibrate, "
             "else from the run's test report; upper 95% bound).")] = None,
    calibrate: Annotated[Path | None, typer.Option(
        help="A known-clean stream (no impurity) to measure the false-positive rate on.")]
    = None,
    alpha: Annotated[float, typer.Option(
        help="Significance of one window (one-sided binomial test).")] = 1e-3,
    consecutive: Annotated[int, typer.Option(
        help="Significant windows in a row that raise the alarm.")] = 2,
    watch_mode: Annotated[bool, typer.Option(
        "--watch", help="Follow the folder as the probe writes it (Ctrl-C stops).")] = False,
    poll: Annotated[float, typer.Option(help="--watch: seconds between looks.")] = 1.0,
    settle: Annotated[float, typer.Option(
        help="--watch: a window is complete when unchanged this long (or a later one "
             "exists).")] = 5.0,
    stop_when_idle: Annotated[float | None, typer.Option(
        help="--watch: stop after this many seconds without a new window.")] = None,
    time_from: Annotated[str, typer.Option(
        help="folders (time folders or a CSV), name (a timestamp in each file name) or mtime "
             "(file times), for a flat folder of crops.")] = "folders",
    time_pattern: Annotated[str, typer.Option(
        help="--time-from name: regular expression whose first group is the time.")]
    = DEFAULT_TIME_PATTERN,
    window_seconds: Annotated[float, typer.Option(
        help="--time-from name|mtime: window length in seconds.")] = 60.0,
    frames: Annotated[bool, typer.Option(
        "--frames", help="STREAM holds full probe frames: cut them into crops first.")]
    = False,
    cut: Annotated[str, typer.Option(
        help="--frames: particles (segmented bright particles; measured better) or tiles "
             "(the whole frame in crop-sized squares).")] = "particles",
    crop_size: Annotated[int, typer.Option(
        help="--frames: crop side in the frame's pixels (the crops the model learnt).")]
    = 151,
    on_alarm: Annotated[str | None, typer.Option(
        help="Command to run when the alarm fires (evidence in $CRYSTALSCOPE_ALARM).")]
    = None,
    post: Annotated[str | None, typer.Option(
        help="URL to POST the alarm's evidence to (JSON).")] = None,
) -> int:
    """Impurity share per time window, with a 95% interval and an alarm that accounts for the
    model's own false positives; writes trend.csv, events.jsonl, timeline.png.

    Exit code 3 when the alarm fired (so scripts can act), 0 when it did not.
    """
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.monitor.run import Monitor, choose_false_positive_rate, replay, watch
    from crystalscope.monitor.trend import AlarmRule

    if not positive:
        raise UserError("give --positive CLASS: the impurity to watch (e.g. --positive pg)")
    if not 0 < alpha < 1 or consecutive < 1:
        raise UserError("--alpha: give a probability in (0, 1); --consecutive: at least 1")
    predictor = load_predictor(model)
    from crystalscope.monitor.run import FrameCutting

    if cut not in ("tiles", "particles") or crop_size < 8:
        raise UserError(f"--cut {cut} / --crop-size {crop_size}: use tiles or particles, and "
                        "a crop side of at least 8 pixels")
    cutting = FrameCutting(crop_size, cut) if frames else None  # type: ignore[arg-type]
    rate, source = choose_false_positive_rate(predictor, Path(model), positive,
                                              given=false_positive_rate, clean_stream=calibrate,
                                              cutting=cutting)
    rule = AlarmRule(positive=positive, false_positive_rate=rate, alpha=alpha,
                     consecutive=consecutive, source=source)
    err.print(f"alarm rule: {consecutive} window(s) in a row with P(this many {positive} calls "
              f"| false-positive rate {rate:.4f}) < {alpha:g}; rate: {source}", highlight=False,
              markup=False)
    runner = Monitor(predictor, rule, out_dir, on_alarm=on_alarm, post_url=post,
                     cutting=cutting)
    if watch_mode:
        if not stream.is_dir():
            raise UserError(f"--watch {stream}: give the folder the probe writes time folders to")
        result = watch(runner, stream, poll_s=poll, settle_s=settle, idle_stop_s=stop_when_idle)
    else:
        with progress_bar() as progress:
            task = progress.add_task("monitor", total=None)
            result = replay(runner, stream, progress=lambda n: progress.advance(task, n),
                            time_from=time_from, pattern=time_pattern,
                            window_seconds=window_seconds)
    per_second = result.seconds or float("inf")
    rate_text = (f"{result.images / per_second:.1f} frames/s, {result.crops / per_second:.0f} "
                 "crops/s" if frames else f"{result.crops / per_second:.0f} crops/s")
    counted = (f"{result.images} frames, {result.crops} crops" if frames
               else f"{result.crops} crops")
    out.print(f"{len(result.windows)} windows, {counted} ({rate_text}); "
              + (f"alarm at window {result.alarm.index} ({result.alarm.time})" if result.alarm
                 else "no alarm"))
    out.print(f"wrote {', '.join(result.files)} to {out_dir}")
    return 3 if result.alarm else 0


# ------------------------------------------------------------------------------- serve


@app.command(epilog="Example: crystalscope serve runs/demo --store crystals.lance --port 8000  "
                    "then open http://127.0.0.1:8000/")
def serve(
    model: Annotated[Path, typer.Argument(help="Run directory or model.onnx.")],
    store: Annotated[str | None, typer.Option(help="Vector store for /similar.")] = None,
    monitor_stream: Annotated[Path | None, typer.Option(
        "--monitor", help="Follow this stream folder (as monitor --watch) for /monitor.")]
    = None,
    positive: Annotated[str, typer.Option(help="--monitor: the impurity class.")] = "",
    false_positive_rate: Annotated[float | None, typer.Option(
        help="--monitor: the model's false impurity rate (default: from the run's report).")]
    = None,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    token: Annotated[str | None, typer.Option(
        envvar="CRYSTALSCOPE_TOKEN", help="Require Authorization: Bearer TOKEN on the API.")]
    = None,
) -> None:
    """The model behind HTTP: /predict, /similar, /model, /monitor, /health, /docs, and a
    dashboard page at / (drop images, see classes and similar crystals, follow a batch)."""
    import uvicorn

    from crystalscope.infer.predictor import load_predictor
    from crystalscope.serve.app import ServeSettings, create_app
    from crystalscope.serve.server import LOOPBACK
    from crystalscope.vectors.backends import open_store

    if host not in LOOPBACK and not token:
        err.print(f"[yellow]serving on {host} without a token: anyone who reaches it can use "
                  "it (give --token)[/yellow]")
    predictor = load_predictor(model)
    settings = ServeSettings(predictor=predictor, token=token,
                             store=open_store(store) if store else None)
    if monitor_stream is not None:
        import threading

        from crystalscope.monitor.run import Monitor, choose_false_positive_rate, watch
        from crystalscope.monitor.trend import AlarmRule

        if not positive:
            raise UserError("--monitor needs --positive CLASS (the impurity)")
        rate, source = choose_false_positive_rate(predictor, Path(model), positive,
                                                  given=false_positive_rate)
        runner = Monitor(predictor, AlarmRule(positive, rate, source=source),
                         Path(tempfile.mkdtemp(prefix="crystalscope-serve-monitor-")))
        settings.monitor = runner
        threading.Thread(target=watch, args=(runner, monitor_stream), daemon=True).start()
    err.print(f"dashboard: http://{host}:{port}/   API docs: http://{host}:{port}/docs")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


# -------------------------------------------------------------------------------- demo


@app.command(epilog="Example: crystalscope demo crystalscope-demo/")
def demo(
    folder: Annotated[Path | None, typer.Argument(
        help="New folder for everything the demo writes (default: a temporary folder).")]
    = None,
    per_class: Annotated[int, typer.Option(help="Synthetic crops per class.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Every stage on a small synthetic set: synth … train, evaluate, export, predict, index."""
    from crystalscope.demo import run_demo

    folder = folder or Path(tempfile.mkdtemp(prefix="crystalscope-demo-"))
    written = run_demo(folder, per_class=per_class, seed=seed, say=out.print)
    out.print("[bold]demo done[/bold]; it wrote:")
    for name, path in written.items():
        out.print(f"  {name}: {path}")


# -------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:2] in (["synth", "batch"], ["synth", "ood"]):  # own commands next to `synth OUT`
        args = [f"synth-{args[1]}", *args[2:]]
    try:
        result = app(args=args, prog_name="crystalscope", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors (click's, vendored by Typer): exit 2
        exc.show()
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except CrystalscopeError as exc:
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc} "
                  "(run with --debug for the traceback)", highlight=False)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
