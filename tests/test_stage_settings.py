"""Each per-image stage remembers what it ran with, and the learning stages and predict use exactly that:
a user's own GGUF, VLM folder, OCR engine and card spec reach the trained model and its report. Also:
the per-image stages read any labelled folder whatever its splits, output for scripts, and the layering."""

import ast
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from asectl.cli import cli
from asectl.domain.synth import generate

from .conftest import cli_invoker

FAST = ["--set", "pfa.epochs_per_stage=2", "--set", "fusion.epochs=4", "--set", "encoders.image_epochs=4"]
SPEC = Path(__file__).resolve().parent.parent / "asectl" / "specs" / "default.toml"
TINY_LLM_NAME = "asectl tiny llama"  # general.name inside tests/tiny_gguf.py's file


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_gguf, tiny_instructblip):
    """ocr --engine/--spec, describe --vlm-model, reason --llm-model, then align, fuse-train, report:
    the sequence a user runs by hand, with no option repeated after the per-image stages."""
    root = tmp_path_factory.mktemp("chain")
    data = root / "data"
    generate(data, seed=5, counts="4,4,4,4,4", test_size=5, difficulty="clean")  # settings, not data, under test
    spec = root / "my-spec.toml"
    shutil.copyfile(SPEC, spec)
    cache = root / "cache"
    invoke = cli_invoker(cache)
    invoke("ocr", data, "--engine", "rapidocr", "--spec", spec)
    invoke("describe", data, "--vlm-model", tiny_instructblip, "--max-new-tokens", "3", "--num-beams", "1")
    invoke("reason", data, "--llm-model", tiny_gguf, "--max-tokens", "32")
    invoke("align", data, *FAST)
    invoke("fuse-train", data, "--out", root / "bundle", *FAST)
    invoke("report", data, "--out", root / "report")
    return {
        "root": root,
        "data": data,
        "spec": spec,
        "cache": cache,
        "invoke": invoke,
        "bundle": json.loads((root / "bundle" / "bundle.json").read_text()),
    }


def test_learning_stages_use_the_models_the_per_image_stages_ran(chain, tiny_gguf, tiny_instructblip):
    replay, prov = chain["bundle"]["replay"], chain["bundle"]["provenance"]
    assert replay["ocr"]["engine"] == "rapidocr" and replay["ocr"]["spec"] == str(chain["spec"].resolve())
    assert prov["ocr"].startswith("rapidocr")
    assert replay["describe"]["vlm"] == "instructblip"
    assert replay["describe"]["model"] == str(tiny_instructblip.resolve())
    assert prov["descriptions"].startswith("instructblip")
    assert replay["reason"]["llm_model"] == str(tiny_gguf.resolve())
    assert TINY_LLM_NAME in prov["reasoning"] and "SmolLM2" not in prov["reasoning"]
    report = (chain["root"] / "report" / "report.md").read_text()
    assert TINY_LLM_NAME in report and "SmolLM2" not in report


def _all_test_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    rows = list(csv.DictReader((dst / "labels.csv").open()))
    with (dst / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "split"])
        w.writeheader()
        w.writerows({"image": r["image"], "label": r["label"], "split": "test"} for r in rows)
    return dst


def test_per_image_stages_and_predict_read_a_test_only_folder(chain, tiny_gguf, tmp_path):
    invoke = chain["invoke"]
    evalset = _all_test_copy(chain["data"], tmp_path / "eval")
    invoke("ocr", evalset, "--engine", "rapidocr")
    invoke("describe", evalset)
    # Priors come from the training split, so a folder without one takes them from a trained bundle.
    no_priors = invoke("reason", evalset, "--llm-model", tiny_gguf, code=2)
    assert "--priors" in no_priors.output
    reason = invoke(
        "reason",
        evalset,
        "--llm-model",
        tiny_gguf,
        "--max-tokens",
        "32",
        "--priors",
        chain["root"] / "bundle",
        "--json",
    )
    assert len([ln for ln in reason.stdout.splitlines() if ln.startswith("{")]) == 20
    pred = invoke("predict", evalset, "--model", chain["root"] / "bundle", "--json")
    recs = [json.loads(ln) for ln in pred.stdout.splitlines() if ln.startswith("{")]
    assert len(recs) == 20 and all(r["label"] in chain["bundle"]["classes"] for r in recs)
    # Training still needs a train split, and says so.
    res = invoke("align", evalset, code=1)
    assert "split=train" in res.output


def test_predict_replays_without_changing_what_the_dataset_remembers(chain):
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.modalities import ModalitySettings

    cache, ds = Cache(chain["cache"]), load_dataset(chain["data"])
    before = ModalitySettings.recall(cache, ds)
    chain["invoke"]("predict", chain["data"], "--model", chain["root"] / "bundle")
    assert ModalitySettings.recall(cache, ds) == before
    assert before.reason.expect_model_hash is None  # replay checks are not remembered as choices


def test_settings_hold_the_defaults_and_round_trip():
    from asectl.stages.describe import DescribeSettings
    from asectl.stages.ocr import OcrSettings
    from asectl.stages.reason import ReasonSettings

    for cls in (OcrSettings, DescribeSettings, ReasonSettings):
        s = cls()
        assert cls.from_dict(json.loads(json.dumps(s.as_dict()))) == s
        assert cls.from_dict({**s.as_dict(), "from_a_newer_version": 1}) == s
    assert OcrSettings().engine == "cnocr" and OcrSettings().replace(engine=None).engine == "cnocr"
    # A stage's command shows the default its settings class holds.
    res = CliRunner().invoke(cli, ["ocr", "--help"])
    assert f"[default: {OcrSettings().engine}]" in res.output


# --- output for scripts -------------------------------------------------------------------------------
def _run(*args, cwd=None):
    env = {**os.environ, "COLUMNS": ""}
    return subprocess.run(
        [sys.executable, "-m", "asectl", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_an_alignments_key_does_not_depend_on_where_its_models_are_installed(tmp_path):
    """The same GGUF, VLM and prompt files, each recorded with its content hash, at other paths (another
    virtual environment): the same key material. A card spec is named by its content, wherever it lies."""
    from asectl.stages.modalities import replay_identity

    def replay(root: Path, spec: Path) -> dict:
        return {
            "ocr": {"engine": "cnocr", "spec": str(spec)},
            "describe": {"model": str(root / "vlm"), "expect_model_hash": "v" * 64},
            "reason": {
                "llm_model": str(root / "site-packages" / "llm.gguf"),
                "expect_model_hash": "m" * 64,
                "prompt": str(root / "prompt.txt"),
                "expect_prompt_sha256": "p" * 64,
            },
            "llm_text": "composite",
        }

    for where in ("a", "b", "c"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "spec.toml").write_text("[record]\n" if where != "c" else "[other]\n")
    a, b, c = (replay(tmp_path / w, tmp_path / w / "spec.toml") for w in ("a", "b", "c"))
    assert replay_identity(a) == replay_identity(b) != replay_identity(c)  # c: another card spec
    assert a["reason"]["llm_model"].startswith(str(tmp_path / "a"))  # the replay itself keeps the paths
    unhashed = replay(tmp_path / "a", tmp_path / "a" / "spec.toml")
    del unhashed["reason"]["expect_model_hash"]  # no hash recorded: the path stays part of the key
    assert replay_identity(unhashed)["reason"]["llm_model"] == unhashed["reason"]["llm_model"]


def test_quiet_success_prints_nothing(tmp_path):
    res = _run(
        "-q",
        "--cache-dir",
        tmp_path / "c",
        "synth",
        "--out",
        tmp_path / "d",
        "--counts",
        "1,1,1,1,1",
        "--test-size",
        "1",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""


def test_piped_output_has_no_bar_residue_or_wrapping(small_dataset, tmp_path):
    long_cache = tmp_path / ("a-cache-folder-with-a-long-name-" + "x" * 60)
    res = _run("--cache-dir", long_cache, "describe", small_dataset)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert lines and all(ln.strip() for ln in lines), res.stderr  # no blank lines left by progress bars
    info = _run("--cache-dir", long_cache, "cache", "info")
    assert str(long_cache) in info.stderr  # a table title longer than 80 columns
    assert len(max(info.stderr.splitlines(), key=len)) > 80


# --- layering -----------------------------------------------------------------------------------------
PACKAGE = Path(__file__).resolve().parent.parent / "asectl"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_imports_run_downward_only():
    """commands -> stages -> backends/models -> cache: nothing imports the CLI but the entry point, no
    command imports another layer's CLI helpers from cli.py, and the per-image stages, backends and
    models never import the modality glue or a command."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        mods = _imports(path)
        if rel not in ("cli.py", "__main__.py"):
            assert "asectl.cli" not in mods, f"{rel} imports asectl.cli"
        if not rel.startswith("commands/") and rel != "cli.py":
            assert not any(m.startswith("asectl.commands") for m in mods), f"{rel} imports a command module"
        lower = rel.startswith(
            (
                "backends/",
                "models/",
                "stages/ocr",
                "stages/describe",
                "stages/reason",
                "stages/common",
                "stages/settings",
            )
        ) or rel in ("cache.py", "dataset.py", "card.py")
        if lower:
            assert not any(m.startswith("asectl.stages.modalities") for m in mods), f"{rel} imports the glue"
        if rel.startswith(("backends/", "models/")) or rel in ("cache.py", "dataset.py", "card.py"):
            assert not any(m.startswith("asectl.stages") for m in mods), f"{rel} imports a stage"
