"""Errors the user can fix (bad recipe, missing file, unknown name).

The CLI prints these as one line and exits with code 2, without a traceback:
anything else is a bug and keeps its traceback.
"""

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's input; its message is one line that says how to fix it."""


class ConfigError(UserError):
    """A recipe or override that does not validate."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest candidate, or "" if none is close.

    Typos in keys and names are the most common recipe mistake; naming the fix saves a lookup.
    """
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
