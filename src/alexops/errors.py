"""The one exception type a user can cause; the CLI prints it without a traceback."""


class AlexopsError(Exception):
    """A problem the user can fix: the message names the cause and the fix.

    `transient` marks a cause that may pass by itself (a network, a server that is down), so that
    an orchestrator retries the stage; any other error fails the same way again, and is not retried.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
