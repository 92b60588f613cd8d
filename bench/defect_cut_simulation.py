"""How each way of cutting the defect threshold holds its target on fresh cards, on simulated calibrated
scores (no model, no data: seconds).

    python bench/defect_cut_simulation.py

Scores and labels come from ``asectl.testing.sample_calibrated_cards`` (labels drawn from softmax(logits),
so the scores are calibrated). Each draw is a held-out set of N cards; a rule is chosen on it with
`--max-defect-error 0.05` and applied to 40,000 fresh cards of the same source, whose defect error is
then known almost exactly. The same helpers back the test in tests/test_calibration.py that asserts the
direction of these figures.
Results: bench/results/defect_cut_simulation.json and the ``defect-cut-simulation`` section of
docs/benchmarks.md."""

from __future__ import annotations

import numpy as np

from _common import save, update_section
from asectl.models.calibration import DecisionRule, choose_rule
from asectl.testing import CLASSES, fresh_defect_errors, lowest_cut_anywhere

TARGET = 0.05
RULES = {
    "lowest cut that meets the target anywhere (until this change)": lambda p, y: DecisionRule(
        CLASSES, None, lowest_cut_anywhere(p, y, TARGET), 0.01, TARGET
    ),
    "first cut that breaks the target (now)": lambda p, y: choose_rule(p, y, CLASSES, 0.01, TARGET),
    "first cut that breaks it, 90% upper bound (--defect-confidence 0.9)": lambda p, y: choose_rule(
        p, y, CLASSES, 0.01, TARGET, defect_confidence=0.9
    ),
}
SETUPS = ((300, 40), (3000, 10))  # held-out cards per draw, draws
HEADER = (
    "| held-out cards N | how the cut is chosen | draws with a defect threshold | mean defect error on fresh "
    "cards | draws over the target |\n|---|---|---|---|---|"
)


def main() -> None:
    results, rows = [], []
    for n, draws in SETUPS:
        for name, rule in RULES.items():
            errors = fresh_defect_errors(rule, draws, n)
            over = sum(e > TARGET for e in errors)
            results.append(
                {
                    "held_out": n,
                    "draws": draws,
                    "rule": name,
                    "granted": len(errors),
                    "errors": errors,
                    "over_target": over,
                }
            )
            mean = f"{100 * np.mean(errors):.1f}%" if errors else "-"
            rows.append(f"| {n} | {name} | {len(errors)} of {draws} | {mean} | {over} of {len(errors)} |")
    save("defect_cut_simulation", {"target": TARGET, "results": results})
    md = f"""### How the defect threshold's cut holds its target on fresh cards (simulated calibrated scores)

Each draw: N held-out cards with calibrated scores (5 classes), a rule chosen on them with
`--max-defect-error {TARGET}`, its defect error measured on 40,000 fresh cards of the same source.

{HEADER}
{chr(10).join(rows)}
"""
    update_section("defect-cut-simulation", md)
    print(md)


if __name__ == "__main__":
    main()
