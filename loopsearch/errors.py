"""User-facing errors: one line that names the bad value and the fix.

The CLI prints ``LoopsearchError`` as a single line and exits non-zero without a traceback;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class LoopsearchError(Exception):
    """An error the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2


class UnknownPluginError(LoopsearchError):
    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        avail = ", ".join(sorted(available)) or "none installed"
        super().__init__(
            f"unknown {kind} {name!r}; available: {avail} "
            f"(see `loopsearch plugins list`, or pip-install the package that provides it)"
        )


class SpecError(LoopsearchError):
    """A search space, study recipe or plugin config failed validation."""


class BudgetError(LoopsearchError):
    """A FLOP budget that cannot be parsed or cannot pay for the run."""


class StorageError(LoopsearchError):
    """The Optuna storage cannot be opened or written."""


class StudyNotFoundError(LoopsearchError):
    def __init__(self, name: str, available: list[str], storage: str):
        avail = ", ".join(available) or "none"
        super().__init__(
            f"unknown study {name!r} in {storage}; studies there: {avail} "
            f"(create one with `loopsearch study create --space early_middle --name {name}`)"
        )
