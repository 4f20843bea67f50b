"""map.png: the 2-D map with image thumbnails (up to a few hundred images), or a dot map
coloured by cluster with the marker showing the class (for thousands)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from crystalscope.data.images import ImageLoadError, load_image
from crystalscope.explore.projection import Points, Projection

MAX_THUMBNAILS = 300
MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
THUMBNAIL_PX = 40


def _thumbnail(path: str) -> np.ndarray | None:
    try:
        image = load_image(path, warn_on_mismatch=False).convert("L")
    except (ImageLoadError, OSError):
        return None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return np.asarray(image)


def plot_map(points: Points, projection: Projection, path: Path, *,
             thumbnails: bool | None = None,
             zoom: tuple[float, float, float, float] | None = None) -> Figure:
    """Save the map; ``zoom`` = (x0, x1, y0, y1) in map units shows only that region."""
    coords, labels = projection.coords, projection.labels
    shown = np.arange(len(coords))
    if zoom is not None:
        x0, x1, y0, y1 = zoom
        shown = shown[(coords[:, 0] >= x0) & (coords[:, 0] <= x1)
                      & (coords[:, 1] >= y0) & (coords[:, 1] <= y1)]
    use_thumbnails = len(shown) <= MAX_THUMBNAILS if thumbnails is None else thumbnails
    colours = plt.get_cmap("tab10")
    classes = sorted({points.label(i) for i in range(len(coords))})
    figure, axes = plt.subplots(figsize=(11, 9))
    for i in shown:
        colour = colours(labels[i] % 10)
        picture = _thumbnail(points.paths[i]) if use_thumbnails else None
        if picture is not None:
            box = AnnotationBbox(OffsetImage(picture, cmap="gray", zoom=0.8), coords[i],
                                 frameon=True, pad=0.1,
                                 bboxprops={"edgecolor": colour, "linewidth": 2})
            axes.add_artist(box)
        axes.plot(*coords[i], MARKERS[classes.index(points.label(i)) % len(MARKERS)],
                  color=colour, markersize=4 if use_thumbnails else 6, alpha=0.8,
                  markeredgecolor="black", markeredgewidth=0.3)
    if len(shown):
        margin = 0.05 * (np.ptp(coords[shown], axis=0) + 1e-9)
        axes.set_xlim(coords[shown, 0].min() - margin[0], coords[shown, 0].max() + margin[0])
        axes.set_ylim(coords[shown, 1].min() - margin[1], coords[shown, 1].max() + margin[1])
    axes.set_xlabel(f"PC1 ({100 * projection.explained[0]:.1f}% of variance)")
    axes.set_ylabel(f"PC2 ({100 * projection.explained[1]:.1f}% of variance)")
    known = "true class where the folder says, else predicted"
    axes.set_title(f"{len(shown)} crystals, {projection.k} k-means clusters (colour); "
                   f"marker: class ({known})", fontsize=10)
    handles = [Line2D([], [], marker="o", linestyle="", color=colours(c % 10),
                      label=f"cluster {c}") for c in range(projection.k)]
    handles += [Line2D([], [], marker=MARKERS[i % len(MARKERS)], linestyle="", color="grey",
                       label=name) for i, name in enumerate(classes)]
    axes.legend(handles=handles, loc="best", fontsize=8)
    axes.grid(alpha=0.2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return figure
