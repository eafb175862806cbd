"""The library's own error for bad input from a user. The command-line tools (`vqrae.cli.common.run_cli`) print it as
one line, `PROG: error: ...`, and exit with status 2; the library raises it without knowing about them."""


class UsageError(ValueError):
    """Bad input from the user: the message says which option or file, the value, and what is allowed."""


class MissingSplitError(UsageError):
    """The dataset has no split of the requested name (most image datasets have only `train`)."""
