"""Interactive pages that work offline: the map as a D3Blocks scatter, and a force-directed
similarity graph (d3graph, the engine of D3Blocks' graph block).

Both libraries inline d3 into the page. Two of their defaults must be overridden: the pages
would load a third-party advertising script unless ``support=False``, and edges with a weight
below 1 are dropped silently, so cosine similarities are mapped onto 1.5-10.

d3graph takes a dense adjacency matrix and a browser lays out a few thousand nodes at most, so
the graph shows at most ``GRAPH_MAX_NODES`` images, drawn from every cluster in proportion
(seeded); neighbours come from a k-nearest-neighbour search (scikit-learn), never an N x N
similarity matrix.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from crystalscope.explore.projection import Points, Projection

GRAPH_MAX_NODES = 1500
CLUSTER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                   "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
GRAPH_NOTE = (
    "How to read this graph: each node is one crystal image, coloured by its k-means cluster "
    "on the map. Each image is linked to its {k} most similar images (cosine similarity of the "
    "model's embeddings); thicker, shorter links are more similar. Edge weight = 1.5 + 8.5 x "
    "similarity. Move the slider to keep only the strongest links: groups that stay connected "
    "are crystals the model sees as alike. Hover a node for its file and classes.{sample}"
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
    """(i, j, cosine similarity) for each image's k most similar others; never i == j.

    A k-nearest-neighbour search in bounded memory (no N x N matrix); ties keep the lower
    index first.
    """
    from sklearn import config_context
    from sklearn.neighbors import NearestNeighbors

    n = len(embeddings)
    k = min(k, n - 1)
    if k < 1:
        return []
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    search = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute")
    with config_context(working_memory=64):  # MiB per chunk of the distance matrix
        distances, neighbours = search.fit(unit).kneighbors(unit)
    edges = []
    for i in range(n):
        others = [(float(d), int(j)) for d, j in zip(distances[i], neighbours[i], strict=True)
                  if j != i]
        for _, j in sorted(others)[:k]:
            edges.append((i, j, float(unit[i] @ unit[j])))
    return edges


def graph_sample(labels: np.ndarray, max_nodes: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_nodes`` points, each cluster in proportion to its size (at
    least one each), sorted; all points when there are few enough."""
    n = len(labels)
    if n <= max_nodes:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    chosen = []
    clusters = np.unique(labels)
    for cluster in clusters:
        members = np.flatnonzero(labels == cluster)
        take = max(1, round(max_nodes * len(members) / n))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    picked = np.sort(np.concatenate(chosen))
    if len(picked) > max_nodes:  # rounding up in many small clusters
        picked = np.sort(rng.choice(picked, size=max_nodes, replace=False))
    return picked


def edge_weight(similarity: float) -> float:
    """Cosine similarity -> a weight of at least 1.5 (d3graph drops weights below 1)."""
    return round(1.5 + 8.5 * float(np.clip(similarity, 0.0, 1.0)), 4)


def graph_html(points: Points, projection: Projection, path: Path, *, k: int = 5,
               max_nodes: int = GRAPH_MAX_NODES, seed: int = 0) -> int:
    """graph.html: force-directed graph of each image's top-k neighbours (among at most
    ``max_nodes`` images sampled by cluster); returns how many images it shows."""
    from d3graph import d3graph

    _quiet("d3graph")
    shown = graph_sample(projection.labels, max_nodes, seed)
    names = [f"n{i}" for i in shown]
    adjacency = pd.DataFrame(0.0, index=names, columns=names)
    for a, b, similarity in top_k_edges(points.embeddings[shown], k):
        adjacency.iloc[a, b] = edge_weight(similarity)
    graph = d3graph(support=False, verbose=40)
    graph.graph(adjacency)
    order = [int(name[1:]) for name in graph.node_properties]  # d3graph's own node order
    graph.set_node_properties(
        label=[Path(points.paths[i]).name for i in order],
        tooltip=[_tooltip(points, projection, i) for i in order],
        color=[CLUSTER_COLOURS[projection.labels[i] % len(CLUSTER_COLOURS)] for i in order])
    graph.show(filepath=str(path), showfig=False, title="crystalscope similarity graph",
               show_slider=True)
    sample = ("" if len(shown) == len(points.paths) else
              f" It shows {len(shown):,} of the {len(points.paths):,} images, drawn from every "
              "cluster in proportion; links are among those shown.")
    page = Path(path).read_text(encoding="utf-8")
    note = (f'<div id="crystalscope-note" style="font:14px sans-serif;padding:8px 12px;'
            f'background:#f4f4f4;color:#222">'
            f'{html.escape(GRAPH_NOTE.format(k=k, sample=sample))}</div>')
    page = page.replace("<body>", "<body>\n" + note, 1) if "<body>" in page else note + page
    Path(path).write_text(page, encoding="utf-8")
    return len(shown)
