"""The modalities of a card set, and the settings that make them.

``collect_modalities`` runs (or finds in the cache) OCR, descriptions and LLM reasoning for a set of
samples with one ``ModalitySettings`` (what each per-image stage last ran with on the dataset, or a
bundle's stored replay settings); ``encode_modalities`` turns them into one feature matrix per branch
(``asectl.models.train_config.BRANCHES``): image, VLM text, LLM text, and ``stats``, the OCR'd record's
numbers as a vector (``stats_vectors``; missing fields are NaN, masked by the stats encoder).
The learning stages and ``predict`` call these; nothing here imports a command or a learning stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from asectl.cache import Cache
from asectl.domain.card import CardSpec
from asectl.domain.dataset import Dataset, Sample
from asectl.errors import ConfigError
from asectl.models.train_config import BRANCHES, DEFAULT_LLM_TEXT, check_llm_text
from asectl.stages.describe import DescribeSettings
from asectl.stages.ocr import OcrSettings
from asectl.stages.reason import ReasonSettings

log = logging.getLogger("asectl")
# The per-image stage each text branch reads; a model without that branch need not run it.
STAGE_OF_BRANCH = {"vlm": "describe", "llm": "reason"}
SKIPPABLE_STAGES = tuple(STAGE_OF_BRANCH.values())


def skipped_stages(branches: Sequence[str]) -> tuple[str, ...]:
    """The per-image stages no branch of ``branches`` reads."""
    return tuple(stage for branch, stage in STAGE_OF_BRANCH.items() if branch not in branches)


@dataclass(frozen=True)
class ModalitySettings:
    """One settings object per per-image stage, what the LLM-branch text is made of (``llm_text``,
    ``asectl.models.train_config.LLM_TEXTS``) and whether the stats vectors carry the dot pattern's
    measured numbers after the printed ones (``dot_pattern``, asectl.domain.dot_pattern). The last two are
    set from ``encoders.llm_text`` and ``encoders.dot_pattern`` by the learning stages and replayed from a
    bundle. ``skipped_stages``: the per-image stages whose output no branch of the model reads (``describe``
    without the vlm branch, ``reason`` without the llm branch), which are then not run at all, so a model
    without the llm branch predicts without loading the LLM."""

    ocr: OcrSettings = field(default_factory=OcrSettings)
    describe: DescribeSettings = field(default_factory=DescribeSettings)
    reason: ReasonSettings = field(default_factory=ReasonSettings)
    llm_text: str = DEFAULT_LLM_TEXT
    dot_pattern: bool = False
    skipped_stages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_llm_text(self.llm_text)
        unknown = sorted(set(self.skipped_stages) - set(SKIPPABLE_STAGES))
        if unknown:
            raise ConfigError(
                f"per-image stage {', '.join(unknown)} cannot be skipped; only {', '.join(SKIPPABLE_STAGES)} can"
            )

    @classmethod
    def recall(cls, cache: Cache, dataset: Dataset) -> ModalitySettings:
        """What each per-image stage last ran with on ``dataset`` (defaults where it never ran)."""
        return cls(
            OcrSettings.recall(cache, dataset),
            DescribeSettings.recall(cache, dataset),
            ReasonSettings.recall(cache, dataset),
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Mapping[str, Any] | None] | None) -> ModalitySettings:
        """From stored dicts per stage (a bundle's ``replay``, a benchmark's settings)."""
        values = values or {}
        return cls(
            OcrSettings.from_dict(values.get("ocr")),
            DescribeSettings.from_dict(values.get("describe")),
            ReasonSettings.from_dict(values.get("reason")),
            values.get("llm_text") or DEFAULT_LLM_TEXT,
            bool(values.get("dot_pattern", False)),
            tuple(values.get("skipped_stages") or ()),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ocr": self.ocr.as_dict(),
            "describe": self.describe.as_dict(),
            "reason": self.reason.as_dict(),
            "llm_text": self.llm_text,
            # named only when on, so the replay settings (and keys) of earlier models stay what they were
            **({"dot_pattern": True} if self.dot_pattern else {}),
            **({"skipped_stages": list(self.skipped_stages)} if self.skipped_stages else {}),
        }


@dataclass
class Modalities:
    samples: list[Sample]  # samples with every modality present, in input order
    ocr_fields: list[dict[str, Any]]
    vlm_texts: list[str]
    llm_texts: list[str]
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {"image", "error"}
    replay: dict[str, dict[str, Any]] = field(default_factory=dict)  # settings that repeat each stage
    provenance: dict[str, str] = field(default_factory=dict)
    partial: dict[str, list[str]] = field(default_factory=dict)  # image -> record fields OCR did not read
    stats: np.ndarray | None = None  # stats_vectors(ocr_fields): [n, len(stats_names)], NaN = not read
    stats_names: list[str] = field(default_factory=list)


def replay_identity(replay: Mapping[str, Any]) -> dict[str, Any]:
    """A replay (``ModalitySettings.as_dict``) for a cache key, free of where things are installed: a model
    file's or prompt file's path is left out where the replay records its content hash beside it, and the
    OCR's own card spec and recogniser files are named by their sha256. A model trained with the same
    packages installed elsewhere (another virtual environment, another machine) gets the same key."""
    import copy

    from asectl.cache import sha256_file

    found = copy.deepcopy(dict(replay))
    for stage, path_field, hash_field in (
        ("reason", "llm_model", "expect_model_hash"),
        ("reason", "prompt", "expect_prompt_sha256"),
        ("describe", "model", "expect_model_hash"),
    ):
        values = found.get(stage) or {}
        if values.get(hash_field) and values.get(path_field) and Path(str(values[path_field])).is_absolute():
            values[path_field] = None
    ocr = found.get("ocr") or {}
    for path_field in ("spec", "recogniser"):
        if ocr.get(path_field):
            ocr[path_field] = {"sha256": sha256_file(ocr[path_field])}
    return found


def collect_modalities(
    dataset: Dataset,
    cache: Cache,
    settings: ModalitySettings | Mapping[str, Any] | None = None,
    *,
    priors: Mapping[str, Any] | None = None,
    force: bool = False,
    remember: bool = True,
) -> Modalities:
    """OCR, describe and reason over every sample (cached). ``settings``: remembered settings, or a
    bundle's stored replay settings (which enforce the exact models). ``priors`` replace the LLM's
    prior knowledge (TDA: the real training cards' priors). A replay (``remember=False``) leaves the
    dataset's remembered settings as they are."""
    from asectl.stages.describe import run_describe
    from asectl.stages.ocr import run_ocr
    from asectl.stages.reason import answer_only_text, hint_free_prompt, run_reason

    if not isinstance(settings, ModalitySettings):
        settings = ModalitySettings.from_dict(settings)
    answer_only = settings.llm_text == "answer"
    reason_settings = settings.reason.replace(priors=dict(priors) if priors is not None else None)
    if answer_only:  # the LLM's own answer: its prompt carries no nearest-class hint
        reason_settings = reason_settings.replace(prompt=hint_free_prompt(reason_settings.prompt))
    ocr = run_ocr(dataset, settings.ocr, cache=cache, force=force, remember=remember)
    skip = set(settings.skipped_stages)
    desc = (
        None
        if "describe" in skip
        else run_describe(dataset, settings.describe, cache=cache, force=force, remember=remember)
    )
    # The hint-free prompt is this branch's, not the user's choice for `asectl reason`: not remembered.
    reas = (
        None
        if "reason" in skip
        else run_reason(
            dataset, reason_settings, ocr=settings.ocr, cache=cache, force=force, remember=remember and not answer_only
        )
    )
    unread = {"text": "", "json": None}  # what a skipped stage gives each card: nothing any branch reads
    by = [ocr.by_image(), *(r.by_image() if r is not None else None for r in (desc, reas))]
    keep, fields, vlm, llm, dropped, partial = [], [], [], [], [], {}
    for s in dataset.samples:
        recs = [b.get(s.name, {"error": f"{s.path}: no record"}) if b is not None else unread for b in by]
        # A partly read record (some fields, the rest missing) still serves: its missing numbers are masked.
        read_partly = bool(recs[0].get("fields")) and bool(recs[0].get("missing"))
        err = next((r["error"] for r in recs[int(read_partly) :] if r.get("error")), None)
        if err:
            dropped.append({"image": s.name, "error": err})
            continue
        if read_partly:
            partial[s.name] = list(recs[0]["missing"])
        keep.append(s)
        fields.append(recs[0]["fields"])
        vlm.append(recs[1]["text"])
        llm.append(answer_only_text(recs[2].get("json")) if answer_only and reas is not None else recs[2]["text"])
    if dropped:
        log.warning(
            "%d of %d cards lack a modality and are left out (first: %s)",
            len(dropped),
            len(dataset.samples),
            dropped[0]["error"],
        )
    for name, missing in partial.items():
        log.warning("%s: OCR did not read %s; classified with those numbers masked", name, ", ".join(missing))
    spec = settings.ocr.card_spec()
    replay = ModalitySettings(
        settings.ocr,
        DescribeSettings.replay(desc.params) if desc is not None else settings.describe,
        ReasonSettings.replay(reas.params) if reas is not None else settings.reason,
        settings.llm_text,
        settings.dot_pattern,
        settings.skipped_stages,
    )
    prov = provenance(ocr.params, desc.params if desc else None, reas.params if reas else None)
    if reas is not None:
        prompt = reas.params["prompt"]["name"]
        prov["LLM text"] = (
            f"answer only: the LLM's own answer (prompt {prompt}, no nearest-class hint, no record sentence)"
            if answer_only
            else f"composite: the LLM's answer and the OCR'd record sentence (prompt {prompt})"
        )
    stats, names = stats_vectors(fields, spec), stats_names(spec)
    if settings.dot_pattern:
        from asectl.domain.dot_pattern import PATTERN_NAMES
        from asectl.stages.features import dot_pattern_features

        stats = np.hstack([stats, dot_pattern_features(keep, cache)])
        names += [f"dots.{n}" for n in PATTERN_NAMES]
        prov["dot pattern"] = "measured from the pink pixels (asectl.domain.dot_pattern), in the stats branch"
    return Modalities(
        keep,
        fields,
        vlm,
        llm,
        dropped=dropped,
        replay=replay.as_dict(),
        provenance=prov,
        partial=partial,
        stats=stats,
        stats_names=names,
    )


def stats_names(spec: CardSpec) -> list[str]:
    """The entries of a stats vector: each scalar field of the card spec, each radius bin's count, and each
    bin's share of the counted holes (the shape of the radial profile, whatever N is)."""
    bins = [f"bin{k}" for k in range(spec.n_bins)]
    return [*spec.field_names(), *bins, *(f"{b}_share" for b in bins)]


def stats_vectors(records: list[Mapping[str, Any]], spec: CardSpec) -> np.ndarray:
    """The OCR'd records as numbers, float32 [n, len(stats_names(spec))]; a field OCR did not read (or
    could not convert to a finite number) is NaN, which the stats encoder masks."""
    out = np.full((len(records), len(stats_names(spec))), np.nan, dtype=np.float32)
    names = spec.field_names()
    for i, rec in enumerate(records):
        for j, name in enumerate(names):
            v = rec.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                out[i, j] = v
        bins = rec.get("bins")
        if spec.n_bins and isinstance(bins, list) and len(bins) == spec.n_bins:
            counts = np.asarray(bins, dtype=np.float64)
            out[i, len(names) : len(names) + spec.n_bins] = counts
            if counts.sum() > 0:
                out[i, len(names) + spec.n_bins :] = counts / counts.sum()
    return out


def provenance(
    ocr_params: Mapping[str, Any], desc_params: Mapping[str, Any] | None, reason_params: Mapping[str, Any] | None
) -> dict[str, str]:
    """One line per per-image stage saying what made its output; None: the stage was skipped (no branch of
    the model reads it)."""
    eng = ocr_params.get("engine", {})
    out = {"ocr": f"{eng.get('engine', '?')} ({eng.get('rec_model', {}).get('file', '?')})"}
    if desc_params is None:
        out["descriptions"] = "not made: the model has no vlm branch"
    else:
        backend = desc_params.get("backend") or desc_params.get("identity", {}).get("backend", "?")
        model = desc_params.get("model") or desc_params.get("identity", {}).get("model", {})
        if backend == "builtin":
            out["descriptions"] = "built-in describer (model-free, not a VLM)"
        else:
            mid = model.get("id") if isinstance(model, dict) else model
            out["descriptions"] = f"{backend} ({mid})"
    if reason_params is None:
        out["reasoning"] = "not run: the model has no llm branch"
    else:
        rb = reason_params.get("backend", {})
        out["reasoning"] = (
            f"llama.cpp GGUF {rb.get('id', rb.get('path', '?'))} ({rb.get('chat_format', '?')} chat format)"
        )
    return out


def build_encoders(enc_cfg: Any) -> tuple[Any, Any, Any]:
    """(image encoder, VLM-branch text encoder, LLM-branch text encoder): one text encoder instance per
    branch, as in Eq. (2), so fine-tuning (paper profile) adapts each branch separately."""
    from asectl.backends.encoders import image_encoder, text_encoder
    from asectl.registry import IMAGE_ENCODERS

    img_kw: dict[str, Any] = {"device": enc_cfg.device}
    img_cls = IMAGE_ENCODERS.get(enc_cfg.image)[0]
    if hasattr(img_cls, "config_options"):  # an encoder trained in align takes its training keys
        img_kw.update(img_cls.config_options(enc_cfg))
    if enc_cfg.image_weights:
        img_kw["weights"] = enc_cfg.image_weights
    if enc_cfg.image_random_init:
        img_kw["random_init"] = True
    txt_kw: dict[str, Any] = {"device": enc_cfg.device, "batch_size": enc_cfg.batch_size}
    if enc_cfg.text_path:
        txt_kw["path"] = enc_cfg.text_path
    return (
        image_encoder(enc_cfg.image, **img_kw),
        text_encoder(enc_cfg.text, **txt_kw),
        text_encoder(enc_cfg.text, **txt_kw),
    )


def modality_inputs(mods: Modalities) -> dict[str, Any]:
    """What each branch reads, by modality: the cards (samples), the two texts, and the record's numbers
    (``stats``, an array: it has no encoder graph, its standardization and MLP are part of the heads)."""
    return {"image": list(mods.samples), "vlm": list(mods.vlm_texts), "llm": list(mods.llm_texts), "stats": mods.stats}


def encode_modalities(
    mods: Modalities, encoders: tuple[Any, Any, Any], cache: Cache, branches: Sequence[str] = BRANCHES
) -> dict[str, np.ndarray]:
    """Frozen features Z_image, Z_vlm, Z_llm (cached per input and encoder) and the raw stats vectors
    (standardized by the stats encoder, which trains), for every kept sample and each of ``branches``."""
    from asectl.stages.features import image_features, text_features

    img_enc, vlm_enc, llm_enc = encoders
    inputs = modality_inputs(mods)
    make = {
        "image": lambda: image_features(inputs["image"], img_enc, cache),
        "vlm": lambda: text_features(inputs["vlm"], vlm_enc, cache, "vlm"),
        "llm": lambda: text_features(inputs["llm"], llm_enc, cache, "llm"),
        "stats": lambda: inputs["stats"],
    }
    return {b: make[b]() for b in BRANCHES if b in branches}
