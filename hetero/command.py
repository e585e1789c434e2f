"""What every command line of hetero shares: one `error: ...` line per failure, and the argument types.

Users see one `error: ...` line per failure: exit 2 for usage errors, 1 for failures while running,
130 for Ctrl-C; `--debug` shows the traceback instead. What the library warns about while it works (a
device left out, a table entry not trusted) is printed as `note: ...` lines on stderr.  Inference.py,
print_table.py and measure_io.py (hetero.cli), the benchmarks and the server parse and run through here.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence

from .errors import HeteroError, UsageError, one_line

USAGE_ERROR = 2
RUN_ERROR = 1


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def batch_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


def nonnegative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, at least 0, got {text!r}")
    return value


class _NoteHandler(logging.Handler):
    """The library's warnings as `note: ...` lines, written to whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"note: {record.getMessage()}", file=sys.stderr)


def _show_notes() -> None:
    logger = logging.getLogger("hetero")
    if not any(isinstance(handler, _NoteHandler) for handler in logger.handlers):
        logger.addHandler(_NoteHandler())


def _error(message: str) -> None:
    """Print `error: message` as one line, whatever control characters the user's text brought in."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    print(f"error: {text}", file=sys.stderr)


def run_command(main: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    _show_notes()
    try:
        return main(args)
    except UsageError as exc:
        if "--debug" in args:
            raise
        _error(str(exc))
        return USAGE_ERROR
    except (HeteroError, OSError, ValueError) as exc:
        if "--debug" in args:
            raise
        _error(one_line(exc))
        return RUN_ERROR
    except KeyboardInterrupt as exc:
        _error(str(exc) or "interrupted; profiles measured so far are kept in the table")
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: still one line, the traceback on request
        if "--debug" in args:
            raise
        _error(f"unexpected {type(exc).__name__}: {one_line(exc)} (--debug shows where)")
        return RUN_ERROR
