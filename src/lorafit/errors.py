"""The one exception type for user-facing failures: the CLI prints its message on one line."""


class LorafitError(Exception):
    """A mistake in the user's input or environment, explained in one line (exit code 1)."""

    exit_code = 1


class UsageError(LorafitError):
    """A bad command-line flag or combination of flags (exit code 2, like argparse)."""

    exit_code = 2


class WriteError(LorafitError):
    """A file could not be written (a full disk, a read-only folder); ``path`` is the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {path} ({reason})")
        self.path = path
