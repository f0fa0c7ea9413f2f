"""Errors an audit reports to its user.

Every problem with the user's input (checkpoint, data, YAML, options) is raised as an
``AuditError`` whose message says what is wrong and how to fix it; the plugin shows it as one
paragraph with no traceback. Anything else escaping the library is a bug, except what the user's
own code raises (a model factory, a forward pass): ``user_code`` turns that into an ``AuditError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class AuditError(Exception):
    """An audit cannot run as asked; the message is meant for the user."""


class ConfigError(AuditError):
    """A YAML audit file or an option is invalid."""


class CheckpointError(AuditError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


class DataError(AuditError):
    """The image source is missing, empty or unreadable."""


class MemauditWarning(UserWarning):
    """A gate of severity ``warn`` was crossed, or the audit has something to say that does not fail it."""


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run code the user supplies: any exception from it becomes an AuditError naming ``what`` and
    the cause; AuditErrors pass through unchanged."""
    try:
        yield
    except AuditError:
        raise
    except Exception as exc:
        raise AuditError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
