"""User-facing errors: each prints as one line (plus an optional list of problems), never a traceback."""

from __future__ import annotations


class GenpipeError(Exception):
    """An error the user can fix: bad spec, unreadable manifest, missing model, unreachable service."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])

    def render(self) -> str:
        lines = [str(self)]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class SpecError(GenpipeError):
    """The job spec is invalid; nothing was launched."""


class ManifestError(GenpipeError):
    """The manifest is missing, unreadable, corrupt or truncated."""


class JobFailed(GenpipeError):
    """The job ran but could not finish (e.g. failures over the error budget)."""

    exit_code = 1
