"""Errors a user can fix: bad input, bad config, missing packages.

The CLI prints them as one clear message (no traceback) and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input, config or environment, with a message saying what to do.

    ``where`` names the place (``file:line``, ``file: field``) when there is one; ``message``
    is the text without it (to re-raise the error at another place).
    """

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
