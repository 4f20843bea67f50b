"""Settings of each command as pydantic models, with YAML in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crystalscope.errors import UserError
from crystalscope.train.recipes import DEFAULT_RECIPE, RECIPES


class TrainConfig(BaseModel):
    """Everything that decides a training run. Saved as ``config.yaml`` in the run."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    recipe: str = DEFAULT_RECIPE
    model: str = "resnet50"
    weights: str = "imagenet"  # a fine-tuning tool starts from pretrained layers
    image_size: int = Field(160, ge=16, le=1024)
    trainable: float = Field(0.25, ge=0.0, le=1.0)
    head: Literal["mlp", "linear"] = "mlp"
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: Literal["none", "cosine"] = "cosine"
    batch_size: int = Field(32, ge=1)
    augmentation: Literal["none", "dihedral", "georgia"] = "dihedral"
    epochs: int = Field(30, ge=1)
    f1_threshold: float = Field(0.997, gt=0, le=1.0)
    patience: int = Field(10, ge=1)
    fraction: float = Field(1.0, gt=0, le=1.0)
    class_weights: Literal["none", "auto"] = "none"
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    cache: Literal["auto", "ram", "disk"] = "auto"  # disk: a memory-mapped file in runs_dir
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


def resolve_train_config(options: dict[str, Any], config_file: Path | None = None) -> TrainConfig:
    """Recipe defaults, then the YAML file, then the command-line options (None = not given).

    With ``weights: none`` every layer trains unless ``trainable`` is given (option or file).
    """
    from_file: dict[str, Any] = {}
    if config_file is not None:
        try:
            from_file = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"--config {config_file}: cannot read it ({exc})") from exc
        if not isinstance(from_file, dict):
            raise UserError(f"--config {config_file}: must hold a mapping of option: value")
    given = {k: v for k, v in options.items() if v is not None}
    recipe = given.get("recipe") or from_file.get("recipe") or DEFAULT_RECIPE
    if recipe not in RECIPES:
        raise UserError(f"--recipe {recipe}: use one of {', '.join(RECIPES)}")
    merged = {**RECIPES[recipe], **from_file, **given, "recipe": recipe}
    if merged.get("weights", "imagenet") == "none" and "trainable" not in {**from_file, **given}:
        # A recipe's frozen share assumes pretrained layers: frozen random layers are noise.
        merged["trainable"] = 1.0
    try:
        return TrainConfig(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise UserError(f"--{field.replace('_', '-')}: {first['msg']} "
                        f"(got {first.get('input')!r})") from None


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
