"""The one kind of error that is the user's to fix.

A config value, a data file, a model name, a reward function's import path or a server address that cannot be
used raises a `UserInputError` whose message names the thing (file and row, field, function, address) and says
what to do. The CLI prints such an error as its last line and exits 2 without a traceback (`--debug` shows it);
anything else is a bug or a failure of the machine and keeps its traceback.
"""


class UserInputError(ValueError):
    """Input the user gave that cannot be used; the message names it."""
