"""The command line as a user meets it: help, exit codes, one-line errors, the demo."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = [["synth"], ["data", "check"], ["data", "download"], ["split"], ["train"],
            ["evaluate"], ["export"], ["predict"], ["index"], ["similar"], ["explore"],
            ["explain"], ["monitor"], ["synth", "batch"], ["synth", "unknown"], ["serve"],
            ["label"], ["label", "start"], ["label", "export"], ["label", "import"], ["demo"]]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crystalscope.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "Example: crystalscope" in result.stdout


def _assert_one_line_error(result: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_user_mistakes_exit_2_with_one_line(tmp_path: Path) -> None:
    _assert_one_line_error(run("data", "check", str(tmp_path / "nope")), 2, "no such folder")
    _assert_one_line_error(run("split", str(tmp_path / "nope"), str(tmp_path / "d")), 2,
                           "no such folder")
    _assert_one_line_error(run("synth", str(tmp_path / "s"), "--difficulty", "x"), 2,
                           "--difficulty")
    _assert_one_line_error(run("synth", "unknown", str(tmp_path / "o"), "--kinds", "cats"), 2,
                           "--kinds cats")
    _assert_one_line_error(run("synth", "unknown", str(tmp_path / "o"), "--per-kind", "0"), 2,
                           "--per-kind")
    _assert_one_line_error(run("label", str(tmp_path), "--out", str(tmp_path / "l"),
                               "--classes", "cex,cex"), 2, "--classes cex,cex")
    _assert_one_line_error(run("label", str(tmp_path / "nope"), "--out", str(tmp_path / "l"),
                               "--classes", "cex,pg"), 2, "not a folder of images")
    result = run("split", "a")  # missing argument: click's usage error, exit 2
    assert result.returncode == 2 and "Traceback" not in result.stderr


def _no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))


def test_download_is_tried_without_credentials(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import kagglehub

    from crystalscope.data.download import download_dataset

    _no_credentials(monkeypatch, tmp_path)
    calls = []

    def public_download(handle: str, *, output_dir: str, force_download: bool) -> str:
        calls.append(handle)  # a public data set needs no account
        for name in ("cex", "pg"):
            folder = Path(output_dir) / "cropped" / "cropped" / name
            folder.mkdir(parents=True)
            (folder / f"{name.upper()} (1).png").write_bytes(b"png")
        return output_dir

    monkeypatch.setattr(kagglehub, "dataset_download", public_download)
    found = download_dataset(tmp_path / "data")
    assert calls and found == tmp_path / "data" / "cropped" / "cropped"
    assert sorted(p.name for p in found.iterdir()) == ["cex", "pg"]
    assert not list(tmp_path.glob(".data.partial*"))


def test_failed_download_explains_credentials_and_manual_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    import kagglehub

    from crystalscope.cli import main

    _no_credentials(monkeypatch, tmp_path)

    def refused(handle: str, **_: object) -> str:
        raise PermissionError("403 Client Error: Forbidden\nmore detail")

    monkeypatch.setattr(kagglehub, "dataset_download", refused)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "download", str(tmp_path / "data")])
    err = capsys.readouterr().err.replace("\n", " ")
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert "PermissionError: 403 Client Error: Forbidden" in err
    assert "no Kaggle credentials were found" in err and "KAGGLE_USERNAME" in err
    assert "kaggle.com/datasets/opencrystaldata/cephalexin-reactive-crystallization" in \
        err.replace(" ", "")
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data.partial*"))


def test_check_json_and_strict(sample_classes: Path) -> None:
    result = run("data", "check", str(sample_classes), "--json", "--workers", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["readable"] == 14 and len(report["duplicate_groups"]) == 2
    (sample_classes / "pg" / "bad.png").write_bytes(b"")
    assert run("data", "check", str(sample_classes), "--strict").returncode == 1
    table = run("data", "check", str(sample_classes))
    assert table.returncode == 0 and "bad.png" in table.stdout and "cex" in table.stdout


def test_split_refuses_link_and_move_together(synthetic_set: Path, tmp_path: Path) -> None:
    _assert_one_line_error(run("split", str(synthetic_set), str(tmp_path / "d"), "--link",
                               "--move"), 2, "choose one")


def test_unexpected_errors_are_one_line_unless_debug(tmp_path: Path) -> None:
    bad = tmp_path / "dest-is-a-file"
    bad.write_text("x")
    _assert_one_line_error(run("synth", str(bad)), 2, "not an empty folder")


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = run("demo", str(tmp_path / "demo"), "--per-class", "30")
    assert result.returncode == 0, result.stderr
    assert "demo done" in result.stdout
    assert (tmp_path / "demo" / "splits" / "manifest.csv").is_file()
    report = json.loads((tmp_path / "demo" / "splits" / "split.json").read_text())
    assert report["status"] == "complete"
    run_dir = tmp_path / "demo" / "runs" / "demo"
    for name in ("report.txt", "confusion_matrix.png", "model.onnx", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    predictions = (tmp_path / "demo" / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + len(list((tmp_path / "demo" / "splits" / "test")
                                             .rglob("*.png")))
    assert (tmp_path / "demo" / "similar.html").is_file()
    flagged = list(csv.DictReader((tmp_path / "demo" / "unknown-images.csv").open(newline="")))
    cat = next(row for row in flagged if row["file"].endswith("cat.png"))
    assert cat["predicted_class"] == "unknown" and float(cat["unknown_score"]) > 1
    assert "cat.png: unknown" in result.stdout
    assert "6/8 index" in result.stdout and "7/8 explore" in result.stdout
    assert "8/8 monitor" in result.stdout
    assert (tmp_path / "demo" / "monitor" / "timeline.png").is_file()
    assert (tmp_path / "demo" / "maps" / "graph.html").is_file()
    assert (tmp_path / "demo" / "cams" / "sheet.png").is_file()


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    import crystalscope.synth.crops as crops
    from crystalscope.cli import main
    from crystalscope.cli.app import _state

    def broken(*_: object, **__: object) -> None:
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(crops, "synthesize", broken)
    monkeypatch.setitem(_state, "debug", False)
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "ZeroDivisionError: a bug, not bad input" in err and "--debug" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    with pytest.raises(ZeroDivisionError):  # --debug: the real exception, with its traceback
        main(["--debug", "synth", str(tmp_path / "b")])
    from crystalscope.errors import UserError

    with pytest.raises(UserError, match="per_class"):  # bad input under --debug: raised too
        main(["--debug", "synth", str(tmp_path / "c"), "--per-class", "0"])


def test_train_has_one_option_per_setting_with_its_description() -> None:
    """The train command's options are made from TrainConfig: none dropped, none restated."""
    import inspect

    import crystalscope.cli.train as train_cli
    from crystalscope.config import TrainConfig

    parameters = inspect.signature(train_cli.train).parameters
    assert set(parameters) - {"config", "resume", "as_json"} == set(TrainConfig.model_fields)
    for name, field in TrainConfig.model_fields.items():
        option = parameters[name].annotation.__metadata__[0]
        assert field.description and option.help == field.description, name
    help_text = run("train", "--help").stdout
    assert "--channels-last" in help_text and "--no-compile" in help_text


def test_a_train_setting_given_as_a_flag_reaches_the_settings(tmp_path: Path) -> None:
    """A flag's value arrives in config.yaml's field, and a bad one is named as the flag."""
    result = run("train", str(tmp_path / "nope"), "--image-size", "8", "--weights", "none")
    _assert_one_line_error(result, 2, "--image-size 8:")
    result = run("train", str(tmp_path / "nope"), "--head", "big", "--weights", "none")
    _assert_one_line_error(result, 2, "--head big:")


def test_error_messages_keep_square_brackets(tmp_path: Path) -> None:
    """Rich markup must not eat bracketed text: file names like 'crop[1].png', or install
    hints such as pip install 'crystalscope[ray]'."""
    result = run("predict", str(tmp_path / "run[1]"), str(tmp_path / "crop.png"))
    _assert_one_line_error(result, 2, "run[1]")
