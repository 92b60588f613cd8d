"""Cross-modality attention fusion: Eq. (6)-(8), variants, training, label mapping, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asectl.errors import ConfigError, DataError
from asectl.models.cmaf import (
    FusionModel,
    fusion_weights,
    load_fusion,
    map_labels,
    predict_proba,
    save_fusion,
    train_fusion,
)
from asectl.models.train_config import FusionConfig

CLASSES = ["normal", "type1", "type2", "type3", "type4"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def separable(n: int = 150, seed: int = 0, dim: int = 256) -> tuple[dict[str, np.ndarray], list[str]]:
    """Unit-norm aligned-like features; each modality carries part of the class signal, with noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    centres = rng.normal(size=(3, 5, dim))
    feats = {}
    for m, name in enumerate(("vlm", "llm", "image")):
        x = centres[m][y] + 3.0 * rng.normal(size=(n, dim))
        feats[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return feats, [CLASSES[i] for i in y]


def rows(feats: dict[str, np.ndarray], sl) -> dict[str, np.ndarray]:
    return {k: v[sl] for k, v in feats.items()}


def test_cmaf_weights_are_sigmoid_gates_and_eq8_holds():
    torch.manual_seed(0)
    model = FusionModel(256, 5, "cmaf", tokens=8, heads=4, reduced_dim=16)
    q, k, v = (torch.nn.functional.normalize(torch.randn(6, 256), dim=1) for _ in range(3))
    w = model.fusion_weights(q, k, v)
    assert w.shape == (6, 8, 3)
    assert (w > 0).all() and (w < 1).all()
    # Eq. (8): Z = W1*Q + W2*K + W3*V, each token's weight broadcast over its 32 channels.
    s = model.input_scale
    manual = w[..., 0:1] * q.view(6, 8, 32) + w[..., 1:2] * k.view(6, 8, 32) + w[..., 2:3] * v.view(6, 8, 32)
    assert torch.allclose(model.fuse(q, k, v), manual.reshape(6, 256) * s, atol=1e-5)
    assert model(q, k, v).shape == (6, 5)
    # Attention is over tokens: changing one token of K changes the weights of other tokens too.
    k2 = k.clone()
    k2[:, :32] += 1.0
    w2 = model.fusion_weights(q, k2, v)
    assert not torch.allclose(w2[:, 5], w[:, 5])


def test_variants_shapes_and_nosigmoid_is_the_raw_projection():
    q, k, v = (torch.randn(4, 256) for _ in range(3))
    torch.manual_seed(1)
    gated = FusionModel(256, 2, "cmaf")
    torch.manual_seed(1)
    raw = FusionModel(256, 2, "cmaf-nosigmoid")
    torch.manual_seed(1)
    concat = FusionModel(256, 2, "concat")
    assert torch.allclose(torch.sigmoid(raw.fusion_weights(q, k, v)), gated.fusion_weights(q, k, v), atol=1e-6)
    for m in (gated, raw, concat):
        assert m(q, k, v).shape == (4, 2)
    assert concat.fuse(q, k, v).shape == (4, 768)
    assert concat.mlp[0].in_features == 768 and gated.mlp[0].in_features == 256
    with pytest.raises(ConfigError):
        concat.fusion_weights(q, k, v)
    with pytest.raises(ConfigError):
        FusionModel(256, 2, "cmaf", tokens=6)
    with pytest.raises(ConfigError):
        FusionModel(256, 2, "average")


@pytest.mark.parametrize(
    "variant,attention", [("cmaf", "chunks"), ("cmaf-nosigmoid", "chunks"), ("concat", "chunks"), ("cmaf", "tokens")]
)
def test_fusion_training_separates_synthetic_classes(variant, attention):
    feats, labels = separable(200)
    cfg = FusionConfig(variant=variant, epochs=15, lr=3e-3, batch_size=10, attention=attention)
    model, history = train_fusion(rows(feats, slice(0, 150)), labels[:150], cfg, seed=0)
    assert history["classes"] == CLASSES and len(history["epochs"]) == 15
    assert history["epochs"][-1]["loss"] < history["epochs"][0]["loss"]
    proba = predict_proba(model, rows(feats, slice(150, 200)))
    assert proba.shape == (50, 5)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    pred = [model.bundle.classes[i] for i in proba.argmax(1)]
    accuracy = np.mean([p == t for p, t in zip(pred, labels[150:])])
    assert accuracy >= 0.9, accuracy
    if variant == "cmaf":
        w = fusion_weights(model, rows(feats, slice(150, 200)))
        shape = (50, 8, 3) if attention == "chunks" else (50, 3)
        assert w.shape == shape and (w > 0).all() and (w < 1).all()


def test_token_attention_runs_across_modalities_with_one_gate_each():
    torch.manual_seed(0)
    inputs = ("vlm", "llm", "image", "stats")
    model = FusionModel(256, 5, "cmaf", attention="tokens", inputs=inputs)
    with torch.no_grad():
        model.branch_embedding.normal_()
    xs = [torch.nn.functional.normalize(torch.randn(6, 256), dim=1) for _ in inputs]
    w = model.fusion_weights(*xs)
    assert w.shape == (6, 4) and (w > 0).all() and (w < 1).all()
    # Eq. (8) for M modalities: Z = sum_m W_m X_m.
    manual = sum(w[:, m : m + 1] * xs[m] for m in range(4)) * model.input_scale
    assert torch.allclose(model.fuse(*xs), manual, atol=1e-5)
    # Attention crosses modalities: changing the stats token changes the image's gate.
    changed = model.fusion_weights(*xs[:3], xs[3] + 1.0)
    assert not torch.allclose(changed[:, 2], w[:, 2])
    # Chunk attention has fixed roles and refuses other inputs; token attention takes any two or more.
    with pytest.raises(ConfigError, match="attention tokens"):
        FusionModel(256, 5, "cmaf", attention="chunks", inputs=inputs)
    feats, labels = separable(60)
    feats["stats"] = feats["image"][::-1].copy()
    model, history = train_fusion(
        {m: feats[m] for m in ("image", "stats")}, labels, FusionConfig(attention="tokens", epochs=3), seed=0
    )
    assert model.inputs == ("image", "stats") and history["inputs"] == ["image", "stats"]


def test_fusion_is_deterministic_and_records_validation():
    feats, labels = separable(60)
    cfg = FusionConfig(epochs=3)
    kw = dict(val_features=rows(feats, slice(40, 60)), val_labels=labels[40:])
    a, ha = train_fusion(rows(feats, slice(0, 40)), labels[:40], cfg, seed=5, **kw)
    b, hb = train_fusion(rows(feats, slice(0, 40)), labels[:40], cfg, seed=5, **kw)
    assert ha["epochs"] == hb["epochs"] and "val_accuracy" in ha["epochs"][-1]
    np.testing.assert_array_equal(predict_proba(a, feats), predict_proba(b, feats))
    # The step decay: lr x0.75 every 15 epochs.
    _, h = train_fusion(rows(feats, slice(0, 40)), labels[:40], FusionConfig(epochs=16), seed=0)
    assert h["epochs"][14]["lr"] == pytest.approx(1e-2) and h["epochs"][15]["lr"] == pytest.approx(7.5e-3)


def test_binary_task_maps_defect_types_to_defective():
    idx, classes = map_labels(["normal", "type3", "type1", "normal"], "binary")
    assert classes == ["normal", "defective"] and idx.tolist() == [0, 1, 1, 0]
    idx, classes = map_labels(["type2", "normal"])
    assert classes == ["normal", "type2"] and idx.tolist() == [1, 0]
    idx, classes = map_labels([0, 3], classes=CLASSES)
    assert idx.tolist() == [0, 3] and classes == CLASSES
    with pytest.raises(DataError):
        map_labels(["type9"], classes=CLASSES)
    feats, labels = separable(80)
    model, history = train_fusion(feats, labels, FusionConfig(task="binary", epochs=8), seed=0)
    assert model.bundle.classes == ["normal", "defective"] and model.bundle.task == "binary"
    assert predict_proba(model, feats).shape == (80, 2)


def test_fusion_model_round_trips_through_safetensors(tmp_path):
    feats, labels = separable(40)
    model, _ = train_fusion(feats, labels, FusionConfig(epochs=2, variant="cmaf-nosigmoid"), seed=0)
    path = save_fusion(model, tmp_path / "fusion.safetensors")
    assert path.read_bytes()[8:9] == b"{"
    again = load_fusion(path)
    assert again.variant == "cmaf-nosigmoid" and again.bundle.classes == model.bundle.classes
    np.testing.assert_allclose(predict_proba(again, feats), predict_proba(model, feats), atol=1e-6)
    with pytest.raises(ConfigError):
        load_fusion(tmp_path / "missing.safetensors")


def test_fusion_input_errors():
    feats, labels = separable(10)
    with pytest.raises(DataError, match="missing"):
        train_fusion({"vlm": feats["vlm"], "llm": feats["llm"]}, labels)
    with pytest.raises(DataError):
        train_fusion(feats, labels[:5])
    with pytest.raises(DataError, match="two classes"):
        train_fusion(feats, ["normal"] * 10)
    with pytest.raises(ConfigError):
        train_fusion(feats, labels, FusionConfig(variant="sum"))


def test_logistic_classifier_is_scikit_learns_regression_folded_into_the_linear_layer(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    feats, labels = separable(120, seed=3)
    config = FusionConfig(variant="concat", classifier="logistic", logistic_c=0.05)
    model, history = train_fusion(rows(feats, slice(0, 90)), labels[:90], config, seed=0, classes=CLASSES)
    z = np.hstack([feats[m] for m in ("vlm", "llm", "image")]).astype(np.float64) * 16.0  # concat x sqrt(256)
    scaler = StandardScaler().fit(z[:90])
    ref = LogisticRegression(C=0.05, max_iter=5000).fit(scaler.transform(z[:90]), map_labels(labels[:90])[0])
    expected = ref.predict_proba(scaler.transform(z[90:]))
    got = predict_proba(model, rows(feats, slice(90, None)))
    assert np.abs(got - expected).max() < 1e-4
    assert history["classifier"]["kind"] == "logistic" and len(history["epochs"]) == 1
    save_fusion(model, tmp_path / "f.safetensors")  # predict and export load it like any fusion model
    again = predict_proba(load_fusion(tmp_path / "f.safetensors"), rows(feats, slice(90, None)))
    assert np.array_equal(again, got)
    binary, _ = train_fusion(
        rows(feats, slice(0, 90)),
        labels[:90],
        FusionConfig(variant="concat", classifier="logistic", task="binary"),
        seed=0,
    )
    assert predict_proba(binary, rows(feats, slice(90, None))).shape == (30, 2)


def test_logistic_classifier_needs_concat_and_frozen_heads_and_keeps_mlp_keys():
    from asectl.models.train_config import get_profile

    for bad in ({"variant": "cmaf"}, {"projections": "end-to-end"}):
        with pytest.raises(ConfigError, match="fusion.classifier logistic"):
            FusionConfig(**{"variant": "concat", "classifier": "logistic", **bad}).validate(256)
    mlp = get_profile("quick", {"fusion.classifier": "mlp"}).to_dict()["fusion"]
    assert "classifier" not in mlp and "logistic_c" not in mlp  # models trained before the option keep their keys
    logistic = get_profile("quick", {"fusion.classifier": "logistic"}).to_dict()["fusion"]
    assert logistic["classifier"] == "logistic" and logistic["logistic_c"] > 0
    assert get_profile("quick").to_dict()["fusion"] == logistic  # auto: logistic for concat, frozen heads
    for over in ({"fusion.variant": "cmaf"}, {"fusion.projections": "end-to-end"}):
        assert get_profile("quick", over).fusion.resolved_classifier() == "mlp"
        assert "classifier" not in get_profile("quick", over).to_dict()["fusion"]
    assert get_profile("paper", {"fusion.variant": "concat"}).fusion.resolved_classifier() == "mlp"
