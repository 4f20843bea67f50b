"""`crystalscope explore` and `explain`: maps of the embeddings, class activation maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from crystalscope.cli.app import app
from crystalscope.cli.options import AsJson, Backend, BackendOption, ModelArgument
from crystalscope.console import err, out, progress_bar
from crystalscope.errors import UserError

if TYPE_CHECKING:
    pass

def _parse_k(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--k {text}: give a number of clusters or auto") from None


def _parse_zoom(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        x0, x1, y0, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--zoom {text}: give x0,x1,y0,y1 in map units, e.g. "
                        "-0.2,0.3,-0.1,0.4") from None
    if x0 >= x1 or y0 >= y1:
        raise UserError(f"--zoom {text}: give x0 < x1 and y0 < y1")
    return x0, x1, y0, y1


@app.command(epilog="Example: crystalscope explore runs/demo splits/valid splits/test "
                    "--out maps/ --k auto  (or: crystalscope explore runs/demo --store "
                    "crystals.lance --out maps/)")
def explore(
    model: ModelArgument,
    paths: Annotated[list[str] | None, typer.Argument(
        help="Image files, folders or quoted globs (or use --store).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the maps.")]
    = Path("explore"),
    store: Annotated[str | None, typer.Option(
        help="Map every image of this vector store instead of embedding PATHS.")] = None,
    k: Annotated[str, typer.Option("--k", help="k-means clusters, or auto (silhouette).")]
    = "4",
    neighbours: Annotated[int, typer.Option(
        min=1, help="Links per image in graph.html (its most similar images).")] = 5,
    zoom: Annotated[str | None, typer.Option(
        help="map.png shows only x0,x1,y0,y1 (map units, see the axes).")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same map and clusters.")] = 0,
    backend: BackendOption = Backend.onnx,
    as_json: AsJson = False,
) -> int:
    """Map the embeddings: PCA to 2-D, k-means clusters, thumbnails, interactive pages.

    Writes map.png (thumbnails up to 300 images, else dots coloured by cluster with the class
    as marker), map.html (scatter with tooltips), graph.html (each image linked to its most
    similar images, slider on the similarity) and clusters.json. The pages work offline.
    """
    from crystalscope.data.layout import expand_paths
    from crystalscope.explore.stage import explore as run_explore
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.vectors.backends import open_store

    chosen_k, chosen_zoom = _parse_k(k), _parse_zoom(zoom)
    if store is not None:
        vector_store = open_store(store)
        try:
            result = run_explore(out_dir, store=vector_store, k=chosen_k, seed=seed,
                                 neighbours=neighbours, zoom=chosen_zoom)
        finally:
            vector_store.close()
    else:
        if not paths:
            raise typer.BadParameter("give images, or --store", param_hint="PATHS")
        predictor = load_predictor(model, backend=backend.value)
        files = expand_paths(paths)
        with progress_bar() as progress:
            task = progress.add_task("embed", total=len(files))
            result = run_explore(out_dir, predictor=predictor, files=files, k=chosen_k,
                                 seed=seed, neighbours=neighbours, zoom=chosen_zoom,
                                 progress=lambda n: progress.advance(task, n))
    if as_json:
        out.print_json(json.dumps(result.clusters))
    else:
        explained = result.projection.explained
        table = Table(title=f"{len(result.points.paths)} images, {result.projection.k} clusters "
                            f"(PC1 {100 * explained[0]:.1f}%, PC2 {100 * explained[1]:.1f}% of "
                            "variance)")
        for column in ("cluster", "size", "classes", "purity"):
            table.add_column(column, no_wrap=True)
        table.add_column("nearest the centre", overflow="fold")
        for c in result.clusters:
            table.add_row(str(c["cluster"]), str(c["size"]),
                          ", ".join(f"{n} {v}" for n, v in c["composition"].items()),
                          f"{c['purity']:.4f}",
                          ", ".join(Path(p).name for p in c["nearest_to_centroid"]))
        out.print(table)
        out.print(f"wrote {', '.join(result.files)} to {out_dir}")
    for failure in result.failures:
        err.print(f"[yellow]skipped[/yellow] {failure.reason}", highlight=False)
    return 1 if result.failures else 0


@app.command(epilog="Example: crystalscope explain runs/demo 'splits/test/pg/*.png' --out cams/")
def explain(
    model: Annotated[Path, typer.Argument(
        help="Run directory or model.safetensors (CAMs need gradients: not ONNX).")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders or quoted globs.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the overlays.")]
    = Path("explain"),
    target: Annotated[str | None, typer.Option(
        "--class", help="Explain this class (default: the predicted one).")] = None,
    layer: Annotated[str | None, typer.Option(
        help="Backbone module to explain (default: its last stage, e.g. layer4).")] = None,
) -> int:
    """Where the model looked: Grad-CAM and LayerCAM overlays and a side-by-side sheet.

    Writes <n>-<image>-gradcam.png and -layercam.png (at the crop's own size), sheet.png
    (original and overlays with 70/80/90th percentile contours) and explanations.json.
    """
    from crystalscope.data.layout import expand_paths
    from crystalscope.explore.explain import explain as run_explain

    files = expand_paths(images)
    with progress_bar() as progress:
        task = progress.add_task("explain", total=len(files))
        explanations, written, skipped = run_explain(
            model, files, out_dir, target=target, layer=layer,
            progress=lambda n: progress.advance(task, n))
    for item in explanations:
        out.print(f"{item.path}: predicted {item.predicted} ({item.probability:.4f}); maps for "
                  f"{item.target}")
    out.print(f"wrote {len(written)} files to {out_dir} (sheet.png, explanations.json, "
              "overlays)")
    for reason in skipped:
        err.print(f"[yellow]skipped[/yellow] {reason}", highlight=False)
    return 1 if skipped else 0
