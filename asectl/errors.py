"""Errors a user can act on. The CLI prints them as one line and exits with ``exit_code``."""

from __future__ import annotations


class AsectlError(Exception):
    """Base class: a message that names the cause and the fix."""

    exit_code = 1


class DataError(AsectlError):
    """Bad input data (an image, a labels file, a record): exit code 1."""

    exit_code = 1


class ConfigError(AsectlError):
    """Bad usage or configuration (missing model, bad option, no CUDA): exit code 2."""

    exit_code = 2


def describe_exception(exc: BaseException) -> str:
    """One line for a per-item error record."""
    if isinstance(exc, AsectlError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
