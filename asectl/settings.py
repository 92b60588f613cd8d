"""Where every setting of every command comes from (docs/config.md, docs/design.md "Settings").

One order of precedence, lowest first:

    default  <  user config file  <  --config FILE  <  environment (ASECTL_*)  <  command line

- default: the option's default (``--help`` shows it); for the training hyperparameters, the profile's.
- user config file: ``config.toml`` in the user config folder (platformdirs), or the file ``ASECTL_CONFIG``
  names (then it must exist).
- ``--config FILE``: a TOML file given to one command.
- environment: the variables in ``ENVIRONMENT`` (the only place their names are written).
- command line: the options given.

Both files hold the same keys: a command's options in a table named after the command (``[ocr]``,
``[fuse-train]``, ``[models.list]``), the executor options in ``[executor]``, the training hyperparameters
in ``[pfa]``, ``[fusion]`` and ``[encoders]``, and ``profile`` at the top. Which keys exist and what type
each has is the command tree's (click option types) and the training profile's (asectl.models.train_config):
asectl.commands._shared joins them; this module reads the layers and names the source of each value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from asectl.environment import env_flag
from asectl.errors import ConfigError

CONFIG_ENV = "ASECTL_CONFIG"

# Sources, as `asectl config show` prints them (an environment variable's: "env NAME").
DEFAULT = "default"
USER_CONFIG = "user config"
CONFIG_OPTION = "--config"
COMMAND_LINE = "command line"

# Settings that an environment variable may set: setting key -> variable.
ENVIRONMENT = {
    "executor.kind": "ASECTL_EXECUTOR",
    "executor.address": "ASECTL_RAY_ADDRESS",
    "executor.workers": "ASECTL_RAY_WORKERS",
    "executor.batch_size": "ASECTL_RAY_BATCH_SIZE",
    "executor.num_gpus_per_worker": "ASECTL_NUM_GPUS_PER_WORKER",
    "describe.vlm_model": "ASECTL_VLM_MODEL",
    "describe.allow_download": "ASECTL_ALLOW_DOWNLOAD",
}


def env_source(name: str) -> str:
    return f"env {name}"


def user_config_path() -> Path:
    """The user config file: ASECTL_CONFIG, else config.toml in the user config folder."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("asectl")) / "config.toml"


def read_toml(path: Path, required: bool) -> dict[str, Any]:
    """A TOML config file as a dict ({} when it is absent and not ``required``); errors name the file."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"{path}: no such config file; fix the path"
                + (f" or unset {CONFIG_ENV}" if path == user_config_path() else "")
            ) from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc}); fix or remove it") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix or remove it") from None


def user_config() -> tuple[Path, dict[str, Any]]:
    """(path, contents) of the user config file; a file named by ASECTL_CONFIG must exist."""
    path = user_config_path()
    return path, read_toml(path, required=bool(os.environ.get(CONFIG_ENV)))


def flatten(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every non-table value; dashes in names read as underscores."""
    for name, value in table.items():
        key = prefix + str(name).replace("-", "_") if prefix else str(name)
        if isinstance(value, Mapping):
            yield from flatten(value, key + ".")
        else:
            yield key, value


def environment_value(key: str) -> str | None:
    """The environment variable of setting ``key``, when it is set and not empty."""
    value = os.environ.get(ENVIRONMENT[key], "").strip()
    return value or None


def environment_switch(key: str) -> bool | None:
    """An on/off setting from its environment variable (asectl.environment.env_flag); None when unset."""
    return env_flag(ENVIRONMENT[key]) if environment_value(key) is not None else None


@dataclass(frozen=True)
class Layer:
    """One source of values: its name as printed (``source``), the file it came from, and its values by
    dotted key."""

    source: str
    path: Path | None
    values: dict[str, Any]

    def where(self, key: str) -> str:
        """Where a value came from, for messages: "FILE: setting 'ocr.engine'" or "ASECTL_EXECUTOR"."""
        return f"{self.path}: setting '{key}'" if self.path is not None else self.source


def file_layers(config_file: Path | None, canonical=lambda key: key) -> list[Layer]:
    """The user config file's layer, then ``config_file``'s, keys made canonical (aliases resolved)."""
    path, data = user_config()
    layers = [Layer(USER_CONFIG, path, {canonical(k): v for k, v in flatten(data)})]
    if config_file is not None:
        layers.append(
            Layer(
                CONFIG_OPTION, config_file, {canonical(k): v for k, v in flatten(read_toml(config_file, required=True))}
            )
        )
    return layers


def environment_layers() -> list[Layer]:
    """One layer per environment variable that is set (its source says which)."""
    return [
        Layer(env_source(ENVIRONMENT[key]), None, {key: value})
        for key in ENVIRONMENT
        if (value := environment_value(key)) is not None
    ]


@dataclass(frozen=True)
class Setting:
    """One effective setting: its key, the option that sets it (None for a hyperparameter without one),
    its value and where that came from."""

    key: str
    option: str | None
    value: Any
    source: str

    def as_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {
            "key": self.key,
            "option": self.option,
            "value": value if _plain(value) else str(value),
            "source": self.source,
        }


def _plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def sources_record(settings: list[Setting]) -> dict[str, str]:
    """What an artifact records: key -> source, for the settings not at their default."""
    return {s.key: s.source for s in settings if s.source != DEFAULT}


__all__ = [
    "CONFIG_ENV",
    "DEFAULT",
    "USER_CONFIG",
    "CONFIG_OPTION",
    "COMMAND_LINE",
    "ENVIRONMENT",
    "Layer",
    "Setting",
    "env_source",
    "user_config_path",
    "read_toml",
    "user_config",
    "flatten",
    "environment_value",
    "environment_switch",
    "file_layers",
    "environment_layers",
    "sources_record",
]
