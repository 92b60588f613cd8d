"""A fully cached rerun of the learning commands loads no model library, and gives the same results."""

import json
import shutil
import subprocess
import sys

import pytest

from asectl.cache import Cache

from .conftest import FAST, make_default_latest

HEAVY = ["torch", "sklearn", "matplotlib", "transformers"]
# One command in a fresh interpreter; prints which of HEAVY it imported.
_RUN = f"""
import json, sys
from asectl.cli import cli
try:
    cli(sys.argv[1:], prog_name="asectl")
except SystemExit as exc:
    if exc.code:
        raise
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""


@pytest.fixture
def trained_default(trained):
    """The shared fixture with its own model as the latest again: other modules' tests (ablations) train
    and leave other models latest; all of these commands are cache hits."""
    make_default_latest(trained)
    return trained


def _heavy_modules(cache, *args) -> list[str]:
    res = subprocess.run(
        [sys.executable, "-c", _RUN, "--cache-dir", str(cache), "-q", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def test_cached_learning_commands_import_no_model_library(trained_default, tmp_path):
    trained = trained_default
    data, cache = trained["data"], trained["cache"]
    card = data / "images" / "0001.png"
    trained["invoke"]("report", data, "--out", tmp_path / "first")
    trained["invoke"]("predict", card)
    for args in (
        ("align", data, "--stride", "0.2", *FAST),
        ("fuse-train", data, *FAST),
        ("report", data, "--out", tmp_path / "again"),
        ("predict", card),
    ):
        assert _heavy_modules(cache, *args) == [], args[0]
    for f in (tmp_path / "first").iterdir():
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name


def test_corrupt_report_entry_is_rebuilt_to_the_same_files(trained_default, tmp_path):
    trained = trained_default
    data, cache = trained["data"], trained["cache"]
    for entry in Cache(cache).iter_entries("report"):  # other tests' reports of other models
        shutil.rmtree(entry)
    trained["invoke"]("report", data, "--out", tmp_path / "first")
    entries = list(Cache(cache).iter_entries("report"))
    assert len(entries) == 1
    (entries[0] / "metrics.json").write_text("{}")
    res = trained["invoke"]("report", data, "--out", tmp_path / "again")
    assert "corrupt" in res.output
    for f in (tmp_path / "first").iterdir():
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_cached_report_decodes_no_card(trained_default, tmp_path, monkeypatch):
    """A cached report copies its files: the per-card thumbnails are not drawn again (they were most of a
    cached report's time)."""
    from asectl.report import _records

    trained = trained_default
    trained["invoke"]("report", trained["data"], "--out", tmp_path / "first")

    def refuse(path, height=48):
        raise AssertionError(f"{path} was decoded for a cached report")

    monkeypatch.setattr(_records, "card_thumbnail", refuse)
    trained["invoke"]("report", trained["data"], "--out", tmp_path / "again")
    assert (tmp_path / "again" / "report.html").read_bytes() == (tmp_path / "first" / "report.html").read_bytes()
