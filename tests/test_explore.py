"""explore and explain: reproducible clusters, real PNGs, complete offline HTML pages (checked
in headless Chromium with the network off), and CAMs that look at the PG agglomerate."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crystalscope.cli import main
from crystalscope.errors import UserError
from crystalscope.explore.cam import explain_image, load_torch_model
from crystalscope.explore.html import top_k_edges
from crystalscope.explore.projection import project
from crystalscope.synth.scenes import render_pg_with_mask

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _points_in_scatter(page: str) -> list:
    data = re.search(r"var jsonData = (\[.*?\]);\n", page, re.S)
    assert data, "no point data in map.html"
    return json.loads(data.group(1).replace("NaN", "null"))


def _graph(page: str) -> dict:
    data = re.search(r"graph = (\{.*?\});?\n", page, re.S)
    assert data, "no graph data in graph.html"
    return json.loads(data.group(1))


def test_clusters_are_reproducible() -> None:
    rng = np.random.default_rng(0)
    embeddings = np.abs(rng.normal(size=(80, 32))) + np.repeat(np.eye(4, 32) * 4, 20, axis=0)
    first, second = project(embeddings, k=4, seed=3), project(embeddings, k=4, seed=3)
    assert np.array_equal(first.labels, second.labels)
    assert np.allclose(first.coords, second.coords)
    auto = project(embeddings, k="auto", seed=3)
    assert auto.k == project(embeddings, k="auto", seed=3).k and 2 <= auto.k <= 8
    with pytest.raises(UserError, match="--k"):
        project(embeddings, k=200)


def test_planted_clusters_are_recovered() -> None:
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 64)) * 3
    truth = np.repeat(np.arange(3), 50)
    embeddings = centres[truth] + rng.normal(scale=0.4, size=(150, 64))
    projection = project(embeddings, k=3, seed=0)
    assert adjusted_rand_score(truth, projection.labels) >= 0.95
    assert project(embeddings, k="auto", seed=0).k == 3


def test_top_k_edges_equal_an_exact_search_in_bounded_memory() -> None:
    import tracemalloc

    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(300, 16))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    expected = {(i, int(j)) for i in range(300) for j in np.argsort(-similarity[i])[:4]}
    edges = top_k_edges(embeddings, 4)
    assert {(i, j) for i, j, _ in edges} == expected
    assert all(s == pytest.approx(similarity[i, j]) for i, j, s in edges)
    big = rng.normal(size=(20_000, 32)).astype(np.float32)
    tracemalloc.start()
    top_k_edges(big, 5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 600 * 2**20  # a dense 20,000^2 float64 matrix alone would be 3.2 GB


def test_the_graph_samples_every_cluster_in_proportion() -> None:
    from crystalscope.explore.html import graph_sample

    labels = np.repeat([0, 1, 2], [9000, 900, 3])
    shown = graph_sample(labels, 1000, seed=1)
    assert len(shown) <= 1000 and len(set(shown)) == len(shown)
    counts = np.bincount(labels[shown], minlength=3)
    assert abs(counts[0] - 909) <= 2 and abs(counts[1] - 91) <= 2 and counts[2] >= 1
    assert np.array_equal(graph_sample(labels[:50], 1000), np.arange(50))


def test_top_k_edges_have_no_self_loops() -> None:
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(10, 8))
    embeddings[3] = embeddings[2]  # duplicates must still not link to themselves
    edges = top_k_edges(embeddings, 3)
    assert len(edges) == 30 and all(i != j for i, j, _ in edges)
    assert (2, 3, pytest.approx(1.0)) in [(i, j, s) for i, j, s in edges]


@pytest.fixture(scope="module")
def explored(exported_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("explore")
    splits = exported_run.parent.parent / "splits"
    with pytest.raises(SystemExit) as exit_info:
        main(["explore", str(exported_run), str(splits / "valid"), str(splits / "test"),
              "--out", str(out), "--k", "3", "--json"])
    assert exit_info.value.code == 0
    return out


def test_explore_writes_a_png_and_complete_pages(explored: Path, exported_run: Path) -> None:
    splits = exported_run.parent.parent / "splits"
    count = len(list((splits / "valid").rglob("*.png"))) + len(list((splits / "test")
                                                                     .rglob("*.png")))
    with Image.open(explored / "map.png") as image:
        assert image.format == "PNG" and image.width > 500
        assert np.asarray(image.convert("L")).std() > 5
    summary = json.loads((explored / "clusters.json").read_text())
    assert summary["images"] == count and summary["k"] == 3
    assert sum(c["size"] for c in summary["clusters"]) == count
    assert len(_points_in_scatter((explored / "map.html").read_text())) == count
    graph = _graph((explored / "graph.html").read_text())
    assert len(graph["nodes"]) == count
    assert all(link["source"] != link["target"] for link in graph["links"])
    assert len(graph["links"]) == 5 * count  # every image's 5 nearest: none dropped
    for name in ("map.html", "graph.html"):
        page = (explored / name).read_text()
        assert not re.search(r"<script[^>]*\bsrc=", page), "a script is loaded from elsewhere"
        assert "ethicalads" not in page
    assert "How to read this graph" in (explored / "graph.html").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install "
                                              "chromium); .ci/run installs it")
def test_pages_render_offline_in_headless_chromium(explored: Path) -> None:
    from playwright.sync_api import sync_playwright

    count = json.loads((explored / "clusters.json").read_text())["images"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                            "--disable-background-networking",
                                            "--disable-component-update", "--no-first-run"])
        context = browser.new_context()
        outside: list[str] = []

        def network_off(route) -> None:
            if route.request.url.startswith(("file:", "data:")):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", network_off)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text)
                if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))

        page.goto((explored / "graph.html").as_uri())
        page.wait_for_timeout(1000)
        assert page.locator("svg .node").count() == count
        assert page.locator("svg line").count() == 5 * count

        page.goto((explored / "map.html").as_uri())
        page.wait_for_timeout(1000)
        assert page.locator("#scatterSvg text").count() > 0  # the axes
        painted = page.evaluate(
            """() => { const c = document.getElementById('scatterCanvas');
                       const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                       let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                       return n; }""")
        assert painted > 50 * count  # the points are drawn (D3Blocks paints them on a canvas)
        browser.close()
    assert outside == [] and errors == []


def test_explore_from_a_store(exported_run: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    images = exported_run.parent.parent / "splits" / "test"
    store = tmp_path / "s.lance"
    with pytest.raises(SystemExit):
        main(["index", str(exported_run), str(images), "--store", str(store)])
    with pytest.raises(SystemExit) as exit_info:
        main(["explore", str(exported_run), "--store", str(store), "--out",
              str(tmp_path / "maps"), "--k", "2"])
    assert exit_info.value.code == 0
    summary = json.loads((tmp_path / "maps" / "clusters.json").read_text())
    assert summary["images"] == len(list(images.rglob("*.png")))
    capsys.readouterr()


def test_cams_concentrate_on_the_pg_agglomerate(pg_detector: Path, tmp_path: Path) -> None:
    net = load_torch_model(pg_detector)
    rng = np.random.default_rng(11)
    ratios: dict[str, list[float]] = {"gradcam": [], "layercam": []}
    for i in range(6):  # bright agglomerates: the model's clearest PG evidence
        image, mask = render_pg_with_mask(rng, 96, 96, 0.0,
                                          kind=("granular", "plate")[i % 2])
        path = tmp_path / f"pg{i}.png"
        Image.fromarray(image).save(path)
        explanation = explain_image(net, path, target="pg")
        for method, cam in explanation.maps.items():
            assert cam.shape == mask.shape
            inside, outside = cam[mask > 0.5].mean(), cam[mask < 0.1].mean()
            ratios[method].append(inside / max(outside, 1e-6))
    for method, values in ratios.items():
        assert np.median(values) > 1.3, (method, values)
        assert sum(v > 1.0 for v in values) >= 4, (method, values)


def test_explain_writes_overlays_at_the_crops_size(pg_detector: Path, samples: Path,
                                                   tmp_path: Path) -> None:
    images = sorted(samples.glob("*.png"))[:3]  # real crops, of different sizes
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(pg_detector), *map(str, images), "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    records = json.loads((tmp_path / "explanations.json").read_text())["images"]
    assert len(records) == 3
    for image, record in zip(images, records, strict=True):
        with Image.open(image) as original:
            for name in record["overlays"].values():
                with Image.open(tmp_path / name) as overlay:
                    assert overlay.size == original.size
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.format == "PNG"


def test_explain_bad_input(pg_detector: Path, exported_run: Path, samples: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    image = str(next(samples.glob("*.png")))
    for argv, expected in (
        (["explain", str(exported_run / "model.onnx"), image], "need gradients"),
        (["explain", str(pg_detector), image, "--class", "quartz"], "not a class"),
        (["explain", str(pg_detector), image, "--layer", "layer9"], "no such module"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err


def test_large_maps_use_dots_and_zoom_shows_one_region(tmp_path: Path) -> None:
    from crystalscope.explore.plots import plot_map
    from crystalscope.explore.projection import Points

    rng = np.random.default_rng(4)
    n = 400  # above the thumbnail limit: a dot map
    embeddings = np.abs(rng.normal(size=(n, 16))) + np.repeat(np.eye(2, 16) * 5, n // 2, 0)
    points = Points(paths=[f"/nowhere/{i}.png" for i in range(n)], embeddings=embeddings,
                    classes=["cex", "pg"], predicted=["cex"] * (n // 2) + ["pg"] * (n // 2),
                    probability=np.full(n, 0.9), true=[None] * n)
    projection = project(embeddings, k=2, seed=0)
    figure = plot_map(points, projection, tmp_path / "map.png")
    assert not figure.axes[0].artists  # no thumbnails
    x0, x1 = np.percentile(projection.coords[:, 0], [10, 50])
    y0, y1 = projection.coords[:, 1].min(), projection.coords[:, 1].max()
    zoomed = plot_map(points, projection, tmp_path / "zoom.png", zoom=(x0, x1, y0, y1))
    inside = ((projection.coords[:, 0] >= x0) & (projection.coords[:, 0] <= x1)).sum()
    assert len(zoomed.axes[0].lines) == inside
    assert f"{inside} crystals" in zoomed.axes[0].get_title()
