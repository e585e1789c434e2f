"""The one exception type the command lines turn into a single `error: ...` line."""


class HeteroError(Exception):
    """A failure the user can act on; its message is one line and needs no traceback."""
