"""Glue between the per-image stages and the learning stages.

Each per-image stage command remembers the settings it last ran with on a dataset (a small pointer in
the cache), so ``asectl describe D --vlm-model X && asectl align D`` aligns X's descriptions without
repeating the option. ``collect_modalities`` runs (or finds in the cache) OCR, descriptions and LLM
reasoning for a set of samples; ``encode_modalities`` turns them into the three feature matrices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from asectl.cache import Cache
from asectl.dataset import Dataset, Sample
from asectl.stages.common import dataset_id

log = logging.getLogger("asectl")

MODALITY_STAGES = ("ocr", "describe", "reason")


def remember(cache: Cache, dataset: Dataset, stage: str, settings: Mapping[str, Any]) -> None:
    """Record the settings a stage ran with on this dataset (JSON-able keyword arguments)."""
    cache.set_pointer(f"settings-{dataset_id(dataset)}-{stage}", dict(settings))


def recall(cache: Cache, dataset: Dataset, stage: str) -> dict[str, Any]:
    return cache.get_pointer(f"settings-{dataset_id(dataset)}-{stage}") or {}


def recalled_settings(cache: Cache, dataset: Dataset) -> dict[str, dict[str, Any]]:
    return {stage: recall(cache, dataset, stage) for stage in MODALITY_STAGES}


@dataclass
class Modalities:
    samples: list[Sample]                 # samples with every modality present, in input order
    ocr_fields: list[dict[str, Any]]
    vlm_texts: list[str]
    llm_texts: list[str]
    dropped: list[dict[str, Any]] = field(default_factory=list)      # {"image", "error"}
    replay: dict[str, dict[str, Any]] = field(default_factory=dict)  # kwargs that repeat each stage
    provenance: dict[str, str] = field(default_factory=dict)


def collect_modalities(dataset: Dataset, cache: Cache, settings: Mapping[str, Mapping[str, Any]] | None = None,
                       *, priors: Mapping[str, Any] | None = None,
                       force: bool = False) -> Modalities:
    """OCR, describe and reason over every sample (cached). ``settings`` holds keyword arguments per
    stage: remembered settings, or a bundle's stored replay arguments (which enforce the exact models)."""
    from asectl.stages.describe import describe_replay_kwargs, run_describe
    from asectl.stages.ocr import run_ocr
    from asectl.stages.reason import replay_kwargs as reason_replay_kwargs
    from asectl.stages.reason import run_reason

    settings = {k: dict(v or {}) for k, v in (settings or {}).items()}
    ocr_kw = settings.get("ocr", {})
    ocr = run_ocr(dataset, engine=ocr_kw.get("engine", "cnocr"), spec=ocr_kw.get("spec"), cache=cache,
                  force=force, detector=ocr_kw.get("detector", "auto"))
    desc = run_describe(dataset, cache=cache, force=force, **settings.get("describe", {}))
    reason_kw = {k: v for k, v in settings.get("reason", {}).items() if k not in ("engine", "spec", "detector")}
    if priors is not None:
        reason_kw["priors"] = priors
    reas = run_reason(dataset, engine=ocr_kw.get("engine", "cnocr"), spec=ocr_kw.get("spec"), cache=cache,
                      detector=ocr_kw.get("detector", "auto"), force=force, **reason_kw)
    by = [ocr.by_image(), desc.by_image(), reas.by_image()]
    keep, fields, vlm, llm, dropped = [], [], [], [], []
    for s in dataset.samples:
        recs = [b.get(s.name, {"error": f"{s.path}: no record"}) for b in by]
        err = next((r["error"] for r in recs if r.get("error")), None)
        if err:
            dropped.append({"image": s.name, "error": err})
            continue
        keep.append(s)
        fields.append(recs[0]["fields"])
        vlm.append(recs[1]["text"])
        llm.append(recs[2]["text"])
    if dropped:
        log.warning("%d of %d cards lack a modality and are left out (first: %s)", len(dropped),
                    len(dataset.samples), dropped[0]["error"])
    replay_args = {"ocr": {"engine": ocr_kw.get("engine", "cnocr"), "spec": ocr_kw.get("spec"),
                           "detector": ocr_kw.get("detector", "auto")},
                   "describe": describe_replay_kwargs(desc.params),
                   "reason": reason_replay_kwargs(reas.params)}
    return Modalities(keep, fields, vlm, llm, dropped, replay_args, provenance(ocr.params, desc.params, reas.params))


def provenance(ocr_params: Mapping[str, Any], desc_params: Mapping[str, Any],
               reason_params: Mapping[str, Any]) -> dict[str, str]:
    eng = ocr_params.get("engine", {})
    out = {"ocr": f"{eng.get('engine', '?')} ({eng.get('rec_model', {}).get('file', '?')})"}
    backend = desc_params.get("backend") or desc_params.get("identity", {}).get("backend", "?")
    model = desc_params.get("model") or desc_params.get("identity", {}).get("model", {})
    if backend == "builtin":
        out["descriptions"] = "built-in describer (model-free, not a VLM)"
    else:
        mid = model.get("id") if isinstance(model, dict) else model
        out["descriptions"] = f"{backend} ({mid})"
    rb = reason_params.get("backend", {})
    out["reasoning"] = f"llama.cpp GGUF {rb.get('id', rb.get('path', '?'))} ({rb.get('chat_format', '?')} chat format)"
    return out


def build_encoders(enc_cfg: Any) -> tuple[Any, Any, Any]:
    """(image encoder, VLM-branch text encoder, LLM-branch text encoder): one text encoder instance per
    branch, as in Eq. (2), so fine-tuning (paper profile) adapts each branch separately."""
    from asectl.backends.encoders import image_encoder, text_encoder

    img_kw: dict[str, Any] = {"device": enc_cfg.device}
    if enc_cfg.image_weights:
        img_kw["weights"] = enc_cfg.image_weights
    if enc_cfg.image_random_init:
        img_kw["random_init"] = True
    txt_kw: dict[str, Any] = {"device": enc_cfg.device, "batch_size": enc_cfg.batch_size}
    if enc_cfg.text_path:
        txt_kw["path"] = enc_cfg.text_path
    return (image_encoder(enc_cfg.image, **img_kw), text_encoder(enc_cfg.text, **txt_kw),
            text_encoder(enc_cfg.text, **txt_kw))


def encode_modalities(mods: Modalities, encoders: tuple[Any, Any, Any], cache: Cache) -> dict[str, np.ndarray]:
    """Frozen features Z_image, Z_vlm, Z_llm for every kept sample (cached per input and encoder)."""
    from asectl.stages.features import image_features, text_features

    img_enc, vlm_enc, llm_enc = encoders
    return {"image": image_features(mods.samples, img_enc, cache),
            "vlm": text_features(mods.vlm_texts, vlm_enc, cache, "vlm"),
            "llm": text_features(mods.llm_texts, llm_enc, cache, "llm")}
