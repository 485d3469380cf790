"""The one exception type a user can cause; the CLI prints it without a traceback."""


class AlexopsError(Exception):
    """A problem the user can fix: the message names the cause and the fix."""
