"""String enums for policy modes, parsed with one-sentence errors."""
from __future__ import annotations

from enum import Enum


class ModeEnum(str, Enum):
    """A policy mode named by a string; ``_label`` says what kind of mode it is in errors."""

    @classmethod
    def parse(cls, value, argument: str = "mode"):
        try:
            return cls(value)
        except ValueError:
            label = getattr(cls, "_label", "mode")
            raise ValueError(f"`{argument}` {value!r} is not {label}; use one of "
                             f"{', '.join(m.value for m in cls)}.") from None
