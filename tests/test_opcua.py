"""OPC UA: a real asyncua client subscribed to `monitor --watch --opcua` while a simulated
batch is written sees AlarmActive rise at the window the CLI reports; certificate security
(Basic256Sha256, the docs' recipe) lets a trusted client in and keeps others out."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("asyncua")

from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID

from crystalscope.errors import UserError
from crystalscope.monitor.opcua import NAMESPACE, OpcUaPublisher, OpcUaSecurity
from crystalscope.synth.batch import BatchSettings, synthesize_batch


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _node(client: Client, stream: str, name: str) -> object:
    index = await client.get_namespace_index(NAMESPACE)
    return client.get_node(f"ns={index};s=Crystalscope.{stream}.{name}")


class _Recorder:
    """asyncua subscription handler: every data change, in order, with the alarm window."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, object]] = []

    def datachange_notification(self, node: object, value: object, _data: object) -> None:
        self.changes.append((str(node.nodeid.Identifier).rsplit(".", 1)[-1], value))  # type: ignore[attr-defined]


async def _follow(url: str, stream: str, recorder: _Recorder, subscribed: threading.Event,
                  done: threading.Event) -> None:
    client = Client(url)
    for _ in range(300):  # the CLI starts the server after loading the model
        try:
            await client.connect()
            break
        except (TimeoutError, OSError):
            await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the monitor's OPC UA server did not come up")
    try:
        nodes = [await _node(client, stream, name)
                 for name in ("AlarmWindow", "Window", "Status", "AlarmActive")]
        subscription = await client.create_subscription(20, recorder)
        await subscription.subscribe_data_change(nodes)
        subscribed.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the last notifications
    finally:
        await client.disconnect()


def test_a_subscribed_client_sees_the_alarm_rise_at_the_window_the_cli_reports(
        pg_detector: Path, tmp_path: Path) -> None:
    settings = BatchSettings(windows=10, per_window=24, onset=4, rate=0.2, size=96,
                             difficulty=0.0, seed=3, calibration_windows=1)
    synthesize_batch(tmp_path / "batch", settings, workers=2)
    live = tmp_path / "live"
    live.mkdir()
    port = _free_port()
    url = f"opc.tcp://127.0.0.1:{port}"
    monitor = subprocess.Popen(
        [sys.executable, "-m", "crystalscope.cli", "monitor", str(pg_detector), str(live),
         "--positive", "pg", "--false-positive-rate", "0.05", "--watch", "--poll", "0.1",
         "--settle", "0.5", "--stop-when-idle", "2", "--out", str(tmp_path / "out"),
         "--opcua", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    recorder, subscribed, done = _Recorder(), threading.Event(), threading.Event()
    client = threading.Thread(target=lambda: asyncio.run(
        _follow(url, "live", recorder, subscribed, done)), daemon=True)
    client.start()
    try:
        assert subscribed.wait(60), "the client could not subscribe"
        for window in sorted(p for p in (tmp_path / "batch" / "pg-batch").iterdir()
                             if p.is_dir()):
            shutil.copytree(window, live / window.name)  # the probe writes a window
            time.sleep(0.4)
        out, err = monitor.communicate(timeout=120)
    finally:
        done.set()
        client.join(timeout=30)
        if monitor.poll() is None:
            monitor.kill()
    assert monitor.returncode == 3, out + err  # the alarm's exit code
    reported = int(re.search(r"alarm at window (\d+)", out).group(1))  # type: ignore[union-attr]
    alarm_values = [value for name, value in recorder.changes if name == "AlarmActive"]
    assert alarm_values[0] is False and alarm_values[-1] is True
    rise = next(i for i, (name, value) in enumerate(recorder.changes)
                if name == "AlarmActive" and value is True)
    before = recorder.changes[:rise]
    assert [v for n, v in before if n == "AlarmWindow"][-1] == reported
    assert [v for n, v in before if n == "Window"][-1] == reported  # written in that window
    assert [v for n, v in before if n == "Status"][-1] == "alarm"
    assert all(v is False for n, v in before if n == "AlarmActive")


def _certificate(folder: Path, name: str, uri: str, use: object) -> tuple[Path, Path]:
    """The docs' recipe: asyncua's self-signed application certificate."""
    key, cert = folder / f"{name}-key.pem", folder / f"{name}-cert.der"
    asyncio.run(setup_self_signed_certificate(key, cert, uri, "localhost", [use],
                                              {"organizationName": "crystalscope test"}))
    return cert, key


async def _read_alarm(url: str, stream: str, certificate: tuple[Path, Path] | None,
                      server_certificate: Path) -> object:
    client = Client(url, timeout=5)
    if certificate is not None:
        client.application_uri = "urn:crystalscope:test-client"
        await client.set_security(SecurityPolicyBasic256Sha256, certificate[0], certificate[1],
                                  server_certificate=str(server_certificate),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
    async with client:
        return await (await _node(client, stream, "AlarmActive")).read_value()  # type: ignore[attr-defined]


def test_certificate_security_lets_the_trusted_client_in_and_keeps_others_out(
        tmp_path: Path) -> None:
    server = _certificate(tmp_path, "server", "urn:freeopcua:python:server",
                          ExtendedKeyUsageOID.SERVER_AUTH)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    client = _certificate(trusted, "client", "urn:crystalscope:test-client",
                          ExtendedKeyUsageOID.CLIENT_AUTH)
    (trusted / "client-key.pem").rename(tmp_path / "client-key.pem")  # keys stay private
    client = (client[0], tmp_path / "client-key.pem")
    stranger = _certificate(tmp_path, "stranger", "urn:crystalscope:test-client",
                            ExtendedKeyUsageOID.CLIENT_AUTH)
    url = f"opc.tcp://127.0.0.1:{_free_port()}"
    with OpcUaPublisher(url, "batch-7", "run-1",
                        security=OpcUaSecurity(server[0], server[1], trusted)) as publisher:
        publisher.publish({"Window": 3, "AlarmActive": True})
        assert asyncio.run(_read_alarm(url, "batch-7", client, server[0])) is True
        with pytest.raises(Exception, match="No matching endpoints"):  # no security offered
            asyncio.run(_read_alarm(url, "batch-7", None, server[0]))
        with pytest.raises(Exception, match="BadCertificateUntrusted"):  # not in the folder
            asyncio.run(_read_alarm(url, "batch-7", stranger, server[0]))


def test_bad_endpoints_and_busy_ports_give_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=re.escape("opc.tcp://127.0.0.1:4840")):
        OpcUaPublisher("http://127.0.0.1:4840", "s", "m")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match="cannot serve there"):
            OpcUaPublisher(f"opc.tcp://127.0.0.1:{port}", "s", "m").start()
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nx\n")
    certificate = _certificate(tmp_path, "server", "urn:freeopcua:python:server",
                               ExtendedKeyUsageOID.SERVER_AUTH)
    with pytest.raises(UserError, match="keep only client certificates"):
        OpcUaPublisher(f"opc.tcp://127.0.0.1:{_free_port()}", "s", "m",
                       security=OpcUaSecurity(*certificate, tmp_path / "trust")).start()
    with pytest.raises(UserError, match="is not a file"):
        OpcUaPublisher("opc.tcp://127.0.0.1:4840", "s", "m",
                       security=OpcUaSecurity(tmp_path / "no.der", tmp_path / "no.pem"))
