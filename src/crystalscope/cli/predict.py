"""`crystalscope predict`, `index` and `similar`: using an exported model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from crystalscope.cli.app import app
from crystalscope.cli.options import (
    AsJson,
    Backend,
    BackendOption,
    Engine,
    EngineOption,
    ModelArgument,
    OutputFormat,
    RayAddressOption,
    StoreOption,
    TtaOption,
)
from crystalscope.console import err, out, progress_bar
from crystalscope.vectors.backends import DEFAULT_STORE


def format_of(output: Path | None) -> OutputFormat:
    """The format an --output file's suffix names (table when it names none)."""
    suffix = output.suffix.lower().lstrip(".") if output else ""
    return OutputFormat(suffix) if suffix in {f.value for f in OutputFormat} else (
        OutputFormat.table)


@app.command(epilog="Example: crystalscope predict runs/demo frames/ 'more/*.png' --format csv "
                    "--output predictions.csv")
def predict(
    model: Annotated[Path, typer.Argument(
        help="Run directory, model.onnx, or model.safetensors (with model.json beside it).")],
    paths: Annotated[list[str], typer.Argument(
        help="Image files, folders (searched recursively) or quoted globs.")],
    output_format: Annotated[OutputFormat | None, typer.Option(
        "--format", help="table, csv, json, jsonl or parquet (parquet needs --output). "
                         "Default: from --output's suffix (.csv, .json, .jsonl, .parquet), "
                         "else table.")] = None,
    output: Annotated[Path | None, typer.Option(
        help="Write to this new file instead of the screen.")] = None,
    backend: BackendOption = Backend.onnx,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 32,
    classes: Annotated[str | None, typer.Option(
        help="Class names of a foreign ONNX model, in output order, e.g. cex,pg.")] = None,
    input_size: Annotated[int | None, typer.Option(
        help="Foreign ONNX model: square input side in pixels.")] = None,
    layout: Annotated[str | None, typer.Option(help="Foreign ONNX model: nchw or nhwc.")]
    = None,
    preprocess: Annotated[str | None, typer.Option(
        help="Foreign ONNX model: raw (0-255), imagenet ((x/255-mean)/std), caffe (BGR minus "
             "means, Keras) or tf (x/127.5-1).")] = None,
    mean: Annotated[str | None, typer.Option(help="Per-channel mean for imagenet mode.")]
    = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std for imagenet mode.")] = None,
    reject_unknown: Annotated[bool, typer.Option(
        "--reject-unknown", help="Give the class 'unknown' to images the unknown-detector "
                                 "flags (unknown_score above 1) instead of forcing a class.")]
    = False,
    outputs: Annotated[str | None, typer.Option(
        help="Foreign ONNX model: what its output holds, probabilities (softmax or sigmoid "
             "applied) or logits.")] = None,
    engine: EngineOption = Engine.local,
    ray_address: RayAddressOption = None,
    tta: TtaOption = None,
) -> int:
    """Classify images: the predicted class, its probability, and every class's probability.

    A model exported with its unknown-detector (crystalscope export) adds the columns
    unknown (yes/no), unknown_score (above 1: unlike the training crystals) and
    unknown_reason (empty, blurred, saturated: the quality gate; novel). Streams in
    batches, so memory stays bounded however many images. Unreadable files are listed on
    stderr and skipped; the exit code is then 1.
    """
    from crystalscope.data.layout import expand_paths
    from crystalscope.infer.output import (
        LEGEND,
        UNKNOWN_LEGEND,
        ParquetPredictionWriter,
        PredictionWriter,
        check_new_file,
        check_output,
        open_output,
    )
    from crystalscope.infer.predictor import (
        Preprocessing,
        load_predictor,
        parse_classes,
    )
    from crystalscope.infer.stream import Failure, predict_stream

    if engine == Engine.ray:
        from crystalscope.infer.ray_engine import check_engine

        check_engine("ray")  # before any output is written
    output_format = output_format or format_of(output)
    check_output(output_format.value, output)
    load_options = {"classes": parse_classes(classes), "outputs": outputs,
                    "preprocessing": Preprocessing.for_foreign_model(input_size, layout,
                                                                     preprocess, mean, std),
                    "tta": tta.value if tta else None}
    predictor = load_predictor(model, backend=backend.value, **load_options)  # type: ignore[arg-type]
    for note in predictor.notes:
        err.print(f"[yellow]{note}[/yellow]")
    if reject_unknown:
        predictor.require_unknown_detector("reject_unknown")
    files = expand_paths(paths)
    has_detector = predictor.unknown_detector is not None
    handle = None
    if output_format == OutputFormat.parquet:
        assert output is not None
        writer: PredictionWriter | ParquetPredictionWriter = ParquetPredictionWriter(
            check_new_file(output), predictor.classes, with_unknown=has_detector,
            reject_unknown=reject_unknown)
    else:
        handle = open_output(output)
        writer = PredictionWriter(handle or sys.stdout, output_format.value, predictor.classes,
                                  with_unknown=has_detector, reject_unknown=reject_unknown)
    if output_format == OutputFormat.table:
        err.print(LEGEND + (UNKNOWN_LEGEND if has_detector else ""), highlight=False)
    failures: list[Failure] = []
    try:
        with progress_bar() as progress:
            task = progress.add_task("predict", total=len(files))
            advance = lambda n: progress.advance(task, n)  # noqa: E731
            if engine == Engine.ray:
                from crystalscope.infer.ray_engine import ray_predict_stream

                stream = ray_predict_stream(model, files, batch_size=batch_size,
                                            backend=backend.value, load_options=load_options,
                                            address=ray_address,
                                            spec=predictor.spec, progress=advance)
            else:
                stream = predict_stream(predictor, files, batch_size=batch_size,
                                        progress=advance)
            for item in stream:
                writer.write(item)
                if isinstance(item, Failure):
                    failures.append(item)
        writer.close()
    finally:
        if handle:
            handle.close()
    for failure in failures:
        err.print(f"[yellow]skipped[/yellow] {failure.reason}", highlight=False)
    if output:
        err.print(f"wrote {writer.count} predictions to {output}")
    if has_detector:
        why = ", ".join(f"{reason} {count}" for reason, count in writer.reasons.items())
        err.print(f"{writer.unknown} of {writer.count} images unknown" + (f": {why}" if why else "")
                  + " (empty, blurred, saturated: no usable crystal; novel: unlike the "
                  "training crystals)")
    if failures:
        err.print(f"{len(failures)} of {len(files)} images could not be read")
        return 1
    return 0





@app.command(name="index", epilog="Example: crystalscope index runs/demo splits/train "
                                  "--store crystals.lance")
def index_command(
    model: ModelArgument,
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or quoted globs.")],
    store: StoreOption = DEFAULT_STORE,
    backend: BackendOption = Backend.onnx,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 32,
    as_json: AsJson = False,
    engine: EngineOption = Engine.local,
    ray_address: RayAddressOption = None,
) -> int:
    """Store one embedding per image (pooled backbone features) with its prediction.

    Each record: path, sha256, predicted class and probabilities, true class (when the image
    lies in a folder named after a class), image size, time added. Indexing a file again
    updates its record.
    """
    from crystalscope.data.layout import expand_paths
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.vectors.backends import open_store
    from crystalscope.vectors.indexing import index_images

    predictor = load_predictor(model, backend=backend.value)
    files = expand_paths(paths)
    if engine == Engine.ray:
        from crystalscope.infer.ray_engine import check_engine

        check_engine("ray")  # before the store is opened or created
    vector_store = open_store(store)
    try:
        with progress_bar() as progress:
            task = progress.add_task("index", total=len(files))
            advance = lambda n: progress.advance(task, n)  # noqa: E731
            results = None
            if engine == Engine.ray:
                from crystalscope.infer.ray_engine import ray_predict_stream

                results = ray_predict_stream(model, files, batch_size=batch_size,
                                             backend=backend.value, address=ray_address,
                                             spec=predictor.spec,
                                             progress=advance)
            result = index_images(predictor, files, vector_store, batch_size=batch_size,
                                  progress=advance, results=results)
        info = vector_store.info()
    finally:
        vector_store.close()
    recall = info.details.get("recall_at_10")
    summary = {"store": info.uri, "indexed": result.indexed, "new": result.new,
               "updated": result.indexed - result.new, "total": info.count,
               "ann_index": info.indexed, "ann_recall_at_10": recall,
               "failed": [f.reason for f in result.failures]}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        search = "exact search"
        if info.indexed:
            search = "ANN index" + (f", recall@10 {recall:.3f} against exact search on "
                                    f"{info.details.get('recall_queries')} stored vectors"
                                    if recall is not None else "")
        out.print(f"{info.uri}: indexed {result.indexed} images ({result.new} new, "
                  f"{result.indexed - result.new} updated); the store holds {info.count} "
                  f"({search})")
    for failure in result.failures:
        err.print(f"[yellow]skipped[/yellow] {failure.reason}", highlight=False)
    return 1 if result.failures else 0


@app.command(epilog="Example: crystalscope similar runs/demo new-crystal.png -k 5 "
                    "--html similar.html")
def similar(
    model: Annotated[Path, typer.Argument(help="The model the store was indexed with.")],
    image: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                          help="The query image.")],
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 5,
    store: StoreOption = DEFAULT_STORE,
    only_class: Annotated[str | None, typer.Option(
        "--class", help="Only stored images predicted as this class.")] = None,
    backend: BackendOption = Backend.onnx,
    html_path: Annotated[Path | None, typer.Option(
        "--html", help="Also write a page with thumbnails to this new file.")] = None,
    as_json: AsJson = False,
) -> None:
    """The stored crystals nearest to IMAGE (cosine distance of embeddings)."""
    from crystalscope.infer.output import open_output
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.vectors.backends import open_store
    from crystalscope.vectors.indexing import find_similar, similar_html

    predictor = load_predictor(model, backend=backend.value)
    handle = open_output(html_path)  # refuse an existing file before any work
    vector_store = open_store(store)
    try:
        query, neighbours = find_similar(predictor, image, vector_store, k,
                                         predicted=only_class)
    finally:
        vector_store.close()
    rows = [{"rank": rank, "distance": round(n.distance, 6), "predicted": n.record.predicted,
             "true_class": n.record.true_class, "path": n.record.path}
            for rank, n in enumerate(neighbours, 1)]
    if handle:
        with handle:
            handle.write(similar_html(query, neighbours, predictor.classes))
    if as_json:
        out.print_json(json.dumps({"query": str(image), "neighbours": rows}))
    else:
        best = query.best
        table = Table(title=f"{image}: predicted {predictor.classes[best]} "
                            f"({query.probabilities[best]:.4f}); nearest {len(rows)} in {store}")
        for column in ("rank", "cosine distance", "predicted", "true class"):
            table.add_column(column, no_wrap=True)
        table.add_column("path", overflow="fold")
        for row in rows:
            table.add_row(str(row["rank"]), f"{row['distance']:.4f}", row["predicted"],
                          row["true_class"] or "-", row["path"])
        out.print(table)
    if html_path:
        err.print(f"wrote {html_path}")
