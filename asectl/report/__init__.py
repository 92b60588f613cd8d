"""The evaluation report: metrics (paper section 4.1), confusion matrices, t-SNE of the image embeddings
after each alignment stage (paper Fig. 8), training curves and the provenance of every modality.

``build_report(ReportInput, out_dir)`` writes ``report.html`` (self-contained: figures embedded as
base64 PNG, no external resources), ``report.md`` (same tables, links to the PNG files), ``metrics.json``,
``confusion.png``, ``confusion_binary.png``, ``tsne.png``, ``curves.png`` and, for a calibrated model,
``calibration.png`` (reliability diagrams before and after calibration, with the decision rule's
figures on the test split beside them). ``compute_metrics`` and
``format_metrics_markdown`` work on their own (benchmarks use them without a full report).

Metrics come from ``sklearn.metrics``. Per-class F1 is Eq. (11); macro-F1 is the unweighted mean of the
per-class F1 scores (Eq. (12)) over the classes that occur in the true or predicted labels (scikit-learn's
default label set): a class with no test sample and no prediction has no F1 to average. Divisions by zero
(a class never predicted) count as 0, as scikit-learn's ``zero_division=0``.

The binary view collapses the labels: ``normal`` is the negative class, every other label is
``defective``; it is derived from the multi-class predictions (a type1 card predicted as type3 is a
correct binary prediction, a normal card predicted as type2 is not).

The package by job, each a private module behind this public face: ``_records`` (the input and output
records), ``_metrics`` (numbers), ``_figures`` (matplotlib), ``_render`` (tables, Markdown and HTML from
``asectl/report_template.html``), ``_terminal`` (the summary lines and rich tables) and ``_build`` (a
report from end to end). Import from ``asectl.report``; the module layout may change.
"""

from __future__ import annotations

from asectl.report._build import build_report, render_report, report_key_parts, write_report
from asectl.report._figures import (
    CLASS_COLOURS,
    TSNE_MIN_SAMPLES,
    confusion_png,
    curves_png,
    reliability_png,
    tsne_2d,
    tsne_all,
    tsne_perplexity,
    tsne_png,
)
from asectl.report._metrics import (
    BINARY_LABELS,
    DECISION_FIGURES,
    INTERVAL_CONFIDENCE,
    METRICS_FORMAT,
    binary_labels,
    calibration_metrics,
    compute_metrics,
    decision_figures,
    exact_upper,
)
from asectl.report._records import (
    FILES,
    CardImages,
    ReportInput,
    ReportSummary,
    StageCurve,
    card_thumbnail,
    pfa_stage_name,
    stage_curves_from_pfa,
)
from asectl.report._render import (
    CARD_GROUPS,
    CARDS_HEADER,
    FIGURES_HEADER,
    PER_CLASS_HEADER,
    TRADEOFF_HEADER,
    TRADEOFF_NOTE,
    card_rows,
    figure_warnings,
    format_metrics_markdown,
    headline_rows,
    per_class_rows,
)
from asectl.report._terminal import print_summary

# Every public name imported above (the private submodules and the __future__ flag aside).
__all__ = [n for n in dir() if not n.startswith("_") and n != "annotations"]
