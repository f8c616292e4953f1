"""The library's one error type: a message a user can act on.

Library code raises `EcditError` (or a subclass) for anything the user can fix: bad config,
missing files, impossible shapes. The CLI turns it into one line and a non-zero exit; every
other exception is a bug and keeps its traceback under `--debug`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EcditError(Exception):
    """A problem the user can fix; `str(err)` is the whole message."""


class ConfigError(EcditError):
    """An invalid configuration value or key."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
