"""The split belongs to the model; provenance stays honest; outputs stay out of the data.

A folder without labels.csv (``<label>/*.png``) trained with another --seed and --split-seed is reported
on the model's own test split, never on its training cards; a folder whose cards differ is refused; a
report folder written into the dataset is not read as a class; a cache hit from a copy of the cards never
relabels the model's dataset; ``models list`` shows what was trained and reported."""

import json
import shutil
from pathlib import Path

import pytest

from asectl.bundle import Bundle
from asectl.domain.dataset import load_dataset
from asectl.domain.synth import generate
from asectl.errors import ConfigError
from asectl.stages.split import model_split

from .conftest import FAST, cli_invoker, copy_read_cards


def image_folder(src: Path, dst: Path) -> Path:
    """A generated dataset rewritten as ``<label>/<image>`` (no labels.csv)."""
    for line in (src / "labels.csv").read_text().splitlines()[1:]:
        image, label, _ = line.split(",")
        (dst / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / image, dst / label / Path(image).name)
    return dst


def fake_bundle(ds, **training) -> Bundle:
    return Bundle(Path("/nowhere"), {"split": ds.split_record(), "training": {"dataset": str(ds.root), **training}})


# --- the split check, without a model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    generate(root / "gen", seed=3, counts="6,3,3,3,3")
    return image_folder(root / "gen", root / "cards")


def test_the_split_seed_is_its_own_and_the_model_split_wins(folder):
    a, b = load_dataset(folder, split_seed=0), load_dataset(folder, split_seed=3)
    assert [s.split for s in a.samples] != [s.split for s in b.samples]
    assert b.split_text() == "13 train / 5 test, stratified, split seed 3"
    bundle = fake_bundle(b)
    mine, own = model_split(a, bundle)  # read with seed 0, the model's split (seed 3) is used
    assert own and [s.split for s in mine.samples] == [s.split for s in b.samples] and mine.split_seed == 3


def test_a_folder_whose_cards_differ_is_refused_and_new_cards_keep_their_split(folder, tmp_path):
    bundle = fake_bundle(load_dataset(folder, split_seed=3))
    fewer = shutil.copytree(folder, tmp_path / "fewer")
    next((fewer / "type1").iterdir()).unlink()
    with pytest.raises(ConfigError, match="do not match the split .*\\(1 of its cards missing"):
        model_split(load_dataset(fewer), bundle)
    more = shutil.copytree(folder, tmp_path / "more")
    shutil.copyfile(next((more / "type2").iterdir()), more / "type2" / "copy.png")
    with pytest.raises(ConfigError, match="1 card\\(s\\) it never saw \\(e.g. type2/copy.png\\)"):
        model_split(load_dataset(more), bundle)
    generate(tmp_path / "gen", seed=4, counts="3,3,3,3,3")
    new = load_dataset(image_folder(tmp_path / "gen", tmp_path / "new"))
    same, own = model_split(new, bundle)
    assert not own and same is new


def test_asectl_output_and_empty_folders_are_not_classes(folder, tmp_path, asectl_log):
    data = shutil.copytree(folder, tmp_path / "data")
    (data / "report").mkdir()
    for name in ("report.html", "metrics.json", "calibration.png"):
        (data / "report" / name).write_bytes(b"x")
    (data / "type9").mkdir()
    before = load_dataset(folder)
    after = load_dataset(data)
    assert [(s.name, s.split) for s in after.samples] == [(s.name, s.split) for s in before.samples]
    assert after.labels == before.labels
    assert "report: skipped, not a class (asectl output: it holds report.html)" in asectl_log.text
    assert "type9: empty class folder" in asectl_log.text


# --- end to end: a model trained with another --seed and --split-seed ----------------------------------
@pytest.fixture(scope="module")
def folder_model(tmp_path_factory, tiny_gguf):
    root = tmp_path_factory.mktemp("split-model")
    gen, cache = copy_read_cards(tmp_path_factory, root, tiny_gguf)
    data = image_folder(gen, root / "mydata")
    invoke = cli_invoker(cache)
    invoke("reason", data, "--llm-model", tiny_gguf, "--max-tokens", "32")
    invoke("describe", data)
    align = invoke("align", data, "--stride", "0.5", "--seed", "3", "--split-seed", "3", *FAST)
    fuse = json.loads(invoke("fuse-train", data, "--json", *FAST).stdout.splitlines()[-1])
    return {
        "root": root,
        "data": data,
        "cache": cache,
        "invoke": invoke,
        "fuse": fuse,
        "align": align,
        "gguf": tiny_gguf,
    }


def test_training_prints_and_the_bundle_records_the_split(folder_model):
    fuse, data = folder_model["fuse"], folder_model["data"]
    seeded = load_dataset(data, split_seed=3)
    assert fuse["split"] == seeded.split_text() == "17 train / 7 test, stratified, split seed 3"
    cfg = json.loads((Path(fuse["bundle"]) / "bundle.json").read_text())
    stored = {c["image"]: c["split"] for c in cfg["split"]["cards"]}
    assert stored == {s.name: s.split for s in seeded.samples} and cfg["split"]["split_seed"] == 3
    assert all(len(c["sha256"]) == 64 for c in cfg["split"]["cards"])
    assert cfg["seed"] == 3


def test_report_scores_the_models_own_test_cards_never_training_cards(folder_model, tmp_path, monkeypatch):
    f = folder_model
    cfg = json.loads((Path(f["fuse"]["bundle"]) / "bundle.json").read_text())
    train = {c["image"] for c in cfg["split"]["cards"] if c["split"] == "train"}
    test = {c["image"] for c in cfg["split"]["cards"] if c["split"] == "test"}
    seed0_test = {s.name for s in load_dataset(f["data"]).split("test")}
    assert seed0_test & train  # the split report used to make would score training cards
    monkeypatch.chdir(tmp_path)
    res = f["invoke"]("report", f["data"], "--json")  # no --model: the latest model trained on this folder
    out = tmp_path / "asectl-report" / "mydata"  # the default folder: outside the dataset
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(res.stdout.splitlines()[-1])["n_test"] == metrics["n_test"] == len(test)
    assert {p["image"] for p in metrics["predictions"]} == test
    assert "split seed 3" in metrics["provenance"]["test split"]
    # predict on the labelled folder says which cards the model trained on.
    recs = [json.loads(x) for x in f["invoke"]("predict", f["data"], "--json").stdout.splitlines() if x.startswith("{")]
    assert {r["image"] for r in recs if r["split"] == "train"} == train


def test_report_refuses_a_changed_folder_and_a_folder_without_a_model(folder_model, tmp_path):
    f = folder_model
    changed = shutil.copytree(f["data"], tmp_path / "changed")
    next((changed / "normal").iterdir()).unlink()
    res = f["invoke"]("report", changed, "--model", f["fuse"]["bundle"], "--out", tmp_path / "r", code=2)
    assert "do not match the split" in res.output and len(res.output.strip().splitlines()) == 1
    # No model trained on that folder: refused, naming the models there are.
    res = f["invoke"]("report", changed, "--out", tmp_path / "r", code=2)
    assert f"no model trained on {changed}" in res.output and f["fuse"]["model"][:12] in res.output
    assert "mydata" in res.output


def test_a_report_written_into_the_dataset_is_not_a_class(folder_model):
    f = folder_model
    before = load_dataset(f["data"], split_seed=3)
    f["invoke"]("report", f["data"], "--out", f["data"] / "report")
    try:
        assert (f["data"] / "report" / "report.html").is_file()
        after = load_dataset(f["data"], split_seed=3)
        assert [(s.name, s.split) for s in after.samples] == [(s.name, s.split) for s in before.samples]
        again = json.loads(f["invoke"]("fuse-train", f["data"], "--json", *FAST).stdout.splitlines()[-1])
        assert again["from_cache"] and again["model"] == f["fuse"]["model"]
    finally:
        shutil.rmtree(f["data"] / "report")


def test_a_cache_hit_keeps_provenance_and_models_list_shows_it(folder_model, tmp_path):
    f = folder_model
    copy = shutil.copytree(f["data"], tmp_path / "copy")
    (copy / "empty-class").mkdir()
    # The same steps on a copy of the cards: every one a cache hit, the model included.
    f["invoke"]("reason", copy, "--llm-model", f["gguf"], "--max-tokens", "32")
    f["invoke"]("describe", copy)
    f["invoke"]("align", copy, "--stride", "0.5", "--seed", "3", "--split-seed", "3", *FAST)
    hit = json.loads(f["invoke"]("fuse-train", copy, "--json", *FAST).stdout.splitlines()[-1])
    assert hit["from_cache"] and hit["model"] == f["fuse"]["model"]
    assert hit["trained_on"] == str(f["data"])  # not relabelled as trained on the copy
    models = json.loads(f["invoke"]("models", "list", "--json").stdout)
    mine = next(m for m in models if m["id"] == f["fuse"]["model"])
    assert mine["dataset"] == str(f["data"]) and mine["classes"] == f["fuse"]["classes"]
    assert mine["targets"] == {
        "max_miss_rate": 0.01,
        "max_defect_error": 0.05,
        "max_defective_error": None,
        "defective_decision": True,
    }
    f["invoke"]("report", copy, "--out", tmp_path / "r")  # the copy's own model pointer: the same model
    models = json.loads(f["invoke"]("models", "list", "--json").stdout)
    mine = next(m for m in models if m["id"] == f["fuse"]["model"])
    assert 0 <= mine["test_macro_f1"] <= 1 and mine["reported_on"] == str(copy)
    from click.testing import CliRunner

    from asectl.cli import cli

    table = CliRunner().invoke(cli, ["--cache-dir", str(f["cache"]), "models", "list"], terminal_width=300).output
    assert f["fuse"]["model"][:12] in table and "mydata" in table


def test_predict_gives_the_reason_for_each_decision(folder_model):
    from asectl.models.calibration import DecisionRule

    f = folder_model
    cfg = json.loads((Path(f["fuse"]["bundle"]) / "bundle.json").read_text())
    rule = DecisionRule.from_dict(cfg["decision"])
    recs = [json.loads(x) for x in f["invoke"]("predict", f["data"], "--json").stdout.splitlines() if x.startswith("{")]
    for r in recs:
        probs = [r["probabilities"][c] for c in cfg["classes"]]
        decision, reason = rule.explain([probs])[0]
        assert r["decision"] == decision and r["reason"].split(" ")[0] == reason.split(" ")[0]
        if r["decision"] == "review":
            assert " < " in r["reason"] or "no pass threshold" in r["reason"] or "no defect threshold" in r["reason"]
    from click.testing import CliRunner

    from asectl.cli import cli

    table = CliRunner().invoke(cli, ["--cache-dir", str(f["cache"]), "predict", str(f["data"])], terminal_width=400)
    assert table.exit_code == 0 and "reason" in table.output and recs[0]["reason"] in table.output


def test_quiet_prints_only_warnings_on_every_command_in_a_pipe(folder_model, tmp_path):
    """``-q`` through real pipes, each command once (all cache hits but synth): nothing on stdout, and on
    stderr nothing but warnings."""
    import subprocess
    import sys

    f = folder_model
    data, gguf = f["data"], f["gguf"]
    line = tmp_path / "line"  # cards of another line, for calibrate
    generate(line, seed=5, counts="2,2,2,2,2", test_size=5, difficulty="clean")
    # The line's per-card stages with the model's settings, in this process: calibrate in the pipe is then a
    # cache hit for them too, and the pipe does not pay the OCR engine's cold import once more.
    cli_invoker(f["cache"])("calibrate", line, "--model", f["fuse"]["bundle"], "--out", tmp_path / "warm")
    commands = [
        ("synth", "--out", tmp_path / "synth", "--counts", "1,1,1,1,1", "--test-size", "1"),
        ("ocr", data),
        ("describe", data),
        ("reason", data, "--llm-model", gguf, "--max-tokens", "32"),
        ("align", data, "--stride", "0.5", "--seed", "3", "--split-seed", "3", *FAST),
        ("fuse-train", data, *FAST),
        ("calibrate", line, "--model", f["fuse"]["bundle"]),
        ("predict", data),
        ("report", data),
        ("export", "--out", tmp_path / "export"),
        ("models", "list"),
        ("cache", "info"),
        ("cache", "clear", "--stage", "no-such-stage", "--yes"),
        ("config", "show", "ocr"),
    ]
    from concurrent.futures import ThreadPoolExecutor

    def run(args):
        return subprocess.run(
            [sys.executable, "-m", "asectl", "--cache-dir", str(f["cache"]), "-q", *map(str, args)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
        )

    # Two at a time: each is a cache hit or writes a folder of its own, and most of each is its imports.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, commands))
    seen = set()
    for args, res in zip(commands, results):
        assert res.returncode == 0, (args, res.stderr)
        assert res.stdout == "", (args, res.stdout)
        assert all(line.startswith("warning:") for line in res.stderr.splitlines()), (args, res.stderr)
        seen.add(" ".join(map(str, args[:2])) if args[0] in ("models", "cache", "config") else args[0])
    from asectl.cli import PIPELINE_ORDER, cli

    groups = {"models": "models list", "cache": "cache info", "config": "config show"}
    assert {groups.get(c, c) for c in PIPELINE_ORDER} <= seen | {"cache clear"}
    assert (tmp_path / "asectl-report" / "mydata" / "report.html").is_file()
    assert set(cli.commands) == set(PIPELINE_ORDER)  # every command is in the pipeline order and tested
