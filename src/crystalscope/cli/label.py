"""`crystalscope label`: the labelling page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crystalscope.cli.app import app
from crystalscope.cli.options import (
    AllowedHostOption,
    HostOption,
    MaxConcurrencyOption,
    PortOption,
    TokenOption,
)
from crystalscope.console import err


@app.command(epilog="Example: crystalscope label new-crops/ --out labelled/ --classes cex,pg "
                    "--model runs/demo")
def label(
    images: Annotated[Path, typer.Argument(help="Folder of crops to label (searched "
                                                "recursively; never changed).")],
    out: Annotated[Path, typer.Option(help="Folder the labels go to: labels.csv and one "
                                           "folder per class (split and train take it as is).")],
    classes: Annotated[str, typer.Option(help="Class names in key order, e.g. cex,pg (keys 1, "
                                              "2, …).")],
    model: Annotated[Path | None, typer.Option(
        help="Run directory or model.onnx: shows its guess and puts first what it is unsure "
             "of.")] = None,
    link: Annotated[bool, typer.Option("--link", help="Hard-link instead of copying (same "
                                                      "file system).")] = False,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8001,
    token: TokenOption = None,
    allowed_host: AllowedHostOption = None,
    max_concurrency: MaxConcurrencyOption = 32,
) -> None:
    """Label crops one at a time in a local page: keys 1-9 assign a class, u = not sure, z =
    undo, arrows move. Every decision is appended to OUT/labels.csv at once and the file is
    copied into OUT/<class>/; a restart resumes where it stopped."""
    from crystalscope.label.app import create_label_app
    from crystalscope.label.session import open_session, parse_label_classes
    from crystalscope.serve.server import LOOPBACK, allowed_hosts, serve_forever, warn_hosts

    names = parse_label_classes(classes)
    predictor = None
    if model is not None:
        from crystalscope.infer.predictor import load_predictor

        predictor = load_predictor(model)
    if host not in LOOPBACK and not token:
        err.print(f"[yellow]serving on {host} without a token: anyone who reaches it can "
                  "label (give --token)[/yellow]")
    session = open_session(images, out, names, predictor=predictor, link=link)
    try:
        state = session.state()
        err.print(f"{state['total']} crops, {state['labelled']} labelled, {state['left']} left"
                  + (f", {len(session.unreadable)} unreadable (listed on the page)"
                     if session.unreadable else ""))
        err.print(session.scores.note)
        suffix = f"?token={token}" if token else ""
        err.print(f"label at http://{host}:{port}/{suffix}   (Ctrl-C to stop; nothing is lost)")
        hosts = allowed_hosts(host, allowed_host or [])
        warn_hosts(host, hosts)
        serve_forever(create_label_app(session, token, hosts), host, port, max_concurrency)
    finally:
        session.close()
