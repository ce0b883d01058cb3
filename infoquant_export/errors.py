"""User-facing errors: one line naming the problem and the fix; the CLI maps them to exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. ``str(err)`` is printed as one line; the CLI exits with code 2."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
