"""Rendering: the tables shared by Markdown, HTML and the terminal, report.md, and report.html from the
jinja template ``asectl/report_template.html``."""

from __future__ import annotations

import base64
from importlib import resources
from typing import Any, Mapping, Sequence

from asectl.domain.dataset import NORMAL
from asectl.models.calibration import threshold_text
from asectl.report._metrics import INTERVAL_CONFIDENCE, exact_upper
from asectl.report._records import CardImages, ReportInput

# ---------------------------------------------------------------------------------------------------
# Tables (Markdown and the rows shared with HTML and the terminal)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _per_class_f1(view: Mapping[str, Any], name: str) -> float | None:
    row = view["per_class"][name]
    return row["f1"] if row["in_macro"] else None


def headline_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The paper's Table 2 layout: binary macro-F1 and per-class F1, then multi-class (percent)."""
    header, row = [], []
    binary = metrics.get("binary")
    if binary:
        header += ["macro-F1 (binary)"] + [f"F1 {c}" for c in binary["labels"]]
        row += [pct(binary["macro_f1"])] + [pct(_per_class_f1(binary, c)) for c in binary["labels"]]
    multi = metrics["multiclass"]
    header += ["macro-F1 (multi-class)"] + [f"F1 {c}" for c in multi["labels"]]
    row += [pct(multi["macro_f1"])] + [pct(_per_class_f1(multi, c)) for c in multi["labels"]]
    return header, row


def per_class_rows(view: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name in view["labels"]:
        r = view["per_class"][name]
        absent = not r["in_macro"]
        rows.append(
            [
                name,
                "—" if absent else pct(r["precision"]),
                "—" if absent else pct(r["recall"]),
                "—" if absent else pct(r["f1"]),
                str(r["support"]),
                str(r["predicted"]),
            ]
        )
    return rows


PER_CLASS_HEADER = ["class", "precision", "recall", "F1", "support", "predicted"]


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _confusion_rows(view: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["true \\ predicted"] + list(view["labels"])
    rows = [[name] + list(counts) for name, counts in zip(view["labels"], view["confusion_matrix"])]
    return header, rows


def format_metrics_markdown(metrics: Mapping[str, Any], detail: bool = True) -> str:
    """Markdown for a ``compute_metrics`` result: the Table 2 style summary row (percent), and with
    ``detail`` the per-class precision/recall/F1 tables and the confusion matrices."""
    header, row = headline_rows(metrics)
    multi = metrics["multiclass"]
    parts = [
        _md_table(header, [row]),
        "",
        f"Accuracy {pct(multi['accuracy'])} % on {metrics['n_test']} test samples; multi-class macro-F1 "
        f"over {len(multi['macro_f1_labels'])} classes ({', '.join(multi['macro_f1_labels'])}).",
    ]
    if not detail:
        return "\n".join(parts) + "\n"
    views = [("Multi-class", multi)]
    if metrics.get("binary"):
        views.append(("Binary (normal vs defective)", metrics["binary"]))
    for title, view in views:
        parts += [
            "",
            f"### {title}",
            "",
            _md_table(PER_CLASS_HEADER, per_class_rows(view)),
            "",
            f"macro-F1 {pct(view['macro_f1'])}, weighted F1 {pct(view['weighted_f1'])}, "
            f"accuracy {pct(view['accuracy'])} (percent).",
            "",
            "Confusion matrix (rows: true class, columns: predicted class):",
            "",
            _md_table(*_confusion_rows(view)),
        ]
    if not metrics.get("binary"):
        parts += ["", "No class is called `normal`, so there is no binary view."]
    return "\n".join(parts) + "\n"


def figure_warnings(figures: Sequence[Mapping[str, Any]]) -> list[str]:
    """A sentence for each target the test split exceeds, and for each it is too small to check."""
    out = []
    for f in figures:
        if f["exceeded"]:
            out.append(
                f"test {f['name']} {rate(f['value'], f['k'], f['n'])} exceeds its target of at most {rate(f['target'])}"
            )
        if f["too_few"]:
            out.append(
                f"{f['n']} {f['unit']} on the test split are too few to check the {f['name']} target of "
                f"{rate(f['target'])}: with none wrong, the exact {INTERVAL_CONFIDENCE:.0%} interval still "
                f"reaches {rate(exact_upper(f['n']))}"
            )
    return out


def report_context(data: ReportInput, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Everything both templates show, as plain strings."""
    multi, binary = metrics["multiclass"], metrics["binary"]
    headline = headline_rows(metrics)
    views = [("Multi-class", multi)] + ([("Binary (normal vs defective)", binary)] if binary else [])
    stage_rows = [
        [
            s.name,
            str(s.n_train) if s.n_train is not None else "—",
            str(len(s.itc_loss)),
            _fmt_loss(s.itc_loss[-1] if len(s.itc_loss) else None),
            _fmt_loss(s.val_loss) if s.val_loss is not None else "— (D_pend empty)",
        ]
        for s in data.pfa_curves
    ]
    last_fusion = data.fusion_curve[-1] if data.fusion_curve else None
    info = [
        ("model", data.model_id or "—"),
        ("dataset", data.dataset or "—"),
        ("dataset fingerprint", data.dataset_fingerprint or "—"),
        ("seeds", ", ".join(f"{k}={v}" for k, v in data.seeds.items()) or "—"),
    ]
    return {
        "title": data.title,
        "warnings": list(metrics["warnings"]),  # the input's, and the decision figures' flags
        "n_test": metrics["n_test"],
        "accuracy": pct(multi["accuracy"]),
        "macro_multi": pct(multi["macro_f1"]),
        "macro_binary": pct(binary["macro_f1"]) if binary else "—",
        "macro_labels": ", ".join(multi["macro_f1_labels"]),
        "headline_header": headline[0],
        "headline_row": headline[1],
        "views": [
            {
                "title": t,
                "rows": per_class_rows(v),
                "macro": pct(v["macro_f1"]),
                "weighted": pct(v["weighted_f1"]),
                "accuracy": pct(v["accuracy"]),
                "confusion": _confusion_rows(v),
            }
            for t, v in views
        ],
        "per_class_header": PER_CLASS_HEADER,
        "stage_rows": stage_rows,
        "fusion_last": (
            f"{len(data.fusion_curve)} epochs; last epoch loss {_fmt_loss(last_fusion.get('loss'))}, "
            f"training accuracy {pct(last_fusion['accuracy']) if 'accuracy' in last_fusion else '—'} %"
            if last_fusion
            else None
        ),
        "provenance": [(str(k), str(v)) for k, v in data.provenance.items()],
        "info": info,
        "tsne": metrics["tsne"],
        "tsne_stages": ", ".join(metrics["tsne"]["stages"]) or "none",
        "calibration": _calibration_context(metrics),
        "decisions": decisions_context(metrics),
        "cards": card_rows(
            metrics, data.thumbnails.thumbnails() if isinstance(data.thumbnails, CardImages) else data.thumbnails
        ),
    }


FIGURES_HEADER = ["figure", "test split", "exact 95% interval", "target", "held-out training cards", "status"]
HELD_OUT_NAME = FIGURES_HEADER[4]  # the cards a rule was cut on; a re-cut model names the line's instead


def held_out_name(metrics: Mapping[str, Any]) -> str:
    """What the cards the decision rule was cut on are: held-out training cards, or the line's cards of a
    model whose thresholds were re-set on them (asectl calibrate)."""
    return (metrics.get("decision") or {}).get("held_out_name") or HELD_OUT_NAME


def figures_header(metrics: Mapping[str, Any]) -> list[str]:
    """FIGURES_HEADER with its cards column named for this model."""
    return [*FIGURES_HEADER[:4], held_out_name(metrics), *FIGURES_HEADER[5:]]


CARDS_HEADER = ["image", "true label", "class", "probability", "decision", "reason", "flag"]
# Per-card table order: what the line must look at first.
CARD_GROUPS = ("missed defect", "wrong defect", "wrong defective", "review", "misclassified", "")


def decisions_context(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The opening section: the decision figures against their targets (None without a decision rule)."""
    dec = metrics.get("decision")
    if not dec or "figures" not in dec:
        return None
    rows, flags = [], []
    for f in dec["figures"]:
        interval = "—" if f["interval"] is None else f"{rate(f['interval'][0])} – {rate(f['interval'][1])}"
        status = (
            "OVER TARGET"
            if f["exceeded"]
            else "too few cards to check"
            if f["too_few"]
            else "within target"
            if f["target"] is not None and f["value"] is not None
            else "—"
        )
        rows.append(
            {
                "cells": [
                    f["name"],
                    rate(f["value"], f["k"], f["n"]),
                    interval,
                    "—" if f["target"] is None else f"at most {rate(f['target'])}",
                    rate(f["held_out"]),
                    status,
                ],
                "exceeded": f["exceeded"],
            }
        )
        if f["exceeded"]:
            flags.append(
                f"The test {f['name']}, {rate(f['value'], f['k'], f['n'])}, exceeds its target of at "
                f"most {rate(f['target'])}."
            )

    def when(v: float | None) -> str:
        return "never (no threshold met its target on held-out cards)" if v is None else f"with p ≥ {v:.4f}"

    defective_t = dec.get("defective_threshold")
    defective = (
        "no defective decision (turned off with --no-defective)"
        if not dec.get("defective_decision", True)
        else "defective (type to confirm): any other card with p(defective) = 1 - p(normal) "
        + ("never" if defective_t is None else f"≥ {defective_t:.4f}")
    )
    rule = (
        f"pass: top class normal {when(dec['pass_threshold'])}; defect: top class a defect class "
        f"{when(dec['defect_threshold'])}; {defective}; otherwise review (thresholds chosen on the "
        f"{held_out_name(metrics)}). "
        f"Miss rate: defective cards passed, over defective cards; review share: cards sent to review, over "
        f"all cards; defect error: cards decided defect whose true class differs, over defect decisions; "
        f"defective error: normal cards decided defective, over defective decisions."
    )
    return {"rows": rows, "flags": flags, "rule": rule, "n": dec["test"]["n"]}


def card_rows(metrics: Mapping[str, Any], thumbnails: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per test card for the per-card table, passed defects first, then wrong defect decisions,
    cards sent to review, other misclassified cards, the rest; most confident first within each."""
    rows = []
    for i, p in enumerate(metrics["predictions"]):
        decision = p.get("decision")
        flag = (
            "missed defect"
            if decision == "pass" and p["true"] != NORMAL
            else "wrong defect"
            if decision == "defect" and not p["correct"]
            else "wrong defective"
            if decision == "defective" and p["true"] == NORMAL
            else "review"
            if decision == "review"
            else ""
            if p["correct"]
            else "misclassified"
        )
        rows.append(
            {
                "thumbnail": thumbnails[i] if thumbnails else None,
                "flag": flag,
                "confidence": p.get("confidence", 0.0),
                "cells": [
                    p["image"],
                    p["true"],
                    p["pred"],
                    f"{p['confidence']:.4f}" if "confidence" in p else "—",
                    decision or "—",
                    p.get("reason", "—"),
                    flag if flag != "review" else "",
                ],
            }
        )
    return sorted(rows, key=lambda r: (CARD_GROUPS.index(r["flag"]), -r["confidence"]))


TRADEOFF_HEADER = ["miss-rate target", "pass threshold", "review share", "miss rate"]
TRADEOFF_NOTE = (
    "a stricter target sends more cards to review; asectl predict --max-miss-rate uses another without retraining."
)


def rate(v: float | None, k: int | None = None, n: int | None = None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.2f} %" + (f" ({k}/{n})" if k is not None and n is not None else "")


def _calibration_context(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The calibration and decision section as plain strings (None without calibration)."""
    cal, dec = metrics.get("calibration"), metrics.get("decision")
    if not cal:
        return None
    test = cal["test"]
    ece_rows = [["ECE, test split", f"{test['ece_before']:.4f}", f"{test['ece_after']:.4f}"]]
    if cal.get("held_out_ece"):
        ece_rows.append(
            [
                "ECE, held-out training cards",
                f"{cal['held_out_ece']['before']:.4f}",
                f"{cal['held_out_ece']['after']:.4f}",
            ]
        )
    if cal.get("held_out_nll"):
        ece_rows.append(
            [
                "NLL, held-out training cards",
                f"{cal['held_out_nll']['before']:.4f}",
                f"{cal['held_out_nll']['after']:.4f}",
            ]
        )
    out: dict[str, Any] = {
        "text": (
            f"Temperature scaling: T = {cal['temperature']:.4f}, fitted on out-of-fold predictions of a "
            f"{cal['folds']}-fold cross-validation on {cal['n_held_out']} training cards (seed "
            f"{cal['seed']}); the test split was not used. The classifier is "
            f"{cal.get('classifier', 'the model trained on every training card')}: "
            "the probabilities shown are the mean of their calibrated probabilities. ECE over "
            f"{test['n_bins']} equal-width confidence bins."
        ),
        "ece_rows": ece_rows,
        "decision_rows": [],
        "rule_text": None,
        "tradeoff_rows": [],
    }
    if dec:

        def thr(v: float | None) -> str:
            return threshold_text(v, 6, "p ≥ ")

        out["rule_text"] = (
            f"pass: top class normal with {thr(dec['pass_threshold'])}; defect: top class a defect class with "
            f"{thr(dec['defect_threshold'])}; otherwise review. Targets, chosen by the user: miss "
            f"rate at most {rate(dec['max_miss_rate'])} (defective cards passed, over defective cards), "
            f"defect error at most {rate(dec['max_defect_error'])} (cards decided defect whose true class "
            f"differs, over defect decisions). On the {held_out_name(metrics)}, the pass threshold is the lowest "
            "that meets its target; the defect threshold is lowered from the most confident card until a cut "
            "first breaks its target"
            + (
                f" (a cut meets it only if the exact upper bound of its error at {100 * dec['defect_confidence']:g}% "
                "confidence does)"
                if dec.get("defect_confidence") is not None
                else ""
            )
            + "."
        )
        views = [(held_out_name(metrics), dec.get("held_out")), ("test split", dec["test"])]
        views = [(name, v) for name, v in views if v]
        out["decision_header"] = [""] + [f"{name} ({v['n']})" for name, v in views]
        out["decision_rows"] = [
            ["pass share"] + [rate(v["pass_share"], v["counts"]["pass"], v["n"]) for _, v in views],
            ["defect share"] + [rate(v["defect_share"], v["counts"]["defect"], v["n"]) for _, v in views],
            ["review share"] + [rate(v["review_share"], v["counts"]["review"], v["n"]) for _, v in views],
            ["miss rate"] + [rate(v["miss_rate"], v["n_missed"], v["n_defective"]) for _, v in views],
            ["defect error"]
            + [rate(v["defect_error"], v["n_wrong_defect"], v["n_defect_decisions"]) for _, v in views],
        ]
        if all("n_defective_decisions" in v for _, v in views):  # models stored before `defective` lack it
            out["decision_rows"][2:2] = [
                ["defective share"] + [rate(v["defective_share"], v["counts"]["defective"], v["n"]) for _, v in views]
            ]
            out["decision_rows"].append(
                ["defective error"]
                + [rate(v["defective_error"], v["n_wrong_defective"], v["n_defective_decisions"]) for _, v in views]
            )
        out["tradeoff_rows"] = [
            [
                rate(r["max_miss_rate"]),
                threshold_text(r["pass_threshold"], 6),
                rate(r["review_share"]),
                rate(r["miss_rate"]),
            ]
            for r in dec.get("tradeoff", [])
        ]
    return out


def _fmt_loss(v: Any) -> str:
    return "—" if v is None else f"{float(v):.4f}"


def render_markdown(ctx: Mapping[str, Any], metrics: Mapping[str, Any], pngs: Mapping[str, bytes]) -> str:
    out = [f"# {ctx['title']}", ""]
    for w in ctx["warnings"]:
        out.append(f"> **Warning:** {w}")
    if ctx["warnings"]:
        out.append("")
    dec = ctx["decisions"]
    if dec:
        out += [f"## Decisions on the test split ({dec['n']} cards)", ""]
        out += [f"> **OVER TARGET:** {flag}" for flag in dec["flags"]] + ([""] if dec["flags"] else [])
        out += [_md_table(figures_header(metrics), [r["cells"] for r in dec["rows"]]), "", dec["rule"], ""]
    out += [
        "## Cards",
        "",
        f"{len(ctx['cards'])} test cards: defective cards passed first, then wrong defect "
        "decisions, cards sent to review, other misclassified cards and the rest.",
        "",
        _md_table(CARDS_HEADER, [r["cells"] for r in ctx["cards"]]),
        "",
    ]
    out += ["## Classification", "", format_metrics_markdown(metrics, detail=True).rstrip(), ""]
    out += ["![Multi-class confusion matrix](confusion.png)", ""]
    if "confusion_binary" in pngs:
        out += ["![Binary confusion matrix](confusion_binary.png)", ""]
    out += ["## ML diagnostics", ""]
    cal = ctx["calibration"]
    if cal:
        out += [
            "### Confidence and decisions",
            "",
            cal["text"],
            "",
            _md_table(["", "before calibration", "after calibration"], cal["ece_rows"]),
            "",
            "![Reliability diagrams](calibration.png)",
            "",
        ]
        if cal["rule_text"]:
            out += [
                f"Decision rule: {cal['rule_text']}",
                "",
                _md_table(cal["decision_header"], cal["decision_rows"]),
                "",
            ]
        if cal["tradeoff_rows"]:
            out += [
                f"Other miss-rate targets on the {held_out_name(metrics)} (same defect target): {TRADEOFF_NOTE}",
                "",
                _md_table(TRADEOFF_HEADER, cal["tradeoff_rows"]),
                "",
            ]
    out += [
        "### Image embeddings (t-SNE)",
        "",
        _tsne_caption(ctx),
        "",
        "![t-SNE of image embeddings](tsne.png)",
        "",
        "### Training",
        "",
    ]
    if ctx["stage_rows"]:
        out += [
            _md_table(["stage", "training pairs", "epochs", "final ITC loss", "ITC loss on D_pend"], ctx["stage_rows"]),
            "",
        ]
    if ctx["fusion_last"]:
        out += [f"Fusion: {ctx['fusion_last']}.", ""]
    out += ["![Training curves](curves.png)", "", "## Provenance", ""]
    out += [_md_table(["part", "produced by"], ctx["provenance"] + ctx["info"]), ""]
    return "\n".join(out)


def _tsne_caption(ctx: Mapping[str, Any]) -> str:
    t = ctx["tsne"]
    perp = f"perplexity {t['perplexity']:.2f}" if t["perplexity"] is not None else "too few samples"
    return (
        f"t-SNE (scikit-learn, {perp}, PCA initialisation, random_state {t['random_state']}) of the "
        f"image embeddings of {t['n_samples']} samples after each stage: {ctx['tsne_stages']}. Colours: "
        "blue, orange, green, red, purple for the classes in label order (paper Fig. 8); circles are "
        "training samples, triangles test samples. Each panel is fitted on its own, so axes are not "
        "comparable across panels."
    )


def render_html(ctx: Mapping[str, Any], metrics: Mapping[str, Any], pngs: Mapping[str, bytes]) -> str:
    import jinja2

    source = resources.files("asectl").joinpath("report_template.html").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    images = {k: "data:image/png;base64," + base64.b64encode(v).decode("ascii") for k, v in pngs.items()}
    return env.from_string(source).render(
        **ctx,
        images=images,
        tsne_caption=_tsne_caption(ctx),
        tradeoff_header=TRADEOFF_HEADER,
        tradeoff_note=TRADEOFF_NOTE,
        figures_header=figures_header(metrics),
        held_out_name=held_out_name(metrics),
        cards_header=CARDS_HEADER,
    )
