"""``asectl predict``: classify cards with a trained bundle, replaying exactly the pipeline it was
trained with (OCR engine and card spec, describer, LLM + priors, encoders, projections, fusion).
Every per-image step is cached, and so are the fusion's logits (per bundle and exact encoder features), so
predicting the same cards twice needs no model at all. The classifier is the bundle's fold models: each
one's logits are calibrated with the bundle's temperature and the probabilities averaged, and each card
gets the bundle's decision: pass, defect, defective or review (asectl.models.calibration)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from asectl.bundle import Bundle
from asectl.cache import Cache, make_key, sha256_bytes
from asectl.domain.dataset import Dataset, Sample
from asectl.errors import ConfigError
from asectl.export import ExportedModel
from asectl.stages.common import StageResult
from asectl.stages.modalities import Modalities, build_encoders, collect_modalities, encode_modalities, modality_inputs

STAGE = "predict"
FORMAT = 3  # 2: logits (calibrated when read), not probabilities; 3: one set per fold model


def bundle_encoders(bundle: Bundle) -> tuple[Any, Any, Any]:
    """The bundle's encoders, checked against the identities it was trained with."""
    from asectl.models.train_config import EncoderConfig

    enc_cfg = EncoderConfig(**bundle.config["profile"]["encoders"])
    encoders = build_encoders(enc_cfg)
    finetuned = [bundle.encoder_state(name) for name in ("image", "vlm", "llm")]
    for enc, want, state in zip(encoders, bundle.config["encoders"], finetuned):
        have = enc.identity()
        if have.get("sha256") != want.get("sha256"):
            raise ConfigError(
                f"encoder {have.get('name')} weights ({str(have.get('sha256'))[:12]}) differ from "
                f"the ones the model was trained with ({str(want.get('sha256'))[:12]}); install "
                "the same weights or retrain"
            )
        if state is not None:
            enc.load_finetuned(state)
        elif getattr(enc, "learns_from_cards", False):
            raise ConfigError(
                f"{bundle.path}: the image encoder {have.get('encoder')} was trained on the cards, "
                "but the model has no encoders/image.safetensors; retrain with fuse-train"
            )
    if finetuned[1] is None and finetuned[2] is None and encoders[1].identity() == encoders[2].identity():
        # Frozen text branches are the same model: one instance serves both (one load, half the memory).
        encoders = (encoders[0], encoders[1], encoders[1])
    return encoders


def bundle_branches(bundle: Bundle) -> list[str]:
    """The branches the bundle's model uses (the paper's three for bundles made before branches existed)."""
    return list(bundle.config.get("branches") or ("image", "vlm", "llm"))


def class_logits(
    bundle: Bundle,
    feats: dict[str, np.ndarray],
    cache: Cache,
    force: bool = False,
    models: Callable[[], tuple[Any, Any]] | None = None,
) -> np.ndarray:
    """Heads and fold models over the encoder features: logits float32 [members, n, classes], one cache
    entry per bundle and exact feature bytes, so a rerun imports no torch. ``models`` returns (heads, fold
    models) on a cache miss (a Predictor's, loaded once), else they are loaded from the bundle."""
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    arrays = {m: np.ascontiguousarray(feats[m], dtype=np.float32) for m in sorted(feats)}
    digests = {m: {"sha256": sha256_bytes(a.tobytes()), "shape": list(a.shape)} for m, a in arrays.items()}
    key = make_key(STAGE, format=FORMAT, bundle=bundle.digest, features=digests)
    entry = None if force else cache.get(STAGE, key)
    if entry is not None:
        return st_load(entry.read_bytes("logits.safetensors"))["logits"]
    from asectl.models.cmaf import fold_logits
    from asectl.models.seeding import one_cpu_thread

    heads, members = models() if models else (bundle.heads(), bundle.fusion_members())
    with one_cpu_thread("cpu"):  # the same logits bits as training computed, whatever the core count
        logits = fold_logits(members, arrays, heads)  # fold models trained end to end project with their own heads
    cache.put(STAGE, key, {"logits.safetensors": st_save({"logits": logits})}, {"params": {"bundle": bundle.digest}})
    return logits


@dataclass
class Predictions:
    samples: list[Sample]  # the cards classified, in input order
    logits: np.ndarray  # [fold models, len(samples), classes], before calibration
    dropped: list[dict[str, Any]]  # {"image", "error"}: cards that lack a modality
    partial: dict[str, list[str]] = field(default_factory=dict)  # image -> record fields OCR did not read


class Predictor:
    """A bundle with its models loaded at most once and kept: a batch or ``--watch`` pays for loading a
    model once, not per card. Nothing is loaded before it is needed, so a fully cached call loads none.
    ``bundle`` may be an exported model (asectl.export): its ONNX graphs replace the torch models."""

    def __init__(
        self, bundle: Bundle | ExportedModel, cache: Cache | None = None, force: bool = False, rule: Any = None
    ):
        self.bundle = bundle
        self.cache = cache or Cache()
        self.force = force
        self.classes = bundle.labels
        self.temperature = bundle.temperature
        self.rule = rule or bundle.decision_rule()  # another operating point: Bundle.operating_point
        self._encoders: tuple[Any, Any, Any] | None = None
        self._models: tuple[Any, Any] | None = None

    def encoders(self) -> tuple[Any, Any, Any]:
        if self._encoders is None:
            self._encoders = bundle_encoders(self.bundle)
        return self._encoders

    def models(self) -> tuple[Any, Any]:
        if self._models is None:
            self._models = (self.bundle.heads(), self.bundle.fusion_members())
        return self._models

    def load_models(self) -> None:
        """Load what fuses the cards now: an export's ONNX sessions, or a bundle's encoders, heads and fold
        models (``--watch`` with workers, which compute the rest)."""
        if isinstance(self.bundle, ExportedModel):
            self.bundle.load()
        else:
            self.encoders()
            self.models()

    def warm_up(self) -> None:
        """Load every model now, so that the first real card does not wait for them (``--watch``): one
        generated card is classified through the bundle's pipeline in a temporary folder and its result
        dropped. With another card layout it may fail part-way; what it reached is loaded all the same."""
        import tempfile
        from pathlib import Path

        from asectl.domain.synth import generate

        self.load_models()
        force, self.force = self.force, True  # computed, not read from the cache: every model loads
        try:
            with tempfile.TemporaryDirectory(prefix="asectl-warm-up-") as tmp:
                generate(Path(tmp) / "card", seed=0, counts="1,1,0,0,0")
                card = sorted((Path(tmp) / "card" / "images").glob("*.png"))[0]
                self.run(Dataset([Sample(card, card.name)], None, "images", []))
        finally:
            self.force = force

    def classify(self, dataset: Dataset) -> Predictions:
        # A replay: the bundle's settings, checked model hashes, and the dataset's remembered settings left alone.
        mods = collect_modalities(dataset, self.cache, self.bundle.config["replay"], force=self.force, remember=False)
        logits = np.zeros((int(self.bundle.config["fusion_members"]), 0, len(self.classes)), np.float32)
        if mods.samples:
            logits = self.class_logits(mods)
        return Predictions(list(mods.samples), logits, list(mods.dropped), dict(mods.partial))

    def class_logits(self, mods: Modalities) -> np.ndarray:
        """Logits [fold models, kept cards, classes]: an export's ONNX graphs (no torch), else the
        bundle's encoders (cached features), heads and fold models."""
        if isinstance(self.bundle, ExportedModel):
            return self.bundle.class_logits(modality_inputs(mods))
        feats = encode_modalities(mods, self.encoders(), self.cache, bundle_branches(self.bundle))
        return class_logits(self.bundle, feats, self.cache, self.force, models=self.models)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities float64 [n, classes]: the fold models' mean after temperature
        scaling."""
        from asectl.models.calibration import mean_softmax

        return mean_softmax(logits, self.temperature)

    def uncalibrated(self, logits: np.ndarray) -> np.ndarray:
        """The same mean with plain softmax (T = 1): what calibration is compared against."""
        from asectl.models.calibration import mean_softmax

        return mean_softmax(logits)

    def records(self, dataset: Dataset, preds: Predictions) -> list[dict[str, Any]]:
        """One record per input card, in input order: class, calibrated probabilities, decision and its
        reason (the threshold it met or missed), or the error that kept the card out."""
        by_name: dict[str, dict[str, Any]] = {d["image"]: d for d in preds.dropped}
        probs = self.probabilities(preds.logits)
        for s, p, (decision, reason) in zip(preds.samples, probs, self.rule.explain(probs)):
            k = int(np.argmax(p))
            by_name[s.name] = {
                "image": s.name,
                "label": self.classes[k],
                "probability": round(float(p[k]), 6),
                "decision": decision,
                "reason": reason,
                "probabilities": {c: round(float(v), 6) for c, v in zip(self.classes, p)},
                **({"true_label": s.label} if s.label else {}),
            }
            if s.name in preds.partial:
                by_name[s.name]["warning"] = (
                    f"OCR did not read {', '.join(preds.partial[s.name])}; classified with those numbers masked"
                )
        return [by_name[s.name] for s in dataset.samples if s.name in by_name]

    def run(self, dataset: Dataset) -> StageResult:
        records = self.records(dataset, self.classify(dataset))
        return StageResult(
            STAGE, records, {"classes": self.classes, "task": self.bundle.config["task"]}, self.cache.summary(STAGE)
        )


def run_predict(
    dataset: Dataset, bundle: Bundle | ExportedModel, cache: Cache | None = None, force: bool = False, rule: Any = None
) -> StageResult:
    """Classify every card of ``dataset`` (one call: each model loaded at most once); ``rule``: a decision
    rule other than the bundle's stored one (``Bundle.operating_point``). On the labelled folder the model
    was trained on, or the line's folder its thresholds were re-set on, each record says in which of the
    stored splits the card was (asectl.stages.split): a training card's result is no evidence of how the
    model does on new ones."""
    held = None
    if dataset.labelled and dataset.root is not None:
        from asectl.stages.split import model_split

        dataset, held = model_split(dataset, bundle)
    result = Predictor(bundle, cache, force, rule).run(dataset)
    if held:
        split = {s.name: s.split for s in dataset.samples}
        for r in result.records:
            r["split"] = split[r["image"]]
    return result
