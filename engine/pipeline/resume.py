"""Where a run stopped, saved so that it can finish later with the same video.

A :class:`RunState` holds the options, the settings, the denoising steps done, the latents after
them and the random generator's state; conditioning is recomputed on resume (it is cheap and,
from the same seed, identical). Files are written atomically and read weights-only.

Example:
    >>> try:
    ...     generate(model, opts, plan)
    ... except Interrupted as stop:
    ...     stop.state.save("cat.resume.pt")
    >>> generate(model, opts, resume=RunState.load("cat.resume.pt"))
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EngineError, InvalidArgument

_FORMAT = "engine-run-state-1"


@dataclass
class RunState:
    """Options, settings and the sampler's progress of one run."""

    config: str
    config_digest: str
    options: dict
    settings: dict
    steps_done: int
    latents: torch.Tensor  # x after ``steps_done`` steps (x_T when none)
    rng_state: torch.Tensor  # the CPU generator's state right after those steps

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file in the same folder, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".pt", dir=path.parent)
        os.close(fd)
        try:
            payload = {**dataclasses.asdict(self), "format": _FORMAT,
                       "latents": self.latents.detach().cpu(), "rng_state": self.rng_state.cpu()}
            torch.save(payload, tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; this is an ordinary file
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, argument: str = "resume") -> RunState:
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"`{argument}` {str(path)!r} is not a file; pass the .resume.pt file an "
                                  "interrupted run wrote next to its output.")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same sentence
            raise InvalidArgument(f"`{argument}` {str(path)!r} cannot be read ({type(exc).__name__}); pass "
                                  "a file written by an interrupted run or --save-latents.") from None
        if not isinstance(data, dict) or data.pop("format", None) != _FORMAT:
            raise InvalidArgument(f"`{argument}` {str(path)!r} is not a saved run; pass a file written by an "
                                  "interrupted run or --save-latents.")
        return cls(**data)


class Interrupted(EngineError):
    """The run stopped before its video (Ctrl-C, SIGTERM); ``state`` is what it finished, to save
    and resume (an ``OutOfMemory`` after every re-plan carries a ``state`` as well)."""

    def __init__(self, message: str, state: RunState, cause: BaseException | None = None):
        super().__init__(message)
        self.state, self.cause = state, cause
