"""The split's settings: one :class:`~crystalscope.settings.Settings` model that owns their
defaults, ranges and cross-field rules (``split``'s options and ``split_dataset``'s argument)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from crystalscope.settings import Settings, SettingsError

Mode = Literal["copy", "link", "move"]
Order = Literal["shuffle", "sorted"]
Layout = Literal["crystalscope", "ultralytics"]
DEFAULT_RATIOS = "0.70,0.25,0.05"


def parse_ratios(text: str) -> tuple[Fraction, Fraction, Fraction]:
    """Parse ``"0.70,0.25,0.05"``: three non-negative numbers that sum to 1, train and valid > 0."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        ratios = tuple(Fraction(p) for p in parts)
    except (ValueError, ZeroDivisionError):
        raise SettingsError("ratios", f"give three numbers such as {DEFAULT_RATIOS}",
                            repr(text)) from None
    if len(ratios) != 3:
        raise SettingsError("ratios", "give exactly three numbers (train,valid,test)", repr(text))
    if any(r < 0 for r in ratios) or ratios[0] == 0 or ratios[1] == 0:
        raise SettingsError("ratios", "train and valid must be > 0 and test >= 0", repr(text))
    if abs(sum(ratios) - 1) > Fraction(1, 10**6):
        total = float(sum(ratios))
        raise SettingsError("ratios", f"the three numbers sum to {total:g}, not 1", repr(text))
    return ratios  # type: ignore[return-value]


class SplitSettings(Settings):
    """How class folders are split into train/valid/test."""

    ratios: str = Field(DEFAULT_RATIOS, description="train,valid,test shares, summing to 1.")
    seed: int = Field(0, description="Same seed, same split.")
    order: Order = Field("shuffle", description="shuffle (seeded) or sorted (by file name).")
    mode: Mode = Field("copy", description="copy, link (symlinks) or move the files.")
    group_by: str | None = Field(None, description="A regular expression over each file's "
                                 "path whose match is its group (one split per group).")
    group_file: Path | None = Field(None, description="A CSV of path,group.")
    group_column: str = Field("group", min_length=1, description="group_file's group column.")
    layout: Layout = Field("crystalscope", description="crystalscope writes train/valid/test; "
                           "ultralytics writes train/val/test (ImageFolder and Ultralytics "
                           "classification). Every command reads both.")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, text: str) -> str:
        parse_ratios(text)  # raises a SettingsError naming the field
        return text

    @property
    def parsed_ratios(self) -> tuple[Fraction, Fraction, Fraction]:
        return parse_ratios(self.ratios)

    @model_validator(mode="after")
    def _one_grouping(self) -> SplitSettings:
        if self.group_by is not None and self.group_file is not None:
            raise ValueError("group_by: give it or group_file, not both")
        return self
