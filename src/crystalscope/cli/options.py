"""Options that several commands share, declared once."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from crystalscope.vectors.backends import DEFAULT_STORE


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    jsonl = "jsonl"
    parquet = "parquet"


class Backend(StrEnum):
    onnx = "onnx"
    openvino = "openvino"
    torch = "torch"


class Engine(StrEnum):
    local = "local"
    ray = "ray"


EngineOption = Annotated[Engine, typer.Option(
    help="local (this process) or ray (Ray Data: read, decode and run the ONNX model on a Ray "
         "cluster's CPUs, same rows as local; pip install 'crystalscope[ray]').")]
RayAddressOption = Annotated[str | None, typer.Option(
    help="With --engine ray: auto (the cluster this machine joined with `ray start`) or "
         "ray://HOST:10001; default: a local Ray started for this run.")]


STORE_HELP = (f"LanceDB folder (default ./{DEFAULT_STORE}) or a Weaviate server URL, "
              "e.g. http://localhost:8080.")

AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Workers = Annotated[int | None, typer.Option(help="Processes (default: CPU cores).")]
BackendOption = Annotated[Backend, typer.Option(
    help="onnx (ONNX Runtime), openvino (the same ONNX model through OpenVINO: int8 models "
         "about 1.5x faster on Intel CPUs; pip install 'crystalscope[openvino]') or torch.")]
ModelArgument = Annotated[Path, typer.Argument(
    metavar="MODEL", help="Run directory, model.onnx or model.safetensors.")]
StoreOption = Annotated[str, typer.Option(help=STORE_HELP)]
HostOption = Annotated[str, typer.Option(
    help="Address to bind (127.0.0.1: this machine only).")]
PortOption = Annotated[int, typer.Option(help="Port.")]
TokenOption = Annotated[str | None, typer.Option(
    envvar="CRYSTALSCOPE_TOKEN",
    help="Require this token: Authorization: Bearer TOKEN on the API, ?token=TOKEN on pages.")]
