"""One exception type for problems the user can fix.

The CLI turns a ``UserError`` into one line on stderr and exit code 2 (no
traceback; ``--debug`` writes the traceback to the log file)."""


class UserError(Exception):
    """Bad input: a config key, a file, a model path. The message names it and says what to do."""

    exit_code = 2
