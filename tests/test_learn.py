"""align -> fuse-train -> predict -> report end to end on a small generated dataset, through the CLI.

Real OCR, the built-in describer, a tiny random llama GGUF for the LLM branch (fast), the quick profile's
image encoder trained on the cards (cards-cnn) and the real frozen MiniLM; a few epochs keep it quick."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from asectl.cli import cli
from asectl.domain.synth import generate

from .conftest import FAST, make_default_latest


def test_align_stride_schedule_and_losses(trained):
    a = trained["align"]
    stages = a["stages"]
    n_train = stages[-1]["n_train"]
    assert len(stages) == 5
    assert [s["n_train"] for s in stages] == [int(np.ceil(f * n_train - 1e-9)) for f in (0.2, 0.4, 0.6, 0.8, 1.0)]
    assert [s["n_pend"] for s in stages] == [n_train - s["n_train"] for s in stages]
    assert stages[-1]["val_loss"] is None and all(s["val_loss"] is not None for s in stages[:-1])
    assert not a["from_cache"]


def test_align_rerun_is_cached_and_changed_stride_retrains(trained):
    res = trained["invoke"]("align", trained["data"], "--stride", "0.2", "--json", *FAST)
    assert json.loads(res.stdout.splitlines()[-1])["from_cache"] is True
    res = trained["invoke"]("align", trained["data"], "--stride", "0.2/0.6/1", "--json", *FAST)
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["from_cache"] is False and len(out["stages"]) == 3
    make_default_latest(trained)  # the default back for the tests that follow (cached)


def test_bundle_is_safetensors_and_json_only(trained):
    bundle = trained["root"] / "bundle"
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    # one per calibration fold (default 5), each with its trees member on the stats numbers
    members = [f"fusion-{k}{part}.safetensors" for k in range(5) for part in ("", ".trees")]
    # encoders/image.safetensors: the quick profile's image encoder is trained on the cards (cards-cnn)
    assert files == ["bundle.json", "encoders/image.safetensors", *members, "heads.safetensors", "held-out.safetensors"]
    cfg = json.loads((bundle / "bundle.json").read_text())
    assert cfg["classes"] == ["normal", "type1", "type2", "type3", "type4"]
    assert "built-in describer" in cfg["provenance"]["descriptions"]
    assert cfg["replay"]["reason"]["priors"]["classes"]
    assert set(cfg["files"]) == {*members, "heads.safetensors", "held-out.safetensors", "encoders/image.safetensors"}
    assert cfg["fusion_members"] == 5


def test_the_bundle_records_the_machine_it_was_trained_on(trained, monkeypatch):
    """The CPU, the instruction set of torch's kernels and the numeric libraries' versions (a model's last
    bits depend on them) are in the bundle, for the fusion and the alignment, and in the report's provenance;
    a switch that narrows the instruction set is recorded when set."""
    import torch

    from asectl.bundle import load_bundle
    from asectl.environment import KERNEL_FEATURES, RECORDED_SWITCHES, cpu_name, training_machine
    from asectl.stages.report import provenance_lines

    bundle = load_bundle(trained["root"] / "bundle")
    machine = bundle.config["training"]["machine"]
    assert machine["cpu"] == cpu_name() and machine["cpu"]
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    features = machine["cpu_features"]
    assert features == [k for k in KERNEL_FEATURES if k in features]  # known names, in their order
    if machine["torch_cpu_capability"] in ("AVX2", "AVX512"):  # torch found these on the CPU itself
        assert "avx2" in features and ("avx512f" in features or machine["torch_cpu_capability"] == "AVX2")
    assert machine["libraries"]["torch"] == torch.__version__.split("+")[0]
    assert set(machine["libraries"]) >= {"numpy", "scikit-learn", "llama_cpp_python"}
    assert bundle.config["training"]["align_machine"] == machine  # aligned and fused in the same process
    image = bundle.config["training"]["image_encoder_machine"]  # the default trains its image encoder (cards-cnn)
    assert image == machine
    prov, _ = provenance_lines(bundle)
    assert (
        prov["trained on"].startswith(f"{machine['cpu']}, ") and machine["torch_cpu_capability"] in prov["trained on"]
    )
    assert "aligned on" not in prov and "image encoder trained on" not in prov
    # weights from a cache another machine filled: the report names that machine (the record in memory only)
    other = {**machine, "cpu": "Another CPU", "cpu_features": ["avx2", "fma"]}
    bundle.config["training"]["image_encoder_machine"] = other
    prov, _ = provenance_lines(bundle)
    assert prov["image encoder trained on"].startswith("Another CPU, ") and "aligned on" not in prov
    for switch in RECORDED_SWITCHES:
        monkeypatch.delenv(switch, raising=False)
    assert training_machine()["instruction_set_switches"] == {}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    assert training_machine()["instruction_set_switches"] == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def test_predict_fresh_card_outside_the_dataset(trained, tmp_path):
    new = tmp_path / "new"
    generate(new, seed=99, counts="1,0,0,0,1")
    cards = sorted(str(p) for p in (new / "images").glob("*.png"))
    res = trained["invoke"]("predict", *cards, "--model", trained["root"] / "bundle", "--json")
    recs = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(recs) == 2
    for r in recs:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
        assert r["label"] in r["probabilities"]
    # Without --model the latest trained model is used, and says so (unless -q: warnings and errors only).
    res = CliRunner().invoke(cli, ["--cache-dir", str(trained["cache"]), "predict", cards[0]])
    assert res.exit_code == 0 and "using the latest trained model" in res.output


def test_report_writes_all_files(trained):
    out = trained["root"] / "report"
    trained["invoke"]("report", trained["data"], "--out", out)
    for name in (
        "report.html",
        "report.md",
        "metrics.json",
        "confusion.png",
        "confusion_binary.png",
        "tsne.png",
        "curves.png",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["multiclass"]["macro_f1"] <= 1
    html = (out / "report.html").read_text()
    assert "built-in describer" in html and "PFA stage 5" in html


def test_ablation_modes_and_fusions(trained):
    inv, data = trained["invoke"], trained["data"]
    try:
        for mode in ("direct", "none"):
            res = inv("align", data, "--mode", mode, "--json", *FAST)
            assert len(json.loads(res.stdout.splitlines()[-1])["stages"]) == 1
        for fusion in ("concat", "cmaf-nosigmoid"):
            res = inv("fuse-train", data, "--fusion", fusion, "--json", *FAST)
            assert json.loads(res.stdout.splitlines()[-1])["variant"] == fusion
        res = inv("fuse-train", data, "--task", "binary", "--json", *FAST)
        assert json.loads(res.stdout.splitlines()[-1])["classes"] == ["normal", "defective"]
    finally:
        make_default_latest(trained)


def test_predict_without_any_model_is_a_usage_error(tmp_path, small_dataset):
    res = CliRunner().invoke(
        cli, ["--cache-dir", str(tmp_path / "empty"), "predict", str(small_dataset / "images" / "0000.png")]
    )
    assert res.exit_code == 2 and "no trained model" in res.output


def test_damaged_bundle_is_refused(trained, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(trained["root"] / "bundle", copy)
    with open(copy / "fusion-3.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    res = CliRunner().invoke(cli, ["predict", str(trained["data"] / "images" / "0000.png"), "--model", str(copy)])
    assert res.exit_code == 2 and "checksum mismatch" in res.output


def test_fuse_train_on_a_tda_augmented_training_split(trained):
    inv, data, root = trained["invoke"], trained["data"], trained["root"]
    aug = root / "aug"
    inv("synth", "--augment", data, "--out", aug, "--stats", "printed", "--factor", "1.5")
    before = {p.name for p in (trained["cache"] / "entries" / "reason").glob("*/*")}
    res = inv("fuse-train", data, "--augmented", aug, "--json", *FAST)
    out = json.loads(res.stdout.splitlines()[-1])
    cfg = json.loads(
        (root / "cache" / "entries" / "model" / out["model"][:2] / out["model"] / "bundle.json").read_text()
    )
    assert cfg["training"]["augmented"] == str(aug)
    n_real = sum(1 for line in (data / "labels.csv").read_text().splitlines()[1:] if line.endswith(",train"))
    assert out["n_train"] == n_real + round(0.5 * n_real)
    # The synthetic cards train the fold models; the temperature and the rule are fitted on the real ones.
    cal = cfg["calibration"]
    assert cal["n_held_out"] == len(cal["held_out"]) == n_real and cal["n_augmented"] == round(0.5 * n_real)
    assert not any(name.startswith("images/tda-") for name in cal["held_out"])
    assert cfg["decision"]["held_out"]["n"] == n_real
    # The LLM's priors still come from the real training cards: their answers were reused from the cache,
    # only the new synthetic cards were reasoned about.
    after = {p.name for p in (trained["cache"] / "entries" / "reason").glob("*/*")}
    assert len(after - before) == round(0.5 * n_real)
    # A test split that is not the dataset's own is refused.
    other = root / "other"
    generate(other, seed=12, counts="2,2,2,2,2")
    bad = CliRunner().invoke(
        cli, ["--cache-dir", str(trained["cache"]), "fuse-train", str(data), "--augmented", str(other)]
    )
    assert bad.exit_code == 2 and "test split differs" in bad.output


@pytest.mark.slow
def test_paper_profile_through_the_cli(trained, tmp_path):
    """--profile paper end to end: ResNet-50 (random initialisation, on request) and BERT (a tiny one
    from a folder) fine-tuned in warm-up and alignment, then fusion and predict. Slow on a CPU: one
    epoch per phase still runs ResNet-50 forward and backward over every training card."""
    from .test_encoders import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert")
    paper = [
        "--profile",
        "paper",
        "--set",
        "encoders.device=cpu",
        "--set",
        "encoders.image_random_init=true",
        "--set",
        f"encoders.text_path={bert}",
        "--set",
        "encoders.warmup_epochs=1",
        "--set",
        "pfa.epochs_per_stage=1",
        "--set",
        "fusion.epochs=2",
    ]
    inv, data = trained["invoke"], trained["data"]
    align = json.loads(inv("align", data, "--stride", "0.5/1", "--json", *paper).stdout.splitlines()[-1])
    assert [s["n_train"] for s in align["stages"]][-1] == align["stages"][-1]["n_train"] and len(align["stages"]) == 2
    fuse = json.loads(inv("fuse-train", data, "--out", tmp_path / "bundle", "--json", *paper).stdout.splitlines()[-1])
    cfg = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert cfg["profile"]["name"] == "paper" and cfg["profile"]["encoders"]["finetune"] is True
    inv("report", data, "--model", tmp_path / "bundle", "--out", tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "randomly initialised" in report and "encoders fine-tuned" in report
    res = inv("predict", data / "images" / "0000.png", "--model", tmp_path / "bundle", "--json")
    rec = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("{")))
    assert abs(sum(rec["probabilities"].values()) - 1) < 1e-4 and fuse["classes"] == cfg["classes"]


def test_a_model_whose_llm_moved_replays_it_from_llm_model(trained, tmp_path, tiny_gguf):
    """A station whose GGUF moved since training: the replay stops with one line naming the file and
    --llm-model; told where the file is now (the same file by sha256), predict gives the results the
    recorded file gives, with the model's identity unchanged; another GGUF is refused before any card."""
    import shutil

    from asectl.bundle import Bundle, load_bundle, relocate_llm
    from asectl.cache import Cache
    from asectl.domain.dataset import load_inputs
    from asectl.errors import ConfigError
    from asectl.stages.predict import run_predict

    from .tiny_gguf import write_tiny_llama

    new = tmp_path / "new"
    generate(new, seed=97, counts="1,0,1,0,0")
    cards = sorted(str(p) for p in (new / "images").glob("*.png"))
    bundle_dir = trained["root"] / "bundle"
    invoke = trained["invoke"]
    before = [json.loads(x) for x in invoke("predict", *cards, "--model", bundle_dir, "--json").stdout.splitlines()]
    moved = tmp_path / "elsewhere" / "llm.gguf"
    moved.parent.mkdir()
    shutil.copyfile(tiny_gguf, moved)
    # The recorded file gone, on the loaded model (the session's GGUF serves other tests).
    bundle = load_bundle(bundle_dir)
    replay = bundle.config["replay"]
    bundle.config = {**bundle.config, "replay": {**replay, "reason": {**replay["reason"], "llm_model": "/gone/x.gguf"}}}
    cache = Cache(trained["cache"])
    with pytest.raises(ConfigError, match=r"^/gone/x.gguf: the LLM this model .*pass --llm-model"):
        run_predict(load_inputs(cards), bundle, cache)
    digest = bundle.digest
    after = run_predict(load_inputs(cards), relocate_llm(bundle, moved), cache).records
    assert bundle.digest == digest and bundle.config["replay"]["reason"]["llm_model"] == str(moved)
    assert [r["probabilities"] for r in after] == [r["probabilities"] for r in before]
    # The CLI: the same results from the moved file; another GGUF, or one for a model without the llm
    # branch, is one line and exit code 2 (a usage error).
    res = invoke("predict", *cards, "--model", bundle_dir, "--llm-model", moved, "--json")
    assert [json.loads(x) for x in res.stdout.splitlines()] == before
    other = write_tiny_llama(tmp_path / "other.gguf", seed=5)
    for command in (["predict", cards[0]], ["report", trained["data"]], ["calibrate", trained["data"]]):
        res = invoke(*command, "--model", bundle_dir, "--llm-model", other, code=2)
        assert "other.gguf: not the LLM this model was trained with (sha256" in res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    no_llm = Bundle(bundle_dir, {**bundle.config, "replay": {**replay, "skipped_stages": ["reason"]}})
    with pytest.raises(ConfigError, match="no llm branch"):
        relocate_llm(no_llm, moved)
