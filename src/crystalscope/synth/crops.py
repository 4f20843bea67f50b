"""`crystalscope synth`: a data set of synthetic particle-vision-probe crops, CEX and PG.

What a crop shows is drawn in :mod:`crystalscope.synth.scenes`; this module decides sizes,
names, rotated copies and files. Every image is drawn from its own random generator seeded by
(seed, class, number), so a crop is the same whatever ``per_class`` or the worker count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import Field

from crystalscope.errors import UserError
from crystalscope.parallel import ordered_map
from crystalscope.settings import Settings, SettingsError
from crystalscope.synth.scenes import render_cex, render_pg

CLASSES = ("cex", "pg")
PREFIX = {"cex": "CEX", "pg": "PG"}
DIFFICULTY_LEVELS = {"easy": 0.0, "medium": 0.5, "hard": 1.0}
PG_SIZE_RANGE = (0.87, 1.52)  # PG crop sides relative to the CEX side (132..230 px for 151)


class SynthSettings(Settings):
    """Everything that decides the synthetic data set."""

    per_class: int = Field(200, ge=1)
    size: int = Field(151, ge=32, le=2048)  # the CEX crop side
    uniform_size: int | None = Field(None, ge=16, le=2048)
    difficulty: float = Field(0.3, ge=0.0, le=1.0)
    dihedral_copies: int = Field(0, ge=0, le=7)  # a crop has 8 rotations/flips
    seed: int = 0


def parse_difficulty(text: str) -> float:
    """``easy``/``medium``/``hard`` or a number in 0..1."""
    text = str(text).strip().lower()
    if text in DIFFICULTY_LEVELS:
        return DIFFICULTY_LEVELS[text]
    try:
        value = float(text)
    except ValueError:
        raise SettingsError("difficulty", "give easy, medium, hard or a number in 0..1",
                            repr(text)) from None
    if not 0.0 <= value <= 1.0:
        raise SettingsError("difficulty", "give a number in 0..1", repr(text))
    return value


RENDERERS: dict[str, Callable[[np.random.Generator, int, int, float], np.ndarray]] = {
    "cex": render_cex,
    "pg": render_pg,
}


# ------------------------------------------------------------------------------ data set


def crop_shape(rng: np.random.Generator, class_name: str, settings: SynthSettings
               ) -> tuple[int, int]:
    """(height, width) of one crop: square for CEX, variable for PG, or the uniform size."""
    if settings.uniform_size:
        return settings.uniform_size, settings.uniform_size
    if class_name == "cex":
        return settings.size, settings.size
    low, high = PG_SIZE_RANGE
    return (round(settings.size * rng.uniform(low, high)),
            round(settings.size * rng.uniform(low, high)))


def render_crop(rng: np.random.Generator, class_name: str, settings: SynthSettings
                ) -> np.ndarray:
    """One crop of ``class_name`` as the data set draws it: its shape, then its content."""
    h, w = crop_shape(rng, class_name, settings)
    return RENDERERS[class_name](rng, h, w, settings.difficulty)


def _transform(array: np.ndarray, k: int) -> np.ndarray:
    """Dihedral transform k in 0..7: rotate by k % 4 quarter turns, flip if k >= 4."""
    out = np.rot90(array, k % 4)
    return np.ascontiguousarray(np.fliplr(out) if k >= 4 else out)


def render_group(class_name: str, number: int, settings: SynthSettings) -> list[np.ndarray]:
    """The crop numbered ``number`` and its rotated/flipped copies (PG only)."""
    class_index = CLASSES.index(class_name)
    rng = np.random.default_rng([settings.seed, class_index, number])
    crop = render_crop(rng, class_name, settings)
    copies = settings.dihedral_copies if class_name == "pg" else 0
    transforms = rng.permutation(np.arange(1, 8))[:copies]
    return [crop] + [_transform(crop, int(k)) for k in transforms]


def _render_and_write(job: tuple[str, int, int, SynthSettings, str]) -> list[dict]:
    class_name, first_number, count, settings, out = job
    folder = Path(out) / class_name
    written = []
    for offset, array in enumerate(render_group(class_name, first_number, settings)[:count]):
        number = first_number + offset
        name = f"{PREFIX[class_name]} ({number}).png"
        Image.fromarray(array, mode="L").save(folder / name, compress_level=3)
        written.append({"file": f"{class_name}/{name}", "class": class_name,
                        "group": f"{class_name}-{first_number}", "copy_of_first": offset > 0,
                        "height": int(array.shape[0]), "width": int(array.shape[1])})
    return written


def synthesize(out: Path, settings: SynthSettings, *, workers: int | None = None,
               progress: Callable[[int], None] | None = None) -> dict:
    """Write ``settings.per_class`` crops per class under ``out/<class>/`` and ``synth.json``.

    Refuses an ``out`` folder that already holds files. Returns the summary written to
    ``synth.json`` (settings, and one entry per file with its duplicate group).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new folder")
    group_size = 1 + settings.dihedral_copies
    jobs = []
    for class_name in CLASSES:
        (out / class_name).mkdir(parents=True, exist_ok=True)
        step = group_size if class_name == "pg" else 1
        for first in range(1, settings.per_class + 1, step):
            count = min(step, settings.per_class - first + 1)
            jobs.append((class_name, first, count, settings, str(out)))
    files: list[dict] = []
    for written in ordered_map(_render_and_write, jobs, workers=workers):
        files.extend(written)
        if progress:
            progress(len(written))
    summary = {"settings": settings.model_dump(), "classes": list(CLASSES), "files": files}
    (out / "synth.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
