"""Whether a token's logits from llama.cpp depend on how the tokens around it are split into decode calls,
with the default reasoning model (SmolLM2-135M-Instruct, one thread): what decides which speed-ups of the
LLM answer can leave every answer byte-identical.

    python bench/llm_batch_rows.py [--repeats 5]

The start of the reason prompt is evaluated once in a single decode call and again split into calls of
1, 2, 3 and 7 tokens; the logits of every position are compared bit for bit with the single call's.
Results: bench/results/llm_batch_rows.json and the ``llm-batch-rows`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse

from _common import save, update_section


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5, help="copies of the system message evaluated")
    args = ap.parse_args()

    import llama_cpp
    import numpy as np

    from asectl.backends.llm import amx_in_build, default_model_path, plain_weight_buffers
    from asectl.stages.reason.prompt import load_prompt

    path = default_model_path()
    with plain_weight_buffers(amx_in_build()):  # as asectl loads it (no AMX kernels)
        llm = llama_cpp.Llama(str(path), n_ctx=4096, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False)
    system = load_prompt().system.template.strip()
    tokens = llm.tokenize((system + "\n").encode() * args.repeats)[:1000]
    llm.eval(tokens)
    whole = np.array(llm.scores[: len(tokens)], copy=True)
    rows = {}
    for step in (1, 2, 3, 7):
        llm.reset()
        llm._ctx.kv_cache_clear()
        for i in range(0, len(tokens), step):
            llm.eval(tokens[i : i + step])
        split = np.array(llm.scores[: len(tokens)], copy=True)
        rows[step] = {
            "identical_positions": int((split == whole).all(axis=1).sum()),
            "max_abs_difference": float(np.abs(split - whole).max()),
        }
        print(step, rows[step])
    llm.close()
    save("llm_batch_rows", {"model": path.name, "tokens": len(tokens), "calls_of": rows})
    table = "\n".join(
        f"| {step} | {r['identical_positions']} of {len(tokens)} | {r['max_abs_difference']:.3g} |"
        for step, r in rows.items()
    )
    title = f"Does a token's result depend on how the prompt is split into decode calls? ({path.name}, one thread)"
    update_section(
        "llm-batch-rows",
        f"""### {title}

{len(tokens)} tokens of the reason prompt evaluated in one decode call, then again in calls of a few tokens
each; positions whose logits are bit for bit the single call's:

| tokens per call | identical positions | largest logit difference |
|---|---|---|
{table}
""",
    )


if __name__ == "__main__":
    main()
