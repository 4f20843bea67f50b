"""The monitor's state on OPC UA, the language of a plant's control system.

An asyncua server (the optional extra ``crystalscope[opcua]``) in a thread of its own, with one
object ``Objects/Crystalscope/<stream>`` whose variables a DCS or PLC subscribes to:
``AlarmActive``, ``AlarmWindow``, ``Status`` (ok / alarm / unknown particles / degraded),
``StatusReason``, ``ImpurityShare`` and ``ImpurityShareUpper`` (95%), ``BaseRate`` (the clean
share up to which no alarm is due), ``PValue``, ``Statistic`` and ``Threshold`` (the rule's:
the CUSUM, or the binomial rule's run), ``Rule``, ``Promise``, ``Window``, ``Crops``,
``UnknownShare``, ``LastUpdate`` and ``Model``. Node ids are readable strings in the
namespace ``urn:crystalscope:monitor``: ``Crystalscope.<stream>.AlarmActive`` …

Loopback and anonymous by default. With a certificate and key the server offers only
Basic256Sha256 with signing and encryption; with a folder of trusted client certificates it
accepts only those clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from crystalscope.errors import UserError

NAMESPACE = "urn:crystalscope:monitor"
TIMEOUT_S = 30.0

# name -> (OPC UA type, initial value); the order is the order in the address space.
VARIABLES: dict[str, tuple[str, Any]] = {
    "AlarmActive": ("Boolean", False),
    "AlarmWindow": ("Int64", 0),
    "Status": ("String", "ok"),
    "StatusReason": ("String", "starting"),
    "ImpurityShare": ("Double", math.nan),
    "ImpurityShareUpper": ("Double", math.nan),
    "BaseRate": ("Double", math.nan),
    "PValue": ("Double", math.nan),
    "Statistic": ("Double", 0.0),
    "Threshold": ("Double", math.nan),
    "Rule": ("String", ""),
    "Promise": ("String", ""),
    "Window": ("Int64", 0),
    "Crops": ("Int64", 0),
    "UnknownShare": ("Double", math.nan),
    "LastUpdate": ("DateTime", None),
    "Model": ("String", ""),
}


@dataclass(frozen=True)
class OpcUaSecurity:
    """Certificate security: the server's certificate (DER or PEM) and private key (PEM);
    ``trusted``: a folder of client certificates to accept (None: any client certificate)."""

    certificate: Path
    private_key: Path
    trusted: Path | None = None


def check_endpoint(endpoint: str) -> tuple[str, int]:
    """``opc.tcp://HOST:PORT[/path]`` -> (host, port), or a one-line error."""
    parsed = urlparse(endpoint)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "opc.tcp" or not parsed.hostname or port is None:
        raise UserError(f"--opcua {endpoint}: give an endpoint like opc.tcp://127.0.0.1:4840")
    return parsed.hostname, port


def node_name(stream: str) -> str:
    """A stream's name as an OPC UA browse name: letters, digits, '-' and '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stream).strip("_") or "stream"


class OpcUaPublisher:
    """Hosts the OPC UA server; :meth:`publish` writes the variables (from any thread)."""

    def __init__(self, endpoint: str, stream: str, model: str, *,
                 security: OpcUaSecurity | None = None) -> None:
        self.host, self.port = check_endpoint(endpoint)
        self.endpoint, self.stream, self.model = endpoint, node_name(stream), model
        self.security = security
        if security is not None:
            for path in (security.certificate, security.private_key):
                if not Path(path).is_file():
                    raise UserError(f"--opcua-cert/--opcua-key: {path} is not a file")
            if security.trusted is not None and not Path(security.trusted).is_dir():
                raise UserError(f"--opcua-trust: {security.trusted} is not a folder")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._nodes: dict[str, Any] = {}

    @staticmethod
    def namespace_uri() -> str:
        """The namespace of the monitor's nodes."""
        return NAMESPACE

    @property
    def node_prefix(self) -> str:
        """The string node ids' prefix: ``Crystalscope.<stream>.``."""
        return f"Crystalscope.{self.stream}."

    def start(self) -> OpcUaPublisher:
        """Start the server; a one-line error if asyncua is missing or the port is taken."""
        try:
            import asyncua  # noqa: F401
        except ImportError as exc:
            raise UserError("--opcua needs asyncua: pip install 'crystalscope[opcua]'") from exc
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opcua-server",
                                        daemon=True)
        self._thread.start()
        try:
            self._call(self._start())
        except OSError as exc:
            self.stop()
            raise UserError(f"--opcua {self.endpoint}: cannot serve there ({exc})") from exc
        except UserError:
            self.stop()
            raise
        return self

    def publish(self, values: dict[str, Any]) -> None:
        """Write these variables (names from :data:`VARIABLES`); LastUpdate is set too."""
        if self._loop is None:
            return
        unknown = set(values) - set(VARIABLES)
        if unknown:
            raise ValueError(f"not OPC UA variables of the monitor: {sorted(unknown)}")
        self._call(self._write({**values, "LastUpdate": datetime.now(UTC)}))

    def stop(self) -> None:
        """Stop the server and its thread (idempotent)."""
        if self._loop is None:
            return
        if self._server is not None:
            with contextlib.suppress(Exception):  # stopping: nothing left to tell the user
                self._call(self._server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop, self._server = None, None

    def __enter__(self) -> OpcUaPublisher:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ on the server's loop

    def _call(self, coroutine: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(TIMEOUT_S)

    async def _start(self) -> None:
        from asyncua import Server, ua

        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("crystalscope monitor")
        if self.security is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            try:
                await server.load_certificate(str(self.security.certificate))
                await server.load_private_key(str(self.security.private_key))
            except ValueError as exc:
                raise UserError(f"--opcua-cert/--opcua-key: not a certificate and its private "
                                f"key ({exc})") from exc
            if self.security.trusted is not None:
                from asyncua.crypto.truststore import TrustStore
                from asyncua.crypto.validator import (
                    CertificateValidator,
                    CertificateValidatorOptions,
                )

                store = TrustStore([Path(self.security.trusted)], [])
                try:
                    await store.load()
                except ValueError as exc:
                    raise UserError(f"--opcua-trust {self.security.trusted}: keep only client "
                                    f"certificates (DER or PEM) there ({exc})") from exc
                options = (CertificateValidatorOptions.TRUSTED
                           | CertificateValidatorOptions.TIME_RANGE
                           | CertificateValidatorOptions.PEER_CLIENT)
                server.set_certificate_validator(
                    CertificateValidator(options, store).validate)  # type: ignore[arg-type]
        index = await server.register_namespace(NAMESPACE)
        folder = await server.nodes.objects.add_folder(
            ua.NodeId("Crystalscope", index), ua.QualifiedName("Crystalscope", index))
        stream = await folder.add_object(
            ua.NodeId(f"Crystalscope.{self.stream}", index),
            ua.QualifiedName(self.stream, index))
        for name, (kind, initial) in VARIABLES.items():
            variant = getattr(ua.VariantType, kind)
            value = self.model if name == "Model" else initial
            self._nodes[name] = await stream.add_variable(
                ua.NodeId(self.node_prefix + name, index), ua.QualifiedName(name, index),
                ua.Variant(value, variant))
        await server.start()
        self._server = server

    async def _write(self, values: dict[str, Any]) -> None:
        from asyncua import ua

        for name, value in values.items():
            kind = VARIABLES[name][0]
            if kind == "Double":
                value = math.nan if value is None else float(value)
            elif kind == "Int64":
                value = int(value or 0)
            elif kind == "String":
                value = "" if value is None else str(value)
            await self._nodes[name].write_value(
                ua.DataValue(ua.Variant(value, getattr(ua.VariantType, kind)),
                             SourceTimestamp=values["LastUpdate"]))
