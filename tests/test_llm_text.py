"""The LLM branch's text: the composite (answer + OCR'd record, prompt with the nearest-class hint) or the
LLM's own answer alone (``encoders.llm_text = "answer"``), through reason, align, fuse-train and predict.

Real OCR, the built-in describer and a tiny random llama GGUF (tests/tiny_gguf.py)."""

import json

import pytest
from click.testing import CliRunner

from asectl.cli import cli
from asectl.errors import ConfigError

from .conftest import reasoned_dataset

ANSWER = {
    "verdict": "defective",
    "deviation_kind": "shift",
    "axis": "x",
    "severity": "high",
    "closest_class": "type1",
    "rationale": "mean x far above.",
}


def test_answer_only_text_is_the_composite_without_the_record():
    from asectl.stages.reason import answer_only_text, answer_text

    only = answer_only_text(ANSWER)
    assert only == "Verdict: defective, shift deviation along x, high severity, closest to type1. mean x far above."
    assert answer_text(ANSWER, "N 90 holes.") == f"{only} Record: N 90 holes."
    assert answer_only_text(None) == "No usable answer." and "Record" not in answer_only_text(None)


def test_hint_free_prompt_has_no_nearest_class_line(small_dataset):
    from asectl.domain.dataset import load_dataset
    from asectl.domain.synth import read_truth
    from asectl.stages.reason import (
        DEFAULT_PROMPT,
        HINT_PLACEHOLDERS,
        build_priors,
        card_levels,
        card_summary,
        hint_free_prompt,
        load_prompt,
    )

    assert hint_free_prompt(DEFAULT_PROMPT) == "reason-v3"
    assert hint_free_prompt("reason-v3") == "reason-v3"
    v3 = load_prompt("reason-v3")
    assert not v3.placeholders() & set(HINT_PLACEHOLDERS) and "card_levels" in v3.placeholders()
    with pytest.raises(ConfigError, match=r"class hint \(\$deviation\)"):
        hint_free_prompt("reason-v1")
    printed = {name: row["printed"] for name, row in read_truth(small_dataset).items()}
    train = load_dataset(small_dataset).split("train")
    priors = build_priors([printed[s.name] for s in train], [s.label for s in train])
    card = printed[train[0].name]
    levels = card_levels(card, priors)
    assert "Nearest class profiles" in card_summary(card, priors) and "Nearest" not in levels
    assert card_summary(card, priors).startswith(levels)
    messages = v3.messages(
        card="HINT", card_levels=levels, record="", deviation="HINT", priors="", n_train=1, labels="normal, type1"
    )
    assert "HINT" not in json.dumps(messages) and messages[-1]["content"].endswith(levels)


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_gguf):
    root = tmp_path_factory.mktemp("llm-text")
    data, cache, invoke = reasoned_dataset(tmp_path_factory, root, tiny_gguf)
    fast = ["--set", "pfa.epochs_per_stage=2", "--set", "fusion.epochs=4"]
    invoke("fuse-train", data, "--set", "encoders.llm_text=answer", "--out", root / "bundle", *fast)
    return {"root": root, "data": data, "cache": cache, "invoke": invoke, "fast": fast}


def test_answer_only_branch_from_align_to_predict(learned):
    from asectl.bundle import load_bundle
    from asectl.cache import Cache
    from asectl.domain.dataset import load_dataset
    from asectl.stages.modalities import ModalitySettings, collect_modalities
    from asectl.stages.reason import ReasonSettings

    cache, data = Cache(learned["cache"]), load_dataset(learned["data"])
    bundle = load_bundle(learned["root"] / "bundle")
    cfg = bundle.config
    # Recorded in the bundle: the profile key, the replayed settings (hint-free prompt) and the provenance.
    assert cfg["profile"]["encoders"]["llm_text"] == "answer"
    assert cfg["replay"]["llm_text"] == "answer" and cfg["replay"]["reason"]["prompt"] == "reason-v3"
    assert cfg["provenance"]["LLM text"].startswith("answer only")
    # The texts the LLM branch encoded, as predict replays them: the answer alone.
    replayed = collect_modalities(data, cache, cfg["replay"], remember=False)
    assert replayed.llm_texts and not any("Record:" in t for t in replayed.llm_texts)
    assert all(t.startswith("Verdict:") or t == "No usable answer." for t in replayed.llm_texts)
    # The composite (default) on the same cards ends with the record and used the hinted prompt.
    composite = collect_modalities(data, cache, ModalitySettings.recall(cache, data), remember=False)
    assert all("Record:" in t for t in composite.llm_texts)
    assert composite.replay["reason"]["prompt"] == "reason-v2"
    assert composite.provenance["LLM text"].startswith("composite")
    # The answer-only run did not change what `asectl reason` remembers for the dataset.
    assert ReasonSettings.recall(cache, data).prompt == "reason-v2"
    # predict replays the bundle; report states the LLM text in its provenance lines.
    card = sorted((learned["data"] / "images").glob("*.png"))[0]
    res = learned["invoke"]("predict", card, "--model", learned["root"] / "bundle", "--json")
    assert json.loads(res.stdout.splitlines()[-1])["label"] in cfg["classes"]
    out = learned["root"] / "report"
    learned["invoke"]("report", learned["data"], "--model", learned["root"] / "bundle", "--out", out)
    assert "answer only: the LLM's own answer" in (out / "report.md").read_text()


def test_bad_llm_text_is_one_line_error(learned):
    res = CliRunner().invoke(
        cli,
        [
            "--cache-dir",
            str(learned["cache"]),
            "align",
            str(learned["data"]),
            "--set",
            "encoders.llm_text=record",
            *learned["fast"],
        ],
    )
    assert res.exit_code != 0 and "encoders.llm_text" in res.output and "composite, answer" in res.output


def test_replayed_llm_text_is_checked_too():
    # A bundle's replay (or a benchmark's settings) is checked by the same rule as a profile.
    from asectl.stages.modalities import ModalitySettings

    with pytest.raises(ConfigError, match="encoders.llm_text.*composite, answer"):
        ModalitySettings.from_dict({"llm_text": "record"})
    assert ModalitySettings.from_dict({"llm_text": "answer"}).llm_text == "answer"
