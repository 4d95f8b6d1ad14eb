"""The one exception type users see: a readable, single-sentence message."""


class FusionError(ValueError):
    """A problem the user can fix (bad file, wrong shape, bad parameter).

    The message is one sentence naming the file, tensor or parameter and what was expected;
    the UI and CLI show it as is, never a stack trace.
    """
