"""`crystalscope synth` (crops), `synth unknown` (neither class), `synth batch` (over time)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crystalscope.cli.app import synth_app
from crystalscope.cli.options import Workers
from crystalscope.console import err, out, progress_bar


@synth_app.command("crops", epilog="Example: crystalscope synth data/synthetic --per-class 500 "
                    "--difficulty hard --uniform-size 151 --dihedral-copies 3.   A simulated "
                    "batch over time: crystalscope synth batch OUT; images that are neither "
                    "CEX nor PG: crystalscope synth unknown OUT (see --help there).")
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
    workers: Workers = None,
) -> None:
    """Write synthetic particle-vision-probe crops: CEX needles and PG agglomerates.

    Files are named like the public data: OUT/cex/CEX (n).png and OUT/pg/PG (n).png, 8-bit
    grayscale PNG, plus OUT/synth.json (settings and duplicate groups).
    """
    from crystalscope.synth.crops import SynthSettings, parse_difficulty, synthesize

    settings = SynthSettings(per_class=per_class, size=size, uniform_size=uniform_size,
                             difficulty=parse_difficulty(difficulty),
                             dihedral_copies=dihedral_copies, seed=seed)
    with progress_bar() as progress:
        task = progress.add_task("synth", total=2 * per_class)
        summary = synthesize(out_dir, settings, workers=workers,
                             progress=lambda n: progress.advance(task, n))
    err.print(f"wrote {len(summary['files'])} crops to {out_dir} "
              f"({', '.join(summary['classes'])}) and {out_dir / 'synth.json'}")


@synth_app.command(
    "unknown", epilog="Example: crystalscope synth unknown unknown-images/ --per-kind 100")
def synth_unknown(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New folder for the images.")],
    per_kind: Annotated[int, typer.Option(help="Images of each kind.")] = 50,
    kinds: Annotated[str, typer.Option(
        help="Comma-separated: bubble, empty, defocus, cube (near), natural (far), or near, "
             "far, all.")] = "all",
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 151,
    difficulty: Annotated[str, typer.Option(
        help="easy, medium, hard or 0..1, as for CEX/PG crops.")] = "medium",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same images.")] = 0,
    workers: Workers = None,
) -> None:
    """Images a CEX/PG model never saw, to test its unknown flag: bubbles, empty frames,
    heavy defocus, cubes (a third habit) drawn like probe crops, and pieces of scikit-image's
    bundled photographs (the cat, the astronaut, …).

    Writes OUT/<kind>/<kind>-0001.png … and OUT/unknown.json.
    """
    from crystalscope.synth.crops import parse_difficulty
    from crystalscope.synth.unknown import UnknownSettings, parse_kinds, synthesize_unknown

    settings = UnknownSettings(per_kind=per_kind, kinds=parse_kinds(kinds), size=size,
                               difficulty=parse_difficulty(difficulty), seed=seed)
    with progress_bar() as progress:
        task = progress.add_task("synth unknown", total=settings.per_kind * len(settings.kinds))
        summary = synthesize_unknown(out_dir, settings, workers=workers,
                                     progress=lambda n: progress.advance(task, n))
    err.print(f"wrote {len(summary['files'])} images to {out_dir} "
              f"({', '.join(f'{k}: {v}' for k, v in summary['kinds'].items())}) and "
              f"{out_dir / 'unknown.json'}")


synth_app.command("ood", hidden=True)(synth_unknown)  # its earlier name, kept for scripts


@synth_app.command(
    "batch", epilog="Example: crystalscope synth batch batches/ --windows 60 --onset 30")
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
    difficulty: Annotated[str, typer.Option(
        help="easy, medium, hard or 0..1, as for `synth` crops.")] = "0.3",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    frames: Annotated[int, typer.Option(
        help="Write this many full probe frames per window instead of crops (0: crops).")]
    = 0,
    frame_size: Annotated[int, typer.Option(help="--frames: frame side in pixels.")] = 604,
    calibration_windows: Annotated[int, typer.Option(
        help="Windows of the clean calibration batch (the alarm needs at least 30).")] = 40,
) -> None:
    """A simulated batch: crops over time with PG from a known onset, plus a control batch
    and a calibration batch (both PG-free).

    Writes OUT/pg-batch/t0001/…, OUT/control/t0001/… and OUT/calibration/t0001/…, each with
    truth.csv, and batch.json.
    """
    from crystalscope.synth.batch import BatchSettings, synthesize_batch
    from crystalscope.synth.crops import parse_difficulty

    settings = BatchSettings(windows=windows, per_window=per_window, onset=onset, rate=rate,
                             max_fraction=max_fraction, size=size,
                             difficulty=parse_difficulty(difficulty),
                             seed=seed, frames=frames, frame_size=frame_size,
                             calibration_windows=calibration_windows)
    with progress_bar() as progress:
        task = progress.add_task("synth batch",
                                 total=(2 * windows + calibration_windows) * per_window)
        summary = synthesize_batch(out_dir, settings,
                                   progress=lambda n: progress.advance(task, n))
    for batch in summary["batches"].values():
        count = sum(p.is_dir() for p in Path(batch["folder"]).iterdir())
        out.print(f"{batch['folder']}: {count} windows of {per_window} crops; first PG in "
                  f"window {batch['first_pg_window'] or '-'}")
