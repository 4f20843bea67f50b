"""`crystalscope serve`: the model behind HTTP (FastAPI) and a dashboard page.

Endpoints: ``POST /predict`` (one or several images), ``POST /similar`` (one image, nearest
stored crystals with thumbnails), ``GET /model``, ``GET /monitor`` (trend and alarm state while
monitoring), ``GET /health``, ``GET /metrics`` (Prometheus: serve/metrics.py); OpenAPI docs at
``/docs``; the dashboard at ``/``.

Safe by default: a request body larger than ``max_request_bytes`` is refused from its
Content-Length header before it is read (and cut off while streaming when it has none); each
upload is size- and pixel-limited, read by content through the project's safe loader, never
looked up by a client-given path; every error is JSON ``{"error": …}`` with the right status
code; with a token, API calls need ``Authorization: Bearer <token>`` (compared in constant
time). Each upload's pixel count is read from its header and refused above ``max_pixels``
before it is decoded (one 64-megapixel PNG decodes to ~192 MB); only the loopback names and
the configured hosts are answered (``allowed_hosts``: against DNS rebinding). The images of
one request go through the model in one batch.
"""

from __future__ import annotations

import bisect
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import ConfigDict, Field, InstanceOf

from crystalscope.data.images import ImageLoadError
from crystalscope.errors import UserError
from crystalscope.infer.predictor import Outputs, Predictor
from crystalscope.model.spec import decode
from crystalscope.serve.metrics import CONTENT_TYPE, RequestMetrics, ServeMetrics
from crystalscope.serve.page import DASHBOARD
from crystalscope.serve.server import LOOPBACK_HOST_NAMES, guard_hosts
from crystalscope.settings import Settings
from crystalscope.vectors.indexing import thumbnail_uri
from crystalscope.vectors.store import check_same_model

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_REQUEST_BYTES = 64 * 2**20
MAX_FILES = 64
MAX_PIXELS = 4_000_000  # a probe frame is 1-4 MP; a crop a few hundred pixels a side
ENDPOINTS = ("/", "/health", "/model", "/predict", "/similar", "/monitor", "/metrics", "/docs",
             "/openapi.json")


class ServeSettings(Settings):
    """What the app serves and its limits. The model, the store and the monitor are live
    objects (checked by type, never copied); the limits are checked like every setting."""

    model_config = ConfigDict(extra="forbid", frozen=False, arbitrary_types_allowed=True)

    predictor: InstanceOf[Predictor]
    store: Any = None  # a VectorStore (a protocol: not checked by isinstance)
    monitor: Any = None  # a crystalscope.monitor.run.Monitor fed by a watch thread
    token: str | None = None
    max_upload_bytes: int = Field(MAX_UPLOAD_BYTES, ge=1)
    max_request_bytes: int = Field(MAX_REQUEST_BYTES, ge=1)
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    allowed_hosts: list[str] = Field(default_factory=lambda: list(LOOPBACK_HOST_NAMES),
                                     min_length=1)
    model_info: dict[str, Any] | None = None


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413, from its
    Content-Length before anything is read, or as soon as a streamed body passes the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send)
            return
        received, refused = 0, False

        async def counted() -> dict:
            # Past the limit: answer 413 now, then tell the app the client has gone.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                refused = True
                await self._refuse(send)
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict) -> None:
            if not refused:  # nothing more after the 413
                await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, send: Any) -> None:
        response = JSONResponse({"error": f"request body larger than {self.limit:,} bytes"},
                                status_code=413, headers={"Connection": "close"})
        await response({"type": "http"}, None, send)  # type: ignore[arg-type]


def create_app(settings: ServeSettings) -> FastAPI:
    """The FastAPI application."""
    app = FastAPI(title="crystalscope", description="Classify crystal images; find similar "
                  "ones; follow a batch.", version="1")
    predictor, store_lock = settings.predictor, threading.Lock()
    metrics = ServeMetrics(predictor.classes, ENDPOINTS, settings.monitor)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    guard_hosts(app, settings.allowed_hosts)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: runs first, counts all

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)

    def authorised(authorization: str | None = Header(default=None)) -> None:
        if settings.token and not secrets.compare_digest(
                (authorization or "").encode(), f"Bearer {settings.token}".encode()):
            raise HTTPException(401, "missing or wrong token: send Authorization: Bearer …")

    def read_upload(upload: UploadFile) -> np.ndarray:
        """The upload as the model's input (3, S, S), through the same loader as files."""
        data = upload.file.read(settings.max_upload_bytes + 1)
        name = Path(upload.filename or "upload").name
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"{name}: larger than {settings.max_upload_bytes:,} bytes")
        with tempfile.TemporaryDirectory() as folder:  # the safe loader reads files
            path = Path(folder) / "upload"
            path.write_bytes(data)
            refuse_large(path, name)
            try:
                pixels, _, _ = decode(path, predictor.spec)
            except ImageLoadError as exc:
                raise HTTPException(400, f"{name}: {exc.reason}") from exc
        return pixels

    def refuse_large(path: Path, name: str) -> None:
        """413 when the image's header says it has more than ``max_pixels`` pixels."""
        try:
            with Image.open(path) as header:  # reads the header, not the pixels
                width, height = header.size
        except Exception:  # not an image (or a broken one): the loader says why, below
            return
        if width * height > settings.max_pixels:
            raise HTTPException(413, f"{name}: {width}x{height} pixels is over the limit of "
                                     f"{settings.max_pixels:,} (serve --max-pixels)")

    def classify(pixels: np.ndarray) -> Outputs:
        """The model's outputs for a batch, counted in /metrics."""
        outputs = predictor.predict(pixels)
        best = predictor.decide(outputs.probabilities)
        reasons = outputs.unknown_reasons or [None] * len(best)
        metrics.observe_predictions([predictor.classes[i] for i in best], list(reasons))
        return outputs

    def describe(outputs: Outputs, name: str, row: int = 0) -> dict[str, Any]:
        probabilities = outputs.probabilities[row]
        best = int(predictor.decide(probabilities)[0])
        result = {"file": name, "predicted_class": predictor.classes[best],
                  "probability_of_predicted": float(probabilities[best]),
                  "probabilities": {c: float(p) for c, p in
                                    zip(predictor.classes, probabilities, strict=True)}}
        if outputs.unknown_scores is not None:
            score = float(outputs.unknown_scores[row])
            reason = outputs.unknown_reasons[row] if outputs.unknown_reasons else None
            result.update(unknown=reason is not None, unknown_score=score,
                          unknown_reason=reason)
        return result

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return DASHBOARD

    @app.get("/health", response_model=None)
    def health() -> dict[str, str] | JSONResponse:
        """ok; 503 "degraded" with the reason when the monitor's watcher has stopped."""
        monitor = settings.monitor
        if monitor is not None:
            watcher = monitor.watcher
            if monitor.degraded is None and watcher is not None and not watcher.is_alive():
                monitor.mark_degraded("the watcher thread is not running")
            if monitor.degraded is not None:
                return JSONResponse({"status": "degraded", "reason": monitor.degraded},
                                    status_code=503)
        return {"status": "ok"}

    @app.get("/model", dependencies=[Depends(authorised)])
    def model() -> dict[str, Any]:
        return {"classes": predictor.classes, "input_size": predictor.input_size,
                "backend": predictor.backend, "store": store is not None,
                "monitoring": settings.monitor is not None,
                "operating_point": (predictor.operating_point.to_dict()
                                    if predictor.operating_point else None),
                **(settings.model_info or {})}

    @app.get("/metrics", dependencies=[Depends(authorised)], include_in_schema=False)
    def prometheus() -> Response:
        """The Prometheus exposition (serve/metrics.py lists the series)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    store = settings.store
    model_id = predictor.model_id if store is not None else ""

    @app.post("/predict", dependencies=[Depends(authorised)])
    def predict(files: list[UploadFile] = File(...)) -> dict[str, Any]:
        """Classes and probabilities for each uploaded image (form field ``files``)."""
        if len(files) > MAX_FILES:
            raise HTTPException(413, f"at most {MAX_FILES} images per request")
        pixels = np.stack([read_upload(upload) for upload in files])
        outputs = classify(pixels)  # one forward pass for the whole request
        return {"results": [describe(outputs, Path(upload.filename or "").name, row)
                            for row, upload in enumerate(files)]}

    @app.post("/similar", dependencies=[Depends(authorised)])
    def similar(file: UploadFile = File(...), k: int = Form(5)) -> dict[str, Any]:
        """The ``k`` stored crystals nearest to the uploaded image."""
        if store is None:
            raise HTTPException(404, "no vector store: start serve with --store")
        if not 1 <= k <= 100:
            raise HTTPException(422, "k: give 1 to 100")
        pixels = read_upload(file)
        outputs = classify(pixels[None])
        if outputs.embeddings is None:
            raise HTTPException(400, "this model gives no embeddings")
        with store_lock:
            try:  # the store may have been filled by another model since serve started
                check_same_model(store, model_id, "the store")
            except UserError as exc:
                raise HTTPException(409, str(exc)) from exc
            neighbours = store.nearest(outputs.embeddings[0], k)
        found = [{"path": n.record.path, "distance": n.distance,
                  "predicted": n.record.predicted, "true_class": n.record.true_class,
                  "thumbnail": thumbnail_uri(n.record.path, 128) or None}
                 for n in neighbours]
        return {"query": describe(outputs, Path(file.filename or "").name),
                "neighbours": found}

    thumbnails: dict[int, list[dict[str, str]]] = {}  # alarm window -> its example crops

    @app.get("/monitor", dependencies=[Depends(authorised)])
    def monitor(since: int = 0) -> dict[str, Any]:
        """The trend (windows after ``since``: poll with the last index seen, so each poll
        costs the new windows only), the status and the alarm with its evidence (404 when not
        monitoring)."""
        if settings.monitor is None:
            raise HTTPException(404, "not monitoring: start serve with --monitor STREAM")
        runner = settings.monitor
        result, rule = runner.result, runner.rule
        status, reason = runner.status()
        alarm = result.alarm
        if alarm is not None and alarm.index not in thumbnails:
            thumbnails[alarm.index] = [{"path": str(p), "thumbnail": thumbnail_uri(p, 96)}
                                       for p in result.examples.get(alarm.index, [])]
        return {"positive": rule.positive, "rule": rule.rule,
                "promise": runner.trend.promise(),
                "false_positive_rate": rule.false_positive_rate,
                "base_rate": rule.in_control_share, "status": status, "reason": reason,
                "windows_total": len(result.windows),
                "windows": [{"window": w.index, "time": w.time, "crops": w.crops,
                             "fraction": w.fraction,
                             "interval": list(w.interval) if w.interval else None,
                             "statistic": w.statistic, "threshold": w.threshold,
                             "alarm": w.alarm, "unknown": w.unknown,
                             "unknown_fraction": w.unknown_fraction,
                             "unknown_alarm": w.unknown_alarm}
                            for w in result.windows[bisect.bisect_right(
                                result.windows, since, key=lambda w: w.index):]],
                "alarm": result.alarm_text,
                "alarm_window": alarm.index if alarm else None,
                "examples": thumbnails.get(alarm.index, []) if alarm else [],
                "unknown_alarms": [runner.trend.explain_unknown_alarm(w)
                                   for w in result.unknown_alarms]}

    return app
