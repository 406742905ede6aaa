"""Errors meant for people.

A ``UserError`` is a mistake in the user's input (recipe, model path, argument). The CLI prints
its message as one line on stderr and exits 2, never with a traceback. A ``GateFailed`` means
verification ran and a gate did not pass (exit 1).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: exit code 2, one line naming the file/field and the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


class GateFailed(Exception):
    """A verify gate did not pass: exit code 1."""

    exit_code = 1
