"""The base of every error meant for the user rather than for a traceback."""


class SlopeError(Exception):
    """A problem the user can fix, whose message says what is wrong and what to do.

    The launchers print it as one `error: ...` line and exit with status 2.
    """
