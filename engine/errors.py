"""The exceptions the library raises on purpose: one base, a few kinds a caller may want to catch.

Each message is one sentence naming the argument (the Python parameter in library calls, the flag
on the CLI), the offending value and the way out. The classes also derive from ``ValueError`` or
``TypeError`` where that is what the error is, so ``except ValueError`` keeps working.

Example:
    >>> try:
    ...     generate(model, opts, plan=plan_for_another_size)
    ... except engine.PlanMismatch as err:
    ...     print(err)
"""
from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises deliberately."""


class InvalidArgument(EngineError, ValueError):
    """A value the caller passed cannot be used (unknown key, out of range, unsupported)."""


class WrongType(EngineError, TypeError):
    """An argument of the wrong Python type (a string where a size belongs, a dict for options)."""


class PlanMismatch(InvalidArgument):
    """A plan made for another config, size, frame count or device kind than the run."""


class DoesNotFit(InvalidArgument):
    """No plan fits the memory budget, or a forced plan is predicted not to fit."""
