"""Exceptions. A :class:`MisleaderError` is a user-facing problem: the CLI prints its message on one
line (no traceback), so each message says what went wrong *and* how to fix it."""


class MisleaderError(Exception):
    """A problem the user can fix (bad input, missing file, unknown name)."""


class QueryBudgetExceeded(MisleaderError):
    """Raised by an oracle *before* evaluating a batch that would exceed its query budget."""
