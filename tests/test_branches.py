"""The branches of a model (image, vlm, llm and the OCR'd numbers as `stats`) and CMAF's two kinds of
attention: the stats vector and its standardization, the branch switches from the command line to the
bundle, the report and predict's replay, and a card whose record OCR read only partly."""

import json

import numpy as np
import pytest
from PIL import ImageDraw

from asectl.domain.card import GEOMETRY, default_spec, record_from_points, render_card
from asectl.errors import ConfigError
from asectl.models.train_config import get_profile
from asectl.stages.modalities import stats_names, stats_vectors

from .conftest import FAST, make_default_latest


def test_stats_vector_marks_what_ocr_did_not_read():
    spec = default_spec()
    full = {"N": 10, "mu_x": 0.5, "mu_y": -0.25, "sd_x": 1.0, "sd_y": 2.0, "bins": [4, 3, 3, 0, 0, 0, 0, 0, 0]}
    partly = {"N": 10, "mu_y": -0.25, "sd_x": float("nan")}
    x = stats_vectors([full, partly], spec)
    names = stats_names(spec)
    assert x.shape == (2, len(names)) == (2, 5 + 2 * spec.n_bins)
    assert x[0, names.index("mu_x")] == 0.5 and x[0, names.index("bin0_share")] == pytest.approx(0.4)
    assert not np.isnan(x[0]).any()
    missing = {n for n, v in zip(names, x[1]) if np.isnan(v)}
    assert missing == {"mu_x", "sd_x", "sd_y", *(n for n in names if n.startswith("bin"))}


def test_stats_standardization_uses_training_cards_only():
    from asectl.models.pfa import train_pfa
    from asectl.models.train_config import PFAConfig

    rng = np.random.default_rng(0)
    n, train = 30, list(range(20))
    feats = {
        "image": rng.normal(size=(n, 12)),
        "vlm": rng.normal(size=(n, 8)),
        "stats": rng.normal(3.0, 2.0, size=(n, 6)).astype(np.float32),
    }
    feats["stats"][2, 1] = np.nan  # a training card with a field not read
    config = PFAConfig(epochs_per_stage=1, rank_warmup_epochs=1, batch_size=8)
    res = train_pfa(feats, config, seed=0, train_index=train)
    x = feats["stats"][train].astype(np.float64)
    np.testing.assert_allclose(res.heads.stats.mean.numpy(), np.nanmean(x, 0), rtol=1e-5)
    np.testing.assert_allclose(res.heads.stats.scale.numpy(), np.nanstd(x, 0, ddof=1), rtol=1e-4)
    # Test cards with other numbers change neither the standardization nor anything trained.
    other = {**feats, "stats": feats["stats"].copy()}
    other["stats"][20:] = 1e4
    res2 = train_pfa(other, config, seed=0, train_index=train)
    for k, v in res.stages[-1].checkpoint.items():
        assert np.array_equal(v.numpy(), res2.stages[-1].checkpoint[k].numpy()), k
    assert res.summary()["branches"] == ["image", "vlm", "stats"]
    assert "loss_stats" in res.stages[-1].curve[-1] and "loss_llm" not in res.stages[-1].curve[-1]


def test_branch_setting_is_checked():
    assert get_profile("quick", {"encoders.branches": "stats, image"}).encoders.branches == ("image", "stats")
    with pytest.raises(ConfigError, match="unknown branch audio"):
        get_profile("quick", {"encoders.branches": "image,audio"})
    with pytest.raises(ConfigError, match="at least two"):
        get_profile("quick", {"encoders.branches": "image"})
    with pytest.raises(ConfigError, match="fusion.attention"):
        get_profile("quick", {"fusion.attention": "rows"})


def partly_read_card(path, seed=5, line: int = 1):
    """A card whose record line ``line`` (1: "MEAN X") is painted over: OCR reads the rest of the record."""
    points = np.random.default_rng(seed).normal(0.0, 1.5, size=(40, 2))
    img = render_card(points, record_from_points(points))
    g = GEOMETRY
    top = g.text_top + line * g.line_step
    ImageDraw.Draw(img).rectangle([g.text_x - 2, top - 2, g.width, top + g.line_step - 4], fill="white")
    img.save(path)
    return path


def test_branch_switches_reach_bundle_report_and_replay(trained, tmp_path):
    """--branches and --attention reach the bundle, the report's provenance and predict's replay; a card
    with a partly read record still gets a prediction, with a warning."""
    import shutil

    from asectl.bundle import load_bundle
    from asectl.cache import Cache
    from asectl.stages.predict import Predictor, bundle_branches

    inv, data = trained["invoke"], trained["data"]
    reports_before = set(Cache(trained["cache"]).iter_entries("report"))
    try:
        bundles = {}
        # The quick profile's fusion (concatenation) over four branches; CMAF with token attention over two.
        for name, branches, fusion in (
            ("four", "image,vlm,llm,stats", []),
            ("two", "image,stats", ["--fusion", "cmaf", "--attention", "tokens"]),
        ):
            out = json.loads(
                inv(
                    "fuse-train", data, "--branches", branches, *fusion, "--out", tmp_path / name, "--json", *FAST
                ).stdout.splitlines()[-1]
            )
            assert out["branches"] == branches.split(",")
            assert out["variant"] == ("cmaf" if fusion else "concat") and out["attention"] == "tokens"
            bundles[name] = load_bundle(tmp_path / name)
            cfg = bundles[name].config
            names = branches.split(",")
            assert cfg["branches"] == names and cfg["profile"]["encoders"]["branches"] == names
            assert set(cfg["heads"]["dims"]) == set(branches.split(","))
            assert cfg["stats_fields"][:5] == ["N", "mu_x", "mu_y", "sd_x", "sd_y"]
        # The quick profile's stats branch carries the dot pattern's numbers, and its fold models a trees
        # member on them (bundle format 6).
        four = bundles["four"].config
        assert [f for f in four["stats_fields"] if f.startswith("dots.")][:2] == ["dots.centroid_x", "dots.centroid_y"]
        assert four["format"] == 6 and four["numbers_trees"]["weight"] == 0.5
        assert (tmp_path / "four" / "fusion-0.trees.safetensors").is_file()
        assert "fusion-0.trees.safetensors" in four["files"]
        # The standardization travels with the heads (fitted on the training cards).
        heads = bundles["four"].heads()
        assert heads.stats is not None and float(heads.stats.scale.min()) > 0
        # Chunk attention has fixed roles: it refuses the stats branch with a clear message.
        res = inv(
            "fuse-train", data, "--branches", "image,vlm,llm,stats", "--fusion", "cmaf", "--attention", "chunks", code=2
        )
        assert "--attention tokens" in res.output and "Traceback" not in res.output

        inv("report", data, "--model", tmp_path / "two", "--out", tmp_path / "report")
        report = (tmp_path / "report" / "report.md").read_text()
        assert "image, stats (stats: the OCR'd numbers" in report and "attention across modality tokens" in report

        card = partly_read_card(tmp_path / "partly.png")
        good = data / "images" / "0000.png"
        res = inv("predict", good, card, "--model", tmp_path / "four", "--json")
        recs = {r["image"]: r for r in map(json.loads, (x for x in res.stdout.splitlines() if x.startswith("{")))}
        assert set(recs) == {"0000.png", "partly.png"}
        assert "mu_x" in recs["partly.png"]["warning"] and "warning" not in recs["0000.png"]
        assert abs(sum(recs["partly.png"]["probabilities"].values()) - 1) < 1e-4
        # A model without the vlm and llm branches runs neither the describer nor the LLM, in training or on
        # a new card; the four-branch model runs both (its replay skips nothing).
        assert bundles["two"].config["replay"]["skipped_stages"] == ["describe", "reason"]
        assert "skipped_stages" not in bundles["four"].config["replay"]
        cache = Cache(trained["cache"])

        def entries():
            return {stage: len(list(cache.iter_entries(stage))) for stage in ("describe", "reason")}

        before = entries()
        new = partly_read_card(tmp_path / "new.png", seed=6)
        res = inv("predict", new, "--model", tmp_path / "two", "--json")
        assert json.loads(res.stdout.splitlines()[-1])["image"] == "new.png" and entries() == before
        # Its export carries no LLM, and predicts the same without one.
        res = inv("export", "--model", tmp_path / "two", "--out", tmp_path / "two-export", "--copy-llm", "--json")
        assert json.loads(res.stdout.splitlines()[-1])["llm"]["not_needed"] == "the model has no llm branch"
        assert not (tmp_path / "two-export" / "llm").exists()
        exported = json.loads(inv("predict", new, "--model", tmp_path / "two-export", "--json").stdout.splitlines()[-1])
        own = json.loads(inv("predict", new, "--model", tmp_path / "two", "--json").stdout.splitlines()[-1])
        assert exported["label"] == own["label"] and abs(exported["probability"] - own["probability"]) < 1e-4
        assert entries() == before
        inv("predict", new, "--model", tmp_path / "four", "--json")
        assert all(entries()[stage] > before[stage] for stage in before)
        # The replay encodes exactly the bundle's branches, and a changed stats vector changes the answer.
        from asectl.domain.dataset import Dataset, Sample
        from asectl.stages.modalities import collect_modalities, encode_modalities
        from asectl.stages.predict import class_logits

        cache = Cache(trained["cache"])
        for bundle in bundles.values():
            pred = Predictor(bundle, cache)
            mods = collect_modalities(
                Dataset([Sample(good, good.name)], None, "images", []), cache, bundle.config["replay"], remember=False
            )
            feats = encode_modalities(mods, pred.encoders(), cache, bundle_branches(bundle))
            assert sorted(feats) == sorted(bundle.config["branches"])
            shifted = {**feats, "stats": feats["stats"] + 3 * np.nanstd(feats["stats"]) + 1}
            assert not np.allclose(class_logits(bundle, feats, cache), class_logits(bundle, shifted, cache))
    finally:  # later tests continue from the shared fixture's default alignment, model and report entries
        make_default_latest(trained)
        for entry in set(Cache(trained["cache"]).iter_entries("report")) - reports_before:
            shutil.rmtree(entry)
