"""Write tiny GGUF files for tests: a random llama model llama.cpp can run in milliseconds, and
broken variants (unknown architecture, hostile chat template).

The vocabulary is SentencePiece ("llama" tokenizer model): <unk>, <s>, </s>, the 256 <0xXX> byte tokens
(so any text tokenizes and any token sequence decodes), plus "▁" (SentencePiece's space) and the
printable ASCII characters as single tokens, which keeps prompts at about one token per character.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    import gguf

    chars = ["\u2581"] + [chr(c) for c in range(0x21, 0x7F)]
    tokens = list(SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(256)] + chars
    scores = [0.0] * (3 + 256) + [-1.0] * len(chars)
    types = (
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * len(chars)
    )
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(
    path: str | Path,
    seed: int = 0,
    *,
    arch: str = "llama",
    name: str = "asectl tiny llama",
    chat_template: str | None = None,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 64,
    context_length: int = 4096,
) -> Path:
    """A random-weight llama-architecture GGUF (float32, a few hundred KB). Same seed, same bytes."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    # numpy shape is (rows, cols) = (out, in); GGUF stores it reversed, as llama.cpp expects.
    w.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{t}.weight", weight(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_fake_arch(path: str | Path, arch: str = "asectl-no-such-arch") -> Path:
    """A well-formed GGUF whose general.architecture no llama.cpp build knows."""
    import gguf

    path = Path(path)
    tokens, scores, types = _vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("not a real model")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":  # pragma: no cover - handy for trying the CLI by hand
    import sys

    print(write_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf"))
