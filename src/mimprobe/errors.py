"""Errors a user can cause and fix.

The command line prints a :class:`UserError` as one line (no traceback) and exits with status 2. Anything
else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (a path, an option, a store): the message says what to do."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``limit`` chars."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(e: BaseException) -> str:
    """Why something could not be read, in one line: ``'OSError: image file is truncated'``."""
    return f"{type(e).__name__}: {first_line(e)}"
