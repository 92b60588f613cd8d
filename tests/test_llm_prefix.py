"""The shared prompt prefix is kept on disk and restored by a new process: same cells, same logits."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

SYSTEM = {"role": "system", "content": "You inspect drilled-hole positions on printed circuit boards. " * 3}
PREFIX = [SYSTEM, {"role": "user", "content": "Class averages: normal, type1, type2, type3, type4. Card:"}]


def card(text: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": PREFIX[1]["content"] + " " + text}]


def _old_enough(path) -> None:
    """Memos skip files changed in the last 2 s (asectl.cache); wait that out for a just-written model."""
    st = os.stat(path)
    wait = 2.2 - (time.time() - max(st.st_mtime, st.st_ctime))
    if wait > 0:
        time.sleep(wait)


def _logits_after(llm, messages) -> np.ndarray:
    """Logits for the token after the card's prompt, the shared prefix put in place as ``answer`` does."""
    import llama_cpp

    model = llm.load()
    tokens = llm.prompt_tokens(messages)
    n = llm._continue_from_prefix(tokens, llm.prompt_tokens(PREFIX))
    assert n > 8
    model.eval(tokens[n:])
    ptr = llama_cpp.llama_get_logits_ith(model._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm._llm.n_vocab(),)).copy()


def test_prefix_restored_from_disk_gives_the_same_logits_and_answers(tiny_gguf, _isolated_cache):
    from asectl.backends.json_decode import Field
    from asectl.backends.llm import LlamaCppLLM

    _old_enough(tiny_gguf)
    fields = [Field("verdict", ("normal", "defect")), Field("rationale", None, 0, 40)]
    sampling = {"temperature": 0.0, "max_tokens": 64, "seed": 0}

    first = LlamaCppLLM(tiny_gguf, n_ctx=2048)
    evaluated = _logits_after(first, card("N 131, mean x -0.21"))
    assert first.prefix_source == "evaluated"
    memos = list((_isolated_cache / LlamaCppLLM.PREFIX_MEMO).glob("*.bin"))
    assert len(memos) == 1
    answers = [first.answer(card(t), fields, sampling, prefix_messages=PREFIX)["raw"] for t in ("N 90", "N 400")]
    first.close()

    second = LlamaCppLLM(tiny_gguf, n_ctx=2048)
    restored = _logits_after(second, card("N 131, mean x -0.21"))
    assert second.prefix_source == "restored"
    np.testing.assert_array_equal(restored, evaluated)
    assert [
        second.answer(card(t), fields, sampling, prefix_messages=PREFIX)["raw"] for t in ("N 90", "N 400")
    ] == answers
    second.close()

    # The prefix matters (the check above could not pass with empty cells): without it the logits differ.
    alone = LlamaCppLLM(tiny_gguf, n_ctx=2048)
    model = alone.load()
    model.eval(alone.prompt_tokens([{"role": "user", "content": "N 131, mean x -0.21"}]))
    import llama_cpp

    other = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model._ctx.ctx, -1), shape=(model.n_vocab(),))
    assert not np.array_equal(other, evaluated)
    alone.close()

    # A damaged memo is not used: the prefix is evaluated again (same logits) and the memo rewritten.
    data = bytearray(memos[0].read_bytes())
    data[-1] ^= 0xFF
    memos[0].write_bytes(bytes(data))
    third = LlamaCppLLM(tiny_gguf, n_ctx=2048)
    np.testing.assert_array_equal(_logits_after(third, card("N 131, mean x -0.21")), evaluated)
    assert third.prefix_source == "evaluated"
    third.close()
    fourth = LlamaCppLLM(tiny_gguf, n_ctx=2048)
    np.testing.assert_array_equal(_logits_after(fourth, card("N 131, mean x -0.21")), evaluated)
    assert fourth.prefix_source == "restored"
    fourth.close()


def test_prefix_memo_key_changes_with_the_context_size(tiny_gguf, _isolated_cache):
    """Another n_ctx is another memo (a state from one context layout is never forced into another)."""
    from asectl.backends.llm import LlamaCppLLM

    _old_enough(tiny_gguf)
    for n_ctx in (2048, 3072):
        llm = LlamaCppLLM(tiny_gguf, n_ctx=n_ctx)
        _logits_after(llm, card("N 131"))
        assert llm.prefix_source == "evaluated"
        llm.close()
    assert len(list((_isolated_cache / LlamaCppLLM.PREFIX_MEMO).glob("*.bin"))) == 2


def test_answers_with_the_shared_prefix_reused_equal_answers_computed_from_scratch(tiny_gguf, _isolated_cache):
    """Reusing the evaluated prefix (kept in the context, and restored from disk by a new process) is a pure
    speed-up: each answer equals the one computed with the whole prompt evaluated anew, in any card order."""
    from asectl.backends.json_decode import Field
    from asectl.backends.llm import LlamaCppLLM

    _old_enough(tiny_gguf)
    fields = [
        Field("verdict", ("normal", "defect")),
        Field("kind", ("none", "shift", "spread")),
        Field("rationale", None, 1, 40),
    ]
    sampling = {"temperature": 0.0, "max_tokens": 96, "seed": 0}
    texts = ["N 90", "N 400, mean x 1.2", "N 131, mean x -0.21", "sd y 3.5, far high", "N 90"]

    scratch = LlamaCppLLM(tiny_gguf, n_ctx=2048)
    alone = [scratch.answer(card(t), fields, sampling) for t in texts]
    assert all(a["tokens"]["prompt_reused"] == 0 for a in alone)
    scratch.close()
    for order in (texts, texts[::-1]):
        llm = LlamaCppLLM(tiny_gguf, n_ctx=2048)
        reused = {t: llm.answer(card(t), fields, sampling, prefix_messages=PREFIX) for t in order}
        assert all(r["tokens"]["prompt_reused"] > 8 for r in reused.values())
        assert [reused[t]["raw"] for t in texts] == [a["raw"] for a in alone]
        llm.close()
    assert len({a["raw"] for a in alone}) > 1  # the cards' answers differ: the comparison can fail
