"""`crystalscope label`: the labelling page (``label start``, the group's short form) and the
trade with Label Studio (``label export``, ``label import``)."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from crystalscope.cli.app import label_app
from crystalscope.cli.options import (
    AllowedHostOption,
    HostOption,
    MaxConcurrencyOption,
    PortOption,
    TokenOption,
)
from crystalscope.console import err

if TYPE_CHECKING:
    from crystalscope.infer.predictor import Predictor

ImagesArgument = Annotated[Path, typer.Argument(
    help="Folder of crops to label (searched recursively; never changed).")]
OutOption = Annotated[Path, typer.Option(
    help="Folder the labels go to: labels.csv and one folder per class (split and train take "
         "it as is).")]
ClassesOption = Annotated[str, typer.Option(
    help="Class names in key order, e.g. cex,pg (keys 1, 2, …).")]
ModelOption = Annotated[Path | None, typer.Option(
    help="Run directory or model.onnx: shows its guess and puts first what it is unsure of.")]


@label_app.command("start", epilog="Example: crystalscope label new-crops/ --out labelled/ "
                                   "--classes cex,pg --model runs/demo")
def label(
    images: ImagesArgument,
    out: OutOption,
    classes: ClassesOption,
    model: ModelOption = None,
    link: Annotated[bool, typer.Option("--link", help="Hard-link instead of copying (same "
                                                      "file system).")] = False,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8001,
    token: TokenOption = None,
    allowed_host: AllowedHostOption = None,
    max_concurrency: MaxConcurrencyOption = 32,
) -> None:
    """Label crops one at a time in a local page: keys 1-9 assign a class, u = not sure, z =
    undo, arrows move. Every decision is appended to OUT/labels.csv at once and the file is
    copied into OUT/<class>/; a restart resumes where it stopped."""
    from crystalscope.label.app import create_label_app
    from crystalscope.label.session import open_session, parse_label_classes
    from crystalscope.serve.server import LOOPBACK, allowed_hosts, serve_forever, warn_hosts

    names = parse_label_classes(classes)
    predictor = _predictor(model)
    if host not in LOOPBACK and not token:
        err.print(f"[yellow]serving on {host} without a token: anyone who reaches it can "
                  "label (give --token)[/yellow]")
    session = open_session(images, out, names, predictor=predictor, link=link)
    try:
        state = session.state()
        err.print(f"{state['total']} crops, {state['labelled']} labelled, {state['left']} left"
                  + (f", {len(session.unreadable)} unreadable (listed on the page)"
                     if session.unreadable else ""))
        err.print(session.scores.note)
        suffix = f"?token={token}" if token else ""
        err.print(f"label at http://{host}:{port}/{suffix}   (Ctrl-C to stop; nothing is lost)")
        hosts = allowed_hosts(host, allowed_host or [])
        warn_hosts(host, hosts)
        serve_forever(create_label_app(session, token, hosts), host, port, max_concurrency)
    finally:
        session.close()


class TaskFormat(StrEnum):
    label_studio = "label-studio"


@label_app.command("export", epilog="Example: crystalscope label export new-crops/ --out "
                                    "labelled/ --classes cex,pg --model runs/demo --output "
                                    "tasks.json")
def export_labels(
    images: ImagesArgument,
    out: OutOption,
    classes: ClassesOption,
    output: Annotated[Path, typer.Option(help="The new tasks file (JSON); the labelling "
                                              "config is written beside it (.xml).")],
    model: ModelOption = None,
    task_format: Annotated[TaskFormat, typer.Option(
        "--format", help="label-studio: Label Studio tasks.")] = TaskFormat.label_studio,
    url_prefix: Annotated[str, typer.Option(
        help="What goes before each crop's path in the image URL (default: Label Studio's "
             "local files, with LOCAL_FILES_DOCUMENT_ROOT = the images folder).")]
    = "/data/local-files/?d=",
) -> None:
    """Every crop as a Label Studio task: its image, the model's guess as a prediction, and the
    label made here (if any) as an annotation; and the project's labelling config."""
    from crystalscope.infer.output import check_new_file
    from crystalscope.label.session import open_session, parse_label_classes
    from crystalscope.label.studio import export_tasks, label_config

    config_path = output.with_suffix(".xml")
    for path in (output, config_path):
        check_new_file(path)
    session = open_session(images, out, parse_label_classes(classes),
                           predictor=_predictor(model))
    try:
        tasks = export_tasks(session, url_prefix, model_version=str(model or ""))
    finally:
        session.close()
    output.write_text(json.dumps(tasks, indent=1), encoding="utf-8")
    config_path.write_text(label_config(session.classes), encoding="utf-8")
    labelled = sum("annotations" in t for t in tasks)
    err.print(f"wrote {len(tasks)} tasks ({labelled} labelled, "
              f"{sum('predictions' in t for t in tasks)} with the model's guess) to {output}; "
              f"the labelling config to {config_path}")


@label_app.command("import", epilog="Example: crystalscope label import project-1.json "
                                    "new-crops/ --out labelled/ --classes cex,pg")
def import_labels(
    export: Annotated[Path, typer.Argument(help="A Label Studio JSON export (a list of tasks).")],
    images: ImagesArgument,
    out: OutOption,
    classes: ClassesOption,
) -> None:
    """Labels made in Label Studio into OUT: each task's latest annotation, matched to its crop
    by path, journalled in labels.csv (input "import") and copied into OUT/<class>/."""
    from crystalscope.label.session import open_session, parse_label_classes
    from crystalscope.label.studio import match_tasks, read_tasks

    tasks = read_tasks(export)
    session = open_session(images, out, parse_label_classes(classes))
    try:
        result = match_tasks(session, tasks)
        session.record_many(result.labelled, "import")
        counts = session.counts()
    finally:
        session.close()
    err.print(f"imported {len(result.labelled)} labels from {export} "
              f"({', '.join(f'{k} {v}' for k, v in counts.items())} in {out} now)")
    if result.unannotated:
        err.print(f"{result.unannotated} task(s) without an annotation: left as they were")
    if result.unmatched:
        err.print(f"[yellow]{len(result.unmatched)} task(s) name no crop in {images}, e.g. "
                  f"{result.unmatched[0]}[/yellow]")
    if result.not_a_class:
        err.print(f"[yellow]{len(result.not_a_class)} label(s) are not in --classes, e.g. "
                  f"{result.not_a_class[0]!r}: not imported[/yellow]")


def _predictor(model: Path | None) -> Predictor | None:
    if model is None:
        return None
    from crystalscope.infer.predictor import load_predictor

    return load_predictor(model)
