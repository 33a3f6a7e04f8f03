"""The exceptions the CLI turns into one line on stderr, never a traceback."""


class UserError(Exception):
    """Bad input: a missing folder, an incompatible checkpoint. The CLI prints it in one line."""

    exit_code = 2


class RunError(Exception):
    """A run that cannot go on (a diverged loss, a failed check): one line and exit code 1."""

    exit_code = 1
