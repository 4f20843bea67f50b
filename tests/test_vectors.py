"""The vector store contract on LanceDB (and on Weaviate when a server is given); nearest
neighbours against numpy's exact search; index and similar through the command line."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from crystalscope.cli import main
from crystalscope.errors import CrystalscopeError, UserError
from crystalscope.vectors.backends import open_store
from crystalscope.vectors.lance import LanceStore
from crystalscope.vectors.store import Record, VectorStore, record_id

WEAVIATE_URL = os.environ.get("CRYSTALSCOPE_WEAVIATE_URL")
DIM = 16


def _records(n: int, seed: int = 0, dim: int = DIM) -> list[Record]:
    rng = np.random.default_rng(seed)
    vectors = np.abs(rng.normal(size=(n, dim))).astype(np.float32)
    return [Record(id=record_id(Path(f"/data/img{seed}-{i}.png")), vector=vectors[i],
                   path=f"/data/img{seed}-{i}.png", sha256=f"{i:064x}",
                   predicted="cex" if i % 3 else "pg",
                   probabilities={"cex": 0.7, "pg": 0.3} if i % 3 else {"cex": 0.2, "pg": 0.8},
                   true_class=None if i % 5 == 0 else "cex", width=151, height=151,
                   added="2026-11-28T12:00:00+00:00") for i in range(n)]


def _exact(records: list[Record], query: np.ndarray, k: int,
           predicted: str | None = None) -> list[tuple[str, float]]:
    chosen = [r for r in records if predicted is None or r.predicted == predicted]
    matrix = np.stack([r.vector for r in chosen])
    cosine = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    order = np.argsort(1 - cosine, kind="stable")[:k]
    return [(chosen[i].id, float(1 - cosine[i])) for i in order]


@pytest.fixture(params=["lance", "weaviate"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    if request.param == "weaviate":
        if not WEAVIATE_URL:
            pytest.skip("set CRYSTALSCOPE_WEAVIATE_URL=http://host:8080 to run the contract "
                        "against a Weaviate server")
        opened = open_store(WEAVIATE_URL)
        opened.truncate()
    else:
        opened = open_store(tmp_path / "store.lance")
    yield opened
    opened.close()


def test_contract_add_get_update_delete_truncate(store: VectorStore) -> None:
    records = _records(30)
    assert isinstance(store, VectorStore)
    assert store.count() == 0 and store.get(records[0].id) is None
    store.upsert(records)
    assert store.count() == 30
    got = store.get(records[4].id)
    assert got is not None and got.path == records[4].path and got.sha256 == records[4].sha256
    assert got.probabilities == records[4].probabilities and got.true_class == "cex"
    assert np.allclose(got.vector, records[4].vector)
    assert store.get(records[0].id).true_class is None  # type: ignore[union-attr]
    changed = Record(**{**records[4].__dict__, "predicted": "pg", "width": 99})
    store.upsert([changed])
    assert store.count() == 30  # updated, not duplicated
    assert store.get(records[4].id).predicted == "pg"  # type: ignore[union-attr]
    listed = {r.id: r for r in store.records()}
    assert set(listed) == {r.id for r in records} and listed[records[4].id].predicted == "pg"
    assert np.allclose(listed[records[7].id].vector, records[7].vector)
    assert store.delete([records[1].id, records[2].id, record_id(Path("/never"))]) == 2
    assert store.count() == 28 and store.get(records[1].id) is None
    store.truncate()
    assert store.count() == 0


def test_contract_nearest_equals_numpy_exact_search(store: VectorStore) -> None:
    records = _records(60, seed=1)
    store.upsert(records)
    rng = np.random.default_rng(7)
    for _ in range(5):
        query = np.abs(rng.normal(size=DIM)).astype(np.float32)
        found = store.nearest(query, 7)
        expected = _exact(records, query, 7)
        assert [n.record.id for n in found] == [i for i, _ in expected]
        assert [n.distance for n in found] == pytest.approx([d for _, d in expected], abs=1e-4)
        by_id = {r.id: r for r in records}
        assert all(n.record.path == by_id[n.record.id].path for n in found)
        assert all(n.record.vector.size == 0 for n in found)  # answers carry no vectors
        only_pg = store.nearest(query, 4, predicted="pg")
        assert [n.record.id for n in only_pg] == [i for i, _ in _exact(records, query, 4, "pg")]
        assert all(n.record.predicted == "pg" for n in only_pg)
    with pytest.raises(UserError, match="-value vectors"):
        store.nearest(np.ones(DIM + 1, dtype=np.float32), 3)


def test_lance_builds_an_ann_index_with_high_recall(tmp_path: Path) -> None:
    records = _records(3000, seed=2, dim=32)
    store = LanceStore(tmp_path / "ann.lance", index_threshold=2000)
    store.upsert(records[:1000])
    store.flush()
    assert not store.info().indexed  # small: exact search
    store.upsert(records[1000:])
    assert not store.info().indexed  # writes leave the index to flush
    store.flush()
    assert store.info().indexed
    assert store.info().details["recall_at_10"] >= 0.95  # its own measurement at build
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(20):
        query = np.abs(rng.normal(size=32)).astype(np.float32)
        expected = {i for i, _ in _exact(records, query, 10)}
        hits += len(expected & {n.record.id for n in store.nearest(query, 10)})
        assert [n.record.id for n in store.exact_nearest(query, 10)] == \
            [i for i, _ in _exact(records, query, 10)]
    assert hits / 200 >= 0.95
    built = store.info().details["rows_at_build"]
    assert built == 3000
    store.upsert(_records(200, seed=9, dim=32))  # new ids: +6.7%, under a tenth
    store.flush()
    assert store.info().details["rows_at_build"] == built
    store.upsert(_records(600, seed=10, dim=32)[200:])  # now +13%: rebuilt
    store.flush()
    assert store.info().details["rows_at_build"] == 3600


def test_store_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        open_store(tmp_path / "file")
    with pytest.raises(UserError, match="cannot open or create"):
        open_store(tmp_path / "file" / "inside.lance").upsert(_records(1))
    start = time.monotonic()
    with pytest.raises(CrystalscopeError, match=r"Weaviate at .*cannot reach it"):
        open_store("http://127.0.0.1:9", timeout_s=2)  # nothing listens there
    assert time.monotonic() - start < 15  # an error, not a hang


def test_index_and_similar_from_the_command_line(exported_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    splits = exported_run.parent.parent / "splits"
    store = tmp_path / "crystals.lance"
    train_images = sorted((splits / "train").rglob("*.png"))
    for attempt in range(2):  # the second time updates every record
        with pytest.raises(SystemExit) as exit_info:
            main(["index", str(exported_run), str(splits / "train"), "--store", str(store),
                  "--json"])
        assert exit_info.value.code == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["indexed"] == len(train_images) == summary["total"]
        assert summary["new"] == (len(train_images) if attempt == 0 else 0)
    query = train_images[3]
    with pytest.raises(SystemExit):
        main(["similar", str(exported_run), str(query), "-k", "3", "--store", str(store),
              "--json", "--html", str(tmp_path / "similar.html")])
    result = json.loads(capsys.readouterr().out)
    first = result["neighbours"][0]
    assert first["path"] == str(query.resolve()) and first["distance"] < 1e-4
    assert first["true_class"] == query.parent.name
    assert len(result["neighbours"]) == 3
    page = (tmp_path / "similar.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and query.name in page
    record = LanceStore(store).get(record_id(query))
    assert record is not None and record.width > 0
    import hashlib

    assert record.sha256 == hashlib.sha256(query.read_bytes()).hexdigest()


def test_similar_on_an_empty_store_says_so(exported_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    image = next((exported_run.parent.parent / "splits" / "test").rglob("*.png"))
    with pytest.raises(SystemExit) as exit_info:
        main(["similar", str(exported_run), str(image), "--store", str(tmp_path / "s.lance")])
    assert exit_info.value.code == 2
    assert "store is empty" in capsys.readouterr().err


def test_a_record_survives_its_stored_encoding() -> None:
    """Every backend stores ``Record.to_properties()``; reading it back gives the record."""
    record = Record(id="a", vector=np.arange(4, dtype=np.float32), path="/x/PG (1).png",
                    sha256="0" * 64, predicted="pg", probabilities={"cex": 0.25, "pg": 0.75},
                    true_class=None, width=151, height=160, added="2026-11-29T12:00:00")
    properties = record.to_properties()
    assert all(isinstance(v, str | int) for v in properties.values())  # flat, any backend
    back = Record.from_properties("a", record.vector, properties)
    assert np.array_equal(back.vector, record.vector)
    assert {k: v for k, v in vars(back).items() if k != "vector"} == \
        {k: v for k, v in vars(record).items() if k != "vector"}


def test_serve_sees_rows_an_index_beside_it_adds(exported_run: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from crystalscope.infer.predictor import load_predictor
    from crystalscope.serve.app import ServeSettings, create_app
    from crystalscope.serve.server import running
    from test_serve import _post

    splits = exported_run.parent.parent / "splits"
    folder = tmp_path / "crystals.lance"
    served = open_store(folder)  # empty when the server starts: no table yet
    predictor = load_predictor(exported_run)
    query = sorted((splits / "test").rglob("*.png"))[0]
    with running(create_app(ServeSettings(predictor=predictor, store=served))) as url:
        code, body = _post(f"{url}/similar", [("file", query.name, query.read_bytes())])
        assert code == 200 and body["neighbours"] == []
        index = subprocess.run([sys.executable, "-m", "crystalscope.cli", "index",
                                str(exported_run), str(splits / "test"), "--store",
                                str(folder)], capture_output=True, text=True, timeout=300)
        assert index.returncode == 0, index.stderr
        code, body = _post(f"{url}/similar", [("file", query.name, query.read_bytes())])
    assert code == 200 and body["neighbours"][0]["path"] == str(query.resolve())


def test_a_store_of_another_models_embeddings_is_refused(exported_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    from crystalscope.infer.predictor import load_predictor

    splits = exported_run.parent.parent / "splits"
    folder = tmp_path / "crystals.lance"
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(exported_run), str(splits / "test"), "--store", str(folder)])
    assert exit_info.value.code == 0
    store = LanceStore(folder)
    assert store.model_id() == load_predictor(exported_run).export_id != ""
    store.record_model("0" * 32)  # as if another export (or run) had indexed it
    image = next((splits / "test").rglob("*.png"))
    for command in (["similar", str(exported_run), str(image)],
                    ["index", str(exported_run), str(splits / "valid")]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--store", str(folder)])
        assert exit_info.value.code == 2
        assert "holds embeddings of model 0000" in capsys.readouterr().err


RACE_WRITER = """
import sys
import numpy as np
from pathlib import Path
from crystalscope.vectors.lance import LanceStore
from crystalscope.vectors.store import Record
who, folder = int(sys.argv[1]), Path(sys.argv[2])
store = LanceStore(folder, index_threshold=1500)
rng = np.random.default_rng(who)
for batch in range(4):
    store.upsert([Record(id=f"{who}-{batch}-{i}", vector=rng.normal(size=16).astype(np.float32),
                         path=f"/{who}/{batch}/{i}.png", sha256="0" * 64, predicted="cex",
                         probabilities={"cex": 1.0}) for i in range(250)])
store.flush()
"""


def test_two_index_runs_racing_on_one_store_both_land(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "writer.py"
    script.write_text(RACE_WRITER)
    folder = tmp_path / "race.lance"
    writers = [subprocess.Popen([sys.executable, str(script), str(who), str(folder)],
                                stderr=subprocess.PIPE, text=True) for who in (1, 2, 3)]
    errors = [writer.communicate(timeout=300)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0, 0], errors
    store = LanceStore(folder)
    assert store.count() == 3 * 4 * 250
    assert store.info().indexed  # one of them built the index; none crashed on the others


def test_flush_compacts_small_fragments(tmp_path: Path) -> None:
    from crystalscope.vectors import lance

    store = LanceStore(tmp_path / "s.lance")
    for seed in range(lance.SMALL_FRAGMENTS_TO_COMPACT + 2):  # one fragment per write
        store.upsert(_records(5, seed=seed))
    assert store.table.stats()["fragment_stats"]["num_fragments"] >= 16
    store.flush()
    assert store.table.stats()["fragment_stats"]["num_fragments"] == 1
    assert store.count() == 5 * (lance.SMALL_FRAGMENTS_TO_COMPACT + 2)


def test_a_store_without_the_answer_column_is_read_and_written_in_its_layout(
        tmp_path: Path) -> None:
    import lancedb

    from crystalscope.vectors import lance

    records = _records(40, seed=4)
    folder = tmp_path / "old.lance"
    old = LanceStore(folder)
    old.upsert(records[:1])  # the arrow rows, then the table remade in the earlier layout
    data = old._arrow(records[:20]).drop_columns([lance.ANSWER_COLUMN])
    lancedb.connect(str(folder)).create_table(lance.TABLE, data=data, mode="overwrite")
    store = LanceStore(folder)
    assert not store._has_answer_column()
    store.upsert(records[20:])
    assert lance.ANSWER_COLUMN not in store.table.schema.names
    query = np.abs(np.random.default_rng(1).normal(size=DIM)).astype(np.float32)
    found = store.nearest(query, 5)
    assert [n.record.id for n in found] == [i for i, _ in _exact(records, query, 5)]
    by_id = {r.id: r for r in records}
    assert [n.record.probabilities for n in found] == \
        [by_id[n.record.id].probabilities for n in found]
    fresh = LanceStore(tmp_path / "new.lance")
    fresh.upsert(records)
    assert lance.ANSWER_COLUMN in fresh.table.schema.names
    assert [(n.record.id, n.record.path, n.record.probabilities, n.record.true_class)
            for n in fresh.nearest(query, 5)] == \
        [(n.record.id, n.record.path, n.record.probabilities, n.record.true_class)
         for n in found]
