"""Interactive pages that work offline: the map as a D3Blocks scatter, and a force-directed
similarity graph (d3graph, the engine of D3Blocks' graph block).

Both libraries inline d3 into the page. Two of their defaults must be overridden: the pages
would load a third-party advertising script unless ``support=False``, and edges with a weight
below 1 are dropped silently, so cosine similarities are mapped onto 1.5-10.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from crystalscope.explore.projection import Points, Projection

CLUSTER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                   "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
GRAPH_NOTE = (
    "How to read this graph: each node is one crystal image, coloured by its k-means cluster "
    "on the map. Each image is linked to its {k} most similar images (cosine similarity of the "
    "model's embeddings); thicker, shorter links are more similar. Edge weight = 1.5 + 8.5 x "
    "similarity. Move the slider to keep only the strongest links: groups that stay connected "
    "are crystals the model sees as alike. Hover a node for its file and classes."
)


def _tooltip(points: Points, projection: Projection, i: int) -> str:
    truth = points.true[i] or "unknown"
    return (f"{html.escape(Path(points.paths[i]).name)}<br>predicted {points.predicted[i]} "
            f"(p={points.probability[i]:.4f})<br>true {truth}<br>cluster "
            f"{projection.labels[i]}")


def _quiet(name: str) -> None:
    logging.getLogger(name).setLevel(logging.ERROR)


def scatter_html(points: Points, projection: Projection, path: Path) -> None:
    """map.html: the 2-D map, one point per image, tooltips with file, classes, cluster."""
    from d3blocks import D3Blocks

    _quiet("d3blocks")
    chart = D3Blocks(verbose="error", support=False)
    chart.scatter(
        projection.coords[:, 0], projection.coords[:, 1],
        color=np.array([CLUSTER_COLOURS[c % len(CLUSTER_COLOURS)]
                        for c in projection.labels]),
        c_gradient=None, size=np.full(len(points.paths), 6), opacity=0.85,
        tooltip=np.array([_tooltip(points, projection, i) for i in range(len(points.paths))]),
        title="crystalscope map", filepath=str(path), showfig=False, overwrite=True,
        xlim=[None, None], ylim=[None, None])


def top_k_edges(embeddings: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """(i, j, cosine similarity) for each image's k most similar others; never i == j."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    k = min(k, len(embeddings) - 1)
    edges = []
    for i, row in enumerate(similarity):
        for j in np.argsort(-row, kind="stable")[:k]:
            edges.append((i, int(j), float(row[j])))
    return edges


def edge_weight(similarity: float) -> float:
    """Cosine similarity -> a weight of at least 1.5 (d3graph drops weights below 1)."""
    return round(1.5 + 8.5 * float(np.clip(similarity, 0.0, 1.0)), 4)


def node_names(points: Points) -> list[str]:
    """Unique node ids ``n<index>`` (file names repeat across folders, and d3graph rewrites
    spaces); the file name is the node's label."""
    return [f"n{i}" for i in range(len(points.paths))]


def graph_html(points: Points, projection: Projection, path: Path, *, k: int = 5) -> None:
    """graph.html: force-directed graph of each image's top-k neighbours."""
    from d3graph import d3graph

    _quiet("d3graph")
    names = node_names(points)
    adjacency = pd.DataFrame(0.0, index=names, columns=names)
    for i, j, similarity in top_k_edges(points.embeddings, k):
        adjacency.iloc[i, j] = edge_weight(similarity)
    graph = d3graph(support=False, verbose=40)
    graph.graph(adjacency)
    order = [int(name[1:]) for name in graph.node_properties]  # d3graph's own node order
    graph.set_node_properties(
        label=[Path(points.paths[i]).name for i in order],
        tooltip=[_tooltip(points, projection, i) for i in order],
        color=[CLUSTER_COLOURS[projection.labels[i] % len(CLUSTER_COLOURS)] for i in order])
    graph.show(filepath=str(path), showfig=False, title="crystalscope similarity graph",
               show_slider=True)
    page = Path(path).read_text(encoding="utf-8")
    note = (f'<div id="crystalscope-note" style="font:14px sans-serif;padding:8px 12px;'
            f'background:#f4f4f4;color:#222">{html.escape(GRAPH_NOTE.format(k=k))}</div>')
    page = page.replace("<body>", "<body>\n" + note, 1) if "<body>" in page else note + page
    Path(path).write_text(page, encoding="utf-8")
