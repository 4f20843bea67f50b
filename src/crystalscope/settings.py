"""One settings style: a pydantic model per command's settings that checks its own fields
(ranges, and cross-field rules in validators) and speaks of them by their Python names.

A bad value raises :class:`SettingsError` (a ``UserError``) naming the field; the command line
turns the field name into its flag in one place (``cli/app.py``), so a Python caller reads
``per_class`` where a shell user reads ``--per-class``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from crystalscope.errors import UserError


class SettingsError(UserError):
    """A setting's value is wrong: ``field`` (a Python name, or "" for the whole), why."""

    def __init__(self, field: str, reason: str, value: Any = None) -> None:
        self.field, self.reason, self.value = field, reason, value
        super().__init__(f"{field}{_shown(value)}: {reason}" if field else reason)

    def for_flags(self) -> str:
        """The same message with the field spelt as its command-line flag."""
        if not self.field:
            return self.reason
        return f"{flag(self.field)}{_shown(self.value)}: {self.reason}"


def _shown(value: Any) -> str:
    return "" if value is None else f" {value}"


def flag(field: str) -> str:
    """``per_class`` -> ``--per-class``; a one-letter field -> ``-k``."""
    return ("-" if len(field) == 1 else "--") + field.replace("_", "-")


def settings_error(exc: ValidationError) -> SettingsError:
    """The first problem pydantic found, as a :class:`SettingsError`."""
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    reason = str(first["msg"]).removeprefix("Value error, ")
    if not field and ": " in reason:  # a cross-field rule: "field: why"
        field, reason = reason.split(": ", 1)
        return SettingsError(field, reason)
    return SettingsError(field, reason, first.get("input"))


class Settings(BaseModel):
    """Base of every command's settings: unknown fields refused, values checked on creation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise settings_error(exc) from None
