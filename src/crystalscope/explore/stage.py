"""`crystalscope explore`: embeddings -> map.png, map.html, graph.html, clusters.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crystalscope.errors import UserError
from crystalscope.explore.html import graph_html, scatter_html
from crystalscope.explore.plots import plot_map
from crystalscope.explore.projection import (
    Points,
    Projection,
    points_from_images,
    points_from_store,
    project,
    summarize_clusters,
)
from crystalscope.infer.predictor import Predictor
from crystalscope.infer.stream import Failure
from crystalscope.settings import SettingsError
from crystalscope.vectors.store import VectorStore

OUTPUTS = ("map.png", "map.html", "graph.html", "clusters.json")


@dataclass
class Exploration:
    """What explore found and wrote."""

    points: Points
    projection: Projection
    clusters: list[dict]
    files: dict[str, Path]
    failures: list[Failure]


def explore(out_dir: Path, *, predictor: Predictor | None = None, files: list[Path] | None = None,
            store: VectorStore | None = None, k: int | str = 4, seed: int = 0,
            neighbours: int = 5, zoom: tuple[float, float, float, float] | None = None,
            progress: Callable[[int], None] | None = None) -> Exploration:
    """Embed ``files`` with ``predictor`` (or read every record of ``store``), map, cluster."""
    failures: list[Failure] = []
    if store is not None:
        points = points_from_store(store)
    elif predictor is not None and files is not None:
        points, failures = points_from_images(predictor, files, progress)
    else:
        raise UserError("give images to embed, or --store")
    return explore_points(points, out_dir, k=k, seed=seed, neighbours=neighbours, zoom=zoom,
                          failures=failures)


def explore_points(points: Points, out_dir: Path, *, k: int | str = 4, seed: int = 0,
                   neighbours: int = 5, zoom: tuple[float, float, float, float] | None = None,
                   failures: list[Failure] | None = None) -> Exploration:
    """Map and cluster ``points``; write the maps, the graph and clusters.json (``failures``:
    images that could not be embedded, reported with the result)."""
    projection = project(points.embeddings, k=k, seed=seed)
    clusters = summarize_clusters(points, projection)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingsError("out", "is a file; give a folder", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {name: out_dir / name for name in OUTPUTS}
    plot_map(points, projection, written["map.png"], zoom=zoom)
    scatter_html(points, projection, written["map.html"])
    graph_html(points, projection, written["graph.html"], k=neighbours, seed=seed)
    document = {
        "images": len(points.paths), "k": projection.k, "seed": seed,
        "explained_variance": projection.explained.tolist(),
        "silhouette": projection.silhouette, "clusters": clusters,
        "points": [{"path": p, "x": float(x), "y": float(y), "cluster": int(c),
                    "predicted": pred, "true": true}
                   for p, (x, y), c, pred, true in zip(
                       points.paths, projection.coords, projection.labels, points.predicted,
                       points.true, strict=True)],
    }
    written["clusters.json"].write_text(json.dumps(document, indent=2), encoding="utf-8")
    return Exploration(points=points, projection=projection, clusters=clusters, files=written,
                       failures=list(failures or []))
