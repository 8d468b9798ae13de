"""Logging helpers shared by the library: a warning that prints once per process, however often the
code path that raises it runs (a per-stage estimate, a per-prompt encode), and progress bars."""
from __future__ import annotations

import logging
import threading

_seen: set[tuple[str, str]] = set()
_lock = threading.Lock()


def warn_once(logger: logging.Logger, message: str, *args, key: str | None = None) -> bool:
    """Log ``message % args`` as a warning on ``logger`` unless that exact text (or, when given,
    ``key``: for messages that abbreviate what they are about) was already logged there in this
    process; return whether it was logged.

    Example:
        >>> warn_once(logging.getLogger("engine"), "frames=%d lies outside the traced regime", 1)
        True
        >>> warn_once(logging.getLogger("engine"), "frames=%d lies outside the traced regime", 1)
        False
    """
    text = message % args if args else message
    with _lock:
        seen = (logger.name, text if key is None else key)
        if seen in _seen:
            return False
        _seen.add(seen)
    logger.warning("%s", text)
    return True


def reset_warn_once() -> None:
    """Forget which warnings were logged (tests that assert a warning appears)."""
    with _lock:
        _seen.clear()


def progress_bar(iterable=None, **kwargs):
    """A ``tqdm`` bar that starts no monitor thread.

    tqdm's monitor is a thread per process that lives on after the bar; a process running other
    threads never forks the planner's fit helper (:mod:`engine.planner.fit_ahead`), so one DDIM
    bar would make every later cold plan in that process sequential. The user's own bars keep
    tqdm's default: only ours are made without it.
    """
    return _bar_class()(iterable, **kwargs)


_BAR_CLASS: list = []


def _bar_class():
    if not _BAR_CLASS:
        from tqdm import tqdm

        _BAR_CLASS.append(type("EngineBar", (tqdm,), {"monitor_interval": 0}))
    return _BAR_CLASS[0]
