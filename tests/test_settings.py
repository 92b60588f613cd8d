"""The one settings layer (asectl/settings.py, asectl/commands/config.py, docs/config.md): its order of
precedence on a real command, `asectl config show` covering every option of every command, config-file
errors, and options typed at the command line (--stride)."""

from __future__ import annotations

import json
import sys

import click
import pytest
from click.testing import CliRunner

from asectl.cli import cli
from asectl.commands.config import leaf_commands, option_key, profile_overrides
from asectl.models.train_config import get_profile

SOURCES = {"default", "user config", "--config", "command line"}


def show(*args, env=None):
    res = CliRunner().invoke(cli, ["config", "show", *map(str, args), "--json"], env=env)
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_every_option_of_every_command_appears_in_config_show_with_its_source():
    commands = leaf_commands(cli)
    assert {"ocr", "align", "fuse-train", "predict", "models.list", "cache.clear", "config.show"} <= set(commands)
    for path, cmd in commands.items():
        rows = {r["key"]: r for r in show(*path.split("."))}
        for p in cmd.params:
            if isinstance(p, click.Option):
                row = rows.get(option_key(path, p))
                assert row is not None, f"{path} {p.opts[-1]}: not in `asectl config show {path}`"
                assert row["option"] == p.opts[-1]
                assert row["source"] in SOURCES or row["source"].startswith(("env ", "default (profile"))
        if path == "align":  # a training command also lists every hyperparameter of its profile
            assert rows["pfa.lr"]["source"] == "default (profile quick)" and rows["fusion.epochs"]["value"] == 60


def test_each_level_overrides_the_one_below_on_a_real_command(tmp_path, monkeypatch, _isolated_user_config):
    """ocr's executor: ray (Ray made unimportable: a one-line error) or local (the missing image's error),
    from the user config file, then --config, then ASECTL_EXECUTOR, then --executor."""
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delenv("ASECTL_EXECUTOR", raising=False)
    monkeypatch.chdir(tmp_path)

    def kind(*args):
        res = CliRunner().invoke(cli, ["ocr", "missing.png", *map(str, args)])
        assert res.exit_code in (1, 2) and len(res.output.strip().splitlines()) == 1, res.output
        return "ray" if "needs Ray" in res.output else "local"

    def source():
        return {r["key"]: r for r in show("ocr", *args)}["executor.kind"]["source"]

    args: tuple = ()
    assert kind() == "local" and source() == "default"
    _isolated_user_config.parent.mkdir(parents=True)
    _isolated_user_config.write_text('[executor]\nkind = "ray"\n')
    assert kind() == "ray" and source() == "user config"
    given = tmp_path / "local.toml"
    given.write_text('[executor]\nkind = "local"\n')
    args = ("--config", given)
    assert kind(*args) == "local" and source() == "--config"
    monkeypatch.setenv("ASECTL_EXECUTOR", "ray")
    assert kind(*args) == "ray" and source() == "env ASECTL_EXECUTOR"
    assert kind(*args, "--executor", "local") == "local"


@pytest.mark.parametrize(
    "text, key",
    [
        ('[ocr]\nengin = "cnocr"\n', "ocr.engin"),
        ('[ocr]\nworkers = "many"\n', "ocr.workers"),
        ('[pfa]\nepochs_per_stage = "many"\n', "pfa.epochs_per_stage"),
        ("[fusion]\nlr = true\n", "fusion.lr"),
    ],
)
def test_a_bad_key_or_type_in_a_config_file_is_one_line_naming_file_and_key(tmp_path, text, key, _isolated_user_config):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    for args in (["models", "list", "--config", str(bad)], ["config", "show", "ocr", "--config", str(bad)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and str(bad) in res.output and key in res.output
    _isolated_user_config.parent.mkdir(parents=True)
    _isolated_user_config.write_text(text)  # the user config file is checked the same way
    res = CliRunner().invoke(cli, ["models", "list"])
    assert res.exit_code == 2 and str(_isolated_user_config) in res.output and key in res.output


def profile_from_align_options(*args):
    """The training profile align would build from these options (click parses them; no training)."""
    root = click.Context(cli, info_name="asectl")
    with cli.commands["align"].make_context("align", [".", *args], parent=root) as ctx:
        return get_profile(ctx.params["profile"] or "quick", profile_overrides(ctx.params["sets"]))


def test_stride_is_a_list_of_floats_from_the_command_line():
    for text, strides in (
        ("0.2/0.6/1", (0.2, 0.6, 1.0)),
        ("0.2,0.6,1", (0.2, 0.6, 1.0)),
        ("0.25", (0.25, 0.5, 0.75, 1.0)),
    ):
        pfa = profile_from_align_options("--stride", text).pfa
        assert pfa.strides == strides and all(type(f) is float for f in pfa.strides)
    # the command line outranks --set, which outranks nothing typed by name: the same checker for both
    assert profile_from_align_options("--set", "pfa.strides=0.5/1", "--stride", "0.2/0.6/1").pfa.strides == (
        0.2,
        0.6,
        1.0,
    )
    assert profile_from_align_options("--set", "pfa.stride=0.5").pfa.strides == (0.5, 1.0)
    res = CliRunner().invoke(cli, ["align", ".", "--stride", "0.2/0.6"])
    assert res.exit_code == 2 and "last fraction must be 1" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_default_settings_build_the_same_profile_as_before(tmp_path):
    """Cache keys hold the validated profile: the default options (and the common --stride 0.2) give exactly
    the profile the built-in defaults give, so earlier cached results stay valid."""
    quick = get_profile("quick").to_dict()
    assert profile_from_align_options().to_dict() == quick
    assert profile_from_align_options("--stride", "0.2").to_dict() == quick
    given = tmp_path / "hp.toml"
    given.write_text('profile = "paper"\n[pfa]\nlr = 0.005\n')
    paper = profile_from_align_options("--config", given)
    assert paper.name == "paper" and paper.pfa.lr == 0.005


def test_a_training_run_records_where_each_setting_came_from_outside_its_cache_key(trained, tmp_path):
    """fuse-train records each setting's source in its bundle (and align's in the align pointer): the
    command line's --set outranks --config's value for fusion.epochs; what only the file gave says
    --config; the same settings from other sources give the same model (sources are not in the key)."""
    import shutil

    from asectl.bundle import load_bundle
    from asectl.cache import Cache

    from .conftest import FAST, cli_invoker

    cache = tmp_path / "cache"  # a copy: the shared model's pointers stay as they are
    shutil.copytree(trained["cache"], cache)
    invoke = cli_invoker(cache)
    # The fixture's alignment, again (a cache hit): other tests that share the fixture's cache may have
    # aligned since with other options, and the align pointer keeps the last run's sources.
    invoke("align", trained["data"], "--stride", "0.2", "--json", *FAST)
    given = tmp_path / "fusion.toml"
    given.write_text("[fusion]\nepochs = 5\nlr = 0.002\n")
    args = ("fuse-train", trained["data"], "--json")
    first = json.loads(invoke(*args, "--config", given, "--set", "fusion.epochs=2").stdout.splitlines()[-1])
    bundle = load_bundle(first["bundle"]).config
    assert bundle["profile"]["fusion"]["epochs"] == 2 and bundle["profile"]["fusion"]["lr"] == 0.002
    sources = bundle["settings_sources"]
    assert sources["fusion.epochs"] == "command line" and sources["fusion.lr"] == "--config"
    # align's settings (the trained fixture's `align --stride 0.2 --set pfa.epochs_per_stage=3`) come with it
    assert sources["pfa.strides"] == "command line" and sources["pfa.epochs_per_stage"] == "command line"
    # the pointer of this dataset (other tests may have aligned other folders in the shared cache)
    from asectl.stages.common import folder_id

    pointer = Cache(cache).get_pointer(f"align-{folder_id(trained['data'])}")
    assert pointer["settings_sources"]["pfa.strides"] == "command line"
    # the same values, all from the file: the same model, from the cache
    given.write_text("[fusion]\nepochs = 2\nlr = 0.002\n")
    again = json.loads(invoke(*args, "--config", given).stdout.splitlines()[-1])
    assert again["model"] == first["model"] and again["from_cache"]


def test_fuse_train_says_which_alignment_settings_an_earlier_run_left(trained, tmp_path, asectl_log):
    """fuse-train trains on the dataset's last alignment, overrides included (docs/fuse-train.md): the ones
    this call does not give are named in one info line; the ones it gives are not."""
    import logging
    import shutil

    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.fuse import run_fuse_train

    from .conftest import FAST, cli_invoker

    cache = tmp_path / "cache"  # a copy: the shared model's pointers stay as they are
    shutil.copytree(trained["cache"], cache)
    cli_invoker(cache)("align", trained["data"], "--stride", "0.2", *FAST)  # the fixture's alignment, again
    logging.getLogger("asectl").setLevel(logging.INFO)  # the CLI's -q above raised it
    ds = load_dataset(trained["data"])
    run_fuse_train(ds, Cache(cache), overrides={"fusion.epochs": 8})  # the fixture's model: a cache hit
    line = next(r.getMessage() for r in asectl_log.records if "alignment keeps" in r.getMessage())
    assert "pfa.epochs_per_stage=3" in line and "pfa.strides=" in line and "asectl align DATA" in line
    asectl_log.clear()
    named = {
        "pfa.epochs_per_stage": 3,
        "pfa.strides": [0.2, 0.4, 0.6, 0.8, 1.0],
        "fusion.epochs": 8,
        "encoders.image_epochs": 4,
    }
    run_fuse_train(ds, Cache(cache), overrides=named)
    assert not any("alignment keeps" in r.getMessage() for r in asectl_log.records)
