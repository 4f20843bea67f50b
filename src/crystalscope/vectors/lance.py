"""LanceDB, embedded: the default store, a folder on disk, nothing to start.

Small tables are searched exactly (a flat scan). From ``index_threshold`` rows on, an ANN
index is built automatically (IVF partitions with HNSW graphs over scalar-quantised vectors,
cosine distance) and searched with enough partitions probed, and candidates re-ranked on the
full vectors, to keep recall@10 high; ``benchmarks/vectors.py`` measures it against exact
search. Writes do not touch the index; :meth:`LanceStore.flush` (called by `index` once its
writes are done) builds it, or rebuilds it once more than a tenth of the rows came after the
last build, so at most a tenth of a table is ever searched flat. Each build measures its own
recall@10 against exact search on ``RECALL_QUERIES`` stored vectors spread over the table
(``info().details``; `index` prints it).

A search answer reads each neighbour's id and ``record`` column (its properties as one JSON
text), never its vector: at 10^6 rows each column read is a random read of its own (see
:func:`_schema`).

Cost: writes are batched merges on the id; an index build is O(N log N) and happens once per
`index` run that grows the table by a tenth or more; a query probes ``NPROBES`` partitions of
about sqrt(N) x 4 vectors each, plus the unindexed tenth at most.

Several processes may share a store: every read sees the latest committed version (a
``read_consistency_interval`` of 0: one manifest check per query), so a server sees rows an
`index` beside it adds, and a table created after the server started. Writers that collide
(two `index` runs) retry on LanceDB's commit conflicts with backoff; once small fragments pile
up, ``flush`` compacts them (``optimize``). The model that made the vectors is recorded in the
vector column's metadata (``crystalscope.model_id``) and a different one is refused.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa

from crystalscope.errors import CrystalscopeError
from crystalscope.settings import SettingsError
from crystalscope.vectors.store import (
    INT_PROPERTIES,
    TEXT_PROPERTIES,
    Neighbour,
    Record,
    StoreInfo,
    check_vector,
)

# Lance warns at every index_stats call unless this choice is made; we need no centroids.
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")

TABLE = "crystals"
INDEX_THRESHOLD = 10_000
# Query settings, tuned at 10^6 x 512 (benchmarks/scale.py, docs/benchmarks.md): recall is
# limited by the HNSW candidates per partition (LanceDB's default ef is 1.5 x k), not by the
# partitions probed (24 to 96 probes: 0.929), and the scalar-quantised distances need a
# re-rank on full vectors (without it 0.88). 4 probes, ef 160, 2k candidates re-ranked.
NPROBES = 4
HNSW_EF = 160
REFINE_FACTOR: int | None = 2
WHOLE_INDEX_PARTITIONS = 16  # up to this many (~4,000 rows) every partition is probed
PARTITION_DIVISOR = 4
REBUILD_GROWTH = 1.1
RECALL_QUERIES = 20
FIELDS = ("id", *TEXT_PROPERTIES, *INT_PROPERTIES)
ANSWER_COLUMN = "record"  # the properties as one JSON text (see _schema)
MODEL_KEY = b"crystalscope.model_id"  # in the vector column's field metadata
COMMIT_ATTEMPTS = 8
SMALL_FRAGMENTS_TO_COMPACT = 16  # fragments under LanceDB's target size, before optimize()
T = TypeVar("T")


def is_commit_conflict(exc: BaseException) -> bool:
    """LanceDB's "retryable commit conflict": another writer committed first."""
    text = str(exc).lower()
    return "commit conflict" in text or "retryable" in text or "already exists" in text


def with_retries(operation: Callable[[], T], what: str, path: Path,
                 attempts: int = COMMIT_ATTEMPTS) -> T:
    """Run ``operation``; on a commit conflict with another writer, again after a growing,
    jittered pause (50 ms .. ~6 s), ``attempts`` times at most; then a one-line error."""
    for attempt in range(attempts):
        try:
            return operation()
        except (RuntimeError, OSError, ValueError) as exc:
            if not is_commit_conflict(exc):
                raise
            if attempt == attempts - 1:
                raise CrystalscopeError(f"LanceDB store {path}: {what} kept colliding with "
                                        f"another writer ({attempts} tries); run it again "
                                        "when the other `index` has finished") from exc
            time.sleep(0.05 * 2 ** attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def partitions_for(rows: int) -> int:
    """IVF partitions: about sqrt(rows) / 4 (a few thousand vectors per partition)."""
    return max(1, round(math.sqrt(rows) / PARTITION_DIVISOR))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _schema(dimension: int, answer_column: bool = True) -> pa.Schema:
    """The table's columns. ``ANSWER_COLUMN`` repeats a record's properties as one JSON text:
    a search answer reads it instead of eight columns, each a random read of its own (at
    10^6 rows in one compacted fragment: p50 8 ms against 25 ms). Stores made before it
    have no such column and are answered from the eight."""
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dimension)),
        pa.field("path", pa.string()), pa.field("sha256", pa.string()),
        pa.field("predicted", pa.string()), pa.field("probabilities", pa.string()),
        pa.field("true_class", pa.string()), pa.field("width", pa.int32()),
        pa.field("height", pa.int32()), pa.field("added", pa.string()),
        *([pa.field(ANSWER_COLUMN, pa.string())] if answer_column else []),
    ])


class LanceStore:
    """A :class:`~crystalscope.vectors.store.VectorStore` in a LanceDB folder."""

    def __init__(self, path: Path, *, dimension: int | None = None,
                 index_threshold: int = INDEX_THRESHOLD) -> None:
        import lancedb

        self.path, self.index_threshold = Path(path), index_threshold
        if self.path.exists() and not self.path.is_dir():
            raise SettingsError("store", "is a file; give a folder for the LanceDB store",
                                str(path))
        try:
            # 0: every read checks for a newer version (another process's writes)
            self.db = lancedb.connect(str(self.path), read_consistency_interval=timedelta(0))
            self.table = self._open_table()
        except (OSError, RuntimeError, ValueError) as exc:
            raise SettingsError("store", f"cannot open or create it ({exc})",
                                str(path)) from exc
        self.dimension = dimension
        if self.table is not None:
            stored = self.table.schema.field("vector").type.list_size
            if dimension is not None and stored != dimension:
                check_vector(np.zeros(dimension), stored)  # raises the explained error
            self.dimension = stored

    def _open_table(self) -> object | None:
        """The table, or None while there is none — or while another process is still
        creating it (its folder is listed before its first version is committed)."""
        names = self.db.list_tables()
        names = getattr(names, "tables", names)
        if TABLE not in names:
            return None
        try:
            return self.db.open_table(TABLE)
        except ValueError as exc:
            if "not found" in str(exc).lower():
                return None
            raise

    def _current(self) -> bool:
        """Whether there is a table: one another process created since is opened now."""
        if self.table is None:
            self.table = self._open_table()
            if self.table is not None and self.dimension is None:
                self.dimension = self.table.schema.field("vector").type.list_size
        return self.table is not None

    # -- the model that made the vectors ---------------------------------------------------

    def model_id(self) -> str | None:
        """The id of the model whose embeddings the store holds (None: not recorded)."""
        if not self._current():
            return None
        metadata = self.table.schema.field("vector").metadata or {}
        value = metadata.get(MODEL_KEY)
        return value.decode() if value else None

    def record_model(self, model_id: str) -> None:
        """Record the model of the vectors (in the vector column's metadata)."""
        if self._current() and self.model_id() != model_id:
            with_retries(lambda: self.table.update_field_metadata(
                {"path": "vector", "metadata": {MODEL_KEY.decode(): model_id}}),
                "recording the model", self.path)

    # -- writing ---------------------------------------------------------------------------

    def _has_answer_column(self) -> bool:
        """Whether the table (or the one a first write creates) has ``ANSWER_COLUMN``."""
        return self.table is None or ANSWER_COLUMN in self.table.schema.names

    def _arrow(self, records: list[Record]) -> pa.Table:
        assert self.dimension is not None
        vectors = np.stack([check_vector(r.vector, self.dimension) for r in records])
        rows = [r.to_properties() for r in records]
        columns = {"id": [r.id for r in records],
                   **{name: [row[name] for row in rows] for name in FIELDS if name != "id"}}
        answer_column = self._has_answer_column()
        if answer_column:
            columns[ANSWER_COLUMN] = [json.dumps(row) for row in rows]
        return pa.Table.from_pydict(
            {**columns, "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), self.dimension)},
            schema=_schema(self.dimension, answer_column))

    def upsert(self, records: list[Record]) -> None:
        if not records:
            return
        if self.dimension is None:
            self.dimension = int(np.asarray(records[0].vector).size)
        self._current()  # a table another process made: write in its layout
        data = self._arrow(records)

        def write() -> None:
            if not self._current():  # a second writer may create it first: then merge
                self.table = self.db.create_table(TABLE, data=data, schema=data.schema)
                return
            (self.table.merge_insert("id").when_matched_update_all()
             .when_not_matched_insert_all().execute(data))

        try:
            with_retries(write, "a write", self.path)
        except OSError as exc:
            raise SettingsError("store", f"cannot write to it ({exc})",
                                str(self.path)) from exc

    def flush(self) -> None:
        """After a run of writes: build the ANN index past the threshold, or rebuild it once
        the rows added since the last build exceed a tenth of those it was built on.

        Rows added since the last build are searched exactly (flat), so results stay right;
        what grows is the query time (at 10^5 x 512 with a quarter of the rows flat: p50 52 ms
        against 9 ms). Folding new rows into the index as delta indices measured worse (10^5 x
        1024: p50 31 ms, recall 0.96) than rebuilding (11 ms, 0.997). Building once per run of
        writes, not per batch, keeps a bulk `index` at one build.
        """
        if self._current():
            self._compact()
            with_retries(self._maintain_index, "building the index", self.path)

    def _compact(self) -> None:
        """Merge small fragments (each write batch leaves one) once
        ``SMALL_FRAGMENTS_TO_COMPACT`` have piled up; versions older than a week are pruned.
        LanceDB rewrites only the small fragments, so over many runs each row is rewritten
        O(log) times, not once per run."""
        assert self.table is not None
        small = self.table.stats()["fragment_stats"]["num_small_fragments"]
        if small >= SMALL_FRAGMENTS_TO_COMPACT:
            with_retries(lambda: self.table.optimize(cleanup_older_than=timedelta(days=7)),
                         "compacting", self.path)

    def _maintain_index(self) -> None:
        assert self.table is not None
        rows = self.table.count_rows()
        if rows < self.index_threshold:
            return
        trained_on = self._index_meta().get("rows_at_build", 0)
        if self._indexed() and rows < REBUILD_GROWTH * trained_on:
            return
        from lancedb.index import IvfHnswSq

        self.table.create_index("vector", replace=True, config=IvfHnswSq(
            distance_type="cosine", num_partitions=partitions_for(rows)))
        self._index_meta_path().write_text(json.dumps({"rows_at_build": rows}),
                                           encoding="utf-8")  # queries read it (partitions)
        recall = self.measure_recall(RECALL_QUERIES)
        self._index_meta_path().write_text(json.dumps({
            "rows_at_build": rows, "recall_at_10": recall, "recall_queries": RECALL_QUERIES}),
            encoding="utf-8")

    def measure_recall(self, queries: int, k: int = 10) -> float:
        """recall@k of :meth:`nearest` against :meth:`exact_nearest`, with ``queries`` stored
        vectors spread evenly over the table as queries (each costs one exact scan)."""
        assert self.table is not None
        rows = self.table.count_rows()
        hits = total = 0
        for offset in np.linspace(0, rows - 1, min(queries, rows)).astype(int).tolist():
            found = (self.table.search().select(["vector"]).offset(offset).limit(1)
                     .to_list())
            if not found:
                continue
            vector = np.asarray(found[0]["vector"], dtype=np.float32)
            exact = {n.record.id for n in self.exact_nearest(vector, k)}
            hits += len(exact & {n.record.id for n in self.nearest(vector, k)})
            total += len(exact)
        return hits / total if total else 1.0

    def _index_meta_path(self) -> Path:
        return self.path / "crystalscope-index.json"

    def _index_meta(self) -> dict:
        try:
            return json.loads(self._index_meta_path().read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def _index_name(self) -> str | None:
        assert self.table is not None
        for index in self.table.list_indices():
            if "vector" in index.columns:
                return index.name
        return None

    def _indexed(self) -> bool:
        return self.table is not None and self._index_name() is not None

    def delete(self, ids: list[str]) -> int:
        if self.table is None or not ids:
            return 0
        before = self.table.count_rows()
        self.table.delete(f"id IN ({', '.join(_quote(i) for i in ids)})")
        return before - self.table.count_rows()

    def truncate(self) -> None:
        if self.table is not None:
            self.db.drop_table(TABLE)
            self.table = None
        self._index_meta_path().unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------

    def count(self) -> int:
        return self.table.count_rows() if self._current() else 0

    @staticmethod
    def _record(row: dict) -> Record:
        return Record.from_properties(row["id"], row["vector"], row)

    def records(self) -> Iterator[Record]:
        if not self._current():
            return
        for batch in self.table.to_arrow().to_batches(max_chunksize=1024):
            yield from map(self._record, batch.to_pylist())

    def get(self, record_id: str) -> Record | None:
        if not self._current():
            return None
        rows = self.table.search().where(f"id = {_quote(record_id)}").limit(1).to_list()
        return self._record(rows[0]) if rows else None

    def nearest(self, vector: np.ndarray, k: int, *,
                predicted: str | None = None) -> list[Neighbour]:
        if k < 1:
            raise SettingsError("k", "give at least 1", k)
        if not self._current():
            return []
        query = (self.table.search(check_vector(vector, self.dimension),
                                   vector_column_name="vector")
                 .distance_type("cosine").limit(k))
        answer_column = self._has_answer_column()
        query = query.select(["id", ANSWER_COLUMN, "_distance"] if answer_column
                             else [*FIELDS, "_distance"])
        if predicted is not None:
            query = query.where(f"predicted = {_quote(predicted)}", prefilter=True)
        if self._indexed():
            partitions = partitions_for(self._index_meta().get("rows_at_build", 0))
            # a small index (a low index_threshold) is searched whole: it costs little
            probes = partitions if partitions <= WHOLE_INDEX_PARTITIONS else NPROBES
            query = query.nprobes(probes).ef(HNSW_EF)
            if REFINE_FACTOR:
                query = query.refine_factor(REFINE_FACTOR)
        try:
            rows = query.to_list()
        except (OSError, RuntimeError) as exc:
            raise CrystalscopeError(f"LanceDB store {self.path}: search failed ({exc})") from exc
        no_vector = np.empty(0, dtype=np.float32)
        return [Neighbour(Record.from_properties(
                    row["id"], no_vector,
                    json.loads(row[ANSWER_COLUMN]) if answer_column else row),
                float(row["_distance"])) for row in rows]

    def exact_nearest(self, vector: np.ndarray, k: int) -> list[Neighbour]:
        """Flat-scan search, ignoring any index (the reference for recall)."""
        if self.table is None:
            return []
        rows = (self.table.search(check_vector(vector, self.dimension),
                                  vector_column_name="vector")
                .distance_type("cosine").limit(k).bypass_vector_index().to_list())
        return [Neighbour(self._record(row), float(row["_distance"])) for row in rows]

    def info(self) -> StoreInfo:
        indexed = self._indexed()
        meta = self._index_meta() if indexed else {}
        details = {key: meta[key] for key in ("recall_at_10", "recall_queries", "rows_at_build")
                   if key in meta}
        return StoreInfo(uri=str(self.path), count=self.count(), dimension=self.dimension,
                         indexed=indexed, details=details)

    def close(self) -> None:
        self.table = None
