"""The vector store contract: what `index` writes and `similar` reads, whatever the backend.

A record is one image: its embedding and what we know of it. Its id is derived from the
image's absolute path, so indexing the same file again updates its record. Distances are
cosine distances (1 - cosine similarity), smallest first.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from crystalscope.errors import UserError


def record_id(path: Path) -> str:
    """A stable UUID for an image file: the same path, the same record."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, Path(path).resolve().as_uri()))


@dataclass
class Record:
    """One indexed image."""

    id: str
    vector: np.ndarray
    path: str
    sha256: str
    predicted: str
    probabilities: dict[str, float]
    true_class: str | None = None
    width: int = 0
    height: int = 0
    added: str = ""

    def to_properties(self) -> dict[str, str | int]:
        """Everything but id and vector as flat text/integer fields: how every backend
        stores a record (probabilities as a JSON object, no true class as "")."""
        return {"path": self.path, "sha256": self.sha256, "predicted": self.predicted,
                "probabilities": json.dumps(self.probabilities),
                "true_class": self.true_class or "", "width": int(self.width),
                "height": int(self.height), "added": self.added}

    @classmethod
    def from_properties(cls, record_id: str, vector: np.ndarray,
                        properties: dict) -> Record:
        """The inverse of :meth:`to_properties`."""
        return cls(id=record_id, vector=np.asarray(vector, dtype=np.float32),
                   path=properties["path"], sha256=properties["sha256"],
                   predicted=properties["predicted"],
                   probabilities=json.loads(properties["probabilities"]),
                   true_class=properties.get("true_class") or None,
                   width=int(properties["width"]), height=int(properties["height"]),
                   added=properties["added"])


TEXT_PROPERTIES = ("path", "sha256", "predicted", "probabilities", "true_class", "added")
INT_PROPERTIES = ("width", "height")


@dataclass
class Neighbour:
    """A stored record (without its vector) and its cosine distance to the query."""

    record: Record
    distance: float


@dataclass
class StoreInfo:
    """What a store says about itself (for messages and benchmarks)."""

    uri: str
    count: int
    dimension: int | None
    indexed: bool = False
    details: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class VectorStore(Protocol):
    """Add, read, delete and search image embeddings."""

    def upsert(self, records: list[Record]) -> None:
        """Insert records; a record whose id exists replaces the stored one."""

    def get(self, record_id: str) -> Record | None:
        """The record with this id, or None."""

    def delete(self, ids: list[str]) -> int:
        """Delete these records; returns how many existed."""

    def truncate(self) -> None:
        """Delete every record."""

    def flush(self) -> None:
        """After a run of writes: bring search structures up to date (LanceDB builds or
        rebuilds its ANN index; a server that indexes as it writes does nothing)."""

    def count(self) -> int:
        """How many records the store holds."""

    def records(self) -> Iterator[Record]:
        """Every record, vectors included (for maps of the whole store)."""

    def nearest(self, vector: np.ndarray, k: int, *,
                predicted: str | None = None) -> list[Neighbour]:
        """The k records closest to ``vector``, optionally only those predicted as a class.
        Their ``vector`` is empty: an answer needs the neighbours, not their embeddings, and
        reading 10 full vectors cost a third of a query at 10^6 rows (``get`` has it)."""

    def info(self) -> StoreInfo:
        """Size, dimension and index state."""

    def model_id(self) -> str | None:
        """The id of the model that made the stored vectors (None: not recorded)."""

    def record_model(self, model_id: str) -> None:
        """Record the id of the model that makes the vectors written from now on."""

    def close(self) -> None:
        """Release connections."""


def check_same_model(store: VectorStore, model_id: str, where: str) -> None:
    """Refuse to compare or mix embeddings of two models: the vectors would live in unrelated
    spaces, and distances between them mean nothing."""
    stored = store.model_id()
    if stored is not None and stored != model_id:
        raise UserError(f"{where}: holds embeddings of model {stored}, not of this model "
                        f"({model_id}); index into another store, or query with that model "
                        "(a new export of the same run is a new model: index again)")


def check_vector(vector: np.ndarray, dimension: int | None) -> np.ndarray:
    """A 1-D float32 vector of the store's dimension."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if dimension is not None and vector.shape[0] != dimension:
        raise UserError(f"the model's embeddings have {vector.shape[0]} values but the store "
                        f"holds {dimension}-value vectors (another model indexed it); use "
                        "another store")
    return vector
