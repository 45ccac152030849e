"""Errors a user can cause and fix.

The command line prints a :class:`UserError` as one line (no traceback) and exits with status 2. Anything
else that escapes is a bug and keeps its traceback.
"""

_WORKER = "\nOriginal Traceback (most recent call last):"


class UserError(Exception):
    """A problem with the user's input (a path, an option, a store): the message says what to do.

    Raised in a DataLoader worker, it reaches the main process re-created by torch from the worker's whole
    traceback text ("Caught UserError in DataLoader worker process 0. Original Traceback ..."): the message is
    brought back to the worker's one line."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and _WORKER in args[0]:
            args = (_original_message(args[0], type(self).__name__),)
        super().__init__(*args)


def _original_message(text: str, name: str) -> str:
    """The message of the exception at the end of a formatted traceback (``pkg.mod.Name: message``)."""
    tail = text[text.rindex(_WORKER):]
    marker = f"{name}: "
    if marker in tail:
        return tail[tail.rindex(marker) + len(marker):].strip()
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1].strip() if lines else text


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``limit`` chars."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(e: BaseException) -> str:
    """Why something could not be read, in one line: ``'OSError: image file is truncated'``."""
    return f"{type(e).__name__}: {first_line(e)}"
