"""Models kept loaded between stage calls in one process, for ``asectl predict --watch``.

A one-shot command makes its backends in each stage call and frees them at the call's end, so it holds no
memory it no longer needs. Inside ``keep_loaded()`` instead, ``kept(key, make)`` returns one backend per
key (its construction arguments) for the whole block, a backend's ``close()`` leaves it loaded while the
block holds it, and the stages run in this process (no worker pool to start per call). The block's end
frees everything it kept. Backends made outside the block behave as before.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator

_kept: dict[str, Any] | None = None


def active() -> bool:
    """True inside ``keep_loaded()``."""
    return _kept is not None


def holds(backend: Any) -> bool:
    """True while ``backend`` is kept (its ``close()`` should then keep it loaded)."""
    return _kept is not None and any(b is backend for b in _kept.values())


def kept(kind: str, make: Callable[[], Any], **args: Any) -> Any:
    """``make()``, or inside ``keep_loaded()`` the backend already made with the same ``kind`` and ``args``."""
    if _kept is None:
        return make()
    key = kind + json.dumps(args, sort_keys=True, default=str)
    if key not in _kept:
        _kept[key] = make()
    return _kept[key]


def kept_backends() -> list[Any]:
    return list(_kept.values()) if _kept is not None else []


@contextlib.contextmanager
def keep_loaded() -> Iterator[None]:
    """Keep every backend made by ``kept`` loaded until the block ends (nested blocks share the outer one)."""
    global _kept
    if _kept is not None:
        yield
        return
    _kept = {}
    try:
        yield
    finally:
        backends, _kept = list(_kept.values()), None
        for backend in backends:
            close = getattr(backend, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
