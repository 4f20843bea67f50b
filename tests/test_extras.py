"""Slim installs: the core runs predict and monitor on an exported model with no extra, core +
[serve] runs serve, and a command whose extra is missing says which one to install.

The extras' libraries are made unimportable in a child process (tests/without_extras.py);
``.ci/slim-install`` repeats the first two checks on real installs in fresh environments.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from crystalscope.extras import EXTRA_OF_MODULE

ROOT = Path(__file__).resolve().parents[1]
WITHOUT = Path(__file__).with_name("without_extras.py")


def _run(extras: str, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WITHOUT), extras, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_the_core_runs_predict_and_monitor_without_any_extra(exported_run: Path,
                                                             tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    made = _run("all", "synth", "batch", batch, "--windows", "6", "--per-window", "8",
                "--onset", "2", "--size", "64", "--seed", "1")
    assert made.returncode == 0, made.stderr
    csv = tmp_path / "p.csv"
    predicted = _run("all", "predict", exported_run / "model.onnx", batch / "pg-batch" / "t0001",
                     "--format", "csv", "--output", csv)
    assert predicted.returncode == 0, predicted.stderr
    assert len(csv.read_text(encoding="utf-8").splitlines()) == 1 + 8
    monitored = _run("all", "monitor", exported_run, batch / "pg-batch", "--positive", "pg",
                     "--false-positive-rate", "0.05", "--out", tmp_path / "monitor")
    assert monitored.returncode in (0, 3), monitored.stderr  # 3: the alarm was raised
    trend = (tmp_path / "monitor" / "trend.csv").read_text(encoding="utf-8").splitlines()
    assert len(trend) >= 2
    assert (tmp_path / "monitor" / "timeline.png").stat().st_size > 0


@pytest.mark.parametrize(("command", "extra"), [
    (["train", "{tmp}"], "train"),
    (["evaluate", "{run}"], "train"),
    (["predict", "{run}/model.safetensors", "{tmp}"], "train"),
    (["explore", "{run}", "{tmp}"], "explore"),
    (["index", "{run}", "{tmp}", "--store", "{tmp}/s.lance"], "index"),
    (["serve", "{run}"], "serve"),
    (["label", "{tmp}", "--out", "{tmp}/labelled", "--classes", "cex,pg"], "serve"),
])
def test_a_command_whose_extra_is_missing_says_which_to_install(
        command: list[str], extra: str, exported_run: Path, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes((ROOT / "tests/data/opencrystal/CEX (1).png").read_bytes())
    args = [a.format(tmp=tmp_path, run=exported_run) for a in command]
    done = _run("all", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"pip install 'crystalscope[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_runs_on_the_core_and_serve_extra(exported_run: Path, tmp_path: Path) -> None:
    blocked = ",".join(sorted(set(EXTRA_OF_MODULE.values()) - {"serve"}))
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(WITHOUT), blocked, "serve", str(exported_run),
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer within 60 s"
                time.sleep(0.3)
        image = (ROOT / "tests/data/opencrystal/PG (565).png").read_bytes()
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                f"filename=\"PG (565).png\"\r\nContent-Type: image/png\r\n\r\n").encode() + image \
            + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            result = json.loads(response.read())["results"][0]
        assert result["predicted_class"] in ("cex", "pg")
        assert sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_core_requires_no_library_of_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {Requirement(r).name.replace("-", "_") for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    for module, extra in EXTRA_OF_MODULE.items():
        assert module not in core, f"{module} is an extra's library but in the core"
        assert extra in extras, f"extras.py names [{extra}], pyproject.toml has no such extra"
    dev = {Requirement(r).name: Requirement(r) for r in extras["dev"]}
    assert dev["crystalscope"].extras >= set(extras) - {"dev"}, "dev must hold every extra"
