"""Reading a batch's JSONL file: every line validated before any work, one sentence per bad line.

A line is one JSON object: the fields of :class:`~engine.pipeline.options.GenerateOptions`
(``image``, ``image2``, ``prompt``, ``mode``, ``height``, ``width``, ``frames``, ``steps``, ``cfg``,
``cfg_img``, ``fs``, ``eta``, ``seed``, ``fps``, ``timestep_spacing``, ``guidance_rescale``), plus
``perframe_ae`` (as ``engine generate --perframe-ae``) and an optional ``id`` (default: the line
number). ``null`` means "the default". Relative image paths are read from the JOBS file's folder.

Example:
    >>> jobs = read_jobs("jobs.jsonl", load_spec("tiny"))
    >>> [j.id for j in jobs.valid], [bad.message for bad in jobs.invalid]
    (['cat', '2'], ['jobs.jsonl line 3: `height` 65 must be a positive multiple of 16 ...'])
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from ..pipeline.options import GenerateOptions, resolve_options

EXTRA_KEYS = ("id", "perframe_ae")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _option_types() -> dict[str, type]:
    """Each option's value type, read from ``GenerateOptions`` (``int | None`` -> ``int``)."""
    hints = typing.get_type_hints(GenerateOptions)
    out = {}
    for f in dataclasses.fields(GenerateOptions):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        out[f.name] = args[0] if args else hints[f.name]
    return out


OPTION_TYPES = _option_types()
KEYS = tuple(OPTION_TYPES) + EXTRA_KEYS


class InvalidJobs(InvalidArgument):
    """Some lines of the JOBS file are not valid jobs; ``messages`` has one sentence per line."""

    def __init__(self, messages: list[str]):
        super().__init__(messages[0] if len(messages) == 1 else f"{len(messages)} lines are not valid jobs")
        self.messages = messages


@dataclass(frozen=True)
class Job:
    """One valid line: its id, where it came from, what it asks for (resolved) and as written."""

    id: str
    line: int
    options: GenerateOptions
    raw: dict[str, Any]
    perframe_ae: bool | None = None

    def digest(self, config: str, ckpt: str | None) -> str:
        """Identity of what this job makes (options, model): a changed job is not "already done"."""
        text = json.dumps({"options": dataclasses.asdict(self.options), "perframe_ae": self.perframe_ae,
                           "config": config, "ckpt": ckpt}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BadLine:
    """A line that is not a valid job: its number, its id if it had one, the one-sentence reason."""

    line: int
    id: str | None
    message: str


@dataclass(frozen=True)
class JobList:
    valid: tuple[Job, ...]
    invalid: tuple[BadLine, ...]


def read_jobs(path, spec) -> JobList:
    """Validate every line of the JSONL file ``path`` for the model ``spec``.

    Checks JSON syntax, unknown keys (naming the nearest valid one), value types, values (through
    :func:`~engine.pipeline.options.resolve_options`), that the images exist and can be read, and
    that ids are unique. A missing file raises ``FileNotFoundError``; a file without any job
    raises :class:`InvalidArgument`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`JOBS` {str(path)!r} does not exist; pass a JSONL file with one job "
                                "(a JSON object) per line.")
    valid, invalid, seen = [], [], {}
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            job = _read_line(text, number, path.parent, spec)
            if job.id in seen:
                raise InvalidArgument(f"`id` {job.id!r} is already used by line {seen[job.id]}; "
                                      "give each job its own id.")
            seen[job.id] = number
            valid.append(job)
        except (InvalidArgument, ValueError, TypeError, FileNotFoundError, OSError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            invalid.append(BadLine(number, _raw_id(text), f"{path.name} line {number}: {message}"))
    if not valid and not invalid:
        raise InvalidArgument(f"`JOBS` {str(path)!r} has no jobs; write one JSON object per line, e.g. "
                              '{"image": "cat.png", "prompt": "a cat"}.')
    return JobList(tuple(valid), tuple(invalid))


def _read_line(text: str, number: int, folder: Path, spec) -> Job:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"the line is not valid JSON ({exc.msg} at column {exc.colno}); "
                              "write one JSON object per line.") from None
    if not isinstance(raw, dict):
        raise InvalidArgument(f"the line is a JSON {type(raw).__name__}, not an object; write "
                              '{"image": ..., "prompt": ...}.')
    values = {k: v for k, v in raw.items() if v is not None}
    for key, value in values.items():
        _check_key(key, value)
    if "image" not in values:
        raise InvalidArgument("`image` is missing; every job needs the path of its conditioning image.")
    job_id = _job_id(values.pop("id", number))
    perframe_ae = values.pop("perframe_ae", None)
    for key in ("image", "image2"):
        if key in values:
            values[key] = str((folder / Path(values[key]).expanduser()).resolve())
    opts = resolve_options(GenerateOptions(**values), spec, name=lambda field: field)
    _check_images(opts)
    return Job(job_id, number, opts, raw, perframe_ae)


def _check_key(key: str, value: Any) -> None:
    if key not in KEYS:
        near = difflib.get_close_matches(key, KEYS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise InvalidArgument(f"key {key!r} is unknown; {hint}the keys are {', '.join(KEYS)}.")
    if key == "id":
        return
    want = bool if key == "perframe_ae" else OPTION_TYPES[key]
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise InvalidArgument(f"`{key}` {value!r} must be {_TYPE_NAMES.get(want, want.__name__)}, "
                              f"not {_json_type(value)}; write {_example(want, value)}.")


def _job_id(value: Any) -> str:
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text is None or not _ID.fullmatch(text):
        raise InvalidArgument(f"`id` {value!r} cannot name an output file; use letters, digits, '.', '_' "
                              "and '-' (starting with a letter or digit), up to 128 characters.")
    return text


def _check_images(opts: GenerateOptions) -> None:
    """The image(s) exist, can be read and cover the size: a typo costs seconds, not a model load."""
    from ..pipeline.image_io import prepare_image

    for name in ("image", "image2"):
        source = getattr(opts, name)
        if source is not None:
            prepare_image(source, opts.height, opts.width, name)


def _raw_id(text: str) -> str | None:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        return None
    value = raw.get("id") if isinstance(raw, dict) else None
    return str(value) if isinstance(value, (str, int)) and value is not None else None


def _json_type(value: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _example(want: type, value: Any) -> str:
    """The value as it should be written (``"2"`` -> ``2``), else one of the right type."""
    try:
        if want is bool and str(value).lower() in ("true", "false"):
            return str(value).lower()
        if want in (int, float) and not isinstance(value, (bool, list, dict)):
            return json.dumps(want(value))
        if want is str and isinstance(value, (int, float)):
            return json.dumps(str(value))
    except (TypeError, ValueError):
        pass
    return {str: 'a quoted string like "cat.png"', int: "a whole number like 64", float: "a number like 7.5",
            bool: "true or false"}.get(want, "null")
