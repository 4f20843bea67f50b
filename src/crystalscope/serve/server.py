"""Run an app with uvicorn — in the foreground (the CLI) or in a thread (tests, benchmarks) —
behind the same two guards: the Host names it answers, and how many requests it takes at once.

Host names: a web page the operator visits could otherwise drive a loopback API by DNS
rebinding (its own name resolving to 127.0.0.1); Starlette's TrustedHostMiddleware answers 400
to any other Host header. Concurrency: uvicorn's ``limit_concurrency`` answers 503 once that
many connections or requests are open, so a burst of large uploads cannot exhaust memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOPBACK_HOST_NAMES = ("127.0.0.1", "localhost", "[::1]")  # as Host headers carry them
WILDCARD_BINDS = ("0.0.0.0", "::", "")
MAX_CONCURRENCY = 32


def allowed_hosts(bind: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host header names a server bound to ``bind`` answers: the loopback names, the bound
    address itself when it is a specific one, and ``extra`` (``*`` for any)."""
    names = list(LOOPBACK_HOST_NAMES)
    if bind not in WILDCARD_BINDS and bind not in LOOPBACK:
        names.append(f"[{bind}]" if ":" in bind else bind)
    return names + [name for name in extra if name not in names]


def warn_hosts(bind: str, hosts: Sequence[str]) -> None:
    """On a wildcard bind with only loopback names allowed, say how other machines get in."""
    from crystalscope.console import err

    if bind in WILDCARD_BINDS and list(hosts) == list(LOOPBACK_HOST_NAMES):
        err.print(f"[yellow]bound to {bind or 'every address'}, but only loopback Host names "
                  "are answered: give --allowed-host with the name or address clients use "
                  "(others get 400)[/yellow]")


def guard_hosts(app: FastAPI, hosts: Sequence[str]) -> None:
    """Answer 400 to requests whose Host header is not one of ``hosts``."""
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))


def server_config(app: FastAPI, host: str, port: int, max_concurrency: int) -> uvicorn.Config:
    """uvicorn's settings for ``app``: quiet, and 503 beyond ``max_concurrency``."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning",
                          limit_concurrency=max_concurrency)


def serve_forever(app: FastAPI, host: str, port: int,
                  max_concurrency: int = MAX_CONCURRENCY) -> None:
    """Serve ``app`` in the foreground until Ctrl-C."""
    uvicorn.Server(server_config(app, host, port, max_concurrency)).run()


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
            max_concurrency: int = MAX_CONCURRENCY) -> Iterator[str]:
    """Serve ``app`` in a thread; yields its base URL; stops it afterwards."""
    server = uvicorn.Server(server_config(app, host, port, max_concurrency))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError("the server did not start")
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
