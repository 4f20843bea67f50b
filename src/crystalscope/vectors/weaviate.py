"""Weaviate (server, weaviate-client v4): the original project's store, same contract.

``--store http://host:8080`` (gRPC on 50051, or ``?grpc=PORT``). Vectors are supplied by us
(no vectoriser), indexed with HNSW under cosine distance. Every call has a timeout, so a
server that is down or unreachable gives an error, not a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import numpy as np

from crystalscope.errors import CrystalscopeError, UserError
from crystalscope.settings import SettingsError
from crystalscope.vectors.store import (
    INT_PROPERTIES,
    TEXT_PROPERTIES,
    Neighbour,
    Record,
    StoreInfo,
    check_vector,
)

COLLECTION = "Crystal"
MODEL_PREFIX = "crystalscope model "


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]



class WeaviateStore:
    """A :class:`~crystalscope.vectors.store.VectorStore` in a Weaviate collection."""

    def __init__(self, url: str, *, dimension: int | None = None, timeout_s: float = 10.0,
                 collection: str = COLLECTION) -> None:
        try:
            import weaviate
            from weaviate.classes.init import AdditionalConfig, Timeout
        except ImportError as exc:
            raise SettingsError("store", "the Weaviate client is not installed; pip install "
                                "'crystalscope[weaviate]'", "http://…") from exc

        parsed = urlparse(url)
        if not parsed.hostname:
            raise SettingsError("store", "give a Weaviate URL like http://localhost:8080", url)
        grpc_port = int(parse_qs(parsed.query).get("grpc", ["50051"])[0])
        self.url, self.dimension, self.name = url, dimension, collection
        try:
            self.client = weaviate.connect_to_custom(
                http_host=parsed.hostname, http_port=parsed.port or 8080,
                http_secure=parsed.scheme == "https", grpc_host=parsed.hostname,
                grpc_port=grpc_port, grpc_secure=parsed.scheme == "https",
                additional_config=AdditionalConfig(timeout=Timeout(
                    init=timeout_s, query=timeout_s, insert=3 * timeout_s)))
        except Exception as exc:  # the client raises several connection error types
            raise CrystalscopeError(f"Weaviate at {url}: cannot reach it "
                                    f"({type(exc).__name__}: {_one_line(exc)})") from exc
        self._ensure_collection()

    def _call(self, what: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (UserError, CrystalscopeError):
            raise
        except Exception as exc:  # network errors, timeouts, server errors
            raise CrystalscopeError(f"Weaviate at {self.url}: {what} failed "
                                    f"({type(exc).__name__}: {_one_line(exc)})") from exc

    def _ensure_collection(self) -> None:
        from weaviate.classes.config import Configure, DataType, Property, VectorDistances

        def create() -> None:
            if self.client.collections.exists(self.name):
                return
            self.client.collections.create(
                self.name,
                properties=[*(Property(name=n, data_type=DataType.TEXT) for n in TEXT_PROPERTIES),
                            *(Property(name=n, data_type=DataType.INT) for n in INT_PROPERTIES)],
                vector_config=Configure.Vectors.self_provided(
                    vector_index_config=Configure.VectorIndex.hnsw(
                        distance_metric=VectorDistances.COSINE)))

        self._call("creating the collection", create)
        self.collection = self.client.collections.get(self.name)

    def model_id(self) -> str | None:
        """The model recorded in the collection's description ("crystalscope model <id>")."""
        description = self._call("reading the collection", self.collection.config.get
                                 ).description or ""
        return description.removeprefix(MODEL_PREFIX) if description.startswith(
            MODEL_PREFIX) else None

    def record_model(self, model_id: str) -> None:
        if self.model_id() != model_id:
            self._call("recording the model", self.collection.config.update,
                       description=MODEL_PREFIX + model_id)

    @staticmethod
    def _vector(obj: object) -> np.ndarray:
        vector = getattr(obj, "vector", None) or {}
        values = vector.get("default") if isinstance(vector, dict) else vector
        return np.asarray(values if values is not None else [], dtype=np.float32)

    def _record(self, obj: object) -> Record:
        return Record.from_properties(str(obj.uuid),  # type: ignore[attr-defined]
                                      self._vector(obj), obj.properties)  # type: ignore[attr-defined]

    def _stored_dimension(self) -> int | None:
        if self.dimension is None:
            page = self._call("reading", self.collection.query.fetch_objects, limit=1,
                              include_vector=True)
            if page.objects:
                self.dimension = int(self._vector(page.objects[0]).size)
        return self.dimension

    def upsert(self, records: list[Record]) -> None:
        if not records:
            return
        dimension = self._stored_dimension() or int(np.asarray(records[0].vector).size)
        self.dimension = dimension

        def write() -> list:
            with self.collection.batch.fixed_size(batch_size=200) as batch:
                for r in records:
                    batch.add_object(properties=r.to_properties(), uuid=r.id,
                                     vector=check_vector(r.vector, dimension).tolist())
            return list(self.collection.batch.failed_objects)

        failed = self._call("writing", write)
        if failed:
            raise CrystalscopeError(f"Weaviate at {self.url}: {len(failed)} records were not "
                                    f"written ({str(failed[0])[:200]})")

    def records(self) -> Iterator[Record]:
        try:
            for obj in self.collection.iterator(include_vector=True):
                yield self._record(obj)
        except Exception as exc:  # network errors, timeouts, server errors
            raise CrystalscopeError(f"Weaviate at {self.url}: reading failed "
                                    f"({type(exc).__name__}: {_one_line(exc)})") from exc

    def get(self, record_id: str) -> Record | None:
        obj = self._call("reading", self.collection.query.fetch_object_by_id, record_id,
                         include_vector=True)
        return None if obj is None else self._record(obj)

    def delete(self, ids: list[str]) -> int:
        if not ids:
            return 0
        from weaviate.classes.query import Filter

        result = self._call("deleting", self.collection.data.delete_many,
                            where=Filter.by_id().contains_any(ids))
        return int(result.successful)

    def truncate(self) -> None:
        self._call("truncating", self.client.collections.delete, self.name)
        self.dimension = None
        self._ensure_collection()

    def count(self) -> int:
        result = self._call("counting", self.collection.aggregate.over_all, total_count=True)
        return int(result.total_count or 0)

    def nearest(self, vector: np.ndarray, k: int, *,
                predicted: str | None = None) -> list[Neighbour]:
        from weaviate.classes.query import Filter, MetadataQuery

        if k < 1:
            raise SettingsError("k", "give at least 1", k)
        query = check_vector(vector, self._stored_dimension())
        filters = Filter.by_property("predicted").equal(predicted) if predicted else None
        response = self._call("searching", self.collection.query.near_vector,
                              near_vector=query.tolist(), limit=k, filters=filters,
                              include_vector=False,
                              return_metadata=MetadataQuery(distance=True))
        return [Neighbour(self._record(o), float(o.metadata.distance))
                for o in response.objects]

    def flush(self) -> None:
        """Weaviate indexes (HNSW) as it writes: nothing to do."""

    def info(self) -> StoreInfo:
        return StoreInfo(uri=self.url, count=self.count(), dimension=self._stored_dimension(),
                         indexed=True, details={"collection": self.name})

    def close(self) -> None:
        self.client.close()
