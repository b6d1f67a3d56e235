"""The one error type that the CLI turns into a single stderr line and exit code 2.

Raise `UsageError` for bad input a user can fix (a missing file, a wrong column, a checkpoint of the wrong
kind). Its message is one sentence: what is wrong, where, and what was expected.
"""


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2, nothing half-written."""
