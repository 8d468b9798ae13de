"""``AEMode``: how one autoencoding direction is executed, and its planner string form."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidArgument

_FORMS = ("batched, per-frame, chunk:K, tile:HxW or chunk:K+tile:HxW "
          "(tile sizes in pixels, optionally +overlap:P pixels)")
_PART = re.compile(r"^(batched|per-frame|chunk:(\d+)|tile:(\d+)(?:x(\d+))?|overlap:(\d+))$")


@dataclass(frozen=True)
class AEMode:
    """Execution mode for VAE encode or decode.

    Attributes:
        chunk: frames per VAE call; ``None`` runs all frames in one call (batched), 1 is
            per-frame.
        tile: spatial tile ``(height, width)`` in PIXELS for both directions (a decode tile
            covers ``height/f x width/f`` latents, ``f`` the downsample factor); ``None`` = no
            tiling.
        overlap: overlap between neighbouring tiles in pixels; ``None`` picks the default,
            a quarter of the tile on each axis (rounded down to a multiple of ``f``).

    String forms (``AEMode.parse`` / ``str``): ``batched``, ``per-frame``, ``chunk:K``,
    ``tile:HxW``, ``tile:HxW+overlap:P`` and ``chunk:K+tile:HxW[+overlap:P]``; ``chunk:1``
    prints as ``per-frame``.

    Example:
        >>> str(AEMode.parse("chunk:4+tile:256x256"))
        'chunk:4+tile:256x256'
    """

    chunk: int | None = None
    tile: tuple[int, int] | None = None
    overlap: int | None = None

    def __post_init__(self):
        if self.chunk is not None and self.chunk < 1:
            raise InvalidArgument(f"`chunk` must be >= 1 (got {self.chunk}); use None for batched.")
        if self.tile is not None:
            if len(self.tile) != 2 or min(self.tile) < 1:
                raise InvalidArgument(f"`tile` must be two positive pixel sizes (got {self.tile}).")
            object.__setattr__(self, "tile", (int(self.tile[0]), int(self.tile[1])))
        if self.overlap is not None:
            if self.tile is None:
                raise InvalidArgument("`overlap` needs a `tile`; set both or neither.")
            if not 0 <= self.overlap < min(self.tile):
                raise InvalidArgument(f"`overlap` must be in [0, {min(self.tile)}) for tile "
                                 f"{self.tile} (got {self.overlap}); use a smaller overlap.")

    def frames_per_call(self, frames: int) -> int:
        """Frames in each VAE call of a run of ``frames`` (the last chunk may hold fewer)."""
        return min(self.chunk or frames, frames)

    @property
    def is_batched(self) -> bool:
        """True when the mode is the plain single call (no chunking, no tiling)."""
        return self.chunk is None and self.tile is None

    def __str__(self) -> str:
        parts = []
        if self.chunk is not None:
            parts.append("per-frame" if self.chunk == 1 else f"chunk:{self.chunk}")
        if self.tile is not None:
            parts.append(f"tile:{self.tile[0]}x{self.tile[1]}")
        if self.overlap is not None:
            parts.append(f"overlap:{self.overlap}")
        return "+".join(parts) or "batched"

    @classmethod
    def parse(cls, text: str | AEMode, argument: str = "mode") -> AEMode:
        """Parse a planner string (see class docstring); an ``AEMode`` passes through.

        Args:
            text: the mode string, e.g. ``"chunk:2+tile:256x256"``.
            argument: name of the user-facing argument, quoted in the error message
                (e.g. ``ae_decode``).

        Raises:
            InvalidArgument: one sentence naming ``argument`` and listing the valid forms.
        """
        if isinstance(text, AEMode):
            return text
        bad = InvalidArgument(f"`{argument}` got {text!r}; use one of {_FORMS}.")
        if not isinstance(text, str) or not text.strip():
            raise bad
        fields: dict[str, object] = {}
        for part in (p.strip() for p in text.strip().lower().split("+")):
            m = _PART.match(part)
            key = "chunk" if part in ("batched", "per-frame") else part.split(":")[0]
            if m is None or key in fields:  # unknown or repeated component
                raise bad
            if part in ("batched", "per-frame"):
                fields[key] = None if part == "batched" else 1
            elif m.group(2):
                fields[key] = int(m.group(2))
            elif m.group(3):
                fields[key] = (int(m.group(3)), int(m.group(4) or m.group(3)))
            else:
                fields[key] = int(m.group(5))
        try:
            return cls(**fields)
        except ValueError as err:  # out-of-range value: say which, then the valid forms
            reason = str(err).split(";")[0].rstrip(".")
            raise InvalidArgument(f"`{argument}` got {text!r} ({reason}); "
                             f"use one of {_FORMS}.") from None
