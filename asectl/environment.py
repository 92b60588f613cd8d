"""Environment variables read as on/off switches (``ASECTL_ALLOW_DOWNLOAD``, ``HF_HUB_OFFLINE``, ...),
parsed one way everywhere."""

from __future__ import annotations

import os

ON_WORDS = ("1", "true", "yes", "on")


def env_flag(name: str) -> bool:
    """True when environment variable ``name`` is 1, true, yes or on (any case, spaces around ignored)."""
    return os.environ.get(name, "").strip().lower() in ON_WORDS
