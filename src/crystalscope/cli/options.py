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
class TtaChoice(StrEnum):
    none = "none"
    dihedral = "dihedral"


TtaOption = Annotated[TtaChoice | None, typer.Option(
    help="Test-time averaging: dihedral = the mean over each crop's 8 rotations and flips (8x "
         "the compute); none = one view. Default: the model's own (its export's --tta).")]
AllowedHostOption = Annotated[list[str] | None, typer.Option(
    "--allowed-host", help="A Host name clients use to reach the server (repeatable; '*' any). "
                           "Loopback names and the --host address are always answered; any "
                           "other Host header gets 400 (against DNS rebinding).")]
MaxConcurrencyOption = Annotated[int, typer.Option(
    min=1, help="Requests and connections at once; beyond it the server answers 503.")]
TokenOption = Annotated[str | None, typer.Option(
    envvar="CRYSTALSCOPE_TOKEN",
    help="Require this token: Authorization: Bearer TOKEN on the API, ?token=TOKEN on pages.")]


class AlarmRuleName(StrEnum):
    cusum = "cusum"
    binomial = "binomial"


# The alarm's options, shared by `monitor` and `serve --monitor` (one rule for both).
RuleOption = Annotated[AlarmRuleName, typer.Option(
    "--rule", help="cusum (default: accounts for over-dispersed, drifting false calls and "
                   "promises --arl0) or binomial (the first rule: --consecutive windows with "
                   "p < --alpha; assumes independent crops).")]
Arl0Option = Annotated[float, typer.Option(
    "--arl0", help="cusum: the promise, one false alarm per this many clean windows at most "
                   "(in expectation).")]
MinShiftOption = Annotated[float, typer.Option(
    help="cusum: alarm only on an impurity share above the false-call rate plus this (e.g. "
         "0.02; set it to the slow drift a clean batch shows).")]
DispersionOption = Annotated[float | None, typer.Option(
    help="cusum: the false calls' intra-window correlation (default: measured with "
         "--calibrate, else 0 = independent crops).")]
FalsePositiveRateOption = Annotated[float | None, typer.Option(
    help="The model's rate of false impurity calls (default: measured with --calibrate, else "
         "from the run's test report; upper 95% bound).")]
CalibrateOption = Annotated[Path | None, typer.Option(
    help="A known-clean stream (no impurity; cusum: at least 30 windows) to measure the false "
         "calls' rate and window-to-window spread on.")]
AlphaOption = Annotated[float, typer.Option(
    help="Significance of one window (the binomial rule's test; the 'significant' column).")]
ConsecutiveOption = Annotated[int, typer.Option(
    help="binomial: significant windows in a row that raise the alarm.")]
OpcUaOption = Annotated[str | None, typer.Option(
    "--opcua", help="Host an OPC UA server at this endpoint, e.g. opc.tcp://127.0.0.1:4840, "
                    "with the alarm's state under Objects/Crystalscope/<stream> (pip install "
                    "'crystalscope[opcua]').")]
OpcUaCertOption = Annotated[Path | None, typer.Option(
    "--opcua-cert", help="--opcua: the server's certificate (DER or PEM); with --opcua-key "
                         "only Basic256Sha256 SignAndEncrypt is offered.")]
OpcUaKeyOption = Annotated[Path | None, typer.Option(
    "--opcua-key", help="--opcua: the server's private key (PEM).")]
OpcUaTrustOption = Annotated[Path | None, typer.Option(
    "--opcua-trust", help="--opcua: a folder of client certificates to accept (default: any "
                          "client certificate).")]
