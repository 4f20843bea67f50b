"""`index` and `similar`: embeddings of images into a store, and the nearest stored crystals.

Each record holds the image's path, sha256, predicted class and probabilities, its true class
when it lies in a folder named after one of the model's classes, its size and when it was
added. The record id comes from the path, so indexing a file again updates its record.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from crystalscope.data.dedupe import file_sha256
from crystalscope.data.images import ImageLoadError, load_image
from crystalscope.errors import UserError
from crystalscope.infer.predictor import Predictor
from crystalscope.infer.stream import Failure, ImageResult, predict_stream
from crystalscope.settings import SettingsError
from crystalscope.vectors.store import (
    Neighbour,
    Record,
    VectorStore,
    check_same_model,
    record_id,
)

UPSERT_BATCH = 2048  # records per write: one LanceDB commit (a merge on the id) per batch


@dataclass
class IndexResult:
    """How many images went in, how many were new, and which could not be read."""

    indexed: int = 0
    new: int = 0
    failures: list[Failure] = field(default_factory=list)


def make_record(result: ImageResult, classes: list[str]) -> Record:
    """The store record of one predicted image."""
    assert result.embedding is not None
    best = result.best
    folder = result.path.parent.name
    return Record(
        id=record_id(result.path), vector=result.embedding,
        path=str(result.path.resolve()), sha256=file_sha256(result.path),
        predicted=classes[best],
        probabilities={c: float(p) for c, p in zip(classes, result.probabilities, strict=True)},
        true_class=folder if folder in classes else None,
        width=result.width, height=result.height,
        added=datetime.now(UTC).isoformat(timespec="seconds"))


def _require_embeddings(predictor: Predictor) -> None:
    if not predictor.has_embedding:
        raise UserError(f"{predictor.source}: gives no embedding output; index and similar "
                        "need a crystalscope model (a run, or its exported model.onnx)")


def index_images(predictor: Predictor, files: list[Path], store: VectorStore, *,
                 batch_size: int = 32, progress: Callable[[int], None] | None = None,
                 results: Iterable[ImageResult | Failure] | None = None) -> IndexResult:
    """Embed ``files`` and upsert them into ``store``.

    ``results``: the predictions already computed elsewhere (e.g. on Ray), in place of this
    process's :func:`predict_stream`; they are written the same way. Cost: O(N) embeddings,
    written in batches of ``UPSERT_BATCH`` (memory: one batch).
    """
    _require_embeddings(predictor)
    model_id = predictor.model_id
    check_same_model(store, model_id, store.info().uri)
    if results is None:
        results = predict_stream(predictor, files, batch_size=batch_size, progress=progress)
    result, pending = IndexResult(), []
    before = store.count()

    def write(records: list[Record]) -> None:
        store.upsert(records)
        if records and not result.indexed:  # the first write: the model, before any more
            store.record_model(model_id)
        result.indexed += len(records)

    for item in results:
        if isinstance(item, Failure):
            result.failures.append(item)
            continue
        pending.append(make_record(item, predictor.classes))
        if len(pending) >= UPSERT_BATCH:
            write(pending)
            pending = []
    write(pending)
    store.flush()  # one ANN index build for the whole run, not one per batch
    result.new = store.count() - before
    return result


def find_similar(predictor: Predictor, image: Path, store: VectorStore, k: int, *,
                 predicted: str | None = None) -> tuple[ImageResult, list[Neighbour]]:
    """The query image's prediction and its k nearest stored neighbours."""
    _require_embeddings(predictor)
    if predicted is not None and predicted not in predictor.classes:
        raise SettingsError("class", f"not a class of the model "
                            f"({', '.join(predictor.classes)})", predicted)
    if store.count() == 0:
        raise UserError("the store is empty; fill it first: crystalscope index MODEL IMAGES")
    check_same_model(store, predictor.model_id, store.info().uri)
    (query,) = list(predict_stream(predictor, [image]))
    if isinstance(query, Failure):
        raise UserError(query.reason)
    return query, store.nearest(query.embedding, k, predicted=predicted)  # type: ignore[arg-type]


def thumbnail_uri(path: str | Path, size: int = 160) -> str:
    """A data: URI of a PNG thumbnail, or '' when the file is gone or unreadable."""
    try:
        image = load_image(path, warn_on_mismatch=False).convert("RGB")
    except (ImageLoadError, OSError):
        return ""
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def similar_html(query: ImageResult, neighbours: list[Neighbour], classes: list[str]) -> str:
    """A small self-contained page: the query image and its neighbours with thumbnails."""
    def card(src: str, caption: str) -> str:
        image = f'<img src="{src}" alt="">' if src else '<div class="gone">image not found</div>'
        return f'<figure>{image}<figcaption>{caption}</figcaption></figure>'

    best = query.best
    cards = [card(thumbnail_uri(query.path),
                  f"<b>query</b><br>{html.escape(query.path.name)}<br>predicted "
                  f"{html.escape(classes[best])} ({query.probabilities[best]:.4f})")]
    for rank, neighbour in enumerate(neighbours, 1):
        record = neighbour.record
        truth = f", true {html.escape(record.true_class)}" if record.true_class else ""
        cards.append(card(thumbnail_uri(record.path),
                          f"#{rank} distance {neighbour.distance:.4f}<br>"
                          f"{html.escape(Path(record.path).name)}<br>predicted "
                          f"{html.escape(record.predicted)}{truth}"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>crystalscope: similar crystals</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; }}
main {{ display: flex; flex-wrap: wrap; gap: 1rem; }}
figure {{ margin: 0; width: 170px; font-size: 0.8rem; }}
figure:first-child {{ outline: 3px solid #1f77b4; }}
img {{ width: 160px; height: 160px; object-fit: contain; background: #222; }}
.gone {{ width: 160px; height: 160px; background: #ddd; display: grid; place-items: center; }}
</style></head>
<body><h1>Nearest stored crystals</h1>
<p>Cosine distance between embeddings (0 = same direction).
Query: {html.escape(str(query.path))}</p>
<main>{''.join(cards)}</main></body></html>
"""
