"""User-facing errors: run_all.py prints these as one line (no traceback) and exits non-zero."""


class BenchError(Exception):
    """An error caused by the user's input (names, overrides, data files); the message says what to do."""


class DataUnavailable(BenchError):
    """A task's data is missing or malformed; the message names the file and what was expected."""
