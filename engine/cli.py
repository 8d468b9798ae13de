"""``engine`` command line: a thin driver over the library (each verb lives in ``engine/commands``)."""
from __future__ import annotations

import argparse
import logging
import re
import sys

from .commands import batch, convert, generate, gpus, inspect, plan, probe, serve
from .errors import EngineError

VERBS = {"generate": generate, "plan": plan, "inspect": inspect, "convert": convert, "probe": probe,
         "gpus": gpus, "batch": batch, "serve": serve}


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in the engine's shape: one line, exit status 2."""

    def error(self, message: str):
        m = re.fullmatch(r"argument (\S+?)(?:/\S+)?: invalid (\w+) value: (.*)", message)
        if m:
            kind = {"int": "a whole number", "float": "a number"}.get(m.group(2), f"a valid {m.group(2)}")
            message = f"`{m.group(1)}` {m.group(3)} is not {kind}"
        elif (m := re.fullmatch(r"argument (\S+?)(?:/\S+)?: (.*)", message)):
            message = f"`{m.group(1)}`: {m.group(2)}"
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="engine", description=(
        "Adaptive memory-aware image-to-video inference for DynamiCrafter-class models."))
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, module in VERBS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("--") and argv[0] not in ("-h", "--help", "-v", "--verbose"):
        argv = ["generate", *argv]  # `engine` alone, or `engine --out x.mp4`, runs the demo
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verb is None:
        build_parser().print_help()
        return 2
    try:
        return VERBS[args.verb].run(args) or 0
    except (EngineError, ValueError, FileNotFoundError, KeyError, ModuleNotFoundError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        print(f"engine {args.verb}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any work worth saving (a run saves its own progress)
        print(f"engine {args.verb}: interrupted", file=sys.stderr)
        return 130


# verbs that build models but never use Hugging Face transformers (batch and serve load accelerate
# and gradio, which look for it)
_WITHOUT_TRANSFORMERS = ("generate", "plan", "probe", "inspect", "convert")


def console_main() -> int:
    """The ``engine`` command in its own process (console script, ``python -m engine``).

    open_clip imports Hugging Face ``transformers`` whenever it is installed (1.3 s of a cold plan
    on a 2-core CPU) for text towers DynamiCrafter's encoders do not use, and these verbs never use
    it either: this process hides it, and open_clip falls back as it does where transformers is not
    installed. A library user's process (``engine.cli.main`` called in-process) is left alone.
    """
    argv = sys.argv[1:]
    words = [a for a in argv if a not in ("-v", "--verbose")]
    verb = words[0] if words and not words[0].startswith("-") else "generate"  # main()'s demo rule
    if verb in _WITHOUT_TRANSFORMERS and "transformers" not in sys.modules:
        sys.modules["transformers"] = None  # `import transformers` raises ImportError here
    code = main(argv)
    if verb in _WITHOUT_TRANSFORMERS:  # single-process verbs (batch may be one rank of many)
        _exit_without_teardown(code)
    return code


def _exit_without_teardown(code: int) -> None:
    """End the process now that its work is done and written, skipping the interpreter's teardown.

    With torch's compiler stack loaded (every cold plan traces on fake tensors, which imports
    ``torch._dynamo``), tearing its modules and caches down takes 1.5-2 s on a 2-core CPU after
    the last line was printed. Exit handlers still run (``atexit``, weakref finalizers such as
    temporary directories, multiprocessing's child clean-up, logging's flush), and the standard
    streams are flushed first; only the freeing of memory the OS takes back anyway is skipped.
    """
    if "torch" not in sys.modules:
        return  # a warm plan imports no torch: nothing slow to skip
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`engine plan | head`) or stream
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(console_main())
