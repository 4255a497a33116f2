"""The exception types for user-facing failures: the CLI prints their message on one line.

The library names settings by their fields (``rank``, ``save_every``), as a Python user writes them;
:class:`FieldError` keeps which words are field names, so that the CLI can name its flags instead
(``--rank``, ``--save-every``).
"""

from __future__ import annotations

import string
from typing import Callable


class LorafitError(Exception):
    """A mistake in the user's input or environment, explained in one line (exit code 1)."""

    exit_code = 1


class UsageError(LorafitError):
    """A bad command-line flag or combination of flags (exit code 2, like argparse)."""

    exit_code = 2


class FieldError(LorafitError):
    """A problem named by the settings' fields: ``template`` marks each one as ``{field}``, and the values
    quoted in it are positional (``{}``, ``{!r}``), so a value is never read as a template.

    ``str(e)`` reads "rank must be >= 1, got 0"; ``e.render(flag)`` "--rank must be >= 1, got 0" where
    ``flag("rank")`` is "--rank".
    """

    def __init__(self, template: str, *values):
        self.template, self.values = template, values
        self.fields = tuple(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template)
                                          if name and not name.isdigit()))
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message with each field called ``name(field)`` (by default, by its own name)."""
        return self.template.format(*self.values, **{f: name(f) for f in self.fields})


class SettingError(FieldError, UsageError):
    """A setting out of range, or settings that do not go together (exit code 2)."""

    @classmethod
    def joined(cls, problems: list["SettingError"]) -> "SettingError | None":
        """Every problem of one config in one error (None when there is none)."""
        if not problems:
            return None
        return cls("; ".join(p.template for p in problems), *(v for p in problems for v in p.values))


class WriteError(LorafitError):
    """A file could not be written (a full disk, a read-only folder); ``path`` is the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {path} ({reason})")
        self.path = path
