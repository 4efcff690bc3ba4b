"""Errors raised by the trainer.

Every error the trainer raises on purpose derives from `TrainerError`, so a
launcher can tell a bad configuration or an unusable model apart from a crash.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base of every error the trainer raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """The job's TOML configuration is missing, malformed or inconsistent."""


class DataError(TrainerError, ValueError):
    """A task or target file cannot be read or holds a malformed example."""


class SketchError(TrainerError):
    """Sketching cannot proceed: no parameters selected, bad shapes, bad model."""


class ServerRefused(TrainerError):
    """The server refused a call that no retry can change (bad argument, no permission,
    unknown job or anchor, a precondition the trainer broke): the mixture is no longer
    being estimated, so the run stops (unless `on_server_error = "continue"`)."""


def is_transient(error: Exception) -> bool:
    """Whether a server error may pass by itself (the server away or slow, a call
    cancelled, an internal fault): retried at the next chance, never fatal."""
    from gradmix.client.errors import Cancelled, DeadlineExceeded, Internal, Unavailable

    return isinstance(error, Unavailable | DeadlineExceeded | Cancelled | Internal)


def describe(error: Exception) -> str:
    """One line: the status code's name (for a server error) and the message."""
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    text = " ".join(str(details if details is not None else error).split())
    name = getattr(code, "name", "")
    return f"{name}: {text}" if name else text
