"""The versions pyproject.toml promises match what the code uses and what is installed."""

import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# What the code relies on, and the torch release that brought it.
TORCH_FEATURES = {
    "torch.OutOfMemoryError (train/run.py)": ("2.5", lambda: hasattr(torch, "OutOfMemoryError")),
    "torch.onnx.export(dynamo=True) (export/onnx.py)":
        ("2.5", lambda: "dynamo" in inspect.signature(torch.onnx.export).parameters),
    "torch.onnx.export(external_data=...) (export/onnx.py)":
        ("2.6", lambda: "external_data" in inspect.signature(torch.onnx.export).parameters),
}


def _requirements() -> dict[str, Requirement]:
    """The core's and every extra's requirements (the extras that name other extras aside)."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    listed = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                          for r in extra)]
    return {r.name: r for r in map(Requirement, listed) if r.name != "crystalscope"}


def _floor(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert floors, f"{requirement}: states no minimum version"
    return max(floors)


def test_the_torch_floor_covers_every_feature_the_code_uses() -> None:
    floor = _floor(_requirements()["torch"])
    for feature, (since, available) in TORCH_FEATURES.items():
        assert available(), f"{feature}: missing from the installed torch"
        assert floor >= Version(since), f"{feature} needs torch >= {since}, pyproject: {floor}"


def test_installed_packages_satisfy_pyproject() -> None:
    for name, requirement in _requirements().items():
        installed = version(name)
        assert requirement.specifier.contains(installed, prereleases=True), (name, installed)
