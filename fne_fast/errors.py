"""The errors every layer of the training system raises for the command line to report.

``UsageError`` is a setting or a file the user can fix: the command line prints its message as one line,
``fne-fast: error: …``, and exits with code 2; the message starts with the flag that sets it. ``NonFiniteError``
is a run with nothing to report (a model, loss or embedding holding NaN or infinity): exit code 1.
"""

from __future__ import annotations

__all__ = ["UsageError", "NonFiniteError"]


class UsageError(ValueError):
    """A setting the run cannot use; the message starts with the flag that sets it."""


class NonFiniteError(RuntimeError):
    """A model, loss or embedding holds NaN or infinity: there is no result to report."""
