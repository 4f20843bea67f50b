"""`crystalscope data check`, `data download` and `split`: the data before training."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from crystalscope.cli.app import app, data_app
from crystalscope.cli.options import AsJson, Workers
from crystalscope.console import err, out, progress_bar

if TYPE_CHECKING:
    pass

@data_app.command("check", epilog="Example: crystalscope data check archive/ --json > check.json")
def data_check(
    folder: Annotated[Path, typer.Argument(metavar="DIR",
                                           help="Folder with one sub-folder per class.")],
    as_json: AsJson = False,
    strict: Annotated[bool, typer.Option(
        help="Exit 1 if any file is unreadable or a duplicate group spans classes.")] = False,
    workers: Workers = None,
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




class SplitOrder(StrEnum):
    shuffle = "shuffle"
    sorted = "sorted"


class SplitLayout(StrEnum):
    crystalscope = "crystalscope"
    ultralytics = "ultralytics"


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
    group_by: Annotated[str | None, typer.Option(
        help="Keep files whose paths give the same key in one split: a regular expression "
             "over each path relative to SRC's class folders' parent; its first group is the "
             r"key, e.g. '(session\d+)' or '^[^/]+/([^_]+)_'.")] = None,
    group_file: Annotated[Path | None, typer.Option(
        help="Keep files with the same key in one split: a CSV with a 'file' column (paths "
             "as for --group-by) and the key's column (--group-column).")] = None,
    group_column: Annotated[str, typer.Option(help="--group-file: the key's column.")]
    = "group",
    layout: Annotated[SplitLayout, typer.Option(
        help="crystalscope: DEST/{train,valid,test}; ultralytics: DEST/{train,val,test} "
             "(ImageFolder and Ultralytics classification). Every command reads both.")]
    = SplitLayout.crystalscope,
    as_json: AsJson = False,
    workers: Workers = None,
) -> None:
    """Split class folders into DEST/{train,valid,test}/<class>/, stratified per class.

    Rotated/flipped and exact copies of one crop stay in one split. Writes DEST/manifest.csv
    (source, dest, sha256, group, split) before any file moves, and DEST/split.json.
    Nothing is overwritten; a killed run is finished with --resume.
    """
    from crystalscope.data.split import split_dataset
    from crystalscope.data.split_settings import SplitSettings

    if link and move:
        raise typer.BadParameter("choose one of --link and --move (the default is to "
                                 "copy)", param_hint="--link/--move")
    settings = SplitSettings(ratios=ratios, seed=seed, order=order.value,
                             mode="link" if link else "move" if move else "copy",
                             group_by=group_by, group_file=group_file,
                             group_column=group_column, layout=layout.value)
    with progress_bar() as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        result = split_dataset(src, dest, settings, resume=resume, workers=workers,
                               progress=report)
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
