"""The evaluation report: files, self-contained HTML, metrics against scikit-learn, binary view, small n."""

from __future__ import annotations

import base64
import json
import re
import threading

import numpy as np
import pytest
from sklearn.metrics import f1_score

from asectl.errors import DataError
from asectl.report import (
    BINARY_LABELS,
    FILES,
    ReportInput,
    StageCurve,
    binary_labels,
    build_report,
    compute_metrics,
    format_metrics_markdown,
    pfa_stage_name,
    print_summary,
    stage_curves_from_pfa,
    tsne_all,
    tsne_perplexity,
    tsne_png,
)

LABELS = ["normal", "type1", "type2", "type3", "type4"]
PROVENANCE = {
    "ocr": "cnocr 2.3.3 (PP-OCRv6 small)",
    "descriptions": "built-in describer (not a VLM)",
    "reasoning": "SmolLM2-135M-Instruct Q4_1 GGUF",
    "alignment": "progressive, stride 0.2",
    "fusion": "cmaf",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_input(n_test: int = 30, n_embed: int = 40, seed: int = 0, **overrides) -> ReportInput:
    """Random predictions, embeddings and curves: inputs for the renderer, not results of anything."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, n_test).tolist()
    y_pred = [y if rng.random() < 0.6 else int(rng.integers(0, 5)) for y in y_true]
    probs = rng.random((n_test, 5))
    probs /= probs.sum(1, keepdims=True)
    emb_labels = rng.integers(0, 5, n_embed).tolist()
    centres = rng.normal(size=(5, 16)) * 3
    embeddings = {
        "unaligned": rng.normal(size=(n_embed, 16)),
        "PFA stage 1 (50%)": rng.normal(size=(n_embed, 16)) + centres[emb_labels] * 0.3,
        "PFA stage 2 (100%)": rng.normal(size=(n_embed, 16)) + centres[emb_labels],
    }
    fields = dict(
        label_names=LABELS,
        y_true=y_true,
        y_pred=y_pred,
        image_names=[f"cards/{i:04d}.png" for i in range(n_test)],
        probs=probs,
        embeddings=embeddings,
        embedding_labels=emb_labels,
        embedding_split=["train"] * (n_embed - n_embed // 4) + ["test"] * (n_embed // 4),
        pfa_curves=[
            StageCurve("PFA stage 1 (50%)", [3.1, 2.8, 2.5], val_loss=2.9, n_train=10),
            StageCurve("PFA stage 2 (100%)", [2.7, 2.2, 1.9], val_loss=None, n_train=20),
        ],
        fusion_curve=[{"epoch": e, "loss": 1.6 / e, "accuracy": min(1.0, 0.2 * e)} for e in range(1, 6)],
        provenance=PROVENANCE,
        model_id="bundle-3f2a",
        dataset_fingerprint="sha256:00ff",
        seeds={"split": 0, "pfa": 1, "fusion": 2},
        warnings=["image encoder randomly initialised"],
        title="Test report",
    )
    fields.update(overrides)
    return ReportInput(**fields)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data = synthetic_input()
    summary = build_report(data, tmp_path_factory.mktemp("report") / "out")
    return data, summary


def test_every_file_is_written(built):
    _, summary = built
    assert set(summary.paths) == set(FILES)
    for key, path in summary.paths.items():
        assert path.name == FILES[key]
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_MAGIC)
    # No temporary files left behind by the atomic writes.
    assert sorted(p.name for p in summary.paths["html"].parent.iterdir()) == sorted(FILES.values())


def test_html_is_self_contained(built):
    _, summary = built
    html = summary.paths["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", html, re.I)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    sources = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(sources) == 4  # confusion, binary confusion, t-SNE, curves
    embedded = set()
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        embedded.add(base64.b64decode(src.split(",", 1)[1]))
    # The embedded images are exactly the PNG files written next to the report.
    assert embedded == {summary.paths[k].read_bytes() for k in ("confusion", "confusion_binary", "tsne", "curves")}


def test_metrics_json_matches_sklearn(built):
    data, summary = built
    metrics = json.loads(summary.paths["metrics"].read_text())
    assert metrics == json.loads(json.dumps(summary.metrics))
    multi = metrics["multiclass"]
    assert multi["macro_f1"] == pytest.approx(f1_score(data.y_true, data.y_pred, average="macro"))
    # Eq. (12): the macro-F1 is the mean of the per-class F1 scores.
    assert multi["macro_f1"] == pytest.approx(np.mean([multi["per_class"][c]["f1"] for c in LABELS]))
    per_class = f1_score(data.y_true, data.y_pred, average=None, labels=range(5))
    assert [multi["per_class"][c]["f1"] for c in LABELS] == pytest.approx(per_class.tolist())
    assert sum(multi["per_class"][c]["support"] for c in LABELS) == len(data.y_true) == metrics["n_test"]
    cm = np.asarray(multi["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == len(data.y_true)
    assert np.trace(cm) / cm.sum() == pytest.approx(multi["accuracy"])
    yb_true, yb_pred = binary_labels(LABELS, data.y_true), binary_labels(LABELS, data.y_pred)
    assert metrics["binary"]["labels"] == list(BINARY_LABELS)
    assert metrics["binary"]["macro_f1"] == pytest.approx(f1_score(yb_true, yb_pred, average="macro"))
    assert len(metrics["predictions"]) == len(data.y_true)
    assert metrics["tsne"]["perplexity"] == tsne_perplexity(40) and metrics["tsne"]["random_state"] == 0
    assert metrics["curves"]["pfa"][1]["val_loss"] is None
    assert metrics["provenance"] == PROVENANCE and metrics["seeds"] == {"split": 0, "pfa": 1, "fusion": 2}


def test_provenance_and_warnings_appear_in_html_and_markdown(built):
    _, summary = built
    html = summary.paths["html"].read_text(encoding="utf-8")
    md = summary.paths["markdown"].read_text(encoding="utf-8")
    for text in (html, md):
        for part, producer in PROVENANCE.items():
            assert producer in text
        assert "image encoder randomly initialised" in text
        assert "bundle-3f2a" in text and "sha256:00ff" in text
        assert "PFA stage 2 (100%)" in text
    for name in ("confusion.png", "confusion_binary.png", "tsne.png", "curves.png"):
        assert f"]({name})" in md
    # The Markdown carries the same tables as metrics.json describes.
    assert format_metrics_markdown(summary.metrics).strip() in md


def test_binary_view_on_a_hand_made_example():
    # normal->type2: binary error; type1->type3: binary correct; normal->normal; type2->normal: error;
    # type4->type4.
    y_true = [0, 1, 0, 2, 4]
    y_pred = [2, 3, 0, 0, 4]
    assert binary_labels(LABELS, y_true) == [0, 1, 0, 1, 1]
    assert binary_labels(LABELS, y_pred) == [1, 1, 0, 0, 1]
    m = compute_metrics(LABELS, y_true, y_pred)
    assert m["multiclass"]["accuracy"] == pytest.approx(2 / 5)
    binary = m["binary"]
    assert binary["accuracy"] == pytest.approx(3 / 5)
    assert binary["confusion_matrix"] == [[1, 1], [1, 2]]
    assert binary["per_class"]["normal"]["f1"] == pytest.approx(0.5)
    assert binary["per_class"]["defective"]["f1"] == pytest.approx(2 / 3)
    assert binary["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_no_normal_class_means_no_binary_view():
    m = compute_metrics(["cat", "dog"], [0, 1, 1], [0, 1, 0])
    assert m["binary"] is None
    assert "no binary view" in format_metrics_markdown(m)


@pytest.mark.filterwarnings("error::UserWarning", "error::RuntimeWarning")
def test_six_samples_and_a_class_never_predicted(tmp_path):
    # type4 is neither true nor predicted; type3 is true once but never predicted (zero division).
    y_true = [0, 0, 1, 2, 3, 1]
    y_pred = [0, 1, 1, 2, 0, 1]
    data = synthetic_input(
        n_test=6,
        n_embed=6,
        y_true=y_true,
        y_pred=y_pred,
        probs=None,
        embedding_split=None,
        fusion_curve=[{"epoch": 1, "loss": float("nan"), "accuracy": 0.5}],
    )
    summary = build_report(data, tmp_path / "small")
    m = json.loads(summary.paths["metrics"].read_text())
    multi = m["multiclass"]
    assert multi["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert multi["macro_f1_labels"] == ["normal", "type1", "type2", "type3"]
    assert multi["per_class"]["type4"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
        "predicted": 0,
        "in_macro": False,
    }
    assert multi["per_class"]["type3"]["f1"] == 0.0 and multi["per_class"]["type3"]["in_macro"]
    assert m["curves"]["fusion"][0]["loss"] is None  # NaN is not JSON
    assert m["tsne"]["perplexity"] < 6
    assert summary.paths["tsne"].read_bytes().startswith(PNG_MAGIC)
    md = summary.paths["markdown"].read_text()
    assert "| type4 | — | — | — | 0 | 0 |" in md


def test_report_is_deterministic(tmp_path):
    data = synthetic_input(n_test=8, n_embed=12, seed=4)
    a = build_report(data, tmp_path / "a")
    b = build_report(data, tmp_path / "b")
    for key in FILES:
        assert a.paths[key].read_bytes() == b.paths[key].read_bytes(), key


def test_tsne_runs_on_threads_give_the_coordinates_of_one_run_after_another(monkeypatch):
    """A report's embeddings go through t-SNE one per core at once, to the same coordinates as in turn."""
    from asectl.report import tsne_2d

    monkeypatch.setattr("asectl.environment.usable_cores", lambda: 2)
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(40, 8)) for _ in range(3)]
    threads = []

    def tracked(x, seed):
        threads.append(threading.current_thread().name)
        return tsne_2d(x, seed)

    together = tsne_all(xs, 0, tracked)
    assert all(name.startswith("tsne") for name in threads) and len(together) == 3
    assert all(np.array_equal(a, tsne_2d(x, 0)) for a, x in zip(together, xs))


def test_tsne_with_too_few_samples_draws_a_note():
    png = tsne_png({"unaligned": np.zeros((3, 4))}, [0, 1, 2], LABELS, None, seed=0)
    assert png.startswith(PNG_MAGIC)
    assert tsne_perplexity(6) < 6 and tsne_perplexity(1000) == 30


@pytest.mark.parametrize(
    "change, message",
    [
        ({"y_pred": [0, 1]}, "predictions"),
        ({"y_true": [0, 7, 1, 1, 1, 1]}, "outside the 5 classes"),
        ({"probs": np.ones((6, 4))}, "expected (6, 5)"),
        ({"image_names": ["a"]}, "image names"),
        ({"embedding_labels": [0, 1]}, "embedding labels"),
        ({"y_true": [], "y_pred": [], "image_names": [], "probs": None}, "test split is empty"),
    ],
)
def test_bad_input_is_a_data_error(tmp_path, change, message):
    data = synthetic_input(n_test=6, n_embed=6, **change)
    with pytest.raises(DataError, match=re.escape(message)):
        build_report(data, tmp_path / "bad")
    assert not (tmp_path / "bad" / "report.html").exists()


def test_print_summary_shows_f1_and_provenance(built):
    from rich.console import Console

    _, summary = built
    console = Console(record=True, width=140, color_system=None)
    print_summary(summary, console)
    out = console.export_text()
    multi = summary.metrics["multiclass"]
    assert f"{100 * multi['macro_f1']:.2f}" in out
    assert f"{100 * summary.metrics['binary']['macro_f1']:.2f}" in out
    for c in LABELS:
        assert f"{100 * multi['per_class'][c]['f1']:.2f}" in out
    assert "built-in describer (not a VLM)" in out and "image encoder randomly initialised" in out
    assert "macro-F1" in summary.text and str(summary.paths["html"]) in summary.text


def test_report_from_real_alignment_and_fusion_runs(tmp_path):
    """End to end with the real PFA and CMAF trainers on tiny random features."""
    import torch

    from asectl.models.cmaf import predict_proba, train_fusion
    from asectl.models.pfa import train_pfa
    from asectl.models.train_config import FusionConfig, PFAConfig

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n, n_train = 20, 15
    labels = [i % 5 for i in range(n)]
    feats = {m: rng.normal(size=(n, 12)).astype(np.float32) for m in ("image", "llm", "vlm")}
    pfa = train_pfa(
        feats,
        PFAConfig(strides=(0.5, 1.0), epochs_per_stage=2, batch_size=5, proj_dim=32),
        seed=0,
        train_index=range(n_train),
    )
    curves = stage_curves_from_pfa(pfa.summary())
    assert [c.name for c in curves] == ["PFA stage 1 (50%)", "PFA stage 2 (100%)"]
    assert curves[0].val_loss is not None and curves[1].val_loss is None
    assert all(len(c.itc_loss) == 2 for c in curves)
    aligned = pfa.embeddings
    train_feats = {m: aligned[m][:n_train] for m in ("image", "llm", "vlm")}
    test_feats = {m: aligned[m][n_train:] for m in ("image", "llm", "vlm")}
    model, history = train_fusion(
        train_feats, [LABELS[y] for y in labels[:n_train]], FusionConfig(epochs=3, batch_size=5), seed=0, classes=LABELS
    )
    probs = predict_proba(model, test_feats)
    embeddings = {"unaligned": feats["image"]}
    embeddings.update({pfa_stage_name(s.index, s.fraction): s.embeddings["image"] for s in pfa.stages})
    data = ReportInput(
        label_names=LABELS,
        y_true=labels[n_train:],
        y_pred=probs.argmax(1).tolist(),
        image_names=[f"{i}.png" for i in range(n_train, n)],
        probs=probs,
        embeddings=embeddings,
        embedding_labels=labels,
        embedding_split=["train"] * n_train + ["test"] * (n - n_train),
        pfa_curves=curves,
        fusion_curve=history["epochs"],
        provenance=PROVENANCE,
    )
    summary = build_report(data, tmp_path / "e2e")
    m = summary.metrics
    assert m["tsne"]["stages"] == ["unaligned", "PFA stage 1 (50%)", "PFA stage 2 (100%)"]
    assert m["curves"]["fusion"][-1]["epoch"] == 3
    assert m["multiclass"]["macro_f1"] == pytest.approx(
        f1_score(data.y_true, data.y_pred, average="macro", zero_division=0)
    )


# --- the report for the line: decision figures against their targets, the per-card table -------------
def decided_input(**overrides) -> ReportInput:
    """Ten test cards with calibrated probabilities and the decisions and reasons of a real rule; card 0
    is a defective card the rule passes (a miss), so the miss-rate target of 1% is exceeded."""
    from asectl.models.calibration import DecisionRule, decision_stats

    rng = np.random.default_rng(1)
    y_true = [1, 0, 0, 0, 2, 3, 4, 1, 0, 2]
    probs = rng.dirichlet(np.ones(5) * 0.3, size=len(y_true))
    probs[0] = [0.9, 0.04, 0.03, 0.02, 0.01]  # a type1 card the model is sure is normal
    probs[1] = [0.55, 0.2, 0.1, 0.1, 0.05]  # a normal card below the pass threshold: review
    rule = DecisionRule(tuple(LABELS), 0.6, 0.7, 0.01, 0.05)
    explained = rule.explain(probs)
    held, y_held = rng.dirichlet(np.ones(5) * 0.3, size=40), rng.integers(0, 5, 40)  # "held-out" cards
    fields = dict(
        label_names=LABELS,
        y_true=y_true,
        y_pred=probs.argmax(1).tolist(),
        image_names=[f"cards/{i:02d}.png" for i in range(len(y_true))],
        probs=probs,
        probs_uncalibrated=probs,
        decisions=[d for d, _ in explained],
        reasons=[r for _, r in explained],
        calibration={"temperature": 1.0, "folds": 5, "n_held_out": 40, "seed": 0},
        decision_rule={**rule.to_dict(), "held_out": decision_stats(rule.decide(held), y_held, held.argmax(1), LABELS)},
    )
    fields.update(overrides)
    return ReportInput(**fields)


def test_an_exceeded_target_is_flagged_first_with_exact_intervals(tmp_path):
    from scipy.stats import beta

    summary = build_report(decided_input(), tmp_path / "r")
    figures = {f["name"]: f for f in summary.metrics["decision"]["figures"]}
    miss = figures["miss rate"]
    n_def = sum(1 for y in decided_input().y_true if y != 0)
    assert (miss["k"], miss["n"], miss["exceeded"]) == (1, n_def, True)
    # Clopper-Pearson from the beta quantiles, an independent reference for binomtest's exact interval.
    assert miss["interval"] == pytest.approx([beta.ppf(0.025, 1, n_def), beta.ppf(0.975, 2, n_def - 1)])
    assert figures["review share"]["target"] is None and not figures["review share"]["exceeded"]
    # Six defective cards cannot show a 1% miss rate even with none missed: said, not hidden.
    assert miss["too_few"] and any("too few to check the miss rate target" in w for w in summary.metrics["warnings"])
    html = summary.paths["html"].read_text()
    md = summary.paths["markdown"].read_text()
    for text in (html, md):
        assert "OVER TARGET" in text and "exceeds its target of at most 1.00 %" in text
        # The decisions open the report; ECE and t-SNE come later, under ML diagnostics.
        assert (
            text.index("Decisions on the test split")
            < text.index("Cards")
            < text.index("ML diagnostics")
            < text.index("t-SNE")
        )
    assert f"1/{n_def}" in md


def test_the_per_card_table_lists_passed_defects_first_with_the_reason(tmp_path):
    data = decided_input(thumbnails=[f"data:image/png;base64,{i}" for i in range(10)])
    summary = build_report(data, tmp_path / "r")
    preds = summary.metrics["predictions"]
    assert preds[0]["decision"] == "pass" and preds[0]["reason"] == "p(normal) 0.9000 >= pass threshold 0.6000"
    assert preds[1]["decision"] == "review" and preds[1]["reason"] == "p(normal) 0.5500 < pass threshold 0.6000"
    md = summary.paths["markdown"].read_text()
    table = md[md.index("## Cards") : md.index("## Classification")]
    rows = [ln for ln in table.splitlines() if ln.startswith("| cards/")]
    assert len(rows) == 10 and rows[0].startswith("| cards/00.png | type1 | normal | 0.9000 | pass |")
    assert "missed defect" in rows[0]
    reviews = [i for i, r in enumerate(rows) if "| review |" in r]
    assert reviews == list(range(reviews[0], reviews[0] + len(reviews)))  # the review cards together
    html = summary.paths["html"].read_text()
    assert html.count('src="data:image/png;base64,') == 10 + 5  # a thumbnail per card, and the 5 figures


def test_thumbnails_are_drawn_from_the_cards_and_keyed_by_their_content(tmp_path, small_dataset):
    """CardImages: the report's key holds the cards' content hashes (the same cards in another folder give
    the same key, a changed card another), and rendering draws one thumbnail per card from the files."""
    import shutil

    from asectl.report import CardImages, card_thumbnail, report_key_parts

    cards = [small_dataset / "images" / f"{i:04d}.png" for i in range(10)]
    moved = [shutil.copyfile(c, tmp_path / c.name) for c in cards]
    data = decided_input(thumbnails=CardImages(tuple(map(str, cards))))
    same = decided_input(thumbnails=CardImages(tuple(map(str, moved))))
    key = report_key_parts(same)
    assert report_key_parts(data) == key
    moved[3].write_bytes(cards[4].read_bytes())
    assert report_key_parts(same) != key
    html = build_report(data, tmp_path / "r").paths["html"].read_text()
    assert all(card_thumbnail(c) in html for c in cards)
