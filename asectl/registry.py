"""Name -> backend class registries, one per family (ocr, vlm, llm, image-encoder, text-encoder, executor).

Built-in backends register themselves with the same decorator a third-party package would use; a
package can also expose an ``asectl.plugins`` entry point whose module registers its backends on import.
Model choice is therefore data (a name in a config or bundle), not an if-chain. A built-in whose module
imports something heavy or optional (the Ray executor) is named with its module and imported only when
it is asked for by name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

from asectl.errors import ConfigError

_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group="asectl.plugins"):
        importlib.import_module(ep.value.split(":")[0])


class Registry:
    def __init__(self, family: str, builtin_module: str, on_demand: dict[str, str] | None = None):
        self.family = family
        self._builtin_module = builtin_module
        self._on_demand = dict(on_demand or {})  # name -> module that registers it when imported
        self._items: dict[str, tuple[type, dict[str, Any]]] = {}

    def register(self, name: str, **defaults: Any) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            self._items[name] = (cls, defaults)
            cls.registry_name = name
            return cls

        return deco

    def _ensure(self) -> None:
        importlib.import_module(self._builtin_module)
        _load_plugins()

    def names(self) -> list[str]:
        self._ensure()
        return sorted(set(self._items) | set(self._on_demand))

    def get(self, name: str) -> tuple[type, dict[str, Any]]:
        self._ensure()
        if name not in self._items and name in self._on_demand:
            importlib.import_module(self._on_demand[name])
        if name not in self._items:
            raise ConfigError(f"unknown {self.family} backend '{name}'; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        cls, defaults = self.get(name)
        return cls(**{**defaults, **kwargs})


OCR_ENGINES = Registry("OCR engine", "asectl.backends.ocr")
VLMS = Registry("vision-language model", "asectl.backends.vlm")
LLMS = Registry("LLM", "asectl.backends.llm")
IMAGE_ENCODERS = Registry("image encoder", "asectl.backends.encoders")
TEXT_ENCODERS = Registry("text encoder", "asectl.backends.encoders")
# Where the per-image stages compute their cache misses (asectl/executors.py); Ray only when asked for.
EXECUTORS = Registry("executor", "asectl.executors", on_demand={"ray": "asectl.ray_executor"})
