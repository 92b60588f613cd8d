"""``describe``: one vision-language description per card (paper section 3.2, VLM's answer).

    from asectl.dataset import load_inputs
    from asectl.stages.describe import run_describe

    result = run_describe(load_inputs(["data/"]), vlm="instructblip", model="/models/instructblip-vicuna-7b")
    result.by_image()["images/0001.png"]["text"]

Records are cached per image under (image bytes, backend, model content hash, prompt, numeric settings,
generation parameters); ``describe_identity`` returns exactly that, so later stages (predict, model
bundles) can store it and rebuild the same backend with ``asectl.backends.vlm.vlm_from_identity``.
"""

from __future__ import annotations

import os
from typing import Any

from asectl.backends.vlm import DEFAULT_PROMPT, VLM, make_vlm
from asectl.cache import Cache
from asectl.dataset import Dataset, Sample
from asectl.errors import ConfigError, DataError
from asectl.imageio import load_image
from asectl.stages.common import StageResult, run_per_image

STAGE = "describe"
# Bump when the record layout changes; it is part of every cache key.
RECORD_FORMAT = 1
DEFAULT_BATCH_SIZE = 4


def describe_identity(vlm: str | VLM | None = None, prompt: str = DEFAULT_PROMPT, *,
                      model: str | os.PathLike | None = None, device: str = "auto",
                      generation: dict[str, Any] | None = None, load_8bit: bool = False) -> dict[str, Any]:
    """What a description depends on: the backend identity plus the prompt and the record format.

    ``vlm`` is a backend or the same choice ``run_describe`` takes (creating a backend only hashes the
    model; weights load on first use). Store the result in a model bundle;
    ``asectl.backends.vlm.vlm_from_identity(identity["vlm"])`` rebuilds the backend and checks the hash."""
    backend = vlm if isinstance(vlm, VLM) else make_vlm(vlm, model, device=device, generation=generation,
                                                        load_8bit=load_8bit)
    return {"record_format": RECORD_FORMAT, "vlm": backend.identity(), "prompt": _check_prompt(prompt)}


def _cache_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The cache key leaves out where the model lives (its id/path): moving a model folder keeps the
    cache, because the content hash stays."""
    vlm = dict(identity["vlm"])
    vlm["model"] = {"hash": vlm["model"]["hash"]}
    return {**identity, "vlm": vlm}


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("--prompt is empty; give the question to ask about each card")
    return prompt


def run_describe(
    dataset: Dataset,
    vlm: str | VLM | None = None,
    model: str | os.PathLike | None = None,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    generation: dict[str, Any] | None = None,
    cache: Cache | None = None,
    force: bool = False,
    strict: bool = False,
    load_8bit: bool = False,
    allow_download: bool | None = None,
    expect_model_hash: str | None = None,
) -> StageResult:
    """Describe every image of ``dataset`` with a VLM backend.

    ``vlm``: a registry name (``instructblip``, ``builtin``), an already created backend (reused, e.g. to
    keep a loaded model between calls), or None for ``instructblip`` when a model is configured
    (``model`` or ASECTL_VLM_MODEL) and ``builtin`` otherwise. ``generation`` overrides generation
    parameters (max_new_tokens, num_beams, ...). ``expect_model_hash`` (a replay) refuses any other
    model. A bad image becomes an error record; a configuration problem raises ConfigError before
    anything is cached."""
    prompt = _check_prompt(prompt)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    backend = vlm if isinstance(vlm, VLM) else make_vlm(vlm, model, device=device, generation=generation,
                                                        load_8bit=load_8bit, allow_download=allow_download)
    cache = cache or Cache()
    identity = describe_identity(backend, prompt)
    vlm_id = identity["vlm"]
    if expect_model_hash and vlm_id["model"]["hash"] != expect_model_hash:
        raise ConfigError(f"{vlm_id['backend']} model {vlm_id['model']['id']} (hash {vlm_id['model']['hash'][:12]}) "
                          f"is not the one the results were made with ({expect_model_hash[:12]}); pass the "
                          "original model with --vlm-model")
    base = {"backend": vlm_id["backend"], "model": dict(vlm_id["model"]), "prompt": prompt,
            "generation": dict(vlm_id.get("generation") or {})}
    measures = getattr(backend, "last_measurements", None) is not None

    def records_for(texts: list[str]) -> list[dict[str, Any]]:
        out = []
        for i, text in enumerate(texts):
            rec = {**base, "text": text}
            if measures:   # the built-in describer also keeps the numbers its sentences came from
                rec["measurements"] = backend.last_measurements[i]
            out.append(rec)
        return out

    def compute(sample: Sample) -> dict[str, Any]:
        return records_for(backend.describe([load_image(sample.path)], prompt))[0]

    def compute_batch(samples: list[Sample]) -> list[dict[str, Any] | DataError]:
        loaded: list[Any] = []
        for s in samples:
            try:
                loaded.append(load_image(s.path))
            except DataError as exc:   # this card gets an error record; the others are described together
                loaded.append(exc)
        images = [im for im in loaded if not isinstance(im, DataError)]
        described = iter(records_for(backend.describe(images, prompt)) if images else [])
        return [im if isinstance(im, DataError) else next(described) for im in loaded]

    records = run_per_image(
        STAGE, dataset.samples, _cache_identity(identity), compute, cache, force=force, strict=strict,
        description=f"describe ({vlm_id['backend']})", meta={"vlm": vlm_id},
        status=backend.status, batch=compute_batch, batch_size=batch_size)
    # A hit may come from the same model stored elsewhere: report where it is now.
    records = [r if r.get("error") else {**r, "model": dict(vlm_id["model"])} for r in records]
    params = {**identity, "backend": vlm_id["backend"], "model": dict(vlm_id["model"]), "batch_size": batch_size}
    return StageResult(STAGE, records, params=params, cache_summary=cache.summary(STAGE))


def describe_replay_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """``run_describe`` keyword arguments that repeat a run from its ``StageResult.params`` (as a trained
    bundle stores them): same backend, model (checked by content hash), prompt and generation."""
    vlm = params["vlm"]
    kwargs: dict[str, Any] = {"vlm": vlm["backend"], "prompt": params["prompt"],
                              "expect_model_hash": vlm["model"]["hash"]}
    if vlm["backend"] != "builtin":
        kwargs.update(model=vlm["model"]["id"], generation=dict(vlm.get("generation") or {}),
                      load_8bit=vlm.get("quantization") == "8bit")
    return kwargs


def remembered_settings(vlm: VLM, prompt: str, generation: dict[str, Any] | None = None,
                        device: str = "auto", load_8bit: bool = False) -> dict[str, Any]:
    """JSON-able ``run_describe`` arguments a command stores for later stages (align, fuse-train) that
    run on the same dataset: the backend chosen (not the default rule), the model's resolved location."""
    ident = vlm.identity()
    out: dict[str, Any] = {"vlm": ident["backend"], "prompt": prompt}
    if ident["backend"] != "builtin":
        folder = getattr(vlm, "folder", None)
        out.update(model=str(folder) if folder is not None else ident["model"]["id"],
                   generation=dict(generation or {}), device=device, load_8bit=load_8bit)
    return out


__all__ = ["run_describe", "describe_identity", "describe_replay_kwargs", "remembered_settings", "DEFAULT_PROMPT",
           "STAGE", "RECORD_FORMAT"]
