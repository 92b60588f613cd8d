"""The settings layer on the command line (asectl/settings.py, docs/config.md): ``--config`` on every
command, the options' setting keys and sources, and ``asectl config show``, every effective setting of a
command and where it came from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from asectl import settings, ui
from asectl.cache import ENV_VAR as CACHE_ENV
from asectl.errors import ConfigError


def environment(*names: str) -> str:
    """A command's help epilog: the environment variables it reads (the cache folder's: every command)."""
    return "Environment: " + ", ".join(dict.fromkeys((CACHE_ENV, *names))) + "."


# --- the settings layer on the command line (asectl/settings.py, docs/config.md) -------------------------
class SettingOption(click.Option):
    """An option whose setting is not its command's own (``<command>.<name>``): one shared by several
    commands (``executor.kind``) or a training hyperparameter (``pfa.strides``)."""

    def __init__(self, *args: Any, setting: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.setting = setting


class ProfileValue(click.ParamType):
    """An option typed as the training profile types its key (``--stride``: ``pfa.strides``, a list of
    floats from "0.2", "0.2/0.6/1" or "0.2,0.6,1"); a bad value is a one-line ConfigError."""

    def __init__(self, key: str):
        self.key = key
        self.name = key

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from asectl.models.train_config import coerce_setting

        return coerce_setting(self.key, value)


STATE = "asectl.settings"  # ctx.meta: what _load_settings found (LayeredSettings)


@dataclass
class LayeredSettings:
    """For one command: the values the config files and the environment gave its options (by option
    name, for click's default_map), each setting's source, and the profile keys they set."""

    config_file: Path | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    profile_values: dict[str, Any] = field(default_factory=dict)


def command_path(ctx: click.Context) -> str:
    """The command's setting prefix: its name under the root ("ocr", "fuse-train", "models.list")."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name or ctx.command.name)
        ctx = ctx.parent
    return ".".join(reversed(names))


def option_key(path: str, param: click.Parameter) -> str:
    """The setting an option sets: its ``setting`` if it names one, else ``<command>.<long name>``."""
    if getattr(param, "setting", None):
        return param.setting
    longest = max(param.opts, key=len).lstrip("-")
    return f"{path}.{longest.replace('-', '_')}"


def leaf_commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    """Every command that runs (not the groups), by its setting prefix ("ocr", "models.list")."""
    out: dict[str, click.Command] = {}
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            out.update(leaf_commands(cmd, path + "."))
        else:
            out[path] = cmd
    return out


def command_options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option)]


def takes_profile(cmd: click.Command) -> bool:
    """Whether the command trains (has --profile): the [pfa], [fusion] and [encoders] keys are its too."""
    return any(getattr(p, "setting", None) == "profile" for p in cmd.params)


def _canonical(key: str) -> str:
    from asectl.models.train_config import canonical_key, is_profile_key

    return canonical_key(key) if is_profile_key(key) else key


def layered(ctx: click.Context, cmd: click.Command, path: str, config_file: Path | None) -> LayeredSettings:
    """The config files' and the environment's values for ``cmd``, every key of the files checked against
    the schema: the options of every command (their click types) and the training profile's keys."""
    from asectl.models.train_config import coerce_setting, is_profile_key

    schema: dict[str, list[click.Option]] = {}
    for other_path, other in leaf_commands(ctx.find_root().command).items():
        for p in command_options(other):
            schema.setdefault(option_key(other_path, p), []).append(p)
    layers = settings.file_layers(config_file, _canonical) + settings.environment_layers()
    own = {option_key(path, p): p for p in command_options(cmd)}
    for layer in layers:
        for key, value in layer.values.items():
            if layer.path is None and key not in own:  # a variable for other commands: theirs to check
                continue
            try:
                if key in schema:
                    for p in schema[key]:
                        p.type_cast_value(ctx, value)
                elif is_profile_key(key):
                    coerce_setting(key, value)
                else:
                    raise ConfigError("unknown setting; `asectl config show` lists every setting")
            except (click.BadParameter, ConfigError) as exc:
                message = exc.format_message() if isinstance(exc, click.BadParameter) else str(exc)
                raise ConfigError(f"{layer.where(key)} = {value!r}: {message}") from None
    found = LayeredSettings(config_file)
    for layer in layers:
        for key, value in layer.values.items():
            if key in own:
                found.defaults[own[key].name] = value
            elif is_profile_key(key) and takes_profile(cmd):
                found.profile_values[key] = value
            else:
                continue
            found.sources[key] = layer.source
    return found


def _load_settings(ctx: click.Context, _param: click.Parameter, config_file: Path | None) -> None:
    """--config's callback, run before the other options: the layers below the command line become
    click's default_map, so each option gets the highest-ranked value (asectl/settings.py)."""
    if ctx.resilient_parsing:
        return
    found = layered(ctx, ctx.command, command_path(ctx), config_file)
    ctx.default_map = {**(ctx.default_map or {}), **found.defaults}
    ctx.meta[STATE] = found


config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    is_eager=True,
    expose_value=False,
    callback=_load_settings,
    help="TOML file of settings: above the user config file, below the environment and the command line "
    "(docs/config.md; `asectl config show` prints them).",
)


def effective_settings(ctx: click.Context) -> list[settings.Setting]:
    """Every option of the running command with its value and source."""
    from click.core import ParameterSource

    found: LayeredSettings = ctx.meta.get(STATE) or LayeredSettings()
    path = command_path(ctx)
    out = []
    for p in command_options(ctx.command):
        key = option_key(path, p)
        origin = ctx.get_parameter_source(p.name)
        if p.name == "config_file":
            value = found.config_file
            source = settings.COMMAND_LINE if value is not None else settings.DEFAULT
        else:
            value = ctx.params.get(p.name)
            source = {
                ParameterSource.COMMANDLINE: settings.COMMAND_LINE,
                ParameterSource.DEFAULT_MAP: found.sources.get(key, settings.USER_CONFIG),
                ParameterSource.ENVIRONMENT: settings.env_source(str(p.envvar)),
            }.get(origin, settings.DEFAULT)
        out.append(settings.Setting(key, p.opts[-1] if p.opts else None, value, source))
    return out


def profile_overrides(sets: tuple[str, ...] = ()) -> dict[str, Any]:
    """The training hyperparameters this command was given, by profile key: the config files' and the
    environment's, then the options bound to profile keys that took their value from them, then
    ``--set KEY=VALUE``, then those options given on the command line (highest)."""
    return _given_profile_keys(sets)[0]


def recorded_sources(sets: tuple[str, ...] = ()) -> dict[str, str]:
    """What a training artifact records of this command's settings: setting key -> where its value came
    from, for every option and profile key not at its default (``--set`` keys: the command line). Never a
    cache key's input: the same settings from another source give the same model."""
    return {**settings.sources_record(effective_settings(click.get_current_context())), **_given_profile_keys(sets)[1]}


def _given_profile_keys(sets: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """(profile_overrides' values, each one's source), in the order of precedence."""
    from asectl.models.train_config import canonical_key, is_profile_key

    ctx = click.get_current_context()
    found = ctx.meta.get(STATE) or LayeredSettings()
    values = dict(found.profile_values)
    sources = {key: found.sources[key] for key in values}
    bound = [s for s in effective_settings(ctx) if is_profile_key(s.key) and s.value is not None]
    for s in bound:
        if s.source != settings.COMMAND_LINE:
            values[s.key], sources[s.key] = s.value, s.source
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set pfa.lr=0.001")
        k, v = item.split("=", 1)
        key = canonical_key(k.strip())
        try:
            values[key] = json.loads(v)
        except ValueError:
            values[key] = v
        sources[key] = settings.COMMAND_LINE
    for s in bound:
        if s.source == settings.COMMAND_LINE:
            values[s.key], sources[s.key] = s.value, s.source
    return values, sources


@click.group("config")
def config_group():
    """The settings every command reads: defaults, the user config file, --config, the environment."""


def command_settings(ctx: click.Context, path: str, cmd: click.Command) -> list[settings.Setting]:
    """What ``cmd`` would run with if given no options: each option's (and, for a training command, each
    hyperparameter's) value and source, through the same layers a run reads (``layered``), with the
    --config file given to ``config show``."""
    from asectl.models.train_config import coerce_setting, get_profile, profile_settings

    found = layered(ctx, cmd, path, ctx.meta.get("asectl.settings").config_file)
    probe = click.Context(cmd, parent=ctx.find_root(), info_name=path, resilient_parsing=True)
    rows: dict[str, settings.Setting] = {}
    for p in command_options(cmd):
        key = option_key(path, p)
        if p.name == "config_file":
            rows[key] = settings.Setting(
                key, p.opts[-1], found.config_file, settings.COMMAND_LINE if found.config_file else settings.DEFAULT
            )
        elif p.name in found.defaults:
            rows[key] = settings.Setting(
                key, p.opts[-1], p.type_cast_value(probe, found.defaults[p.name]), found.sources[key]
            )
        else:
            rows[key] = settings.Setting(key, p.opts[-1], _default(p, probe), settings.DEFAULT)
    if takes_profile(cmd):
        name = rows["profile"].value or "quick"
        for key, value in profile_settings(get_profile(name)).items():
            row = rows.get(key)
            if key in found.profile_values:
                rows[key] = settings.Setting(
                    key, None, coerce_setting(key, found.profile_values[key]), found.sources[key]
                )
            elif row is None:
                rows[key] = settings.Setting(key, None, value, f"{settings.DEFAULT} (profile {name})")
            elif row.source == settings.DEFAULT and row.value is None:  # an option bound to a profile key
                rows[key] = settings.Setting(key, row.option, value, f"{settings.DEFAULT} (profile {name})")
    return list(rows.values())


def _default(p: click.Option, ctx: click.Context):
    """An option's default as the command gets it (click 8.2+ marks "no default" with a sentinel)."""
    value = p.get_default(ctx)
    if value is getattr(click.core, "UNSET", object()):
        return () if p.multiple else None
    return value


@config_group.command("show", epilog=environment(settings.CONFIG_ENV, *settings.ENVIRONMENT.values()))
@click.argument("command", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per setting on stdout.")
@click.pass_context
def config_show(ctx, command, as_json):
    """Print every setting of COMMAND with its value and source.

    COMMAND is one command such as `ocr`, `fuse-train` or `models list` (all commands when omitted). The
    source is the default, the user config, --config or an env NAME. With --config FILE, as COMMAND would
    read it."""
    commands = leaf_commands(ctx.find_root().command)
    path = ".".join(command)
    if path and path not in commands:
        raise ConfigError(f"no command '{' '.join(command)}'; choose one of {', '.join(sorted(commands))}")
    rows = [s for p in ([path] if path else sorted(commands)) for s in command_settings(ctx, p, commands[p])]
    if as_json:
        for s in rows:
            click.echo(json.dumps(s.as_dict(), default=str))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"settings of {' '.join(command) or 'every command'}")
    for col in ("setting", "option", "value", "source"):
        table.add_column(col)
    for s in rows:
        table.add_row(
            s.key, s.option or "", escape(repr(s.value) if isinstance(s.value, str) else str(s.value)), s.source
        )
    ui.info(table)


def register(cli: click.Group) -> None:
    cli.add_command(config_group)
