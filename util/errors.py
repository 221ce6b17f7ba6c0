"""The error a user can fix: ``main.py`` prints its message (no traceback) and exits with status 2.

Raise :class:`UserError` for a mistake in what the user gave (a config key, a path, a file that is not what it
should be) with a message that names the file or key and says what to do. Library code that is called from Python
may raise it too: it is a ``ValueError``, so callers that catch those keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message names the file or key and says what to do."""
