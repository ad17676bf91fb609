"""``python -m compressor <command>``: a thin argparse front over the library.

Each command lives in ``compressor/commands/<name>.py`` with ``add_parser`` and ``run``.
A ``UserError`` becomes one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from typing import Iterator, Sequence

from compressor.errors import UserError


def command_modules() -> list[str]:
    """Every module in ``compressor.commands`` is a command (found, not listed by hand)."""
    import pkgutil

    import compressor.commands as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def get_args_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="python -m compressor", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in command_modules():
        mod = importlib.import_module(f"compressor.commands.{name}")
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


@contextlib.contextmanager
def _bars(show: bool) -> Iterator[None]:
    """--no-progress hides every bar, also those of code that takes no progress flag (the
    first-time check and decoding of an image folder)."""
    from compressor import data

    old, data.PROGRESS = data.PROGRESS, show
    try:
        yield
    finally:
        data.PROGRESS = old


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = (["--debug"] if debug else []) + [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shown = warnings.formatwarning
    if not debug:  # a warning is one line for a user, as an error is: no category, no source line
        warnings.formatwarning = _one_line_warning
    try:
        args = get_args_parser().parse_args(argv)
        with _bars(not getattr(args, "no_progress", False)):
            code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
        return code
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing, and keep Python from complaining at exit
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        warnings.formatwarning = shown
        warnings.resetwarnings()


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    text = " ".join(str(message).split())
    return text + "\n" if text.startswith("warning:") else f"warning: {text}\n"
