"""Backbones from elsewhere: ``hf-hub:ORG/NAME`` (a timm model on the Hugging Face hub) and
``local-dir:PATH`` (a folder in timm's hub layout: ``config.json`` + ``model.safetensors``).

timm reads such a model's ``config.json`` for its architecture, arguments and preprocessing.
That is done once, when the run is made; the resolved :class:`BackboneSource` (a plain dict in
the checkpoint's hyper-parameters and in model.json) rebuilds the network later without the
hub or the folder — an exported model never needs the network to load.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crystalscope.settings import SettingsError

SCHEMES = ("hf-hub:", "local-dir:")


def is_sourced(name: str) -> bool:
    """True for ``hf-hub:…`` and ``local-dir:…`` model names."""
    return name.startswith(SCHEMES)


@dataclass(frozen=True)
class BackboneSource:
    """What a hub or folder model is: its timm architecture, the arguments it was saved with,
    and the mean/std of its weights' preprocessing."""

    name: str  # as given: hf-hub:ORG/NAME or local-dir:PATH
    architecture: str  # a timm model name, e.g. resnet18
    model_args: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSource:
        return cls(name=data["name"], architecture=data["architecture"],
                   model_args=dict(data.get("model_args") or {}),
                   mean=tuple(data["mean"]) if data.get("mean") else None,
                   std=tuple(data["std"]) if data.get("std") else None)


def resolve_source(name: str) -> BackboneSource:
    """Read the config of ``hf-hub:ORG/NAME`` (from the hub: needs internet) or
    ``local-dir:PATH``; a one-line SettingsError when it cannot be read."""
    # timm exports neither at its top level; they are what create_model itself calls
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    scheme, _, where = name.partition(":")
    if not where:
        raise SettingsError("model", f"give what follows {scheme}:, e.g. hf-hub:timm/resnet18."
                            "a1_in1k or local-dir:path/to/folder", name)
    try:
        if scheme == "local-dir":
            folder = Path(where)
            if not (folder / "config.json").is_file():
                raise SettingsError("model", f"{folder} has no config.json: a timm model folder "
                                    "holds config.json and model.safetensors (what `hf download "
                                    "ORG/NAME --local-dir DIR` or timm.models.save_for_hf "
                                    "writes)", name)
            config, architecture, model_args = load_model_config_from_path(folder)
        else:
            hub_log = logging.getLogger("huggingface_hub")
            level = hub_log.level
            hub_log.setLevel(logging.ERROR)  # its retry warnings: the one line below says it
            try:
                config, architecture, model_args = load_model_config_from_hf(where)
            finally:
                hub_log.setLevel(level)
    except SettingsError:
        raise
    except Exception as exc:
        if scheme == "hf-hub":
            raise SettingsError("model", f"could not read its config from the Hugging Face hub "
                                f"({type(exc).__name__}); offline, download the repository on "
                                f"a machine with internet (`hf download {where} --local-dir "
                                "DIR`), copy DIR here and give --model local-dir:DIR",
                                name) from exc
        raise SettingsError("model", f"not a readable timm model folder ({type(exc).__name__}: "
                            f"{str(exc)[:200]})", name) from exc
    import timm

    if not timm.is_model(architecture):
        raise SettingsError("model", f"its config names the architecture {architecture!r}, "
                            f"which this timm ({timm.__version__}) does not know", name)
    mean, std = config.get("mean"), config.get("std")
    return BackboneSource(name=name, architecture=architecture,
                          model_args=dict(model_args or {}),
                          mean=tuple(float(v) for v in mean) if mean else None,
                          std=tuple(float(v) for v in std) if std else None)
