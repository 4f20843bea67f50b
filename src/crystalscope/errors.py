"""Errors that the CLI turns into one clear line and an exit code.

``UserError`` is a mistake the user can fix (bad path, bad option): exit code 2.
``CrystalscopeError`` is a failure of the work itself (a copy that did not verify): exit 1.
Anything else is a bug: exit 1 with a one-line summary, the traceback only under ``--debug``.
"""

from __future__ import annotations


class CrystalscopeError(Exception):
    """The work failed; exit code 1."""

    exit_code = 1


class UserError(CrystalscopeError):
    """The input or the options are wrong; exit code 2. The message says what to do."""

    exit_code = 2
