"""Errors the user can fix (bad recipe, missing file, unknown name).

The CLI prints these as one line and exits with code 2, without a traceback:
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; its message is one line that says how to fix it."""


class ConfigError(UserError):
    """A recipe or override that does not validate."""
