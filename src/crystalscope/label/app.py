"""The labelling page and its small JSON API (FastAPI, as `serve`).

``GET /`` the page; ``GET /api/state`` counts, what is left and the crop to show;
``GET /api/image/{id}`` a crop's file; ``POST /api/label`` ``{"label", "crop", "input"}``,
``POST /api/skip`` ``{"crop", "input"}``, ``POST /api/undo`` ``{"input"}``, ``POST /api/move``
``{"step"}``. ``crop`` is the id of the crop the person saw: a decision for any other crop than
the one under the cursor (a second tab, a key held down) is answered 409 and changes nothing.
With a token, every call needs ``Authorization: Bearer <token>`` (images: ``?token=``).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel

from crystalscope.errors import UserError
from crystalscope.label.page import PAGE
from crystalscope.label.session import LabelSession
from crystalscope.serve.server import LOOPBACK_HOST_NAMES, guard_hosts

Input = Literal["keyboard", "button"]


class LabelRequest(BaseModel):
    label: str
    crop: int
    input: Input = "button"


class SkipRequest(BaseModel):
    crop: int
    input: Input = "button"


class ActionRequest(BaseModel):
    input: Input = "button"


class MoveRequest(BaseModel):
    step: Literal[-1, 1]


def create_label_app(session: LabelSession, token: str | None = None,
                     allowed_hosts: Sequence[str] = LOOPBACK_HOST_NAMES) -> FastAPI:
    """The app serving ``session``; decisions are applied one at a time; only
    ``allowed_hosts`` are answered (against DNS rebinding)."""
    app = FastAPI(title="crystalscope label", docs_url=None, redoc_url=None)
    guard_hosts(app, allowed_hosts)
    lock = threading.Lock()

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    def authorised(authorization: str | None = Header(default=None),
                   query_token: str | None = Query(default=None, alias="token")) -> None:
        if not token:
            return
        given = (authorization or "").removeprefix("Bearer ") or query_token or ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: open the page with ?token=…")

    def apply(action: Any) -> dict[str, Any]:
        with lock:
            try:
                action()
            except UserError as exc:
                raise HTTPException(409, str(exc)) from None
            return session.state()

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/state", dependencies=[Depends(authorised)])
    def state() -> dict[str, Any]:
        with lock:
            return session.state()

    @app.get("/api/image/{index}", dependencies=[Depends(authorised)])
    def image(index: int) -> FileResponse:
        if not 0 <= index < len(session.crops):
            raise HTTPException(404, f"no crop {index}")
        return FileResponse(session.crops[index].path)

    @app.post("/api/label", dependencies=[Depends(authorised)])
    def label(request: LabelRequest) -> dict[str, Any]:
        return apply(lambda: session.label(request.label, request.input, request.crop))

    @app.post("/api/skip", dependencies=[Depends(authorised)])
    def skip(request: SkipRequest) -> dict[str, Any]:
        return apply(lambda: session.skip(request.input, request.crop))

    @app.post("/api/undo", dependencies=[Depends(authorised)])
    def undo(request: ActionRequest) -> dict[str, Any]:
        return apply(lambda: session.undo(request.input))

    @app.post("/api/move", dependencies=[Depends(authorised)])
    def move(request: MoveRequest) -> dict[str, Any]:
        return apply(lambda: session.move(request.step))

    return app
