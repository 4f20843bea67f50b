"""Settings of each command as pydantic models, with YAML in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crystalscope.errors import UserError
from crystalscope.recipes import DEFAULT_RECIPE, RECIPES
from crystalscope.settings import SettingsError, settings_error


class TrainConfig(BaseModel):
    """Everything that decides a training run. Saved as ``config.yaml`` in the run."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    recipe: str = DEFAULT_RECIPE
    # What a recipe decides has no default here: the recipe (recipes.py, beside this file) is
    # the one place for it, so editing a default means editing the recipe.
    model: str
    weights: str = "imagenet"  # a fine-tuning tool starts from pretrained layers
    image_size: int = Field(ge=16, le=1024)
    trainable: float = Field(ge=0.0, le=1.0)
    head: Literal["mlp", "linear"]
    optimizer: Literal["sgd", "adamw"]
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    scheduler: Literal["none", "cosine"]
    batch_size: int = Field(ge=1)
    augmentation: Literal["none", "dihedral", "georgia"]
    # After training (evaluate, export, predict): average over the 8 rotations and flips.
    tta: Literal["none", "dihedral"] = "none"
    epochs: int = Field(ge=1)
    f1_threshold: float = Field(gt=0, le=1.0)
    patience: int = Field(ge=1)
    fraction: float = Field(1.0, gt=0, le=1.0)
    class_weights: Literal["none", "auto"] = "none"
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    cache: Literal["auto", "ram", "disk"] = "auto"  # disk: a memory-mapped file in runs_dir
    trunk_cache: Literal["auto", "off"] = "auto"  # frozen trunk's outputs computed once
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: str = "32-true"
    compile: bool = False
    channels_last: bool = True
    runs_dir: Path = Path("runs")
    name: str | None = None
    evaluate: bool = True  # after training: evaluate on the test split (when there is one)
    export: bool = True  # after training: model.safetensors + model.json + model.onnx
    false_reject: float = Field(0.01, gt=0, lt=1)  # the unknown-detector's calibrated rate
    allow_overlap: bool = False  # train even when crops are shared between splits (counted)


def resolve_train_config(options: dict[str, Any], config_file: Path | None = None) -> TrainConfig:
    """Recipe defaults, then the YAML file, then the command-line options (None = not given).

    With ``weights: none`` every layer trains unless ``trainable`` is given (option or file).
    """
    from_file: dict[str, Any] = {}
    if config_file is not None:
        try:
            from_file = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError("config", f"cannot read it ({exc})", config_file) from exc
        if not isinstance(from_file, dict):
            raise SettingsError("config", "must hold a mapping of option: value", config_file)
    given = {k: v for k, v in options.items() if v is not None}
    recipe = given.get("recipe") or from_file.get("recipe") or DEFAULT_RECIPE
    if recipe not in RECIPES:
        raise SettingsError("recipe", f"use one of {', '.join(RECIPES)}", recipe)
    merged = {**RECIPES[recipe], **from_file, **given, "recipe": recipe}
    if merged.get("weights", "imagenet") == "none" and "trainable" not in {**from_file, **given}:
        # A recipe's frozen share assumes pretrained layers: frozen random layers are noise.
        merged["trainable"] = 1.0
    try:
        return TrainConfig(**merged)
    except ValidationError as exc:
        raise settings_error(exc) from None


def save_config(config: BaseModel, path: Path) -> None:
    """Write a config as YAML (paths as strings)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
                          encoding="utf-8")


def load_train_config(path: Path) -> TrainConfig:
    """Read a run's ``config.yaml``."""
    try:
        return TrainConfig(**yaml.safe_load(Path(path).read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, ValidationError, TypeError) as exc:
        raise UserError(f"{path}: not a readable crystalscope run config ({exc})") from exc
