"""The one exception type a user can cause; the CLI prints it as a single line."""


class TuneloopError(Exception):
    """A problem with the user's input or environment, worded for the user."""
