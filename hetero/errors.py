"""The one exception type the command lines turn into a single `error: ...` line."""


class HeteroError(Exception):
    """A failure the user can act on; its message is one line and needs no traceback."""


class UsageError(HeteroError):
    """Arguments that cannot be acted on (a command line exits 2 for it, not 1)."""


class UnreadableInput(HeteroError):
    """Samples that cannot be read (an image that does not decode): the input is at fault, not the device."""


def one_line(exc: BaseException) -> str:
    """An exception as the one line a report or an `error:` line shows (TVM's messages run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
