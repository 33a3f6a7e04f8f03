"""The one exception type that means "the user's input is wrong" (exit code 2, no traceback)."""


class UserError(Exception):
    """Bad input: a missing folder, an incompatible checkpoint. The CLI prints it in one line."""

    exit_code = 2
