"""Schema-constrained decoding of a flat JSON object (enum and bounded-string values) with llama.cpp.

Why not a llama.cpp grammar: with a grammar, llama-cpp-python runs one decode call per answer token,
keys and punctuation included, although the schema leaves no choice there. Here the fixed text is fed
to the model in the same decode call as the token chosen just before it, so a call is made only where
the model has a real choice (an enum value, the next piece of a string): about 10 calls instead of
50-60 per reasoning answer. The model still picks every value by its own logits, restricted to what the
schema allows, so the answer is always valid JSON of the schema unless --max-tokens cuts it.
"""

from __future__ import annotations

import ctypes
import json
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from asectl.errors import ConfigError, DataError

REPEAT_WINDOW = 64  # tokens a repeat penalty looks back over (llama.cpp's default penalty_last_n)


@dataclass(frozen=True)
class Field:
    """One property of the answer object: a choice among ``options``, or free text of bounded length."""

    name: str
    options: tuple[str, ...] | None = None
    min_chars: int = 0
    max_chars: int = 200


def object_fields(schema: Mapping[str, Any]) -> list[Field]:
    """The fields of a flat JSON schema object whose properties are all required strings (enum or not)."""
    props = schema.get("properties") if schema.get("type") == "object" else None
    if not isinstance(props, dict) or set(schema.get("required", [])) != set(props):
        raise ConfigError("answer schema: need an object whose properties are all required")
    out = []
    for name, p in props.items():
        if p.get("type") != "string":
            raise ConfigError(f"answer schema: property '{name}' must be a string (enum or free text)")
        if "enum" in p:
            out.append(Field(name, tuple(str(v) for v in p["enum"])))
        else:
            out.append(Field(name, None, int(p.get("minLength", 0)), int(p.get("maxLength", 200))))
    return out


@dataclass
class Decoded:
    text: str
    tokens: int  # answer tokens, fixed ones included
    calls: int  # decode calls after the prompt
    finish_reason: str  # "stop", or "length" when max_tokens cut the answer
    prompt_ms: float  # the card's prompt tokens plus the answer's opening text
    generate_ms: float


def _piece(vocab: Any, token: int) -> bytes:
    import llama_cpp

    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[: max(n, 0)]


def _safe_text(piece: bytes) -> str | None:
    """The piece as text when it can sit inside a JSON string as is (no quote, backslash, control
    character or broken UTF-8), else None."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or any(c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return None
    return text


# The vocabulary scan (every token's bytes, and which can sit inside a JSON string as they are) takes about
# 0.4 s for a 49k-token vocabulary: kept on disk beside the cache per model file state and llama-cpp-python
# version, so a cold `predict` (a new process) reads it instead.
VOCAB_MEMO = "llm-vocab"


def vocabulary_scan(llm: Any, memo: tuple[list, Any] | None = None) -> tuple[list[bytes], np.ndarray]:
    """(each token's bytes, the tokens whose text can sit inside a JSON string as is) of a loaded model.
    ``memo``: (key, stat) of the model file (``asectl.cache.file_state``, extended by what else the scan
    depends on) to keep the scan under; None: scanned every time."""
    from safetensors.numpy import load, save

    from asectl.cache import read_memo_bytes, write_memo_bytes

    key, st = memo if memo is not None else (None, None)
    data = read_memo_bytes(VOCAB_MEMO, key) if key else None
    if data is not None:
        arrays = load(data)
        ends = np.cumsum(arrays["lengths"]).tolist()
        blob = arrays["blob"].tobytes()
        pieces = [blob[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        return pieces, arrays["string_ids"]
    vocab = llm._model.vocab
    pieces = [_piece(vocab, t) for t in range(llm.n_vocab())]
    string_ids = np.array([t for t, p in enumerate(pieces) if _safe_text(p) is not None], dtype=np.int64)
    if key:
        arrays = {
            "lengths": np.array([len(p) for p in pieces], dtype=np.int64),
            "blob": np.frombuffer(b"".join(pieces) or b"\0", dtype=np.uint8),
            "string_ids": string_ids,
        }
        write_memo_bytes(VOCAB_MEMO, key, save(arrays), st)
    return pieces, string_ids


class JsonObjectDecoder:
    """Decodes answers of one schema with one loaded ``llama_cpp.Llama``; the vocabulary scan and the
    tokenised fixed text are computed once per model."""

    def __init__(self, llm: Any, fields: Sequence[Field], vocab_memo: tuple[list, Any] | None = None):
        self.llm = llm
        self.fields = list(fields)
        self.n_vocab = llm.n_vocab()
        self.pieces, self.string_ids = vocabulary_scan(llm, vocab_memo)
        self.string_text = {int(t): self.pieces[t].decode("utf-8") for t in self.string_ids}
        self.string_chars = np.array([len(self.string_text[int(t)]) for t in self.string_ids], dtype=np.int64)
        # Fixed text: the opening before the first value, and what follows each value.
        keys = [json.dumps(f.name) + ': "' for f in self.fields]
        self.opening = self.tokens("{" + keys[0])
        self.after = [self.tokens('"' + (", " + keys[i + 1] if i + 1 < len(keys) else "}")) for i in range(len(keys))]
        self.options = [[self.tokens(o) for o in f.options] if f.options else None for f in self.fields]

    def tokens(self, text: str) -> list[int]:
        """Tokens that spell exactly ``text`` when they continue other text. SentencePiece vocabularies
        put a space before a text's first piece; then the text is tokenised after a newline and the
        tokens up to that newline are dropped."""
        llm = self.llm
        want = text.encode("utf-8")
        toks = llm.tokenize(want, add_bos=False, special=False)
        if b"".join(self.pieces[t] for t in toks) == want:
            return toks
        toks = llm.tokenize(b"\n" + want, add_bos=False, special=False)
        for k in range(1, len(toks)):
            if b"".join(self.pieces[t] for t in toks[k:]) == want:
                return toks[k:]
        raise ConfigError(
            f"{llm.model_path}: this model's tokenizer cannot spell {text!r} exactly; use another GGUF for reasoning"
        )

    # --- choosing a token ----------------------------------------------------------------------------
    def _logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)

    def _choose(self, ids: np.ndarray, sampling: Mapping[str, Any], rng: np.random.Generator) -> int:
        """Greedy (temperature 0) or sampled choice among ``ids``, after the repeat penalty; top-k,
        top-p and min-p filter the candidates before temperature, as llama.cpp's sampler chain does."""
        logits = self._logits()[ids]
        penalty = sampling.get("repeat_penalty", 1.0)
        if penalty != 1.0:
            n = self.llm.n_tokens
            seen = np.isin(ids, self.llm.input_ids[max(0, n - REPEAT_WINDOW) : n])
            logits = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
        if sampling.get("temperature", 0.0) <= 0 or len(ids) == 1:
            return int(ids[int(np.argmax(logits))])  # argmax takes the first of equal logits: deterministic
        order = np.argsort(-logits, kind="stable")
        if sampling.get("top_k", 0) > 0:
            order = order[: sampling["top_k"]]
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        keep = int(np.searchsorted(np.cumsum(probs), sampling.get("top_p", 1.0))) + 1
        keep_min = int(np.sum(probs >= sampling.get("min_p", 0.0) * probs[0]))
        order = order[: max(1, min(keep, keep_min))]
        scaled = logits[order] / sampling["temperature"]
        p = np.exp(scaled - scaled.max())
        return int(ids[order[rng.choice(len(order), p=p / p.sum())]])

    # --- one answer ----------------------------------------------------------------------------------
    def decode(self, prompt_tokens: Sequence[int], sampling: Mapping[str, Any]) -> Decoded:
        """Evaluate ``prompt_tokens`` (appended to what the context already holds) and decode one answer."""
        llm = self.llm
        max_tokens = int(sampling["max_tokens"])
        # The window asked for: llama.cpp pads its own (llm.n_ctx()) to a multiple of 256, but
        # llama-cpp-python's token buffer has the size asked for, and eval fails past it.
        n_ctx = min(llm.n_ctx(), len(llm.input_ids))
        if llm.n_tokens + len(prompt_tokens) + len(self.opening) + 1 > n_ctx:
            # This prompt's own failure (another card's may fit): the stage makes it that card's error.
            raise DataError(
                f"the prompt ({llm.n_tokens + len(prompt_tokens)} tokens) does not fit the "
                f"context window ({n_ctx}); raise --n-ctx"
            )
        rng = np.random.default_rng(int(sampling.get("seed", 0)))
        answer: list[int] = []
        pending = list(prompt_tokens)
        times = {"prompt": 0.0, "generate": 0.0}
        calls = 0

        def commit(tokens: Sequence[int]) -> bool:
            """Add answer tokens; False when --max-tokens is reached."""
            room = max_tokens - len(answer)
            answer.extend(tokens[:room])
            pending.extend(tokens[:room])
            return len(tokens) <= room

        def evaluate() -> None:
            nonlocal calls
            if llm.n_tokens + len(pending) > n_ctx:
                raise DataError(
                    f"the answer does not fit the context window ({n_ctx}); raise --n-ctx or lower --max-tokens"
                )
            t0 = time.perf_counter()
            llm.eval(pending)
            times["generate" if calls else "prompt"] += time.perf_counter() - t0
            calls += 1
            pending.clear()

        def done(reason: str) -> Decoded:
            text = b"".join(self.pieces[t] for t in answer).decode("utf-8", errors="replace")
            return Decoded(
                text,
                len(answer),
                max(calls - 1, 0),
                reason,
                round(times["prompt"] * 1000, 1),
                round(times["generate"] * 1000, 1),
            )

        if not commit(self.opening):
            return done("length")
        for i, field in enumerate(self.fields):
            if field.options is not None:
                ok = self._choose_option(self.options[i], sampling, rng, commit, evaluate)
            else:
                ok = self._write_string(field, self.after[i][0], sampling, rng, commit, evaluate)
                if ok:  # the closing quote was chosen by the model: the rest is fixed
                    ok = commit(self.after[i][1:])
                    continue
            if not ok or not commit(self.after[i]):
                return done("length")
        return done("stop")

    def _choose_option(
        self,
        options: list[list[int]],
        sampling: Mapping[str, Any],
        rng: np.random.Generator,
        commit: Any,
        evaluate: Any,
    ) -> bool:
        """Walk the options' tokens: where they differ the model chooses, where they agree the token is
        fixed. Options whose tokens are a prefix of another's are not expected (enum values are words)."""
        alive = list(range(len(options)))
        depth = 0
        while True:
            nexts = sorted({options[j][depth] for j in alive if depth < len(options[j])})
            finished = [j for j in alive if depth == len(options[j])]
            if finished and (not nexts or len(alive) == 1):
                return True
            if len(nexts) == 1 and not finished:
                tok = nexts[0]
            else:
                evaluate()
                tok = self._choose(np.array(nexts, dtype=np.int64), sampling, rng)
            if not commit([tok]):
                return False
            alive = [j for j in alive if depth < len(options[j]) and options[j][depth] == tok]
            depth += 1

    def _write_string(
        self,
        field: Field,
        close: int,
        sampling: Mapping[str, Any],
        rng: np.random.Generator,
        commit: Any,
        evaluate: Any,
    ) -> bool:
        """Free text, one piece at a time, until the model chooses the closing quote (allowed once the
        text has ``min_chars`` non-space characters) or ``max_chars`` leaves room for nothing else."""
        text = ""
        while True:
            room = field.max_chars - len(text)
            ids = self.string_ids[self.string_chars <= room]
            if len(text.strip()) >= field.min_chars:
                ids = np.append(ids, close)
            if len(ids) == 1 and ids[0] == close:
                return commit([close])
            evaluate()
            tok = self._choose(ids, sampling, rng)
            if not commit([tok]):
                return False
            if tok == close:
                return True
            text += self.string_text[tok]
