"""Where the per-image stages compute what is not cached: here (``local``: this process and its worker
pools, asectl/workers.py) or on a Ray cluster (``ray``: asectl/ray_executor.py, imported only then). Each
executor registers itself under its name in ``asectl.registry.EXECUTORS``, where ``make_executor`` finds it.

A stage describes its computation as a ``Work``: a function that runs once per worker and returns the
function that computes a batch of jobs (an OCR engine, a VLM or a GGUF LLM loaded once, then cards or
prompts in batches). On Ray, the workers store each result in the shared content-addressed cache under
the key the driver gave its ``Job``, so records are the same as on the local executor, the two hit each
other's cache, and whatever a worker finished survives a driver that is killed (docs/scale.md).

Settings come from, highest first: the command line, environment variables (``ASECTL_EXECUTOR``,
``ASECTL_RAY_ADDRESS``, ``ASECTL_RAY_WORKERS``, ``ASECTL_RAY_BATCH_SIZE``, ``ASECTL_NUM_GPUS_PER_WORKER``),
``--config FILE``'s and then the user config file's ``[executor]`` table, the defaults here: the order
of every setting (asectl/settings.py). Commands get the values through that layer (``from_values``);
``from_sources`` reads the same sources for library callers.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from asectl.errors import ConfigError
from asectl.registry import EXECUTORS
from asectl.settings import ENVIRONMENT, read_toml, user_config

CONFIG_TABLE = "executor"
INSTALL_HINT = 'pip install -e ".[ray]"'


@dataclass(frozen=True)
class ExecutorSettings:
    """How the cache misses of a per-image stage are computed.

    ``kind``: local or ray. Ray only: ``address`` (None: a running cluster if there is one, else a Ray
    instance on this machine), ``workers`` (None: one per CPU, or per ``num_gpus_per_worker`` GPUs, of the
    cluster, at most one per batch), ``batch_size`` (jobs per batch; None: the stage's own), and
    ``num_gpus_per_worker`` (GPUs each worker reserves, for CUDA backends)."""

    kind: str = "local"
    address: str | None = None
    workers: int | None = None
    batch_size: int | None = None
    num_gpus_per_worker: float = 0.0

    # the option and the environment variable of each setting (its key in [executor] is its name)
    SOURCES = {
        name: (option, ENVIRONMENT[f"{CONFIG_TABLE}.{name}"])
        for name, option in (
            ("kind", "--executor"),
            ("address", "--ray-address"),
            ("workers", "--ray-workers"),
            ("batch_size", "--ray-batch-size"),
            ("num_gpus_per_worker", "--num-gpus-per-worker"),
        )
    }

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS.names():
            raise ConfigError(f"executor {self.kind!r}: choose one of {', '.join(EXECUTORS.names())}")
        for name in ("workers", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{self.SOURCES[name][0]} {value!r}: must be a whole number, 1 or more")
        gpus = self.num_gpus_per_worker
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not (math.isfinite(gpus) and gpus >= 0):
            raise ConfigError(f"--num-gpus-per-worker {gpus!r}: must be 0 or more (fractions share a GPU)")
        if self.kind == "local" and (self.workers or self.batch_size or self.address or gpus):
            given = [
                self.SOURCES[n][0]
                for n in ("address", "workers", "batch_size", "num_gpus_per_worker")
                if getattr(self, n)
            ]
            raise ConfigError(f"{', '.join(given)} apply to the Ray executor; add --executor ray (or drop them)")

    @classmethod
    def from_sources(cls, config: Path | None = None, **given: Any) -> ExecutorSettings:
        """Settings from the command line (``given``, None = not given), then the environment, then the
        config file's [executor] table, then the defaults."""
        path, data = user_config() if config is None else (config, read_toml(config, required=True))
        table = data.get(CONFIG_TABLE, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{CONFIG_TABLE}' must be a table ([{CONFIG_TABLE}]); fix the config file")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - names)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key(s) {', '.join(unknown)} in [{CONFIG_TABLE}]; use {', '.join(sorted(names))}"
            )
        values: dict[str, Any] = {}
        origins: set[str] = set()  # where values other than the command line's came from, for messages
        for name in names:
            env = cls.SOURCES[name][1]
            if given.get(name) is not None:
                values[name] = given[name]
            elif os.environ.get(env):
                values[name] = _from_env(env, os.environ[env], name)
                origins.add(env)
            elif name in table:
                values[name] = table[name]
                origins.add(f"{path} [{CONFIG_TABLE}] {name}")
        return cls.from_values(values, {k for k, v in given.items() if v is not None}, origins)

    @classmethod
    def from_values(
        cls, values: dict[str, Any], command_line: set[str], origins: set[str] = frozenset()
    ) -> ExecutorSettings:
        """Settings from resolved ``values``; ``command_line``: the names given as options, ``origins``:
        where the others came from (for messages)."""
        # Ray settings from the environment or a config file wait for a Ray run; on the command line
        # with a local run they are a mistake (reported by __post_init__).
        if values.get("kind", "local") == "local":
            values = {k: v for k, v in values.items() if k == "kind" or k in command_line}
        try:
            return cls(**values)
        except ConfigError as exc:
            if not origins:
                raise
            raise ConfigError(f"{exc} (settings from {', '.join(sorted(origins))})") from None


def _from_env(env: str, text: str, name: str) -> Any:
    if name in ("kind", "address"):
        return text.strip()
    try:
        return float(text) if name == "num_gpus_per_worker" else int(text)
    except ValueError:
        raise ConfigError(f"{env}={text!r}: not a number; fix or unset it") from None


# --- what a stage hands to an executor ---------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One unit of work: ``item`` (a card, a prompt) and the cache ``key`` its result is stored under,
    with ``meta`` added to the stage's metadata."""

    key: str
    item: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Work:
    """A stage's computation in a form that can be shipped to another machine.

    ``load(*args)`` runs once in each worker (loads the engine) and returns ``compute(items) -> results``,
    one per item in order. A result that is a dict without an ``error`` is stored in the cache under
    (``stage``, the job's key) with ``meta``; an error record is returned, not stored; an AsectlError
    raised by ``load`` or ``compute`` stops the run. ``load`` and ``args`` must be importable or plain
    data (they are pickled); ``name`` says who the workers are in messages ("an OCR worker")."""

    name: str
    stage: str
    load: Callable[..., Callable[[list[Any]], list[Any]]]
    args: tuple = ()
    meta: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8  # jobs per batch unless --ray-batch-size says otherwise
    cpus: float = 1.0  # cores one worker keeps busy (its thread count)
    # On the driver, the result of a job whose worker process died each time it ran it (a poison card): the
    # job's error record; None stops the run instead. Importable, like ``load``.
    lost: Callable[[Job, str], Any] | None = None


@EXECUTORS.register("local")
class Executor:
    """The local executor: stages compute their misses themselves (in-process or with their own worker
    pools). ``distributed`` executors take ``Work`` instead, through ``map``."""

    kind = "local"
    distributed = False

    def map(self, work: Work, jobs: Sequence[Job], cache: Any) -> Iterator[tuple[int, Any]]:
        """(position in ``jobs``, result) for every job, in the order they finish, each result already
        stored in ``cache``."""
        raise NotImplementedError("the local executor runs the stages' own loops")

    def close(self) -> None:
        """Release what this executor started (a Ray instance it started on this machine)."""


LOCAL = Executor()
_current: list[Executor] = []


def check_same(what: str, here: Any, driver: Any) -> None:
    """In a worker: stop unless its engine or model identity (``here``) is the one the run started with;
    another model file or library version on a node would give other records under the same keys."""
    if here == driver:
        return
    import socket

    differ = (
        [k for k in sorted(set(here) | set(driver)) if here.get(k) != driver.get(k)]
        if isinstance(here, dict) and isinstance(driver, dict)
        else []
    )
    raise ConfigError(
        f"{what} on node {socket.gethostname()} is not the one this run started with"
        + (f" (differs in {', '.join(differ)})" if differ else "")
        + "; install the same asectl environment and model files on every node (docs/scale.md)"
    )


def make_executor(settings: ExecutorSettings | None = None) -> Executor:
    """The executor ``settings`` ask for, found by its name in ``asectl.registry.EXECUTORS``. Ray is imported
    only for ``kind == "ray"``; without it installed, one ConfigError saying how to install it."""
    settings = settings or ExecutorSettings()
    if settings.kind == "local":
        return LOCAL
    kind, _ = EXECUTORS.get(settings.kind)
    return kind(settings)


def require_ray() -> None:
    """ConfigError unless Ray Data can be imported."""
    import importlib.util

    try:
        missing = importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        raise ConfigError(
            f"--executor ray needs Ray, which is not installed; run `{INSTALL_HINT}` (or use --executor local)"
        )


def resolve(executor: Executor | None) -> Executor:
    """``executor``, else the one a caller set with ``using()``, else the local executor."""
    if executor is not None:
        return executor
    return _current[-1] if _current else LOCAL


@contextlib.contextmanager
def using(executor: Executor) -> Iterator[Executor]:
    """Run the stages called inside the block (also those ``predict`` calls) on ``executor``, and close it
    at the end."""
    _current.append(executor)
    try:
        yield executor
    finally:
        _current.pop()
        executor.close()


__all__ = [
    "ExecutorSettings",
    "Executor",
    "Job",
    "Work",
    "LOCAL",
    "make_executor",
    "require_ray",
    "resolve",
    "using",
    "check_same",
]
