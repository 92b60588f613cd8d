"""``asectl calibrate``: a trained model's thresholds re-set on a line's own labelled cards.

The line is generated `clean` cards of another seed (cards the model never saw). The new model's thresholds
are those choose_rule cuts on the parent's calibrated probabilities of the line's training cards; its fold
models are the parent's; predict and report use it; report on the line's folder scores only the line's test
split, and a folder whose split differs from the stored one is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from asectl.bundle import HELD_OUT_SCORES, load_bundle
from asectl.cache import Cache, sha256_file
from asectl.cli import cli
from asectl.domain.dataset import Dataset, load_dataset
from asectl.domain.synth import generate
from asectl.models.calibration import DecisionRule, choose_rule
from asectl.stages.predict import Predictor

from .conftest import make_default_latest


@pytest.fixture(scope="module")
def line(trained, tmp_path_factory):
    """15 `clean` cards of another seed (9 train, 6 test), read once; the shared model latest again after."""
    root = tmp_path_factory.mktemp("line") / "line"
    generate(root, seed=21, counts="5,3,3,2,2", test_size=5, difficulty="clean")
    yield root
    make_default_latest(trained)


@pytest.fixture(scope="module")
def recut(trained, line):
    res = trained["invoke"]("calibrate", line, "--model", trained["root"] / "bundle", "--json")
    return json.loads(res.stdout.splitlines()[-1])


def _probs(bundle, cache, cards, root):
    predictor = Predictor(bundle, cache)
    preds = predictor.classify(Dataset(cards, root))
    return preds, predictor.probabilities(preds.logits)


def test_thresholds_are_cut_on_the_line_training_cards_and_nothing_else_changes(trained, line, recut):
    parent = load_bundle(trained["root"] / "bundle")
    new = load_bundle(recut["bundle"])
    cache = Cache(trained["cache"])
    ds = load_dataset(line)
    train = ds.split("train")
    preds, probs = _probs(parent, cache, train, line)
    classes = parent.labels
    y = np.array([classes.index(s.label) for s in preds.samples])
    stored = DecisionRule.from_dict(parent.config["decision"])
    want = choose_rule(
        probs,
        y,
        classes,
        stored.max_miss_rate,
        stored.max_defect_error,
        stored.defect_confidence,
        stored.defective_decision,
        stored.max_defective_error,
    )
    assert new.decision_rule() == want
    assert recut["n_cards"] == len(train) == 9
    held_probs, held_y = new.held_out_scores()
    assert np.allclose(held_probs, probs) and list(held_y) == list(y)
    # the parent's models, temperature and training record; only the rule and its evidence differ
    for name in parent.config["files"]:
        if name != HELD_OUT_SCORES:
            assert sha256_file(new.path / name) == sha256_file(parent.path / name), name
    assert new.temperature == parent.temperature and new.config["split"] == parent.config["split"]
    assert new.config["recalibration"]["parent"]["digest"] == parent.digest
    assert new.config["recalibration"]["split"] == ds.split_record()
    # predict with the new model applies the new rule to the same calibrated probabilities
    test = ds.split("test")
    preds_t, probs_t = _probs(parent, cache, test, line)
    res = trained["invoke"]("predict", *[s.path for s in test], "--model", recut["bundle"], "--json")
    got = {Path(r["image"]).name: r["decision"] for r in map(json.loads, res.stdout.splitlines())}
    assert [got[s.path.name] for s in preds_t.samples] == want.decide(probs_t)


def test_report_on_the_line_scores_its_test_split_and_a_changed_split_is_refused(trained, line, recut, tmp_path):
    inv = trained["invoke"]
    res = inv("report", line, "--out", tmp_path / "report", "--json")  # the line's model: the re-cut one
    metrics = json.loads(res.stdout.splitlines()[-1])
    assert metrics["n_test"] == 6
    md = (tmp_path / "report" / "report.md").read_text()
    assert "the line's cards the thresholds were not set on" in md
    assert "line's labelled cards (9)" in md  # the decision table's column: N cards
    # the same cards with one training card moved to the test split: the stored split wins, so the card
    # that set the thresholds is not scored as a test card
    moved = shutil.copytree(line, tmp_path / "moved")
    rows = (moved / "labels.csv").read_text().splitlines()
    k = next(i for i, r in enumerate(rows) if r.endswith(",train"))
    rows[k] = rows[k][: -len("train")] + "test"
    (moved / "labels.csv").write_text("\n".join(rows) + "\n")
    res = inv("report", moved, "--model", recut["bundle"], "--out", tmp_path / "moved-report", "--json")
    assert json.loads(res.stdout.splitlines()[-1])["n_test"] == 6
    # the line's cards and one more: which split it belongs to is unknown, so refused with one line
    grown = shutil.copytree(line, tmp_path / "grown")
    generate(tmp_path / "one", seed=98, counts="2,0,0,0,0", difficulty="clean")
    shutil.copyfile(tmp_path / "one" / "images" / "0000.png", grown / "images" / "extra.png")
    (grown / "labels.csv").write_text((grown / "labels.csv").read_text() + "images/extra.png,normal,test\n")
    out = CliRunner().invoke(
        cli, ["--cache-dir", str(trained["cache"]), "report", str(grown), "--model", recut["bundle"]]
    )
    assert out.exit_code != 0 and "do not match the split its thresholds were set on" in out.output
    assert "Traceback" not in out.output
    # predict on the line's folder says which cards set the thresholds
    res = inv("predict", line, "--model", recut["bundle"], "--json")
    stored = {c["image"]: c["split"] for c in load_dataset(line).split_record()["cards"]}
    records = [json.loads(x) for x in res.stdout.splitlines()]
    assert len(records) == 15 and all(r["split"] == stored[r["image"]] for r in records)
    listed = json.loads(inv("models", "list", "--json").stdout)
    assert any(m["thresholds_set_on"] == str(line) for m in listed)


def test_a_rerun_is_cached_and_a_new_target_cuts_again(trained, line, recut):
    inv = trained["invoke"]
    again = json.loads(inv("calibrate", line, "--model", trained["root"] / "bundle", "--json").stdout.splitlines()[-1])
    assert again["from_cache"] and again["model"] == recut["model"]
    looser = json.loads(
        inv(
            "calibrate", line, "--model", trained["root"] / "bundle", "--max-miss-rate", "0.2", "--json"
        ).stdout.splitlines()[-1]
    )
    assert not looser["from_cache"] and looser["model"] != recut["model"]
    assert looser["decision"]["max_miss_rate"] == 0.2


def test_bad_line_folders_get_one_line(trained, line, tmp_path):
    model = str(trained["root"] / "bundle")

    def run(folder):
        args = ["--cache-dir", str(trained["cache"]), "calibrate", str(folder), "--model", model]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0 and "Traceback" not in res.output, res.output
        return res.output

    assert "cards the model was trained on" in run(trained["data"])
    only_normal = shutil.copytree(line, tmp_path / "normal")
    rows = (only_normal / "labels.csv").read_text().splitlines()
    keep = [rows[0]] + [r for r in rows[1:] if ",normal," in r]
    (only_normal / "labels.csv").write_text("\n".join(keep) + "\n")
    assert "need both normal and defective cards" in run(only_normal)
    no_train = shutil.copytree(line, tmp_path / "notrain")
    rows = (no_train / "labels.csv").read_text().splitlines()
    (no_train / "labels.csv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.endswith(",test")]) + "\n")
    assert "split" in run(no_train)


def test_few_defective_cards_are_warned_about(trained, line, recut):
    res = CliRunner().invoke(
        cli, ["--cache-dir", str(trained["cache"]), "calibrate", str(line), "--model", str(trained["root"] / "bundle")]
    )
    assert res.exit_code == 0, res.output
    assert "cannot be told from 0 on fewer than 100" in res.output
