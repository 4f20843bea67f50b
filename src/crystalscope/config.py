"""The train settings (a :class:`~crystalscope.settings.Settings` model), with YAML in and out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from crystalscope.errors import UserError
from crystalscope.recipes import DEFAULT_RECIPE, RECIPES
from crystalscope.settings import Settings, SettingsError
from crystalscope.unknown.detector import DEFAULT_FALSE_REJECT, FalseRejectRate


def _split_commas(value: Any) -> Any:
    """``mlflow,wandb`` (one text, or a list of texts) -> ``["mlflow", "wandb"]``."""
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list | tuple):
        return [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    return value


class TrainConfig(Settings):
    """Everything that decides a training run. Saved as ``config.yaml`` in the run.

    Each field's description is its help on the command line: ``train``'s options are made
    from these fields (``cli/train.py``), so a new setting is one line here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path = Field(description="Split folder with train/ and valid/ (from `crystalscope "
                                   "split`).")
    recipe: str = Field(DEFAULT_RECIPE, description="fast (default: ours), timm (fast with "
                                                    "RandAugment, mixup/CutMix, label smoothing "
                                                    "and EMA weights) or georgia (the original "
                                                    "project's settings).")
    # What a recipe decides has no default here: the recipe (recipes.py, beside this file) is
    # the one place for it, so editing a default means editing the recipe.
    model: str = Field(description="Any timm model name, e.g. resnet101; or hf-hub:ORG/NAME "
                                   "(a timm model on the Hugging Face hub) or local-dir:PATH (a "
                                   "folder with its config.json and model.safetensors), which "
                                   "bring their own weights.")
    weights: str = Field("imagenet", description="imagenet (needs internet), none (random "
                                                 "init) or a local weights file.")
    image_size: int = Field(ge=16, le=1024, description="Square input side in pixels.")
    trainable: float = Field(ge=0.0, le=1.0, description="Fraction of the backbone's layers, "
                                                         "from the top, that train.")
    head: Literal["mlp", "linear"] = Field(description="mlp (the original's) or linear.")
    optimizer: Literal["sgd", "adamw"] = Field(description="sgd or adamw.")
    lr: float = Field(gt=0, description="Learning rate.")
    momentum: float = Field(ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(ge=0, description="Weight decay.")
    scheduler: Literal["none", "cosine"] = Field(description="none or cosine.")
    batch_size: int = Field(ge=1, description="Images per batch.")
    augmentation: Literal["none", "dihedral", "georgia"] = Field(
        description="none, dihedral or georgia.")
    randaugment: str = Field(
        "none",
        description="timm's RandAugment after the augmentation: none, or a timm config such as "
                    "rand-m9-mstd0.5 (m: magnitude 0-10, n: ops per image).")
    mixup: float = Field(0.0, ge=0, description="Mixup alpha (timm's Mixup): 0 off, e.g. 0.2.")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (timm's Mixup): 0 off, e.g. "
                                                 "1.0; with mixup, each batch takes one of "
                                                 "the two.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the "
                                                                "training loss: 0 off, e.g. 0.1.")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="Keep an exponential moving average "
                             "of the weights (timm's ModelEmaV3) with this decay, e.g. 0.999: "
                             "validated, checkpointed and exported instead of the raw weights; "
                             "0 off.")
    tta: Literal["none", "dihedral"] = Field(
        "none", description="Test-time averaging in the trained model (evaluate, export, "
                            "predict): none, or dihedral (the mean over the 8 rotations and "
                            "flips; 8x the inference compute).")
    epochs: int = Field(ge=1, description="Most epochs to train.")
    f1_threshold: float = Field(gt=0, le=1.0, description="Stop once every class's validation "
                                                          "F1 reaches this.")
    patience: int = Field(ge=1, description="Epochs without a lower val loss before stopping.")
    fraction: float = Field(1.0, gt=0, le=1.0, description="Train on this fraction of the "
                                                           "images (a quick rehearsal).")
    class_weights: Literal["none", "auto"] = Field("none", description="none or auto (inverse "
                                                                       "frequency).")
    seed: int = Field(0, description="Same seed, data and machine: same metrics.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    cache: Literal["auto", "ram", "disk"] = Field(
        "auto", description="Decoded images in ram, on disk (memory-mapped, for sets larger "
                            "than RAM) or auto (disk when they would fill half the free "
                            "memory).")
    trunk_cache: Literal["auto", "off"] = Field(
        "auto", description="auto: with trainable below 1 and dihedral or no augmentation, "
                            "compute the frozen layers' outputs once and train only the top "
                            "(much faster epochs); off.")
    accelerator: str = Field("auto", description="cpu, gpu, auto … (Lightning).")
    devices: str = Field("auto", description="Number of devices (one process each under "
                                             "strategy ddp) or auto.")
    strategy: str = Field("auto", description="auto, ddp, fsdp … (Lightning).")
    num_nodes: int = Field(1, ge=1, description="Machines (Lightning).")
    precision: str = Field("32-true", description="32-true, bf16-mixed, 16-mixed.")
    compile: bool = Field(False, description="torch.compile the network (slower first epoch; "
                                             "on a CPU needs a C++ compiler).")
    channels_last: bool = Field(True, description="Feed the network in channels_last memory "
                                                  "layout (faster convolutions).")
    logger: list[Literal["csv", "tensorboard", "mlflow", "wandb"]] = Field(
        ["csv", "tensorboard"], min_length=1,
        description="Where the run's params and per-epoch metrics also go (metrics.csv is "
                    "always written): csv, tensorboard, mlflow, wandb; repeat the option or "
                    "separate with commas.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (a server, or "
                                     "sqlite:///…); default: <runs_dir>/mlflow.db.")
    runs_dir: Path = Field(Path("runs"), description="Parent folder of runs.")
    name: str | None = Field(None, description="Run name (default <model>-<date>-<time>).")
    evaluate: bool = Field(True, description="Afterwards, evaluate on the test split (when "
                                             "there is one).")
    export: bool = Field(True, description="Afterwards, export safetensors + ONNX.")
    false_reject: FalseRejectRate = DEFAULT_FALSE_REJECT
    allow_overlap: bool = Field(False, description="Train even when the same crop (or a "
                                "rotated or near copy) lies in two splits; it is counted and "
                                "reported.")

    _loggers = field_validator("logger", mode="before")(_split_commas)

    @field_validator("randaugment")
    @classmethod
    def _randaugment_config(cls, value: str) -> str:
        if value != "none" and not re.fullmatch(r"rand(-[a-z]+[0-9.]+)*", value):
            raise ValueError("none, or a timm RandAugment config such as rand-m9-mstd0.5 "
                             "(rand, then -m<magnitude>, -n<ops>, -mstd<noise>)")
        return value


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
    return TrainConfig(**merged)


def save_config(config: BaseModel, path: Path) -> None:
    """Write a config as YAML (paths as strings)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
                          encoding="utf-8")


def load_train_config(path: Path) -> TrainConfig:
    """Read a run's ``config.yaml``."""
    try:
        return TrainConfig(**yaml.safe_load(Path(path).read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, SettingsError, TypeError) as exc:
        raise UserError(f"{path}: not a readable crystalscope run config ({exc})") from exc
