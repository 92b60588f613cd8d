import json

import numpy as np
import pytest
from click.testing import CliRunner

from asectl.cli import cli
from asectl.domain.card import default_spec, record_from_points
from asectl.domain.dataset import load_dataset
from asectl.domain.synth import TABLE1, generate, sample_cards


@pytest.mark.parametrize("difficulty", ["field", "clean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_table1_statistics(seed, difficulty):
    """Class averages (by label) of per-card mu_x, mu_y, sd_x^2, sd_y^2 match the paper's Table 1."""
    cards = sample_cards(seed, difficulty=difficulty)
    assert len(cards) == 455
    assert sum(c.split == "test" for c in cards) == 130
    for label, expected in TABLE1.items():
        rows = [c.printed for c in cards if c.label == label]
        got = (
            np.mean([r["mu_x"] for r in rows]),
            np.mean([r["mu_y"] for r in rows]),
            np.mean([r["sd_x"] ** 2 for r in rows]),
            np.mean([r["sd_y"] ** 2 for r in rows]),
        )
        for g, e in zip(got, expected):
            assert abs(g - e) <= max(0.05 * abs(e), 0.15), (label, got, expected)


@pytest.mark.parametrize("difficulty", ["field", "clean"])
def test_default_class_counts_and_stratified_split(difficulty):
    """--counts are cards per generating class and, as in the paper's Table 1, per inspector label too;
    the split is stratified by the (inspector) label."""
    cards = sample_cards(0, difficulty=difficulty)
    for label, n in zip(TABLE1, (225, 92, 44, 50, 44)):
        assert sum((c.generating_class or c.label) == label for c in cards) == n
        assert sum(c.label == label for c in cards) == n
        of_label = [c for c in cards if c.label == label]
        n_test = sum(c.split == "test" for c in of_label)
        assert abs(n_test - len(of_label) * 130 / 455) <= 1


def test_shapes_differ_between_classes():
    cards = sample_cards(0, "30,30,30,30,30", difficulty="clean")
    shapes = {c.label: c.latent["shape"] for c in cards}
    assert shapes == {
        "normal": "gaussian",
        "type1": "gaussian",
        "type2": "gaussian",
        "type3": "two-cluster",
        "type4": "ring",
    }
    # type1 tilts one way and type2 the other: a shape cue no printed number carries.
    corr = {
        lab: np.mean([np.corrcoef(c.points.T)[0, 1] for c in cards if c.label == lab]) for lab in ("type1", "type2")
    }
    assert corr["type1"] > 0.25 and corr["type2"] < -0.25

    # A ring has few holes near its own centre compared with a Gaussian of similar spread.
    def centre_share(c):
        d = np.hypot(*(c.points - c.points.mean(axis=0)).T)
        return np.mean(d < 1.0)

    ring = np.mean([centre_share(c) for c in cards if c.label == "type4"])
    normal = np.mean([centre_share(c) for c in cards if c.label == "normal"])
    assert ring < normal / 2


def test_printed_record_is_consistent_with_points():
    cards = sample_cards(3, "3,3,3,3,3")
    for c in cards:
        p = c.printed
        assert p["N"] == len(c.points) == sum(p["bins"])
        assert len(p["bins"]) == default_spec().n_bins
        assert p["mu_x"] == round(float(c.points[:, 0].mean()), 2) or abs(p["mu_x"]) == 0.0
        assert p == record_from_points(c.points)


def test_generate_is_deterministic(tmp_path, monkeypatch):
    """The same seed gives the same bytes, whether this process or worker processes render the cards."""
    import asectl.domain.synth as synth

    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, seed=7, counts="2,1,1,1,1", workers=1)
    monkeypatch.setattr(synth, "RENDER_CHUNK", 2)  # 3 jobs over 2 workers: two rounds, cards split across both
    generate(b, seed=7, counts="2,1,1,1,1", workers=2)
    assert (a / "labels.csv").read_bytes() == (b / "labels.csv").read_bytes()
    assert (a / "truth.jsonl").read_bytes() == (b / "truth.jsonl").read_bytes()
    for img in sorted((a / "images").iterdir()):
        assert img.read_bytes() == (b / "images" / img.name).read_bytes()
    generate(tmp_path / "c", seed=8, counts="2,1,1,1,1")
    assert (a / "truth.jsonl").read_bytes() != (tmp_path / "c" / "truth.jsonl").read_bytes()


def test_tda_cards_do_not_depend_on_workers(tmp_path, monkeypatch):
    import asectl.domain.synth as synth

    src = tmp_path / "src"
    generate(src, seed=3, counts="3,2,2,2,2", test_size=3, difficulty="clean")
    ds = load_dataset(src)
    truth = synth.read_truth(src)
    records = [truth[s.name]["printed"] for s in ds.samples]
    synth.augment(ds, records, tmp_path / "one", stats_source="printed", workers=1)
    monkeypatch.setattr(synth, "RENDER_CHUNK", 3)
    synth.augment(ds, records, tmp_path / "two", stats_source="printed", workers=2)
    one = sorted((tmp_path / "one" / "images").glob("tda-*.png"))
    assert len(one) == len(ds.split("train")) > 3
    for img in one:
        assert img.read_bytes() == (tmp_path / "two" / "images" / img.name).read_bytes()
    assert (tmp_path / "one" / "labels.csv").read_bytes() == (tmp_path / "two" / "labels.csv").read_bytes()


def test_synth_cli_small_counts(tmp_path):
    out = tmp_path / "ds"
    res = CliRunner().invoke(cli, ["synth", "--out", str(out), "--counts", "4,4,4,4,4", "--seed", "1"])
    assert res.exit_code == 0, res.output
    ds = load_dataset(out)
    assert len(ds) == 20 and ds.labels == ["normal", "type1", "type2", "type3", "type4"]
    truth = [json.loads(x) for x in (out / "truth.jsonl").read_text().splitlines()]
    assert {t["image"] for t in truth} == {s.name for s in ds.samples}
    assert all(set(t["printed"]) == {"N", "mu_x", "mu_y", "sd_x", "sd_y", "bins"} for t in truth)
    # Every class keeps at least one card in each split.
    for label in ds.labels:
        assert ds.class_counts("train")[label] >= 1 and ds.class_counts("test")[label] >= 1


def test_synth_refuses_non_empty_out(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    res = CliRunner().invoke(cli, ["synth", "--out", str(out), "--counts", "1,1,0,0,0"])
    assert res.exit_code == 2
    assert "not empty" in res.output and (out / "keep.txt").exists()


@pytest.mark.parametrize("counts", ["1,2", "a,b,c,d,e", "-1,1,1,1,1"])
def test_synth_bad_counts(tmp_path, counts):
    res = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path / "x"), "--counts", counts])
    assert res.exit_code == 2 and "--counts" in res.output
    assert "Traceback" not in res.output
