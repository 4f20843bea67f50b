"""`crystalscope synth batch`: a simulated crystallization, crops over time, PG from a known
onset on — and a control batch without PG — to test and demonstrate `monitor`.

Layout: ``OUT/pg-batch/t0001/crop-0001.png …``, ``OUT/control/t0001/…`` and
``OUT/calibration/t0001/…`` (a second PG-free batch of ``calibration_windows`` windows, to
measure the model's false-positive rate and its spread under the same imaging, as a plant would
on a known-clean batch), one folder per time window,
plus ``truth.csv`` in each batch (window, PG crops, all crops) and ``batch.json``.
The PG share is 0 before ``onset`` and grows by ``rate`` per window after it (up to
``max_fraction``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from crystalscope.errors import UserError
from crystalscope.parallel import ordered_map
from crystalscope.settings import Settings
from crystalscope.synth.crops import SynthSettings, render_crop
from crystalscope.synth.scenes import render_frame


class BatchSettings(Settings):
    """Everything that decides a simulated batch."""

    windows: int = Field(60, ge=1)
    per_window: int = Field(40, ge=1)
    onset: int = Field(30, ge=1)
    rate: float = Field(0.02, gt=0, le=1)
    max_fraction: float = Field(0.5, gt=0, le=1)
    size: int = Field(151, ge=32, le=512)  # the CEX crop side, as `synth` draws it
    difficulty: float = Field(0.3, ge=0.0, le=1.0)
    seed: int = 0
    frames: int = Field(0, ge=0)  # > 0: this many full probe frames per window, not crops
    frame_size: int = 604
    # The clean calibration stream's windows: the alarm measures the false calls' window-to-
    # window spread on at least 30.
    calibration_windows: int = Field(40, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> BatchSettings:
        if self.onset > self.windows:
            raise ValueError(f"onset: window {self.onset} is after the last ({self.windows})")
        if self.frames and self.frame_size < 2 * self.size:
            raise ValueError(f"frame_size: give at least twice size ({2 * self.size})")
        return self


def pg_fraction(settings: BatchSettings, window: int) -> float:
    """The true PG share of window ``window`` (1-based) in the PG batch."""
    if window < settings.onset:
        return 0.0
    return min(settings.max_fraction, settings.rate * (window - settings.onset + 1))


def _render_frames(folder: Path, rng: np.random.Generator, with_pg: bool, window: int,
                   settings: BatchSettings) -> tuple[int, int]:
    """Full frames: needles at the crops' scale, PG agglomerates at random places. The PG
    share is that of crop-sized places holding an agglomerate."""
    places = (settings.frame_size // settings.size) ** 2
    pasted = 0
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(1, settings.frames + 1):
        count = int(rng.binomial(places, pg_fraction(settings, window))) if with_pg else 0
        frame, _ = render_frame(rng, settings.frame_size, settings.size, settings.difficulty,
                                count)
        Image.fromarray(frame).save(folder / f"frame-{index:04d}.png")
        pasted += count
    return pasted, settings.frames * places


def _render_window(job: tuple[Path, int, int, bool, BatchSettings, int]) -> tuple[int, int]:
    folder, window, count, with_pg, settings, stream = job
    rng = np.random.default_rng([settings.seed, window, stream])
    if settings.frames:
        return _render_frames(folder, rng, with_pg, window, settings)
    n_pg = int(rng.binomial(count, pg_fraction(settings, window))) if with_pg else 0
    kinds = np.array([True] * n_pg + [False] * (count - n_pg))
    rng.shuffle(kinds)
    folder.mkdir(parents=True, exist_ok=True)
    # The same drawing as `crystalscope synth` (sizes included): a monitor sees crops of the
    # kind its model was trained on.
    crops = SynthSettings(size=settings.size, difficulty=settings.difficulty)
    for index, is_pg in enumerate(kinds, 1):
        crop = render_crop(rng, "pg" if is_pg else "cex", crops)
        Image.fromarray(crop).save(folder / f"crop-{index:04d}.png")
    return n_pg, count


def synthesize_batch(out: Path, settings: BatchSettings, *, workers: int | None = None,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Write the PG batch and the control batch under ``out``; returns batch.json's content."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: is not empty; give a new folder")
    summary = {"settings": settings.model_dump(), "batches": {}}
    for stream, (name, with_pg) in enumerate((("pg-batch", True), ("control", False),
                                              ("calibration", False))):
        windows = settings.calibration_windows if name == "calibration" else settings.windows
        jobs = [(out / name / f"t{w:04d}", w, settings.per_window, with_pg, settings, stream)
                for w in range(1, windows + 1)]
        counts = []
        for result in ordered_map(_render_window, jobs, workers=workers, min_parallel=4,
                                  chunksize=1):
            counts.append(result)
            if progress:
                progress(settings.per_window)
        with (out / name / "truth.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["window", "pg", "crops", "true_pg_fraction"])
            for w, (n_pg, n) in enumerate(counts, 1):
                writer.writerow([w, n_pg, n, pg_fraction(settings, w) if with_pg else 0.0])
        summary["batches"][name] = {"folder": str(out / name),
                                    "first_pg_window": next((w for w, (n_pg, _) in
                                                             enumerate(counts, 1) if n_pg),
                                                            None)}
    (out / "batch.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
