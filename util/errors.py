"""The errors ``main.py`` prints as ``error: ...`` without a traceback.

Raise :class:`UserError` for a mistake in what the user gave (a config key, a path, a file that is not what it
should be) with a message that names the file or key and says what to do; ``main.py`` exits with status 2. Library
code that is called from Python may raise it too: it is a ``ValueError``, so callers that catch those keep working.

Raise :class:`RunError` when a run stopped, or did part of its work, for a reason its message explains (a loss
that diverged, a rank that stopped answering, images that could not be read); ``main.py`` exits with status 1.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message names the file or key and says what to do."""


class RunError(RuntimeError):
    """A run that stopped or partly failed; the message says what happened, where, and what was kept."""
