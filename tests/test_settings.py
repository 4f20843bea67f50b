"""One settings style: each command's settings check their own fields and cross-field rules,
name fields in the library and flags on the command line, in one line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crystalscope.cli import main
from crystalscope.monitor.settings import (
    AlarmSettings,
    AlertSettings,
    FrameCutting,
    OpcUaSettings,
)
from crystalscope.settings import SettingsError


@pytest.mark.parametrize(("make", "field"), [
    (lambda: AlarmSettings(), "positive"),
    (lambda: AlarmSettings(positive="pg", alpha=0), "alpha"),
    (lambda: AlarmSettings(positive="pg", arl0=5), "arl0"),
    (lambda: AlarmSettings(positive="pg", false_positive_rate=0), "false_positive_rate"),
    (lambda: AlarmSettings(positive="pg", false_positive_rate=0.6, min_shift=0.5), "min_shift"),
    (lambda: AlarmSettings(positive="pg", rule="ewma"), "rule"),
    (lambda: FrameCutting(crop_size=4), "crop_size"),
    (lambda: FrameCutting(cut="squares"), "cut"),
    (lambda: AlertSettings(repeat_alarm=-1), "repeat_alarm"),
    (lambda: OpcUaSettings(opcua_cert=Path("c.pem"), stream=Path("s")), "opcua"),
    (lambda: OpcUaSettings(opcua="opc.tcp://127.0.0.1:4840", opcua_cert=Path("c.pem"),
                           stream=Path("s")), "opcua_key"),
    (lambda: OpcUaSettings(opcua="opc.tcp://127.0.0.1:4840"), "opcua"),
])
def test_settings_name_the_field_never_a_flag(make, field: str) -> None:
    with pytest.raises(SettingsError) as caught:
        make()
    assert caught.value.field == field
    assert "--" not in str(caught.value)


def test_good_settings_keep_their_defaults() -> None:
    alarm = AlarmSettings(positive="pg")
    assert (alarm.rule, alarm.arl0, alarm.alpha, alarm.consecutive) == ("cusum", 10_000, 1e-3, 2)
    assert FrameCutting() == FrameCutting(crop_size=151, cut="particles")


@pytest.mark.parametrize(("args", "flag"), [
    (["--positive", "pg", "--crop-size", "4"], "--crop-size 4:"),
    (["--positive", "pg", "--repeat-alarm", "-1"], "--repeat-alarm -1:"),
    (["--positive", "pg", "--opcua-key", "k.pem"], "--opcua:"),
    (["--positive", "pg", "--min-shift", "0.99", "--false-positive-rate", "0.05"],
     "--min-shift:"),
    ([], "--positive:"),
])
def test_the_monitor_command_speaks_of_flags_in_one_line(
        args: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "stream").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["monitor", str(tmp_path / "no-model"), str(tmp_path / "stream"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert flag in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_serve_refuses_opcua_without_a_monitored_stream(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(tmp_path / "no-model"), "--opcua", "opc.tcp://127.0.0.1:4840"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--opcua:" in err and "monitor STREAM" in err


def test_every_commands_settings_share_one_style() -> None:
    """Train, split, synth, export, serve, monitor and a foreign model's preprocessing: each a
    Settings model (unknown fields refused, values checked on creation, errors naming fields)."""
    from crystalscope.config import TrainConfig
    from crystalscope.data.split_settings import SplitSettings
    from crystalscope.export.stage import ExportSettings
    from crystalscope.infer.predictor import Preprocessing
    from crystalscope.serve.app import ServeSettings
    from crystalscope.settings import Settings
    from crystalscope.synth.batch import BatchSettings
    from crystalscope.synth.crops import SynthSettings
    from crystalscope.synth.unknown import UnknownSettings

    models = (TrainConfig, SplitSettings, ExportSettings, Preprocessing, ServeSettings,
              SynthSettings, BatchSettings, UnknownSettings, AlarmSettings, FrameCutting,
              AlertSettings, OpcUaSettings)
    assert all(issubclass(model, Settings) for model in models)
    for make, field in ((lambda: ExportSettings(false_reject=1.5), "false_reject"),
                        (lambda: SplitSettings(ratios="0.5,0.5,0.5"), "ratios"),
                        (lambda: UnknownSettings(kinds=("cats",)), "kinds"),
                        (lambda: Preprocessing(input_size=48, layout="hwc"), "layout"),
                        (lambda: SplitSettings(seeds=3), "seeds")):
        with pytest.raises(SettingsError) as caught:
            make()
        assert caught.value.field == field
