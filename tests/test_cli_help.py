"""One command line: every option described, defaults shown one way, environment variables listed,
commands in pipeline order."""

import re

import click
from click.testing import CliRunner

from asectl.cli import PIPELINE_ORDER, cli


def commands(group=cli, prefix=("asectl",)):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def test_every_option_has_help_and_defaults_are_shown_one_way():
    for path, cmd in [(("asectl",), cli), *commands()]:
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.name == "help":
                continue
            where = f"{' '.join(path)} {p.opts[-1]}"
            assert p.help, f"{where}: no help"
            assert not re.search(r"\(default", p.help, re.I), f"{where}: a default in the help text, not show_default"
            has_default = (
                not p.is_flag
                and p.default is not None
                and p.default is not click.core.UNSET
                and not p.multiple
                and not p.required
            )
            if has_default:
                assert p.show_default, f"{where}: default {p.default!r} not shown"


def test_each_command_lists_the_environment_it_reads():
    expected = {
        "describe": "ASECTL_VLM_MODEL",
        "ocr": "ASECTL_EXECUTOR",
        "reason": "ASECTL_EXECUTOR",
        "predict": "ASECTL_EXECUTOR",
        "align": "HF_HUB_OFFLINE",
        "report": "HF_HUB_OFFLINE",
    }
    for path, _cmd in commands():
        text = CliRunner().invoke(cli, [*path[1:], "--help"], terminal_width=200).output
        assert "Environment: ASECTL_CACHE_DIR" in text, path
        if path[-1] in expected:
            assert expected[path[-1]] in text, path


def test_help_lists_the_commands_in_pipeline_order():
    text = CliRunner().invoke(cli, ["--help"]).output
    listed = re.findall(r"^  ([a-z-]+)\s{2,}", text.split("Commands:")[1], re.M)
    assert listed == list(PIPELINE_ORDER)
