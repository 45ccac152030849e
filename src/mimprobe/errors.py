"""Errors a user can cause and fix.

The command line prints a :class:`UserError` as one line (no traceback) and exits with status 2. Anything
else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (a path, an option, a store): the message says what to do."""
