"""The field difficulty of the generator: severity, shapes that are typical rather than certain, inspector
disagreement, hole counts, acquisition variation; and that clean stays the data it was."""

import hashlib
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from asectl.cli import cli
from asectl.domain.synth import (
    FIELD_N_RANGE,
    LABEL_DISAGREEMENT,
    MILD_EDGE,
    SECONDARY_SHARE,
    TABLE1,
    generate,
    match_label_counts,
    sample_cards,
)


@pytest.fixture(scope="module")
def field_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("field") / "ds"
    res = CliRunner().invoke(cli, ["synth", "--out", str(out), "--counts", "6,5,4,4,4", "--seed", "4"])
    assert res.exit_code == 0, res.output
    return out


def _truth(root):
    return [json.loads(x) for x in (root / "truth.jsonl").read_text().splitlines()]


def test_truth_records_severity_generating_class_and_label(field_ds):
    truth = _truth(field_ds)
    labels_csv = dict(line.split(",")[:2] for line in (field_ds / "labels.csv").read_text().splitlines()[1:])
    assert json.loads((field_ds / "synth.json").read_text())["difficulty"] == "field"
    for t in truth:
        assert t["label"] == labels_csv[t["image"]] and t["generating_class"] in TABLE1
        if t["generating_class"] == "normal":
            assert t["severity"] == 0.0 and t["mechanisms"] == {}
        else:
            assert 0.0 <= t["severity"] <= 1.0 and t["mechanisms"][t["generating_class"]] == t["severity"]
        assert t["latent"]["shape"] == "field" and t["printed"]["N"] == t["latent"]["n"]
        assert FIELD_N_RANGE[0] <= t["printed"]["N"] <= FIELD_N_RANGE[1]
        assert {"light_gain", "dot_rgb", "font_size", "text_x", "noise_sd", "jpeg_quality"} <= set(t["acquisition"])


def test_disagreement_share_is_the_stated_one():
    cards = [c for seed in range(4) for c in sample_cards(seed)]
    differ = [c for c in cards if c.label != c.generating_class]
    share = len(differ) / len(cards)
    sd = math.sqrt(LABEL_DISAGREEMENT * (1 - LABEL_DISAGREEMENT) / len(cards))
    assert abs(share - LABEL_DISAGREEMENT) < 4 * sd, share
    # Only borderline cards are relabelled, each to its recorded alternative.
    for c in differ:
        assert c.truth_extra["disagreement"]["probability"] > 0
        assert c.label == c.truth_extra["disagreement"]["alternative"]
    # Mild defects are the ones passed as normal.
    missed = [c for c in differ if c.label == "normal"]
    assert missed and all(c.truth_extra["severity"] < MILD_EDGE for c in missed)


def test_label_counts_are_matched_along_a_chain_of_possible_labels():
    """normal has one card too many and type2 one too few, but no normal card can be labelled type2: the
    unit moves normal -> type1 -> type2, each card only to a label it could have been given."""
    labels = ["normal", "normal", "normal", "type1", "type1", "type2"]
    probs = [
        {"normal": 1.0},
        {"normal": 0.9, "type1": 0.1},
        {"normal": 0.6, "type1": 0.4},
        {"type1": 1.0},
        {"type1": 0.7, "type2": 0.3},
        {"type2": 1.0},
    ]
    generating = ["normal", "normal", "normal", "type1", "type1", "type2"]
    match_label_counts(labels, probs, {"normal": 2, "type1": 2, "type2": 2}, generating)
    assert labels == ["normal", "normal", "type1", "type1", "type2", "type2"]
    for lab, p in zip(labels, probs):
        assert p.get(lab, 0) > 0


def test_severity_scales_the_defect():
    cards = sample_cards(0, "30,200,30,30,200")

    def mean(rows, f):
        return float(np.mean([f(c) for c in rows]))

    t1 = [c for c in cards if c.generating_class == "type1" and len(c.truth_extra["mechanisms"]) == 1]
    mild = [c for c in t1 if c.truth_extra["severity"] < MILD_EDGE]
    gross = [c for c in t1 if c.truth_extra["severity"] > 0.7]
    assert len(mild) > 10 and len(gross) > 10
    assert mean(gross, lambda c: c.printed["mu_x"]) - mean(mild, lambda c: c.printed["mu_x"]) > 2.0
    assert mean(gross, lambda c: c.printed["sd_x"] ** 2) > mean(mild, lambda c: c.printed["sd_x"] ** 2) + 2.0
    # A gross, typically shaped ring is hollow; a mild one is not.
    t4 = [c for c in cards if c.generating_class == "type4" and not c.truth_extra["weak_shape"]]

    def centre_share(c):
        d = np.hypot(*(c.points - c.points.mean(axis=0)).T) / np.sqrt(np.mean(c.points.var(axis=0)))
        return np.mean(d < 0.5)

    hollow = mean([c for c in t4 if c.truth_extra["severity"] > 0.7], centre_share)
    filled = mean([c for c in t4 if c.truth_extra["severity"] < MILD_EDGE], centre_share)
    assert hollow < filled / 2


def test_shapes_are_typical_not_certain():
    cards = [c for seed in range(3) for c in sample_cards(seed)]
    defective = [c for c in cards if c.generating_class != "normal"]
    combined = sum(len(c.truth_extra["mechanisms"]) == 2 for c in defective) / len(defective)
    assert 0.5 * SECONDARY_SHARE < combined < 1.5 * SECONDARY_SHARE
    gross3 = [c for c in defective if c.generating_class == "type3" and c.truth_extra["severity"] > 0.7]
    assert any(c.latent["cluster_share"] < 0.35 for c in gross3)  # nearly unimodal two-cluster cards
    assert any(c.latent["cluster_share"] > 0.6 for c in gross3)  # and clearly split ones
    gross4 = [c for c in defective if c.generating_class == "type4" and c.truth_extra["severity"] > 0.7]
    assert any(c.latent["ring_share"] < 0.4 for c in gross4) and any(c.latent["ring_share"] > 0.7 for c in gross4)


# Digests of the clean output (seed 3, counts 5,4,3,3,3) written by the generator before the field
# difficulty existed: clean must stay those bytes.
CLEAN_DIGESTS = {
    "labels.csv": "77ab931ad4162a2d08845a1bf1eaa5256d629cfc69b59e998dee2a67e547191c",
    "truth.jsonl": "314a240469a3323a9050d2ac01c873ace1d8ff9fb4c1fd26a0b43f3b0190c9cf",
}


def test_clean_is_the_data_it_was(tmp_path):
    out = tmp_path / "clean"
    generate(out, seed=3, counts="5,4,3,3,3", difficulty="clean")
    for name, digest in CLEAN_DIGESTS.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert Image.open(out / "images" / "0000.png").convert("RGB").getpixel((700, 470)) == (255, 255, 255)


def test_unknown_difficulty_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path / "x"), "--difficulty", "hard"])
    assert res.exit_code == 2 and "--difficulty" in res.output


def test_acquisition_varies_between_cards(field_ds):
    truth = _truth(field_ds)
    corners, patches = set(), []
    for t in truth:
        a = np.asarray(Image.open(field_ds / t["image"]).convert("RGB"), dtype=np.float64)
        corners.add(tuple(np.rint(a[440:470, 680:710].mean(axis=(0, 1))).astype(int)))
        patches.append(a[440:470, 680:710, 1].std())
    assert len(corners) > len(truth) // 2  # background tint differs between cards
    assert max(patches) > 0.5  # pixel noise
    assert len({t["acquisition"]["font_size"] for t in truth}) > 1
    assert len({t["acquisition"]["text_x"] for t in truth}) > 1


def test_ocr_reads_field_cards_exactly(field_ds, tmp_path):
    """The real OCR engine reads a handful of field cards (different text sizes and offsets) exactly."""
    truth = {t["image"]: t for t in _truth(field_ds)}
    by_size = {}
    for name, t in sorted(truth.items()):
        by_size.setdefault(t["acquisition"]["font_size"], name)
    names = sorted(by_size.values())[:4]
    out = tmp_path / "records.jsonl"
    res = CliRunner().invoke(cli, ["ocr", *[str(field_ds / n) for n in names], "--workers", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == len(names)
    for r in records:
        name = next(n for n in names if r["image"].endswith(n.split("/")[-1]))
        assert r["fields"] == truth[name]["printed"], name
