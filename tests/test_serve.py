"""serve: real HTTP against a started server — good and bad images, missing fields, the token —
and the dashboard in headless Chromium."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crystalscope.infer.predictor import load_predictor
from crystalscope.infer.stream import predict_stream
from crystalscope.model.spec import ModelSpec, decode
from crystalscope.serve.app import ServeSettings, create_app
from crystalscope.serve.server import running
from crystalscope.vectors.backends import open_store
from crystalscope.vectors.indexing import index_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def predict_input(path: Path, size: int) -> np.ndarray:
    return decode(path, ModelSpec(size, ("cex", "pg")))[0]


def _post(url: str, files: list[tuple[str, str, bytes]], fields: dict | None = None,
          token: str | None = None) -> tuple[int, dict]:
    """multipart/form-data POST with urllib (real HTTP, no test client)."""
    boundary = uuid.uuid4().hex
    body = b""
    for field, name, data in files:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                 f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                 ).encode() + data + b"\r\n"
    for key, value in (fields or {}).items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n"
                 f"{value}\r\n").encode()
    body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(exported_run: Path, tmp_path_factory: pytest.TempPathFactory):
    predictor = load_predictor(exported_run)
    store = open_store(tmp_path_factory.mktemp("serve") / "s.lance")
    splits = exported_run.parent.parent / "splits"
    index_images(predictor, sorted((splits / "train").rglob("*.png")), store)
    app = create_app(ServeSettings(predictor=predictor, store=store,
                                   max_upload_bytes=2_000_000))
    with running(app) as url:
        yield url, splits


def test_predict_good_images_over_http(server: tuple[str, Path], exported_run: Path) -> None:
    url, splits = server
    images = sorted((splits / "test").rglob("*.png"))[:3]
    code, body = _post(f"{url}/predict", [("files", p.name, p.read_bytes()) for p in images])
    assert code == 200 and len(body["results"]) == 3
    report = json.loads((exported_run / "report.json").read_text())
    expected = {Path(r["path"]).name: r["probabilities"] for r in report["predictions"]}
    for image, result in zip(images, body["results"], strict=True):
        assert result["file"] == image.name
        for name, p in result["probabilities"].items():  # the same as evaluate's
            assert abs(p - expected[image.name][name]) <= 1e-4
    local = list(predict_stream(load_predictor(exported_run), images))  # the same as predict's
    assert [r["unknown_score"] for r in body["results"]] == pytest.approx(
        [r.unknown_score for r in local], rel=1e-5)
    assert [r["unknown"] for r in body["results"]] == [r.unknown for r in local]
    assert [r["unknown_reason"] for r in body["results"]] == [r.unknown_reason for r in local]
    assert _get(f"{url}/health") == (200, {"status": "ok"})
    code, model = _get(f"{url}/model")
    assert code == 200 and model["classes"] == ["cex", "pg"] and model["store"] is True


def test_bad_uploads_get_json_errors(server: tuple[str, Path], tmp_path: Path) -> None:
    url, splits = server
    good = next((splits / "test").rglob("*.png")).read_bytes()
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb)  # 81 megapixels: over the 64 MP limit
    cases = [
        ([("files", "cut.png", good[: len(good) // 2])], 400, "truncated"),
        ([("files", "text.png", b"hello, not an image")], 400, "not an image"),
        ([("files", "big.png", b"\x89PNG" + bytes(2_000_001))], 413, "larger than"),
        ([("files", "bomb.png", bomb.read_bytes())], 413, "pixels"),  # over the 4 MP cap
        ([("wrong_field", "a.png", good)], 422, "files"),
    ]
    for files, status, words in cases:
        code, body = _post(f"{url}/predict", files)
        assert code == status and words in body["error"], (files[0][1], code, body)
    code, body = _post(f"{url}/similar", [("file", "a.png", good)], {"k": "0"})
    assert code == 422 and "k" in body["error"]


def test_similar_returns_neighbours_with_thumbnails(server: tuple[str, Path]) -> None:
    url, splits = server
    image = sorted((splits / "train").rglob("*.png"))[5]
    code, body = _post(f"{url}/similar", [("file", image.name, image.read_bytes())], {"k": 3})
    assert code == 200 and len(body["neighbours"]) == 3
    first = body["neighbours"][0]
    assert Path(first["path"]).name == image.name and first["distance"] < 1e-4
    assert first["thumbnail"].startswith("data:image/png;base64,")
    code, body = _get(f"{url}/monitor")
    assert code == 404 and "not monitoring" in body["error"]


def test_the_token_guards_the_api_compared_in_constant_time(
        exported_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import secrets

    compared: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return secrets.compare_digest(a, b)

    monkeypatch.setattr("crystalscope.serve.app.secrets",
                        type("S", (), {"compare_digest": staticmethod(spy)}))
    app = create_app(ServeSettings(predictor=load_predictor(exported_run), token="s3cret"))
    with running(app) as url:
        assert _get(f"{url}/model")[0] == 401
        assert _get(f"{url}/model", token="wrong")[0] == 401
        assert _get(f"{url}/model", token="s3cret")[0] == 200
        assert _get(f"{url}/health")[0] == 200
    assert (b"Bearer wrong", b"Bearer s3cret") in compared and len(compared) == 3


def _send_raw(url: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, dict]:
    """POST with http.client: the headers, then the chunks (as sent), then the answer."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.putrequest("POST", "/predict")
    for key, value in headers.items():
        connection.putheader(key, value)
    connection.endheaders()
    try:
        for chunk in chunks:
            connection.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close as soon as it has answered
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    return response.status, body


def test_an_oversized_body_is_refused_before_it_is_read(exported_run: Path) -> None:
    app = create_app(ServeSettings(predictor=load_predictor(exported_run),
                                   max_request_bytes=1_000_000))
    with running(app) as url:
        # 200 MB announced, nothing sent: the answer comes from the header alone
        code, body = _send_raw(url, {"Content-Type": "multipart/form-data; boundary=x",
                                     "Content-Length": str(200 * 2**20)}, [])
        assert code == 413 and "larger than 1,000,000 bytes" in body["error"]
        # no Content-Length (chunked): cut off once 1 MB has streamed in
        def chunk(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        start = (b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"'
                 b"\r\nContent-Type: application/octet-stream\r\n\r\n")
        code, body = _send_raw(url, {"Content-Type": "multipart/form-data; boundary=x",
                                     "Transfer-Encoding": "chunked"},
                               [chunk(start)] + [chunk(b"a" * 65536)] * 40)
        assert code == 413 and "larger than" in body["error"]


def test_the_images_of_one_request_share_one_forward_pass(exported_run: Path) -> None:
    predictor = load_predictor(exported_run)
    batches: list[int] = []
    run = predictor.run

    def counted(x: np.ndarray):
        batches.append(len(x))
        return run(x)

    predictor.run = counted
    images = sorted((exported_run.parent.parent / "splits" / "test").rglob("*.png"))[:5]
    with running(create_app(ServeSettings(predictor=predictor))) as url:
        code, body = _post(f"{url}/predict", [("files", p.name, p.read_bytes())
                                              for p in images])
    assert code == 200 and len(body["results"]) == 5 and batches == [5]
    single = [predictor.predict(predict_input(p, predictor.input_size)[None]) for p in images]
    for result, alone in zip(body["results"], single, strict=True):
        assert result["probabilities"]["pg"] == pytest.approx(
            float(alone.probabilities[0, 1]), abs=1e-5)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install "
                                              "chromium); .ci/run installs it")
def test_dashboard_shows_a_prediction_in_chromium(server: tuple[str, Path],
                                                  tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, splits = server
    image = next((splits / "test" / "pg").glob("*.png"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                            "--disable-background-networking",
                                            "--no-first-run"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        page.wait_for_selector("text=classes: cex, pg")
        page.set_input_files("#files", str(image))
        page.wait_for_selector(".prediction", timeout=30_000)
        prediction = page.locator(".prediction").first.inner_text()
        page.wait_for_selector(".similar img", timeout=30_000)
        screenshot = Path(__file__).parent.parent / "test-artifacts" / "dashboard.png"
        screenshot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert ("cex" in prediction or "pg" in prediction) and "probability" in prediction
    assert errors == []
    with Image.open(screenshot) as shot:
        assert shot.width > 300 and np.asarray(shot.convert("L")).std() > 5


def test_monitor_endpoint_reports_the_trend(exported_run: Path, tmp_path: Path) -> None:
    from crystalscope.monitor.frames import Window
    from crystalscope.monitor.run import Monitor
    from crystalscope.monitor.trend import AlarmRule

    predictor = load_predictor(exported_run)
    runner = Monitor(predictor, AlarmRule("pg", 0.1), tmp_path, say=lambda _: None)
    images = sorted((exported_run.parent.parent / "splits" / "test").rglob("*.png"))
    runner.process(Window(1, "t0001", images[:4]))
    runner.process(Window(2, "t0002", images[4:8]))
    with running(create_app(ServeSettings(predictor=predictor, monitor=runner))) as url:
        code, body = _get(f"{url}/monitor")
    assert code == 200 and body["positive"] == "pg"
    assert [w["time"] for w in body["windows"]] == ["t0001", "t0002"]
    first = body["windows"][0]
    assert first["crops"] + first["unknown"] == 4 and body["alarm"] is None
    assert first["unknown"] == runner.result.windows[0].unknown


def test_an_upload_over_the_pixel_cap_is_refused_from_its_header(exported_run: Path) -> None:
    import io

    def png(side: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("L", (side, side)).save(buffer, format="PNG")  # compresses to a few KB
        return buffer.getvalue()

    app = create_app(ServeSettings(predictor=load_predictor(exported_run)))  # 4 MP default
    with running(app) as url:
        code, body = _post(f"{url}/predict", [("files", "frame.png", png(2100))])
        assert code == 413 and "2100x2100 pixels is over the limit of 4,000,000" in body["error"]
        code, body = _post(f"{url}/predict", [("files", "crop.png", png(64))])
        assert code == 200 and len(body["results"]) == 1


def _get_with_host(url: str, host: str) -> int:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request("GET", "/health", headers={"Host": host})
    status = connection.getresponse().status
    connection.close()
    return status


def test_only_loopback_and_allowed_host_names_are_answered(exported_run: Path) -> None:
    from crystalscope.serve.server import allowed_hosts

    predictor = load_predictor(exported_run)
    with running(create_app(ServeSettings(predictor=predictor))) as url:
        port = url.rsplit(":", 1)[1]
        assert _get_with_host(url, f"127.0.0.1:{port}") == 200
        assert _get_with_host(url, f"localhost:{port}") == 200
        assert _get_with_host(url, f"attacker.example:{port}") == 400  # a rebound DNS name
    hosts = allowed_hosts("0.0.0.0", ["crystals.plant.local"])
    with running(create_app(ServeSettings(predictor=predictor, allowed_hosts=hosts))) as url:
        assert _get_with_host(url, "crystals.plant.local") == 200
        assert _get_with_host(url, "attacker.example") == 400
    assert "10.0.0.5" in allowed_hosts("10.0.0.5") and "[::1]" in allowed_hosts("127.0.0.1")


def test_requests_beyond_the_concurrency_limit_get_503(exported_run: Path) -> None:
    import socket
    from urllib.parse import urlsplit

    app = create_app(ServeSettings(predictor=load_predictor(exported_run)))
    with running(app, max_concurrency=2) as url:
        assert _get_with_host(url, "127.0.0.1") == 200  # alone: within the limit
        parts = urlsplit(url)
        held = socket.create_connection((parts.hostname, parts.port))  # an open, slow client
        try:
            held.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            assert _get_with_host(url, "127.0.0.1") == 503  # uvicorn's plain-text 503
        finally:
            held.close()


def _scrape(url: str, token: str | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client's own parser: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_predictions_and_the_monitor(exported_run: Path,
                                                             tmp_path: Path) -> None:
    from crystalscope.monitor.frames import Window
    from crystalscope.monitor.run import Monitor
    from crystalscope.monitor.trend import AlarmRule

    predictor = load_predictor(exported_run)
    runner = Monitor(predictor, AlarmRule("pg", 0.1), tmp_path, say=lambda _: None)
    images = sorted((exported_run.parent.parent / "splits" / "test").rglob("*.png"))
    runner.process(Window(1, "t0001", images[:4]))
    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 128).save(blank)  # the unknown-image detector flags it empty
    app = create_app(ServeSettings(predictor=predictor, monitor=runner, token="s3"))
    with running(app) as url:
        code, _ = _get(f"{url}/metrics")
        assert code == 401  # a token guards /metrics like the rest of the API
        code, body = _post(f"{url}/predict", [("files", p.name, p.read_bytes())
                                              for p in [*images[:5], blank]], token="s3")
        assert code == 200
        assert _post(f"{url}/predict", [("files", "x.png", b"not an image")], token="s3")[0] == 400
        assert _get(f"{url}/nowhere", token="s3")[0] == 404
        seen = _scrape(url, "s3")
    predicted = [r["predicted_class"] for r in body["results"]]
    flagged = [r["unknown_reason"] for r in body["results"] if r["unknown"]]
    assert "empty" in flagged
    assert seen[("crystalscope_images_total", ())] == 6
    for name in ("cex", "pg"):
        assert seen[("crystalscope_predictions_total", (("class", name),))] == \
            predicted.count(name)
    for reason in set(flagged):
        assert seen[("crystalscope_unknown_images_total", (("reason", reason),))] == \
            flagged.count(reason)
    assert seen[("crystalscope_unknown_share", ())] == pytest.approx(len(flagged) / 6)
    ok = (("endpoint", "/predict"), ("method", "POST"), ("status", "200"))
    assert seen[("crystalscope_requests_total", ok)] == 1
    assert seen[("crystalscope_requests_total", (*ok[:2], ("status", "400")))] == 1
    assert seen[("crystalscope_requests_total",
                 (("endpoint", "other"), ("method", "GET"), ("status", "404")))] == 1
    assert seen[("crystalscope_requests_total",
                 (("endpoint", "/metrics"), ("method", "GET"), ("status", "401")))] == 1
    assert seen[("crystalscope_request_duration_seconds_count", (("endpoint", "/predict"),))] == 2
    assert seen[("crystalscope_request_duration_seconds_bucket",
                 (("endpoint", "/predict"), ("le", "+Inf")))] == 2
    status, _ = runner.status()
    states = {labels[0][1]: value for (name, labels), value in seen.items()
              if name == "crystalscope_monitor_status"}
    assert states == {s: float(s == status) for s in
                      ("ok", "alarm", "unknown particles", "degraded")}
    assert seen[("crystalscope_monitor_windows", ())] == 1
    assert seen[("crystalscope_monitor_positive_fraction", ())] == pytest.approx(
        runner.result.windows[-1].fraction)
