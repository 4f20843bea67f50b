"""`--engine ray`: predict and index on a real local Ray (2 CPUs) give the local path's rows."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the [ray] extra is part of [dev]; pip install '.[ray]'")
pytestmark = pytest.mark.slow


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crystalscope.cli", *args], capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def crops(exported_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's test and valid crops, and one unreadable file among them."""
    folder = tmp_path_factory.mktemp("ray-crops")
    splits = exported_run.parent.parent / "splits"
    for split in ("valid", "test"):
        for path in sorted((splits / split).rglob("*.png")):
            target = folder / path.parent.name / f"{split}-{path.name}"
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(path.read_bytes())
    (folder / "cex" / "broken.png").write_bytes(b"not an image")
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_predict_on_ray_writes_the_local_rows(exported_run: Path, crops: Path,
                                              tmp_path: Path) -> None:
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    first = run("predict", str(exported_run), str(crops), "--format", "csv",
                "--output", str(local), "--batch-size", "8")
    second = run("predict", str(exported_run), str(crops), "--format", "csv",
                 "--output", str(remote), "--batch-size", "8", "--engine", "ray")
    assert first.returncode == second.returncode == 1  # the broken file, in both
    assert "broken.png" in second.stderr and "Traceback" not in second.stderr
    local_rows, ray_rows = _rows(local), _rows(remote)
    assert len(local_rows) == len(list(crops.rglob("*.png"))) - 1 > 20
    assert [r["file"] for r in ray_rows] == [r["file"] for r in local_rows]
    for a, b in zip(local_rows, ray_rows, strict=True):
        assert a["predicted_class"] == b["predicted_class"]
        for key in a:
            if key.startswith(("probability", "unknown_score")):
                assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-6), key


def test_index_on_ray_stores_the_local_records(exported_run: Path, crops: Path,
                                               tmp_path: Path) -> None:
    from crystalscope.vectors.lance import LanceStore

    stores = {}
    for engine in ("local", "ray"):
        store = tmp_path / f"{engine}.lance"
        result = run("index", str(exported_run), str(crops), "--store", str(store),
                     "--engine", engine, "--json")
        assert result.returncode == 1, result.stderr  # the broken file
        stores[engine] = {r.id: r for r in LanceStore(store).records()}
    assert stores["ray"].keys() == stores["local"].keys()
    assert len(stores["ray"]) == len(list(crops.rglob("*.png"))) - 1
    for key, record in stores["local"].items():
        other = stores["ray"][key]
        assert (other.path, other.predicted, other.sha256, other.true_class) == \
               (record.path, record.predicted, record.sha256, record.true_class)
        np.testing.assert_allclose(other.vector, record.vector, atol=1e-5)


def test_without_ray_the_engine_says_what_to_install(exported_run: Path, crops: Path,
                                                     tmp_path: Path) -> None:
    """Ray hidden from the import system, as on an install without the [ray] extra."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('hidden')\n"
        "sys.meta_path.insert(0, _Hide())\n")
    import os

    env = {**os.environ, "PYTHONPATH": str(hide)}
    for command in ("predict", "index"):
        extra = ("--store", str(tmp_path / "s.lance")) if command == "index" else ()
        result = run(command, str(exported_run), str(crops), "--engine", "ray", *extra, env=env)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "crystalscope[ray]" in lines[0], result.stderr
    assert not (tmp_path / "s.lance").exists()


def test_parquet_output_holds_the_csv_rows(exported_run: Path, crops: Path,
                                           tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    run("predict", str(exported_run), str(crops), "--format", "csv",
        "--output", str(tmp_path / "p.csv"))
    result = run("predict", str(exported_run), str(crops), "--format", "parquet",
                 "--output", str(tmp_path / "p.parquet"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    rows = _rows(tmp_path / "p.csv")
    assert [r["file"] for r in table] == [r["file"] for r in rows]
    assert [r["unknown"] for r in table] == [r["unknown"] == "yes" for r in rows]
    assert all(float(r["probability_of_predicted"]) == pytest.approx(t["probability_of_predicted"])
               for r, t in zip(rows, table, strict=True))
    refused = run("predict", str(exported_run), str(crops), "--format", "parquet")
    assert refused.returncode == 2 and "--output" in refused.stderr
