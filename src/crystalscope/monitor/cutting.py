"""Full probe frames cut into crops the model classifies: tiles, or segmented particles.

- ``tiles``: non-overlapping squares of ``crop`` px (a remainder narrower than half a tile is
  dropped). Every part of the frame is looked at; a particle cut by a tile edge is seen twice,
  in halves.
- ``particles``: classical segmentation (scikit-image): smooth, a morphological opening that
  removes thin needles, Otsu's threshold, connected regions above a minimum area; each region
  becomes a square crop around it. Finds compact bright particles (agglomerates) whole, but
  not needles among needles.

`benchmarks/monitor.py --frames 2` measured both on simulated frames: particles alarmed on
every PG batch, about 6 windows after the first PG; tiles on half of them, 13 windows after
(a tile holds a piece of an agglomerate among dense needles, unlike the crops the model
learnt). So ``particles`` is the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from crystalscope.data.images import load_image
from crystalscope.model.spec import ModelSpec, decode

Cutter = Literal["tiles", "particles"]


def cut_tiles(frame: Image.Image, crop: int) -> list[Image.Image]:
    """Non-overlapping ``crop`` x ``crop`` tiles, row by row."""
    width, height = frame.size
    columns, rows = max(1, round(width / crop)), max(1, round(height / crop))
    return [frame.crop((c * crop, r * crop, min(width, (c + 1) * crop),
                        min(height, (r + 1) * crop)))
            for r in range(rows) for c in range(columns)]


def particle_boxes(frame: Image.Image, crop: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) squares around bright compact particles (segmentation)."""
    from skimage import filters, measure, morphology

    gray = np.asarray(frame.convert("L"), dtype=np.float32) / 255
    smooth = filters.gaussian(gray, sigma=2)
    opened = morphology.opening(smooth, morphology.disk(max(2, crop // 16)))
    if float(opened.max() - opened.min()) < 1e-3:
        return []
    # Otsu splits every frame in two, so clean frames give segments too (bright needle
    # bundles, which the model calls CEX): the share of PG among segments then means what it
    # means for crops, and clean windows are not empty.
    mask = opened > filters.threshold_otsu(opened)
    mask = morphology.remove_small_objects(mask, max_size=(crop // 5) ** 2)
    boxes = []
    for region in measure.regionprops(measure.label(mask)):
        top, left, bottom, right = region.bbox
        side = max(int(1.3 * max(bottom - top, right - left)), crop // 2)
        cy, cx = (top + bottom) // 2, (left + right) // 2
        boxes.append((max(0, cx - side // 2), max(0, cy - side // 2),
                      min(frame.width, cx + side // 2), min(frame.height, cy + side // 2)))
    return boxes


def cut_particles(frame: Image.Image, crop: int) -> list[Image.Image]:
    """Square crops around the segmented particles."""
    return [frame.crop(box) for box in particle_boxes(frame, crop)]


def cut_frame(path: Path, crop: int, cutter: Cutter, spec: ModelSpec) -> np.ndarray:
    """(N, 3, S, S) uint8 crops of one frame, decoded as ``spec`` says (squashed to S)."""
    frame = load_image(path, warn_on_mismatch=False).convert("RGB")
    pieces = cut_tiles(frame, crop) if cutter == "tiles" else cut_particles(frame, crop)
    if not pieces:
        return np.zeros((0, 3, spec.input_size, spec.input_size), np.uint8)
    return np.stack([decode(piece, spec)[0] for piece in pieces])
