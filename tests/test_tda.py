import json

import numpy as np
from click.testing import CliRunner

from asectl.cli import cli
from asectl.domain.card import dot_pixels, record_from_points
from asectl.domain.dataset import load_dataset
from asectl.domain.synth import card_correlation, generate
from asectl.imageio import load_image


def _truth(root):
    return {json.loads(x)["image"]: json.loads(x) for x in (root / "truth.jsonl").read_text().splitlines()}


def test_tda_doubles_train_and_leaves_test_untouched(tmp_path):
    src, out = tmp_path / "src", tmp_path / "aug"
    generate(src, seed=2, counts="12,6,4,4,4")
    res = CliRunner().invoke(
        cli, ["synth", "--augment", str(src), "--factor", "2", "--out", str(out), "--stats", "printed", "--seed", "5"]
    )
    assert res.exit_code == 0, res.output
    before, after = load_dataset(src), load_dataset(out)
    assert len(after.split("train")) == 2 * len(before.split("train"))
    # Test split: same names, same labels, byte-identical images; nothing new added to it.
    assert [(s.name, s.label) for s in after.split("test")] == [(s.name, s.label) for s in before.split("test")]
    for s in before.split("test"):
        assert (out / s.name).read_bytes() == s.path.read_bytes()
    # Class shares of the training split are kept.
    for label in before.labels:
        assert after.class_counts("train")[label] == 2 * before.class_counts("train")[label]


def test_tda_cards_carry_correct_printed_records(tmp_path):
    src, out = tmp_path / "src", tmp_path / "aug"
    generate(src, seed=3, counts="6,4,3,3,3")
    CliRunner().invoke(cli, ["synth", "--augment", str(src), "--out", str(out), "--stats", "printed"])
    truth = _truth(out)
    new = [t for t in truth.values() if t["image"].startswith("images/tda-")]
    assert new and all(t["split"] == "train" for t in new)
    for t in new:
        printed = t["printed"]
        assert printed["N"] == sum(printed["bins"])
        assert t["latent"]["tda"] is True
    # The dots drawn on each new card agree with its printed mean (pixel centroid within 0.3 units).
    for t in new[:4]:
        pts = dot_pixels(load_image(out / t["image"]))
        assert abs(pts[:, 0].mean() - t["printed"]["mu_x"]) < 0.3
        assert abs(pts[:, 1].mean() - t["printed"]["mu_y"]) < 0.3


def test_tda_fits_only_the_training_split(tmp_path):
    """Changing test cards must not change what TDA generates."""
    src = tmp_path / "src"
    generate(src, seed=4, counts="8,4,4,4,4")
    a = tmp_path / "a"
    CliRunner().invoke(cli, ["synth", "--augment", str(src), "--out", str(a), "--stats", "printed"])
    # Replace every test card's image and printed record with another card's: fits must not move.
    ds = load_dataset(src)
    truth = _truth(src)
    donor = ds.split("train")[0]
    for s in ds.split("test"):
        s.path.write_bytes(donor.path.read_bytes())
        truth[s.name]["printed"] = truth[donor.name]["printed"]
    (src / "truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truth.values()))
    b = tmp_path / "b"
    CliRunner().invoke(cli, ["synth", "--augment", str(src), "--out", str(b), "--stats", "printed"])
    fa = json.loads((a / "synth.json").read_text())["class_fits"]
    fb = json.loads((b / "synth.json").read_text())["class_fits"]
    assert fa == fb
    for name in (p.name for p in (a / "images").glob("tda-*.png")):
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()


def test_tda_keeps_the_sign_of_sigma_xy(tmp_path):
    src, out = tmp_path / "src", tmp_path / "aug"
    # Clean cards: every type1/type2 card is tilted (field tilts scale with severity, so mild cards barely are).
    generate(src, seed=5, counts="4,8,8,2,2", difficulty="clean")
    CliRunner().invoke(cli, ["synth", "--augment", str(src), "--out", str(out), "--stats", "printed"])
    fits = json.loads((out / "synth.json").read_text())["class_fits"]
    assert fits["type1"]["cov"][0][1] > 0 > fits["type2"]["cov"][0][1]
    truth = _truth(out)
    tda1 = [t for t in truth.values() if t["label"] == "type1" and t["latent"].get("tda")]
    corr = np.mean([card_correlation(load_image(out / t["image"])) for t in tda1])
    assert corr > 0.2


def test_tda_rejects_bad_factor(tmp_path):
    src = tmp_path / "src"
    generate(src, seed=1, counts="2,2,2,2,2")
    res = CliRunner().invoke(
        cli, ["synth", "--augment", str(src), "--out", str(tmp_path / "o"), "--factor", "0.5", "--stats", "printed"]
    )
    assert res.exit_code == 2 and "--factor" in res.output


def test_record_from_points_rounding():
    pts = np.array([[0.0, 0.0], [1.0, 1.0], [2.5, -0.5]])
    rec = record_from_points(pts)
    assert rec["N"] == 3 and rec["mu_x"] == 1.17 and rec["mu_y"] == 0.17
    assert sum(rec["bins"]) == 3
