"""The one exception type for mistakes a user can fix (bad input, bad config, missing files)."""


class ZerotrainError(Exception):
    """A user-facing error: the message says what was wrong, where, and what to do.

    The CLI and the launchers print it without a traceback and exit with status 2.
    """


def did_you_mean(name: str, valid: list[str], cutoff: float = 0.6) -> str:
    """"did you mean 'X'?" for the valid spelling nearest to `name`, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(name, valid, n=1, cutoff=cutoff)
    return f"did you mean {close[0]!r}?" if close else ""
