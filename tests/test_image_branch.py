"""The image branch that learns the cards (``cards-cnn``): trained in align on the training cards only,
carried in the bundle, replayed by predict; the frozen EfficientNet-Lite0 stays selectable."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from asectl.backends.encoders import image_encoder
from asectl.errors import ConfigError

from .conftest import FAST, make_default_latest

# A few epochs: the tests check where the weights come from and go, not how good they are.
CNN_OVERRIDES = {
    "encoders.image": "cards-cnn",
    "encoders.image_epochs": 2,
    "pfa.epochs_per_stage": 3,
    "fusion.epochs": 8,
}


@pytest.fixture
def default_alignment_after(trained):
    """Tests that align the shared dataset with other settings put the default alignment and model back after."""
    yield trained
    make_default_latest(trained)


def _images(folder, n):
    return sorted(str(p) for p in (folder / "images").glob("*.png"))[:n]


def test_cards_cnn_is_trained_before_use_and_deterministic(small_dataset, one_torch_thread, tmp_path):
    enc = image_encoder("cards-cnn", epochs=2, folds=2)
    assert enc.identity()["sha256"] is None and "finetuned" not in enc.identity()
    with pytest.raises(ConfigError, match="learns from the training cards"):
        enc.encode(_images(small_dataset, 1))
    paths = _images(small_dataset, 10)
    labels = ["normal", "type1"] * 5
    own = enc.fit(paths, labels, seed=3)
    assert own.shape == (10, 2) and np.allclose(np.exp(own).sum(1), 1, atol=1e-5)
    again = image_encoder("cards-cnn", epochs=2, folds=2)
    assert np.array_equal(again.fit(paths, labels, seed=3), own)
    # Cross-fitted: a training card's own feature comes from the network that did not see it, so it is
    # not what the networks' mean gives it; with one network it is.
    assert not np.allclose(enc.encode(paths), own)
    single = image_encoder("cards-cnn", epochs=2, folds=1)
    assert np.allclose(single.fit(paths, labels, seed=3), single.encode(paths), atol=1e-6)
    # The file says what network it holds (members, classes, the x/y input channels): a replay needs no
    # other record of it.
    from asectl.backends.encoders import save_module_state

    coords = image_encoder("cards-cnn", epochs=1, folds=2, coords=True)
    coords.fit(paths, labels, seed=0)
    fresh = image_encoder("cards-cnn")
    fresh.load_finetuned(save_module_state(coords.module, tmp_path / "coords.safetensors"))
    assert fresh.identity()["training"]["coords"] and np.array_equal(fresh.encode(paths), coords.encode(paths))
    with pytest.raises(ConfigError, match="too few"):
        image_encoder("cards-cnn", folds=6).fit(paths, labels, seed=0)
    with pytest.raises(ConfigError, match="not cards-cnn weights"):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a weights file")
        image_encoder("cards-cnn").load_finetuned(bad)


def test_cards_cnn_folds_train_in_worker_processes_to_the_same_bits(small_dataset, one_torch_thread, monkeypatch):
    """The fold networks of a large enough training run train at once in worker processes; the weights,
    the training cards' own features and every card's feature are the bits they are one after another
    here (each network's dropout draws from its own process's seeded generator)."""
    import asectl.backends.encoders as encoders

    paths = _images(small_dataset, 9)
    labels = ["normal", "type1", "type2"] * 3
    from asectl.workers import WorkerPool

    monkeypatch.setattr("asectl.environment.usable_cores", lambda: 2)
    pools, run = [], WorkerPool.run
    monkeypatch.setattr(
        WorkerPool, "run", lambda self, fn, jobs, *a: pools.append(len(jobs)) or run(self, fn, jobs, *a)
    )
    runs = []
    for threshold in (10**9, 0):  # in this process, then in three workers
        monkeypatch.setattr(encoders, "PARALLEL_MIN_CARD_EPOCHS", threshold)
        enc = image_encoder("cards-cnn", epochs=2, folds=3)
        own = enc.fit(paths, labels, seed=4)
        runs.append((own, enc.encode(paths), [t.detach().clone() for t in enc.module.state_dict().values()]))
    (own1, z1, w1), (own2, z2, w2) = runs
    assert np.array_equal(own1, own2) and np.array_equal(z1, z2)
    assert len(w1) == len(w2) and all(a.equal(b) for a, b in zip(w1, w2))
    assert pools == [3]  # the second run did train in workers, one per fold network


def _altered_test_split(data, out):
    """A copy of ``data`` whose test cards carry shuffled labels and different pixels."""
    shutil.copytree(data, out)
    rows = list(csv.DictReader((out / "labels.csv").open()))
    test = [r for r in rows if r["split"] == "test"]
    labels = [r["label"] for r in test]
    for r, label in zip(test, labels[1:] + labels[:1]):
        r["label"] = label if label != r["label"] else ("type4" if label == "normal" else "normal")
    with (out / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    from asectl.backends.encoders import range_box

    square = range_box()  # the plotted range the image encoder reads, wherever the card layout puts it
    for r in test:  # the dot range turned a quarter: other pixels, while the printed record stays upright
        img = out / r["image"]
        card = Image.open(img).convert("RGB")
        before = card.crop(square)
        card.paste(before.rotate(90), square)
        assert card.crop(square).tobytes() != before.tobytes()
        card.save(img)
    return [r["image"] for r in test]


def test_image_branch_never_trains_on_test_cards(default_alignment_after, tmp_path):
    trained = default_alignment_after
    """Shuffled test labels and altered test images give the byte-identical trained image encoder."""
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.align import run_align
    from asectl.stages.modalities import ModalitySettings

    cache = Cache(trained["cache"])
    original = load_dataset(trained["data"])
    settings = ModalitySettings.recall(cache, original)
    _altered_test_split(trained["data"], tmp_path / "data")
    altered = load_dataset(tmp_path / "data")
    assert [s.label for s in altered.split("test")] != [s.label for s in original.split("test")]
    weights = []
    for data in (original, altered):
        cache.clear("image-encoder")  # train again, not read the other run's weights
        # One alignment stage: the image encoder is trained before any alignment, which the test does not read.
        out = run_align(data, cache, overrides={**CNN_OVERRIDES, "pfa.strides": [1.0]}, settings=settings)
        assert not out.from_cache
        train_names = {s.name for s in data.split("train")}
        assert out.summary["image_training"]["n_train"] == len(train_names)
        weights.append((out.path / "encoders" / "image.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_trained_image_encoder_travels_in_the_bundle_and_predict_replays_it(trained, tmp_path):
    """The shared model was trained with the quick profile's default image encoder, cards-cnn."""
    from asectl.bundle import load_bundle
    from asectl.cache import Cache, sha256_file
    from asectl.stages.align import AlignOutcome
    from asectl.stages.predict import bundle_encoders

    inv, data = trained["invoke"], trained["data"]
    bundle = load_bundle(trained["root"] / "bundle")
    weights = bundle.path / "encoders" / "image.safetensors"
    assert weights.is_file() and "encoders/image.safetensors" in bundle.config["files"]
    assert sorted(p.name for p in (bundle.path / "encoders").iterdir()) == ["image.safetensors"]
    ident = bundle.config["encoders"][0]
    assert ident["encoder"] == "cards-cnn" and ident["finetuned"]["sha256"] == sha256_file(weights)
    # predict's encoder is the trained one: a test card's image feature equals the one align computed.
    entry = Cache(trained["cache"]).get("align", bundle.config["training"]["align_key"])
    align = AlignOutcome(entry.path, entry.path, entry.read_json("summary.json"), True)
    assert align.summary["image_training"]["n_train"] == len(align.train_index())
    i = align.splits.index("test")
    replayed = bundle_encoders(bundle)[0]
    assert replayed.identity() == ident
    card = data / align.names[i]
    assert np.allclose(replayed.encode([str(card)])[0], align.raw_features()["image"][i], atol=1e-6)
    res = inv("predict", card, "--model", bundle.path, "--json")
    rec = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("{")))
    assert abs(sum(rec["probabilities"].values()) - 1) < 1e-4
    inv("report", data, "--model", bundle.path, "--out", tmp_path / "report")
    assert "cards-cnn" in (tmp_path / "report" / "report.md").read_text()


def test_frozen_efficientnet_lite0_stays_selectable(default_alignment_after):
    trained = default_alignment_after
    inv, data = trained["invoke"], trained["data"]
    res = inv("align", data, "--stride", "0.2", "--json", *FAST, "--set", "encoders.image=efficientnet-lite0")
    out = json.loads(res.stdout.splitlines()[-1])
    from asectl.cache import Cache

    entry = Cache(trained["cache"]).get("align", out["key"])
    summary = entry.read_json("summary.json")
    assert summary["encoders"][0]["encoder"] == "efficientnet-lite0" and summary["image_training"] is None
    assert not (entry.path / "encoders").exists()
