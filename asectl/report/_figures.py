"""The report's figures: confusion matrices, t-SNE panels (paper Fig. 8), training curves and reliability
diagrams, drawn on matplotlib's Agg canvas on Figure objects (no pyplot state, no display needed)."""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from asectl.report._records import StageCurve

# Paper Fig. 8: blue, orange, green, red, purple for normal, type1..type4 (matplotlib's tab10 order).
CLASS_COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)


TSNE_MIN_SAMPLES = 4


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No "Software" stamp: the bytes depend only on the data.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def confusion_png(view: Mapping[str, Any], title: str) -> bytes:
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(view["labels"])
    fig = _new_figure(1.6 + 0.9 * k, 1.2 + 0.85 * k)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.asarray(view["confusion_matrix"]), display_labels=view["labels"]).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title)
    return _png(fig)


def tsne_perplexity(n: int) -> float:
    """30 (the usual value) for large n, about (n-1)/3 for small n; always below n as t-SNE requires."""
    return float(min(30.0, max(1.0, (n - 1) / 3.0)))


def tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    # One OpenMP thread: the Barnes-Hut gradient slows down by 10-100x when its threads compete with
    # other processes for the cores, and report-sized inputs (hundreds of points) need no more.
    with threadpool_limits(limits=1):
        return TSNE(
            n_components=2, perplexity=tsne_perplexity(len(x)), init="pca", learning_rate="auto", random_state=seed
        ).fit_transform(np.asarray(x, dtype=np.float64))


def tsne_all(
    xs: Sequence[np.ndarray], seed: int, tsne: Callable[[np.ndarray, int], np.ndarray] | None = None
) -> list[np.ndarray]:
    """The 2-d t-SNE coordinates of each of ``xs``, one thread per core: the Barnes-Hut gradient releases
    the GIL, and each run keeps one OpenMP thread, so the coordinates are those of one run after another
    (a report's six embeddings in half the time on 2 cores)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from asectl.environment import usable_cores

    tsne = tsne or tsne_2d
    threads = min(usable_cores(), len(xs))
    if threads < 2:
        return [tsne(x, seed) for x in xs]
    # One limit around every run: each run's own limit then restores 1, whichever thread ends first.
    with threadpool_limits(limits=1), ThreadPoolExecutor(threads, thread_name_prefix="tsne") as pool:
        return list(pool.map(lambda x: tsne(x, seed), xs))


def tsne_png(
    embeddings: Mapping[str, np.ndarray],
    labels: Sequence[int],
    label_names: Sequence[str],
    split: Sequence[str] | None,
    seed: int,
    tsne: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> bytes:
    from matplotlib.lines import Line2D

    names = list(embeddings)
    ncols = max(1, min(len(names), 5))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = _new_figure(3.4 * ncols, 3.4 * nrows + 0.6)
    y = np.asarray(list(labels), dtype=np.int64)
    test = np.asarray([s == "test" for s in split]) if split is not None else np.zeros(len(y), bool)
    if not names:
        ax = fig.add_subplot()
        _placeholder(ax, "no embeddings recorded")
    enough = [n for n in names if len(embeddings[n]) >= TSNE_MIN_SAMPLES and embeddings[n].shape[1] >= 2]
    coords = dict(zip(enough, tsne_all([embeddings[n] for n in enough], seed, tsne)))
    for p, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, p + 1)
        x = embeddings[name]
        ax.set_title(f"({chr(ord('a') + p)}) {name}" if p < 26 else name, fontsize=10)
        if name not in coords:
            _placeholder(ax, f"too few samples for t-SNE ({len(x)})")
            continue
        xy = coords[name]
        for c in range(len(label_names)):
            colour = CLASS_COLOURS[c % len(CLASS_COLOURS)]
            for is_test, marker in ((False, "o"), (True, "^")):
                m = (y == c) & (test == is_test)
                if m.any():
                    ax.scatter(
                        xy[m, 0],
                        xy[m, 1],
                        s=14 if not is_test else 22,
                        c=colour,
                        marker=marker,
                        edgecolors="black" if is_test else "none",
                        linewidths=0.4,
                        alpha=0.85,
                    )
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        Line2D([], [], marker="o", linestyle="", color=CLASS_COLOURS[c % len(CLASS_COLOURS)], label=n)
        for c, n in enumerate(label_names)
    ]
    if split is not None and test.any():
        handles += [
            Line2D([], [], marker="o", linestyle="", color="grey", label="train"),
            Line2D([], [], marker="^", linestyle="", color="grey", markeredgecolor="black", label="test"),
        ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return _png(fig)


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def curves_png(pfa: Sequence[StageCurve], fusion: Sequence[Mapping[str, float]]) -> bytes:
    fig = _new_figure(15, 4)
    ax_itc, ax_val, ax_fus = fig.subplots(1, 3)

    # ITC loss, epochs counted across stages (one optimiser and schedule run over the whole alignment).
    ax_itc.set_title("Alignment: ITC loss per epoch (training subset)", fontsize=10)
    start = 0
    for i, stage in enumerate(pfa):
        losses = [_num(v) for v in stage.itc_loss]
        if losses:
            xs = np.arange(start + 1, start + len(losses) + 1)
            ax_itc.plot(xs, losses, marker="." if len(losses) < 30 else None, label=stage.name, color=f"C{i % 10}")
            if start:
                ax_itc.axvline(start + 0.5, color="grey", linestyle=":", linewidth=0.8)
            start += len(losses)
    if start:
        ax_itc.set_xlabel("epoch")
        ax_itc.set_ylabel("L_total = L_llm + L_vlm")
        ax_itc.legend(fontsize=7)
    else:
        _placeholder(ax_itc, "no alignment training recorded")

    ax_val.set_title("Alignment: ITC loss on D_pend after each stage", fontsize=10)
    vals = [(s.name, s.val_loss) for s in pfa]
    if any(v is not None for _, v in vals):
        xs = np.arange(len(vals))
        ys = [np.nan if v is None else _num(v) for _, v in vals]
        ax_val.plot(xs, ys, marker="o")
        for x, (_, v) in zip(xs, vals):
            if v is None:
                ax_val.annotate(
                    "D_pend empty",
                    (x, 0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="grey",
                    xytext=(0, 4),
                    textcoords="offset points",
                )
        ax_val.set_xticks(xs, [n for n, _ in vals], rotation=20, ha="right", fontsize=7)
        ax_val.set_ylabel("ITC loss")
    else:
        _placeholder(ax_val, "no D_pend validation loss recorded")

    ax_fus.set_title("Fusion training", fontsize=10)
    rows = list(fusion)
    if rows:
        epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
        ax_fus.plot(epochs, [_num(r.get("loss")) for r in rows], color="C0", label="loss")
        if any("val_loss" in r for r in rows):
            ax_fus.plot(
                epochs, [_num(r.get("val_loss")) for r in rows], color="C0", linestyle="--", label="validation loss"
            )
        ax_fus.set_xlabel("epoch")
        ax_fus.set_ylabel("cross-entropy loss", color="C0")
        ax_acc = ax_fus.twinx()
        if any("accuracy" in r for r in rows):
            ax_acc.plot(epochs, [_num(r.get("accuracy")) for r in rows], color="C1", label="accuracy")
        if any("val_accuracy" in r for r in rows):
            ax_acc.plot(
                epochs,
                [_num(r.get("val_accuracy")) for r in rows],
                color="C1",
                linestyle="--",
                label="validation accuracy",
            )
        ax_acc.set_ylim(0, 1.02)
        ax_acc.set_ylabel("accuracy", color="C1")
        handles = ax_fus.get_legend_handles_labels()[0] + ax_acc.get_legend_handles_labels()[0]
        ax_fus.legend(handles=handles, fontsize=7, loc="center right")
    else:
        _placeholder(ax_fus, "no fusion training recorded")
    return _png(fig)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def reliability_png(test: Mapping[str, Any] | None) -> bytes:
    """Reliability diagrams of the test split before and after calibration: accuracy per confidence bin
    against the diagonal (perfect calibration), with the number of cards per bin below."""
    fig = _new_figure(10, 5.2)
    if test is None:
        _placeholder(fig.add_subplot(), "no calibration recorded")
        return _png(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1])
    width = 1.0 / test["n_bins"]
    for col, when in enumerate(("before", "after")):
        ax, ax_n = fig.add_subplot(grid[0, col]), fig.add_subplot(grid[1, col])
        bins = test[f"bins_{when}"]
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfect calibration")
        ax.bar(
            centres, [b["accuracy"] for b in bins], width=width * 0.9, color="C0", alpha=0.8, label="accuracy in bin"
        )
        # The gap between a bar's top (accuracy) and its dot (mean confidence) is the miscalibration.
        ax.scatter(centres, [b["confidence"] for b in bins], color="C3", s=14, zorder=3, label="mean confidence in bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{when} calibration: ECE {test[f'ece_{when}']:.4f}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax_n.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="C7")
        ax_n.set_xlim(0, 1)
        ax_n.set_xlabel("confidence (top-class probability)")
        ax_n.set_ylabel("cards")
    return _png(fig)
