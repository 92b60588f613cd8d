"""Run the reliability suite with every seed (slow cases included) and write docs/reliability.md counts.

    python bench/reliability.py

Runs pytest on the reliability-related tests with `-m "slow or not slow"` and a JUnit report, then
counts the cases per category: tried, passed, and failures (a failure means a crash, a lost or a corrupt
artifact, or a message that was not the one-line error expected)."""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from _common import OUT, ROOT, command, machine

CATEGORIES = [
    (
        "bad input files and records",
        [
            "test_bad_input.py",
            "test_dataset.py::test_bad_labels_csv",
            "test_dataset.py::test_non_utf8",
            "test_dataset.py::test_symlink",
            "test_describe.py::test_bad_image",
            "test_ocr.py::test_bad_spec",
            "test_ocr.py::test_consistency",
            "test_reason.py::test_parse_answer",
            "test_reason.py::test_check_priors",
            "test_synth.py::test_synth_bad",
            "test_synth.py::test_synth_refuses",
            "test_tda.py::test_tda_rejects",
        ],
    ),
    (
        "bad models and configuration (exit 2)",
        [
            "test_describe.py::test_missing_model",
            "test_describe.py::test_no_model",
            "test_describe.py::test_hub_id",
            "test_describe.py::test_not_an_instructblip",
            "test_describe.py::test_incomplete",
            "test_describe.py::test_device_cuda",
            "test_describe.py::test_bad_options",
            "test_reason.py::test_cli_bad_model",
            "test_reason.py::test_unlabelled",
            "test_learn.py::test_predict_without",
            "test_ocr.py::test_unknown_engine",
            "test_pfa.py::test_profiles",
            "test_pfa.py::test_bad_strides",
            "test_encoders.py::test_missing_image_weights",
            "test_encoders.py::test_text_encoder_errors",
        ],
    ),
    ("killed runs (SIGKILL at seeded random moments, rerun, compare)", ["test_reliability.py::test_killed"]),
    ("concurrent runs on one cache", ["test_reliability.py::test_two_processes", "test_cache.py::test_concurrent"]),
    (
        "cache integrity (truncate, edit, delete entries)",
        [
            "test_cache.py::test_corrupt",
            "test_cache.py::test_truncated",
            "test_cache.py::test_put_tree",
            "test_ocr.py::test_corrupt",
        ],
    ),
    (
        "unsafe files (pickle, GGUF templates, regex, bundles)",
        [
            "test_reliability.py::test_pickled",
            "test_reliability.py::test_catastrophic",
            "test_reason.py::test_chat_template",
            "test_learn.py::test_damaged_bundle",
            "test_learn.py::test_bundle_is_safetensors",
        ],
    ),
]


def main() -> None:
    report = OUT / "reliability.xml"
    report.parent.mkdir(parents=True, exist_ok=True)
    files = sorted({c.split("::")[0] for _, cases in CATEGORIES for c in cases})
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "slow or not slow",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            *[f"tests/{f}" for f in files],
        ],
        cwd=ROOT,
    )
    minutes = (time.perf_counter() - t0) / 60
    cases = []
    for tc in ET.parse(report).getroot().iter("testcase"):
        name = f"{tc.get('classname', '').split('.')[-1]}.py::{tc.get('name')}"
        failed = any(child.tag in ("failure", "error") for child in tc)
        skipped = any(child.tag == "skipped" for child in tc)
        cases.append((name, failed, skipped))
    rows = [
        "| category | cases tried | passed | failures (crash, lost or corrupt artifact, wrong message) |",
        "|---|---|---|---|",
    ]
    for title, prefixes in CATEGORIES:
        mine = [c for c in cases if any(c[0].startswith(p) for p in prefixes) and not c[2]]
        rows.append(f"| {title} | {len(mine)} | {sum(not c[1] for c in mine)} | {sum(c[1] for c in mine)} |")
    failed = [c[0] for c in cases if c[1]]
    md = ROOT / "docs" / "reliability.md"
    text = md.read_text() if md.exists() else ""
    start, end = "<!-- bench:reliability -->", "<!-- /bench:reliability -->"
    block = (
        f"{start}\n_Measured {time.strftime('%Y-%m-%d')} with `{command()}` on {machine()}; "
        f"{minutes:.1f} min._\n\n"
        + "\n".join(rows)
        + ("\n\nFailing cases: " + ", ".join(failed) if failed else "\n\nNo failing case.")
        + f"\n{end}"
    )
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md.write_text(text)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
