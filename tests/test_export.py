"""asectl export: the trained model of tests/conftest.py's ``trained`` fixture (24 generated cards, real OCR,
the built-in describer, a tiny random llama GGUF, the real frozen EfficientNet-Lite0 and MiniLM) written as
ONNX graphs, and predict from that folder: the bundle's probabilities and decisions, without torch."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from asectl.cli import cli
from asectl.domain.synth import generate

ROOT = Path(__file__).resolve().parent.parent

HEAVY = ("torch", "torchvision", "transformers", "cnocr", "cnstd")
# Reports at exit which heavy packages the process ever imported.
IMPORT_REPORT = f"""
import atexit, json, sys
atexit.register(lambda: sys.stderr.write("IMPORTED " + json.dumps(sorted(
    m for m in sys.modules if m.split(".")[0] in {HEAVY!r})) + "\\n"))
"""
# The CLI as a station runs it.
CLI = (
    IMPORT_REPORT
    + """
from asectl.cli import main
sys.argv = ["asectl", *sys.argv[1:]]
main()
"""
)


def imported(stderr: str) -> list[str]:
    return json.loads(re.search(r"IMPORTED (.*)", stderr).group(1))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "line-model"
    res = trained["invoke"]("export", "--model", trained["root"] / "bundle", "--out", out, "--copy-llm", "--json")
    return {"path": out, "summary": json.loads(res.stdout.splitlines()[-1])}


def test_export_writes_graphs_settings_and_checksums(trained, exported):
    from asectl import __version__
    from asectl.models.cmaf import fusion_inputs

    out = exported["path"]
    manifest = json.loads((out / "export.json").read_text())
    bundle_cfg = json.loads((trained["root"] / "bundle" / "bundle.json").read_text())
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([*manifest["files"], "export.json"])
    assert {"heads.onnx", "encoders/image.onnx", *(f"fusion-{k}.onnx" for k in range(5))} <= set(files)
    # No weights outside the graphs but the fold models' trees members (arrays evaluated with numpy); the other
    # safetensors file is the held-out scores (numbers, read without torch) that let predict move the operating
    # point of an export as of a bundle.
    trees = [f"fusion-{k}.trees.safetensors" for k in range(5)]
    assert manifest["graphs"]["trees"] == trees and manifest["format"] == 3
    arrays = {"held-out.safetensors", *trees}
    assert not any(f.endswith((".safetensors", ".pt", ".pth", ".bin")) for f in files if f not in arrays)
    from asectl.bundle import load_bundle
    from asectl.export import load_export

    targets = {"max_miss_rate": 0.1, "max_defect_error": 0.3}
    moved, held = load_export(out).operating_point(**targets)
    expected = load_bundle(trained["root"] / "bundle").operating_point(**targets)
    assert (moved.to_dict(), held) == (expected[0].to_dict(), expected[1])
    assert manifest["asectl_version"] == __version__
    model = manifest["model"]
    for key in ("classes", "task", "calibration", "decision", "fusion_members"):
        assert model[key] == bundle_cfg[key], key
    # What predict replays: OCR engine without torch, the same card spec, describer, LLM file, prompt, priors.
    ocr = manifest["ocr"]
    assert {k: ocr[k] for k in ("engine", "trained_engine")} == {"engine": "rapidocr", "trained_engine": "cnocr"}
    assert "6370/6370" in ocr["why"]
    assert model["replay"]["ocr"]["engine"] == "rapidocr"
    # The wheel's recogniser cut to printable ASCII (the built-in card spec prints nothing else), in the folder.
    assert model["replay"]["ocr"]["recogniser"] == ocr["recogniser"]["file"] == "./ocr/rec-ascii.onnx"
    assert (ocr["recogniser"]["characters"], ocr["recogniser"]["kept"]) == (18710, 96)
    assert "ocr/rec-ascii.onnx" in manifest["files"] and "the same record" in ocr["recogniser"]["why"]
    for key in ("expect_model_hash", "expect_prompt_sha256", "priors", "max_tokens", "prompt"):
        assert model["replay"]["reason"][key] == bundle_cfg["replay"]["reason"][key], key
    assert model["replay"]["reason"]["llm_model"] == "./llm/tiny.gguf"  # --copy-llm
    assert model["replay"]["describe"] == bundle_cfg["replay"]["describe"]
    # The frozen text branches share one graph; each graph's inputs are named by modality.
    graphs = manifest["graphs"]
    assert graphs["encoders"]["vlm"] == graphs["encoders"]["llm"]
    import onnxruntime as ort

    fusion = ort.InferenceSession(str(out / graphs["fusion"][0]), providers=["CPUExecutionProvider"])
    member = load_bundle(trained["root"] / "bundle").fusion_members()[0]
    assert [i.name for i in fusion.get_inputs()] == list(fusion_inputs(member))
    assert set(fusion_inputs(member)) == set(bundle_cfg["branches"])
    heads = ort.InferenceSession(str(out / graphs["heads"]), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in heads.get_inputs()) == sorted(bundle_cfg["branches"])
    # Every branch but the record's numbers has an encoder graph; the heads graph standardizes the numbers.
    assert sorted(graphs["encoders"]) == sorted(b for b in bundle_cfg["branches"] if b != "stats")
    assert exported["summary"]["parity"]["probabilities"] <= 1e-4


@pytest.fixture(scope="module")
def bundle_on_test_split(trained):
    """The bundle's predictor, the model's test split and the bundle's predictions on it."""
    from asectl.bundle import load_bundle
    from asectl.cache import Cache
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.stages.predict import Predictor

    ds = load_dataset(trained["data"])
    test = Dataset(ds.split("test"), ds.root, ds.source, ds.labels)
    by_bundle = Predictor(load_bundle(trained["root"] / "bundle"), Cache(trained["cache"]))
    return by_bundle, test, by_bundle.classify(test)


def test_a_card_gets_the_same_bits_from_an_export_alone_or_with_other_cards(trained, exported):
    """Each encoder graph takes one card or text per run: a card classified alone gets the logits it gets
    among the whole folder (texts padded to a longer batch-mate's length used to move them in the last
    bits)."""
    from asectl.cache import Cache
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.export import load_export
    from asectl.stages.predict import Predictor

    ds = load_dataset(trained["data"])
    predictor = Predictor(load_export(exported["path"]), Cache(trained["cache"]))
    together = predictor.classify(Dataset(ds.samples, ds.root))
    assert len(together.samples) == len(ds.samples) > 2
    for i in (0, len(together.samples) // 2, len(together.samples) - 1):
        alone = predictor.classify(Dataset([together.samples[i]], ds.root))
        assert np.array_equal(alone.logits[:, 0], together.logits[:, i]), together.samples[i].name


def test_export_round_trip_gives_the_bundles_probabilities_and_decisions(trained, exported, bundle_on_test_split):
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.export import load_export
    from asectl.stages.ocr import OcrSettings
    from asectl.stages.predict import Predictor

    cache = Cache(trained["cache"])
    by_bundle, test, a = bundle_on_test_split
    by_export = Predictor(load_export(exported["path"]), cache)
    by_export.warm_up()  # what --watch does first: every session created
    b = by_export.classify(test)
    assert [s.name for s in a.samples] == [s.name for s in b.samples] and len(a.samples) == len(test.samples)
    pa, pb = by_bundle.probabilities(a.logits), by_export.probabilities(b.logits)
    assert np.abs(pa - pb).max() <= 1e-4
    assert by_bundle.rule.decide(pa) == by_export.rule.decide(pb)
    assert [r["decision"] for r in by_bundle.records(test, a)] == [r["decision"] for r in by_export.records(test, b)]
    # A replay on another OCR engine leaves the engine remembered for the dataset (what align reads) alone.
    assert OcrSettings.recall(cache, load_dataset(trained["data"])).engine == "cnocr"


def test_predict_from_an_export_imports_no_torch(trained, exported, tmp_path):
    """The export (its LLM copied in), moved to another folder, classifies cards new to every stage in a
    fresh process that never imports torch or transformers; its records are the bundle's."""
    moved = tmp_path / "station" / "model"
    shutil.copytree(exported["path"], moved)
    assert (moved / "llm" / "tiny.gguf").is_file()
    new = tmp_path / "new"
    generate(new, seed=99, counts="1,0,0,1,0")
    cards = sorted(str(p) for p in (new / "images").glob("*.png"))
    env = {**os.environ, "ASECTL_CACHE_DIR": str(tmp_path / "station-cache")}
    run = subprocess.run(
        [sys.executable, "-c", CLI, "-q", "predict", *cards, "--model", str(moved), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert imported(run.stderr) == []
    assert "MergeShapeInfo" not in run.stderr  # the cut recogniser's shapes agree with its graph: no warnings
    records = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    res = trained["invoke"]("predict", *cards, "--model", trained["root"] / "bundle", "--json")
    expected = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [r["image"] for r in records] == [r["image"] for r in expected] and len(records) == 2
    for r, e in zip(records, expected):
        assert r["decision"] == e["decision"] and r["label"] == e["label"]
        assert max(abs(r["probabilities"][c] - e["probabilities"][c]) for c in e["probabilities"]) <= 1e-4
    # docs/export.md's Python snippet, on the same cards and station cache: the same answers, no torch.
    snippet = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "export.md").read_text(), re.S).group(1)
    snippet = snippet.replace('"line-model"', repr(str(moved))).replace('["new-card.png"]', repr(cards))
    run = subprocess.run(
        [sys.executable, "-c", IMPORT_REPORT + snippet], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert imported(run.stderr) == []
    printed = [line.split() for line in run.stdout.splitlines()]
    assert [(p[0], p[1], p[3]) for p in printed] == [(e["image"], e["label"], e["decision"]) for e in expected]
    assert all(abs(float(p[2]) - e["probability"]) <= 1e-4 for p, e in zip(printed, expected))


@pytest.mark.parametrize("damage", ["flip", "delete", "manifest", "recogniser"])
def test_damaged_or_missing_export_file_is_one_line_naming_it(trained, exported, tmp_path, damage):
    copy = tmp_path / "model"
    shutil.copytree(exported["path"], copy)
    victim = {
        "flip": "fusion-2.onnx",
        "delete": "encoders/image.onnx",
        "manifest": "export.json",
        "recogniser": "ocr/rec-ascii.onnx",
    }[damage]
    if damage in ("flip", "recogniser"):
        with open(copy / victim, "r+b") as f:
            f.seek(300)
            f.write(b"\x00\x01\x02")
    elif damage == "delete":
        (copy / victim).unlink()
    else:
        (copy / victim).write_text('{"format": 1, "files": ')
    res = CliRunner().invoke(
        cli,
        [
            "--cache-dir",
            str(trained["cache"]),
            "predict",
            str(trained["data"] / "images" / "0000.png"),
            "--model",
            str(copy),
        ],
    )
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output
    assert str(copy / victim) in " ".join(res.output.split()) or victim in res.output
    if damage != "manifest":
        assert "checksum" in res.output


def test_export_refuses_a_non_empty_folder(trained, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep")
    res = trained["invoke"]("export", "--model", trained["root"] / "bundle", "--out", tmp_path / "taken", code=2)
    assert "not an empty folder" in res.output and (tmp_path / "taken" / "notes.txt").read_text() == "keep"


def test_a_card_the_llm_fails_on_is_its_own_error_line_and_the_watch_goes_on(trained, exported, tmp_path):
    """A real llama_decode failure (a context window of 256 tokens, smaller than the prompt's shared prefix)
    on a card whose prompt is new to the cache: a watcher writes that card's error line, naming it and the cause, and
    classifies a card whose answer is known (a test card of the model's dataset); the exit path
    (``predict`` exits 1 on error records) is the OCR errors' own."""
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.export import load_export
    from asectl.stages.predict import Predictor
    from asectl.stages.watch import watch_folder

    from .test_branches import partly_read_card

    # "mean y" not read: a prompt no training card (nor another test's card) had, so the LLM must answer it.
    new = partly_read_card(tmp_path / "partly.png", line=2)
    known = load_dataset(trained["data"]).split("test")[0].path
    model = load_export(exported["path"])
    model.config["replay"]["reason"]["n_ctx"] = 256  # what predict replays: too small for any new prompt
    inbox, out = tmp_path / "inbox", tmp_path / "out.jsonl"
    inbox.mkdir()
    shutil.copy(new, inbox / "new.png")
    shutil.copy(known, inbox / "known.png")
    predictor = Predictor(model, Cache(trained["cache"]))
    summary = watch_folder(
        inbox,
        out,
        lambda ds: predictor.run(ds).records,
        should_stop=lambda: out.exists() and len(out.read_text().splitlines()) >= 2,
        poll=0.01,
    )
    lines = {r["image"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert (summary.classified, summary.errors) == (2, 1)
    assert lines["known.png"]["decision"] in ("pass", "defect", "defective", "review")
    assert set(lines["new.png"]) == {"image", "error"}
    assert lines["new.png"]["error"].startswith(f"{(inbox / 'new.png').resolve()}: the LLM tiny.gguf could not answer")
    assert "llama_decode returned" in lines["new.png"]["error"]


def test_report_from_an_export_gives_the_bundles_figures(trained, exported, bundle_on_test_split, tmp_path):
    """`report --model EXPORT` on the model's dataset: the bundle's macro-F1, classes and decisions on its test
    cards, every part of the report made (the curves from the settings the export carries), and the
    provenance says it is an export read with rapidocr."""
    from sklearn.metrics import f1_score

    by_bundle, test, a = bundle_on_test_split
    res = trained["invoke"]("report", trained["data"], "--model", exported["path"], "--out", tmp_path, "--json")
    metrics = json.loads(res.stdout.splitlines()[-1])
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    expected = by_bundle.records(test, a)
    assert [{k: r[k] for k in ("image", "pred", "decision")} for r in metrics["predictions"]] == [
        {"image": r["image"], "pred": r["label"], "decision": r["decision"]} for r in expected
    ]
    labels = by_bundle.classes
    truth = [labels.index(s.label) for s in a.samples]
    pred = by_bundle.probabilities(a.logits).argmax(axis=1)
    assert metrics["multiclass"]["macro_f1"] == pytest.approx(
        f1_score(truth, pred, labels=range(len(labels)), average="macro", zero_division=0), abs=1e-12
    )
    assert [c["name"] for c in metrics["curves"]["pfa"]] and metrics["curves"]["fusion"]  # from the cache, the export
    assert metrics["provenance"]["exported model"].startswith(str(exported["path"]))
    assert metrics["provenance"]["ocr"].startswith("rapidocr in place of cnocr")
    assert not any("cannot" in w or "not in this cache" in w for w in metrics["warnings"])
    assert {"report.html", "report.md", "metrics.json"} <= {p.name for p in tmp_path.iterdir()}


def test_calibrate_re_sets_an_exports_thresholds_into_a_new_export(trained, exported, tmp_path):
    """A station holding only an export re-sets its thresholds on its line's labelled cards: a new export
    folder with the rule choose_rule cuts on the export's probabilities of the line's training cards, every
    other file the parent's, which predict uses with the line's stored split; the cache's models are left
    alone."""
    from asectl.bundle import HELD_OUT_SCORES
    from asectl.cache import Cache, sha256_file
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.export import MANIFEST, load_export
    from asectl.models.calibration import DecisionRule, choose_rule
    from asectl.stages.predict import Predictor

    line = tmp_path / "line"
    generate(line, seed=22, counts="3,2,2,1,2", test_size=4, difficulty="clean")
    cache = ["--cache-dir", str(trained["cache"])]
    latest = json.loads(trained["invoke"]("models", "list", "--json").stdout)[0]
    res = CliRunner().invoke(cli, [*cache, "calibrate", str(line), "--model", str(exported["path"])])
    assert res.exit_code != 0 and "give --out DIR" in res.output and "Traceback" not in res.output
    new_path = tmp_path / "line-export"
    res = trained["invoke"]("calibrate", line, "--model", exported["path"], "--out", new_path, "--json")
    assert json.loads(res.stdout.splitlines()[-1])["n_cards"] == 6
    parent, new = load_export(exported["path"]), load_export(new_path)  # checksums verified
    ds = load_dataset(line)
    predictor = Predictor(parent, Cache(trained["cache"]))
    preds = predictor.classify(Dataset(ds.samples, line))
    probs = predictor.probabilities(preds.logits)
    train = [i for i, s in enumerate(preds.samples) if s.split == "train"]
    y = np.array([parent.labels.index(preds.samples[i].label) for i in train])
    stored = DecisionRule.from_dict(parent.config["decision"])
    want = choose_rule(probs[train], y, parent.labels, **stored.targets())
    assert new.decision_rule() == want and np.allclose(new.held_out_scores()[0], probs[train])
    for name in parent.manifest["files"]:
        if name != HELD_OUT_SCORES:
            assert sha256_file(new.path / name) == sha256_file(parent.path / name), name
    recut = new.config["recalibration"]
    assert recut["parent"]["exported"] and recut["parent"]["digest"] == parent.digest
    assert new.manifest["graphs"] == parent.manifest["graphs"] and (new.path / MANIFEST).is_file()
    # predict with the new export applies the new rule and knows which cards set it (the line's split)
    res = trained["invoke"]("predict", line, "--model", new_path, "--json")
    records = {r["image"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert [records[s.name]["decision"] for s in preds.samples] == want.decide(probs)
    assert [records[s.name]["split"] for s in preds.samples] == [s.split for s in preds.samples]
    assert json.loads(trained["invoke"]("models", "list", "--json").stdout)[0]["id"] == latest["id"]


def test_copy_llm_takes_the_packaged_gguf_when_the_recorded_one_is_gone(tiny_gguf, tmp_path, monkeypatch):
    """A model trained where the package lay elsewhere (another virtual environment, since removed): its
    export copies the installed packaged GGUF when that is the same file by content, else says the file is
    not there to copy."""
    from asectl.backends import llm as llm_module
    from asectl.backends.identity import model_fingerprint
    from asectl.errors import ConfigError
    from asectl.stages.export import export_llm

    monkeypatch.setattr(llm_module, "default_model_path", lambda: tiny_gguf)  # the packaged GGUF, here
    gone = str(tmp_path / "old-venv" / "tiny.gguf")
    replay = {"reason": {"llm_model": gone, "expect_model_hash": model_fingerprint(tiny_gguf)}}
    (tmp_path / "a").mkdir()
    summary = export_llm(replay, tmp_path / "a", copy_llm=True)
    assert (
        summary["file"] == "./llm/tiny.gguf"
        and (tmp_path / "a" / "llm" / "tiny.gguf").read_bytes() == tiny_gguf.read_bytes()
    )
    other = {"reason": {"llm_model": gone, "expect_model_hash": "0" * 64}}
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="not here to copy"):
        export_llm(other, tmp_path / "b", copy_llm=True)


def test_export_copies_a_moved_llm_from_llm_model(trained, tmp_path):
    """A model whose GGUF moved since training: --copy-llm alone says the file is not here and names
    --llm-model; told where it is now (the same file by sha256), the export copies it in; without
    --copy-llm it records the new path; another GGUF is one line and exit code 2, before anything is written."""
    from asectl.bundle import load_bundle, relocate_llm
    from asectl.errors import ConfigError
    from asectl.stages.export import run_export

    from .tiny_gguf import write_tiny_llama

    bundle_dir = trained["root"] / "bundle"
    recorded = Path(load_bundle(bundle_dir).config["replay"]["reason"]["llm_model"])
    moved = tmp_path / "elsewhere" / "moved.gguf"
    moved.parent.mkdir()
    shutil.copyfile(recorded, moved)
    # The recorded file gone (and no packaged GGUF of that content), on the loaded model only.
    bundle = load_bundle(bundle_dir)
    replay = bundle.config["replay"]
    gone = {**replay, "reason": {**replay["reason"], "llm_model": str(tmp_path / "gone" / "x.gguf")}}
    bundle.config = {**bundle.config, "replay": gone}
    with pytest.raises(ConfigError, match=r"x.gguf: the model's LLM file is not here to copy; pass --llm-model"):
        run_export(bundle, tmp_path / "a", copy_llm=True)
    assert not (tmp_path / "a").exists()
    run_export(relocate_llm(bundle, moved), tmp_path / "b", copy_llm=True)
    assert (tmp_path / "b" / "llm" / "moved.gguf").read_bytes() == recorded.read_bytes()
    invoke = trained["invoke"]
    invoke("export", "--model", bundle_dir, "--out", tmp_path / "c", "--llm-model", moved)
    from asectl.export import load_export

    assert load_export(tmp_path / "c").manifest["model"]["replay"]["reason"]["llm_model"] == str(moved)
    other = write_tiny_llama(tmp_path / "o.gguf", seed=5)
    res = invoke("export", "--model", bundle_dir, "--out", tmp_path / "d", "--llm-model", other, code=2)
    assert "o.gguf: not the LLM this model was trained with" in res.output and not (tmp_path / "d").exists()
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
