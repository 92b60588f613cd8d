"""Terminal output: the summary lines of a written report and the rich tables ``asectl report`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from asectl.report._records import ReportSummary
from asectl.report._render import PER_CLASS_HEADER, decisions_context, figures_header, pct, per_class_rows, rate


def summary_text(metrics: Mapping[str, Any], paths: Mapping[str, Path]) -> str:
    multi, binary = metrics["multiclass"], metrics["binary"]
    lines = [
        f"{metrics['n_test']} test samples: accuracy {pct(multi['accuracy'])} %, macro-F1 "
        f"{pct(multi['macro_f1'])} (multi-class)" + (f", {pct(binary['macro_f1'])} (binary)" if binary else "")
    ]
    lines += [line for line in (decision_line(metrics),) if line]
    lines += [f"warning: {w}" for w in metrics["warnings"]]
    lines.append(f"report: {paths['html']}")
    return "\n".join(lines)


def print_summary(summary: ReportSummary, console: Any = None, quiet: bool = False) -> None:
    """The decision figures against their targets first, then per-class F1, macro-F1 (multi-class and
    binary) and provenance as rich tables; ``quiet``: the warnings only (flags on exceeded targets
    included)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    metrics = summary.metrics
    for w in metrics["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    if quiet:
        return
    figures = (metrics.get("decision") or {}).get("figures")
    if figures:
        table = Table(
            title=f"Decisions on the test split: {metrics['decision']['test']['n']} cards", title_justify="left"
        )
        for col in figures_header(metrics):
            table.add_column(col, justify="left" if col in ("figure", "status") else "right")
        for row in decisions_context(metrics)["rows"]:
            table.add_row(*map(escape, row["cells"]), style="bold red" if row["exceeded"] else None)
        console.print(table)
    multi, binary = metrics["multiclass"], metrics["binary"]
    table = Table(title=f"Test split: {metrics['n_test']} samples", title_justify="left")
    for col in PER_CLASS_HEADER:
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in per_class_rows(multi):
        table.add_row(*map(escape, row))
    table.add_section()
    table.add_row("macro-F1 (multi-class)", "", "", pct(multi["macro_f1"]), "", "", style="bold")
    if binary:
        table.add_section()
        for row in per_class_rows(binary):
            table.add_row(*map(escape, row))
        table.add_row("macro-F1 (binary)", "", "", pct(binary["macro_f1"]), "", "", style="bold")
    table.caption = f"percent; accuracy {pct(multi['accuracy'])}"
    console.print(table)
    if metrics["provenance"]:
        prov = Table(show_header=False, box=None, padding=(0, 1))
        prov.add_column(style="dim")
        prov.add_column()
        for k, v in metrics["provenance"].items():
            prov.add_row(escape(k), escape(v))
        console.print(prov)
    line = decision_line(metrics)
    if line:
        console.print(escape(line), highlight=False)
    console.print(f"report: {escape(str(summary.paths['html']))}", highlight=False)


def decision_line(metrics: Mapping[str, Any]) -> str | None:
    cal, dec = metrics.get("calibration"), metrics.get("decision")
    if not cal:
        return None
    line = (
        f"calibration (T = {cal['temperature']:.3f}): test ECE {cal['test']['ece_before']:.4f} before, "
        f"{cal['test']['ece_after']:.4f} after"
    )
    if dec:
        t = dec["test"]
        line += (
            f"; decisions on test: review {rate(t['review_share'])}, miss rate "
            f"{rate(t['miss_rate'], t['n_missed'], t['n_defective'])} (target at most "
            f"{rate(dec['max_miss_rate'])}), defect error "
            f"{rate(t['defect_error'], t['n_wrong_defect'], t['n_defect_decisions'])}"
        )
    return line
