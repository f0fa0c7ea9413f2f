"""Errors an audit reports to its user.

Every problem with the user's input (checkpoint, data, YAML, options) is raised as an
``AuditError`` whose message says what is wrong and how to fix it; the plugin shows it as one
paragraph with no traceback. Anything else escaping the library is a bug, except what the user's
own code raises: ``user_code`` turns that into an ``AuditError``.
"""

from __future__ import annotations

import contextlib
import reprlib
from collections.abc import Iterator
from typing import Any

CAUSE_CHARS = 500  # of the original message, in a user_code error
QUOTE_CHARS = 200  # of any value quoted in an error message


class AuditError(Exception):
    """An audit cannot run as asked; the message is meant for the user."""


class ConfigError(AuditError):
    """A YAML audit file or an option is invalid."""


class CheckpointError(AuditError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


class DataError(AuditError):
    """The image source is missing, empty or unreadable."""


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run code the user supplies (a model factory, a checkpoint's weights, a forward pass): any
    exception from it (``SystemExit`` too) becomes an AuditError that names ``what`` and the cause,
    so that the plugin shows one usage error instead of an internal error. AuditErrors pass through
    unchanged."""
    try:
        yield
    except AuditError:
        raise
    except (Exception, SystemExit) as exc:  # sys.exit in a factory is its error too, not the session's end
        cause = f"{type(exc).__name__}: {exc}"
        if len(cause) > CAUSE_CHARS:
            cause = cause[: CAUSE_CHARS - 3] + "..."
        raise AuditError(f"{what} failed with {cause}") from exc


class MemauditWarning(UserWarning):
    """A gate of severity ``warn`` was crossed, or the audit has something to say that does not fail it."""


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, whatever the size or depth of ``value``."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 4, limit, limit
    shortener.maxlist = shortener.maxdict = shortener.maxtuple = shortener.maxset = 8
    return shorten(shortener.repr(value), limit)


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters (a name from the file, in an error message)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
