"""`crystalscope demo`: every stage on a small synthetic data set, on a laptop CPU, in minutes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from crystalscope.data.check import scan_dataset, summarize
from crystalscope.data.split import split_dataset
from crystalscope.data.synth import SynthSettings, synthesize
from crystalscope.errors import UserError


def run_demo(folder: Path, *, per_class: int = 120, seed: int = 0,
             say: Callable[[str], None] = print) -> dict[str, Path]:
    """Run synth -> data check -> split under ``folder`` and return what was written where."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder}: is not empty; give a new folder for the demo")
    images, splits = folder / "images", folder / "splits"

    say(f"1/3 synth: {per_class} CEX and {per_class} PG crops (PG with rotated copies) -> {images}")
    synthesize(images, SynthSettings(per_class=per_class, difficulty=0.3, dihedral_copies=2,
                                     seed=seed))

    say(f"2/3 data check: {images}")
    report = summarize(scan_dataset(images))
    say(f"    {report['readable']} readable images, {len(report['duplicate_groups'])} duplicate "
        f"groups holding {report['duplicate_files']} extra copies, "
        f"{report['label_conflicts']} label conflicts")

    say(f"3/3 split 70/25/5, duplicate groups kept together -> {splits}")
    result = split_dataset(images, splits, seed=seed)
    for name, counts in result.report["counts"].items():
        say(f"    {name}: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return {"images": images, "splits": splits, "manifest": splits / "manifest.csv"}
