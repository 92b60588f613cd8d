"""Fusion trained end to end (``fuse-train --heads end-to-end``, asectl/models/adapters.py): the fold models
train the PFA projection heads too, through two zero-initialised adapters on the text branches. Frozen and
end-to-end give different models; at the start the end-to-end model is the frozen one; the heads move only
end to end; predict, the report's provenance and an export replay such a bundle."""

import json

import numpy as np
import pytest

from asectl.errors import ConfigError, DataError
from asectl.models.train_config import END_TO_END_FIELDS, TREES_FIELDS, FusionConfig, PFAConfig, get_profile

from .conftest import FAST, make_default_latest

LABELS = ["normal", "type1", "type2"]


@pytest.fixture(scope="module")
def aligned_toy():
    """Encoder features of four branches (different widths), 60 cards of three classes, and PFA heads
    trained on them for a moment."""
    import torch

    from asectl.models.pfa import align_features, train_pfa

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    feats = {
        "image": rng.normal(size=(60, 12)) + y[:, None],
        "vlm": rng.normal(size=(60, 8)) + y[:, None],
        "llm": rng.normal(size=(60, 10)) - y[:, None],
        "stats": rng.normal(size=(60, 5)),
    }
    feats = {m: a.astype(np.float32) for m, a in feats.items()}
    heads = train_pfa(feats, PFAConfig(epochs_per_stage=1, rank_warmup_epochs=1, batch_size=16), seed=0).heads
    return {"feats": feats, "heads": heads, "aligned": align_features(heads, feats), "labels": [LABELS[i] for i in y]}


def head_weights(heads):
    return {k: v.detach().clone() for k, v in heads.state_dict().items()}


def test_adapters_start_at_zero_so_end_to_end_starts_as_the_frozen_model(aligned_toy):
    from asectl.models.adapters import AdaptedHeads
    from asectl.models.cmaf import predict_logits, train_fusion
    from asectl.models.pfa import align_features

    toy = aligned_toy
    adapted = AdaptedHeads(toy["heads"], adapter_dim=8)
    assert list(adapted.adapters) == ["vlm", "llm"]  # the paper's two: one per language model
    for m, a in align_features(adapted, toy["feats"]).items():  # equal up to the re-normalisation's rounding
        np.testing.assert_allclose(a, toy["aligned"][m], atol=1e-6)
    # One epoch at a vanishing rate: the fold model and its heads are where they started, and the end-to-end
    # model gives the frozen model's logits (same fusion initialisation, adapters at zero).
    still = dict(epochs=1, attention="tokens", lr=1e-12, dropout=0.0)
    frozen, _ = train_fusion(toy["aligned"], toy["labels"], FusionConfig(**still), seed=3)
    e2e, history = train_fusion(
        toy["feats"],
        toy["labels"],
        FusionConfig(**still, projections="end-to-end", projections_lr=1e-12),
        seed=3,
        heads=toy["heads"],
    )
    assert frozen.projections is None and e2e.projections is not None and history["projections"] == "end-to-end"
    np.testing.assert_allclose(predict_logits(e2e, toy["feats"]), predict_logits(frozen, toy["aligned"]), atol=1e-5)


def test_heads_move_only_end_to_end(aligned_toy, tmp_path):
    from asectl.models.cmaf import fold_logits, load_fusion, predict_logits, save_fusion, train_fusion

    toy = aligned_toy
    before = head_weights(toy["heads"])
    cfg = dict(epochs=4, attention="tokens", lr=3e-3, dropout=0.0)
    frozen, _ = train_fusion(toy["aligned"], toy["labels"], FusionConfig(**cfg), seed=0)
    e2e, _ = train_fusion(
        toy["feats"], toy["labels"], FusionConfig(**cfg, projections="end-to-end"), seed=0, heads=toy["heads"]
    )
    # The heads given are left alone (each fold model trains a copy); frozen training has none of its own.
    assert all(torch_equal(v, before[k]) for k, v in head_weights(toy["heads"]).items())
    assert frozen.projections is None
    tuned = head_weights(e2e.projections.alignment)
    moved = [k for k in before if k != "log_tau" and not torch_equal(tuned[k], before[k])]
    assert "proj.vlm.weight" in moved and "proj.image.weight" in moved and "stats.net.0.weight" in moved
    assert torch_equal(tuned["log_tau"], before["log_tau"])  # no contrastive loss: tau stays
    assert torch_equal(tuned["stats.mean"], before["stats.mean"])  # the standardization stays align's
    assert all(float(e2e.projections.adapters[m].up.weight.detach().abs().max()) > 0 for m in ("vlm", "llm"))
    # Different models: different logits on the same cards.
    a, b = predict_logits(frozen, toy["aligned"]), predict_logits(e2e, toy["feats"])
    assert np.abs(a - b).max() > 1e-3
    # The fold model's file carries its heads and adapters; fold_logits mixes both kinds.
    save_fusion(e2e, tmp_path / "fusion-0.safetensors")
    again = load_fusion(tmp_path / "fusion-0.safetensors")
    np.testing.assert_array_equal(predict_logits(again, toy["feats"]), b)
    np.testing.assert_allclose(fold_logits([frozen, again], toy["feats"], toy["heads"]), np.stack([a, b]), atol=1e-6)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_end_to_end_reads_encoder_features_and_needs_the_heads(aligned_toy):
    from asectl.models.cmaf import predict_logits, train_fusion

    toy = aligned_toy
    cfg = FusionConfig(epochs=1, attention="tokens", projections="end-to-end")
    with pytest.raises(ConfigError, match="give them"):
        train_fusion(toy["feats"], toy["labels"], cfg)
    with pytest.raises(DataError, match="encoder features"):
        train_fusion(toy["aligned"], toy["labels"], cfg, heads=toy["heads"])
    model, _ = train_fusion(toy["feats"], toy["labels"], cfg, heads=toy["heads"])
    with pytest.raises(DataError, match="projection heads read"):
        predict_logits(model, toy["aligned"])
    with pytest.raises(ConfigError, match="fusion.projections"):
        get_profile("quick", {"fusion.projections": "thawed"})


def test_frozen_profile_keeps_its_settings_and_end_to_end_adds_its_own():
    """A frozen profile's dict (part of align's and fuse-train's cache keys, and the bundle) has no
    end-to-end settings, so frozen models keep the keys they had; end to end names them all."""
    # The same classifier on both sides: the quick profile's "auto" is the MLP with end-to-end heads.
    frozen = get_profile("quick", {"fusion.classifier": "mlp"}).to_dict()["fusion"]
    e2e = get_profile("quick", {"fusion.projections": "end-to-end"}).to_dict()["fusion"]
    assert not set(END_TO_END_FIELDS) & set(frozen)
    assert {k: e2e[k] for k in END_TO_END_FIELDS} == {
        "projections": "end-to-end",
        "projections_lr": 3e-4,
        "adapter_dim": 32,
    }
    # The trees member needs frozen heads: the frozen quick profile names it, end to end does not.
    assert frozen["numbers_trees"] is True and not set(TREES_FIELDS) & set(e2e)
    assert {k: v for k, v in e2e.items() if k not in END_TO_END_FIELDS} == {
        k: v for k, v in frozen.items() if k not in TREES_FIELDS
    }


@pytest.fixture(scope="module")
def e2e_bundle(trained, tmp_path_factory):
    """The shared fixture's cards trained end to end (bundle copied out); afterwards the frozen model is
    the dataset's latest again (a cache hit: its key is unchanged)."""
    out = tmp_path_factory.mktemp("e2e") / "bundle"
    inv = trained["invoke"]
    make_default_latest(trained)  # trained end to end on the fixture's own alignment
    res = json.loads(
        inv("fuse-train", trained["data"], "--heads", "end-to-end", "--out", out, "--json", *FAST).stdout.splitlines()[
            -1
        ]
    )
    yield {"path": out, "summary": res}
    again = json.loads(inv("fuse-train", trained["data"], "--json", *FAST).stdout.splitlines()[-1])
    assert again["from_cache"] and again["model"] == trained["fuse"]["model"] and again["heads"] == "frozen"


def test_end_to_end_bundle_records_the_option_and_differs_from_frozen(trained, e2e_bundle):
    from asectl.bundle import END_TO_END_FORMAT, TREES_FORMAT, load_bundle
    from asectl.stages.report import provenance_lines

    summary = e2e_bundle["summary"]
    assert summary["heads"] == "end-to-end" and trained["fuse"]["heads"] == "frozen"
    assert summary["model"] != trained["fuse"]["model"]
    bundle, frozen = load_bundle(e2e_bundle["path"]), load_bundle(trained["root"] / "bundle")
    cfg = bundle.config
    # the frozen quick default has the trees member (format 6); end to end has none
    assert cfg["format"] == END_TO_END_FORMAT and frozen.config["format"] == TREES_FORMAT
    assert "numbers_trees" not in cfg and not any(getattr(m, "trees", None) for m in bundle.fusion_members())
    assert cfg["profile"]["fusion"]["projections"] == "end-to-end"
    assert "projections" not in frozen.config and "projections" not in frozen.config["profile"]["fusion"]
    assert cfg["projections"]["training"] == "end-to-end" and cfg["projections"]["adapters"] == ["vlm", "llm"]
    members, frozen_members = bundle.fusion_members(), frozen.fusion_members()
    assert all(m.projections is not None for m in members) and all(m.projections is None for m in frozen_members)
    # Each fold model fine-tuned its own copy of the alignment's heads: they differ from them and each other.
    pfa = head_weights(bundle.heads())
    tuned = [head_weights(m.projections.alignment) for m in members]
    assert not torch_equal(tuned[0]["proj.vlm.weight"], pfa["proj.vlm.weight"])
    assert not torch_equal(tuned[0]["proj.vlm.weight"], tuned[1]["proj.vlm.weight"])
    prov, _ = provenance_lines(bundle)
    assert prov["projection heads"].startswith("trained end to end") and "vlm, llm" in prov["projection heads"]
    assert provenance_lines(frozen)[0]["projection heads"].startswith("frozen")


def test_predict_replays_the_end_to_end_bundle(trained, e2e_bundle):
    """Predict's replay of the test cards gives the probabilities of the fold models applied in-process to
    the encoder features align computed for those cards; on the training cards, each card's own fold model
    over align's features gives the held-out probabilities fuse-train chose the decision rule on."""
    from asectl.bundle import load_bundle
    from asectl.cache import Cache
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.models.calibration import mean_softmax, softmax
    from asectl.models.cmaf import fold_logits, predict_logits
    from asectl.stages.align import AlignOutcome
    from asectl.stages.predict import Predictor

    cache = Cache(trained["cache"])
    bundle = load_bundle(e2e_bundle["path"])
    key = bundle.config["training"]["align_key"]
    entry = cache.get("align", key)
    align = AlignOutcome(key, entry.path, entry.read_json("summary.json"), True)
    raw, names = align.raw_features(), align.names
    members = bundle.fusion_members()
    ds = load_dataset(trained["data"])
    test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
    predictor = Predictor(bundle, cache)
    preds = predictor.classify(test)
    rows = [names.index(s.name) for s in preds.samples]
    assert len(rows) == len(test.samples)
    expected = mean_softmax(
        fold_logits(members, {m: raw[m][rows] for m in bundle.config["branches"]}), bundle.temperature
    )
    np.testing.assert_allclose(predictor.probabilities(preds.logits), expected, atol=1e-5)
    held, y = bundle.held_out_scores()
    folds = bundle.config["calibration"]["held_out"]
    train = [i for i in align.train_index() if names[i] in folds]
    replayed = np.stack(
        [
            softmax(predict_logits(members[folds[names[i]]], {m: raw[m][[i]] for m in raw}), bundle.temperature)[0]
            for i in train
        ]
    )
    np.testing.assert_allclose(replayed, held, atol=1e-5)


def test_export_of_an_end_to_end_bundle_round_trips(trained, e2e_bundle, tmp_path):
    from asectl.bundle import load_bundle
    from asectl.cache import Cache
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.export import END_TO_END_EXPORT_FORMAT, load_export
    from asectl.stages.predict import Predictor

    out = tmp_path / "line-model"
    summary = json.loads(
        trained["invoke"]("export", "--model", e2e_bundle["path"], "--out", out, "--json").stdout.splitlines()[-1]
    )
    assert summary["parity"]["probabilities"] <= 1e-4
    exported = load_export(out)
    assert exported.manifest["format"] == END_TO_END_EXPORT_FORMAT and exported.graphs["heads"] is None
    assert not (out / "heads.onnx").exists()  # every fold graph carries its own heads and adapters
    cache = Cache(trained["cache"])
    ds = load_dataset(trained["data"])
    test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
    by_bundle, by_export = Predictor(load_bundle(e2e_bundle["path"]), cache), Predictor(exported, cache)
    a, b = by_bundle.classify(test), by_export.classify(test)
    assert [s.name for s in a.samples] == [s.name for s in b.samples]
    assert np.abs(by_bundle.probabilities(a.logits) - by_export.probabilities(b.logits)).max() <= 1e-4


def test_end_to_end_refuses_encoders_fine_tuned_in_align(trained):
    res = trained["invoke"](
        "fuse-train", trained["data"], "--heads", "end-to-end", "--set", "encoders.finetune=true", code=2
    )
    assert "--heads frozen" in res.output and "Traceback" not in res.output
