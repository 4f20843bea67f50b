"""The monitor's settings, shared by ``monitor`` and ``serve --monitor``: each a
:class:`~crystalscope.settings.Settings` model that owns its defaults, ranges and cross-field
rules and names its fields (the command line spells them as flags, ``cli/app.py``).

- :class:`AlarmSettings`: which rule, its promise, where the false-call rate comes from;
- :class:`FrameCutting`: full probe frames cut into crops;
- :class:`AlertSettings`: what happens when the alarm fires;
- :class:`OpcUaSettings`: the OPC UA server that publishes the state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from crystalscope.monitor.rules import RuleName
from crystalscope.monitor.trend import DEFAULT_ARL0
from crystalscope.settings import Settings


class AlarmSettings(Settings):
    """The alarm's options; the false-call rate comes from ``false_positive_rate`` (given),
    a clean stream (``calibrate``) or the run's test report, in that order."""

    positive: str = Field("", description="The impurity class to watch, e.g. pg.")
    false_positive_rate: float | None = Field(None, ge=0, lt=1)
    calibrate: Path | None = None
    rule: RuleName = "cusum"
    arl0: float = Field(DEFAULT_ARL0, ge=10)
    min_shift: float = Field(0.0, ge=0, lt=1)
    dispersion: float | None = Field(None, ge=0, lt=1)
    alpha: float = Field(1e-3, gt=0, lt=1)
    consecutive: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _rules(self) -> AlarmSettings:
        if not self.positive:
            raise ValueError("positive: give the impurity class to watch, e.g. pg")
        rate = self.false_positive_rate
        if self.rule == "cusum" and rate == 0:
            raise ValueError("false_positive_rate: the cusum rule needs a rate above 0 (or use "
                             "rule binomial)")
        if rate is not None and self.min_shift >= 1 - rate:
            raise ValueError(f"min_shift: give a share from 0 to below {1 - rate:.4f}")
        return self


class FrameCutting(Settings):
    """STREAM holds full frames: cut each into ``crop_size``-px pieces with ``cut``."""

    crop_size: int = Field(151, ge=8)
    cut: Literal["particles", "tiles"] = "particles"


class AlertSettings(Settings):
    """What the alarm does besides its message: a command, a POST, repeats."""

    on_alarm: str | None = None
    post: str | None = None
    repeat_alarm: int = Field(10, ge=0)
    post_retries: int = Field(3, ge=0)


class OpcUaSettings(Settings):
    """``opcua``: the endpoint to host; with ``opcua_cert`` + ``opcua_key`` the server signs
    and encrypts, and ``opcua_trust`` names the folder of client certificates it accepts."""

    opcua: str | None = None
    opcua_cert: Path | None = None
    opcua_key: Path | None = None
    opcua_trust: Path | None = None
    stream: Path | None = None  # the monitored stream whose state is published

    @model_validator(mode="after")
    def _together(self) -> OpcUaSettings:
        if self.opcua is not None and self.stream is None:
            raise ValueError("opcua: needs a monitored stream (serve's monitor STREAM), "
                             "whose state it publishes")
        if self.opcua is None and (self.opcua_cert or self.opcua_key or self.opcua_trust):
            raise ValueError("opcua: the certificate, key and trust folder need an endpoint")
        if (self.opcua_cert is None) != (self.opcua_key is None):
            raise ValueError("opcua_key: goes with opcua_cert (the server's certificate and "
                             "its private key)")
        if self.opcua_trust is not None and self.opcua_cert is None:
            raise ValueError("opcua_trust: needs opcua_cert and opcua_key")
        return self
