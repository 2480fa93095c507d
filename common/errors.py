"""The one exception type for mistakes a user can fix (bad input, bad config, missing files)."""


class ZerotrainError(Exception):
    """A user-facing error: the message says what was wrong, where, and what to do.

    The CLI and the launchers print it without a traceback and exit with status 2.
    """
