"""User-facing errors.

Anything the user can fix (a bad config key, a missing file, a wrong shape, an unknown word
in a prompt) raises :class:`UserError` with a one-line message naming the bad field, file or
shape and what was expected. The CLI prints that line and exits with code 2, no traceback.
Internal invariants use ``assert`` or ordinary exceptions instead.
"""


class UserError(Exception):
    """An error caused by user input; its message is a single line meant for the user."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C in a resumable command: what was finished is kept (the message says how to continue)."""

    exit_code = 130


def warn(message: str) -> None:
    """A one-line ``warning: …`` on stderr for input that is allowed but unusual."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)
