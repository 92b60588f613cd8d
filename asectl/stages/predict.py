"""``asectl predict``: classify cards with a trained bundle, replaying exactly the pipeline it was
trained with (OCR engine and card spec, describer, LLM + priors, encoders, projections, fusion).
Every per-image step is cached, so predicting the same card twice is nearly free."""

from __future__ import annotations

from typing import Any

import numpy as np

from asectl.bundle import Bundle
from asectl.cache import Cache
from asectl.dataset import Dataset
from asectl.errors import ConfigError
from asectl.pipeline import build_encoders, collect_modalities, encode_modalities
from asectl.stages.common import StageResult

STAGE = "predict"


def bundle_encoders(bundle: Bundle) -> tuple[Any, Any, Any]:
    """The bundle's encoders, checked against the identities it was trained with."""
    from asectl.models.train_config import EncoderConfig

    enc_cfg = EncoderConfig(**bundle.config["profile"]["encoders"])
    encoders = build_encoders(enc_cfg)
    finetuned = [bundle.encoder_state(name) for name in ("image", "vlm", "llm")]
    for enc, want, state in zip(encoders, bundle.config["encoders"], finetuned):
        have = enc.identity()
        if have.get("sha256") != want.get("sha256"):
            raise ConfigError(f"encoder {have.get('name')} weights ({str(have.get('sha256'))[:12]}) differ from "
                              f"the ones the model was trained with ({str(want.get('sha256'))[:12]}); install "
                              "the same weights or retrain")
        if state is not None:
            enc.load_finetuned(state)
    return encoders


def aligned_features(bundle: Bundle, dataset: Dataset, cache: Cache, force: bool = False):
    """(modalities, aligned features) for every card that has all modalities."""
    from asectl.models.pfa import align_features

    mods = collect_modalities(dataset, cache, bundle.config["replay"], force=force)
    if not mods.samples:
        return mods, {}
    feats = encode_modalities(mods, bundle_encoders(bundle), cache)
    return mods, align_features(bundle.heads(), feats)


def run_predict(dataset: Dataset, bundle: Bundle, cache: Cache | None = None, force: bool = False) -> StageResult:
    from asectl.models.cmaf import predict_proba

    cache = cache or Cache()
    mods, aligned = aligned_features(bundle, dataset, cache, force)
    classes = bundle.labels
    by_name: dict[str, dict[str, Any]] = {d["image"]: d for d in mods.dropped}
    if mods.samples:
        probs = predict_proba(bundle.fusion(), aligned)
        for s, p in zip(mods.samples, probs):
            k = int(np.argmax(p))
            by_name[s.name] = {"image": s.name, "label": classes[k], "probability": round(float(p[k]), 6),
                               "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)},
                               **({"true_label": s.label} if s.label else {})}
    records = [by_name[s.name] for s in dataset.samples if s.name in by_name]
    return StageResult(STAGE, records, {"classes": classes, "task": bundle.config["task"]}, cache.summary(STAGE))
