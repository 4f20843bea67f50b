"""Which backend a ``--store`` URI names: the one place that knows every backend."""

from __future__ import annotations

from pathlib import Path

from crystalscope.vectors.store import VectorStore

DEFAULT_STORE = "crystalscope.lance"


def open_store(uri: str | Path, *, dimension: int | None = None,
               timeout_s: float = 10.0) -> VectorStore:
    """``http(s)://host:port`` -> Weaviate; anything else -> a LanceDB folder."""
    text = str(uri)
    if text.startswith(("http://", "https://")):
        from crystalscope.vectors.weaviate import WeaviateStore

        return WeaviateStore(text, dimension=dimension, timeout_s=timeout_s)
    from crystalscope.vectors.lance import LanceStore

    return LanceStore(Path(text), dimension=dimension)
