"""``asectl predict``: classify cards with a trained bundle, replaying exactly the pipeline it was
trained with (OCR engine and card spec, describer, LLM + priors, encoders, projections, fusion).
Every per-image step is cached, and so are the probabilities (per bundle and exact encoder features), so
predicting the same cards twice needs no model at all."""

from __future__ import annotations

from typing import Any

import numpy as np

from asectl.bundle import Bundle
from asectl.cache import Cache, make_key, sha256_bytes
from asectl.dataset import Dataset
from asectl.errors import ConfigError
from asectl.pipeline import build_encoders, collect_modalities, encode_modalities
from asectl.stages.common import StageResult

STAGE = "predict"
FORMAT = 1


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


def class_probabilities(bundle: Bundle, feats: dict[str, np.ndarray], cache: Cache,
                        force: bool = False) -> np.ndarray:
    """Heads and fusion over the encoder features, float32 [n, classes]: one cache entry per bundle and
    exact feature bytes, so a rerun imports no torch."""
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    arrays = {m: np.ascontiguousarray(feats[m], dtype=np.float32) for m in sorted(feats)}
    digests = {m: {"sha256": sha256_bytes(a.tobytes()), "shape": list(a.shape)} for m, a in arrays.items()}
    key = make_key(STAGE, format=FORMAT, bundle=bundle.digest, features=digests)
    entry = None if force else cache.get(STAGE, key)
    if entry is not None:
        return st_load(entry.read_bytes("probs.safetensors"))["probs"]
    from asectl.models.cmaf import predict_proba
    from asectl.models.pfa import align_features

    probs = np.ascontiguousarray(predict_proba(bundle.fusion(), align_features(bundle.heads(), arrays)))
    cache.put(STAGE, key, {"probs.safetensors": st_save({"probs": probs})}, {"params": {"bundle": bundle.digest}})
    return probs


def run_predict(dataset: Dataset, bundle: Bundle, cache: Cache | None = None, force: bool = False) -> StageResult:
    cache = cache or Cache()
    mods = collect_modalities(dataset, cache, bundle.config["replay"], force=force)
    classes = bundle.labels
    by_name: dict[str, dict[str, Any]] = {d["image"]: d for d in mods.dropped}
    if mods.samples:
        feats = encode_modalities(mods, bundle_encoders(bundle), cache)
        probs = class_probabilities(bundle, feats, cache, force)
        for s, p in zip(mods.samples, probs):
            k = int(np.argmax(p))
            by_name[s.name] = {"image": s.name, "label": classes[k], "probability": round(float(p[k]), 6),
                               "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)},
                               **({"true_label": s.label} if s.label else {})}
    records = [by_name[s.name] for s in dataset.samples if s.name in by_name]
    return StageResult(STAGE, records, {"classes": classes, "task": bundle.config["task"]}, cache.summary(STAGE))
