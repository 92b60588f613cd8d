"""``asectl align``: progressive feature alignment (PFA, paper section 3.3) over a labelled dataset.

Runs (or finds in the cache) OCR, descriptions and LLM reasoning for every card, encodes the branches
the profile names (``encoders.branches``: image, vlm, llm, and the OCR'd numbers as ``stats``), and trains
the 256-d projections (the stats branch: its MLP encoder too, standardized on the training cards) with the
ITC loss on the training split, stage by stage.
The result (final and per-stage projections, per-stage embeddings of every card for the t-SNE of Fig. 8,
curves and D_pend losses) is one cache entry; ``fuse-train`` and ``report`` find it by key."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from asectl import ui
from asectl.cache import Cache, make_key, sha256_file
from asectl.domain.dataset import Dataset, load_dataset
from asectl.environment import training_machine
from asectl.errors import ConfigError, DataError
from asectl.models.train_config import BRANCHES
from asectl.stages.common import dataset_id
from asectl.stages.features import train_image_encoder
from asectl.stages.modalities import (
    Modalities,
    ModalitySettings,
    build_encoders,
    collect_modalities,
    encode_modalities,
    replay_identity,
    skipped_stages,
)

log = logging.getLogger("asectl")
STAGE = "align"
FORMAT = 4  # 2: ranking warm-up, update-matched direct mode, update counts; 3: branches;
# 4: features computed one card per pass (asectl.stages.features FORMAT 2)


@dataclass
class AlignOutcome:
    key: str
    path: Path  # the cache entry folder
    summary: dict[str, Any]  # PFA summary + samples, replay settings, provenance, profile
    from_cache: bool

    @property
    def names(self) -> list[str]:
        return [s["image"] for s in self.summary["samples"]]

    @property
    def labels(self) -> list[str]:
        return [s["label"] for s in self.summary["samples"]]

    @property
    def splits(self) -> list[str]:
        return [s["split"] for s in self.summary["samples"]]

    def train_index(self) -> list[int]:
        return [i for i, sp in enumerate(self.splits) if sp == "train"]

    def embeddings(self, stage: int | None = None) -> dict[str, np.ndarray]:
        """Aligned embeddings of every sample after a stage (default: the last)."""
        n = len(self.summary["pfa"]["stages"])
        k = n if stage is None else stage
        return np_load_file(str(self.path / f"stage{k}_embeddings.safetensors"))

    def raw_features(self) -> dict[str, np.ndarray]:
        return np_load_file(str(self.path / "encoded.safetensors"))

    def heads_state(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(str(self.path / "heads.safetensors"))

    def heads(self) -> Any:
        """The final projection heads (``AlignmentHeads``), which map ``raw_features()`` to ``embeddings()``."""
        from asectl.models.pfa import AlignmentHeads

        return AlignmentHeads.from_checkpoint(self.heads_state(), self.summary["pfa"]["heads"])


def resolve_training_dataset(dataset: Dataset, augmented: str | Path | None) -> Dataset:
    """With ``--augmented A``: train on A's training split. A's test split must be D's, byte for byte,
    so the test cards stay the ones the user asked about."""
    if augmented is None:
        return dataset
    aug = load_dataset(augmented)
    mine = sorted((s.name, s.label, sha256_file(s.path)) for s in dataset.split("test"))
    theirs = sorted((s.name, s.label, sha256_file(s.path)) for s in aug.split("test"))
    if mine != theirs:
        raise ConfigError(
            f"{augmented}: its test split differs from {dataset.root}'s; make it with "
            f"`asectl synth --augment {dataset.root}`"
        )
    return aug


def real_training_priors(dataset: Dataset, cache: Cache, settings: ModalitySettings | Mapping[str, Any]) -> dict:
    from asectl.stages.ocr import run_ocr
    from asectl.stages.reason import priors_from_dataset

    if not isinstance(settings, ModalitySettings):
        settings = ModalitySettings.from_dict(settings)
    result = run_ocr(dataset, settings.ocr, cache=cache)
    return priors_from_dataset(dataset, result.by_image(), list(settings.ocr.card_spec().bin_edges))


def _sample_rows(mods: Modalities) -> list[dict[str, Any]]:
    return [{"image": s.name, "label": s.label, "split": s.split, "sha256": sha256_file(s.path)} for s in mods.samples]


def run_align(
    dataset: Dataset,
    cache: Cache | None = None,
    *,
    profile: str = "quick",
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    augmented: str | Path | None = None,
    settings: ModalitySettings | Mapping[str, Any] | None = None,
    force: bool = False,
    settings_sources: Mapping[str, str] | None = None,
) -> AlignOutcome:
    """PFA on the training split; ``overrides`` are profile keys (``pfa.mode``, ``pfa.strides``, ...).
    ``settings`` for the per-image stages default to what each last ran with on ``dataset``.
    ``settings_sources`` (setting key -> where its value came from: asectl.commands.config.recorded_sources)
    goes into the dataset's align pointer, not into the cache key."""
    from asectl.models.train_config import get_profile

    cache = cache or Cache()
    if not dataset.labelled or dataset.root is None:
        raise ConfigError("align needs a labelled dataset folder (labels.csv or <label>/ sub-folders)")
    prof = get_profile(profile, {**(overrides or {}), "seed": seed})
    train_ds = resolve_training_dataset(dataset, augmented)
    if settings is None:
        settings = ModalitySettings.recall(cache, dataset)
    elif not isinstance(settings, ModalitySettings):
        settings = ModalitySettings.from_dict(settings)
    # what the LLM branch reads, whether the stats branch carries the dot pattern's numbers, and which
    # per-image stages no branch reads (not run, here or when the model predicts)
    branches = prof.encoders.branches
    settings = dataclasses.replace(
        settings,
        llm_text=prof.encoders.llm_text,
        dot_pattern=prof.encoders.dot_pattern and "stats" in branches,
        skipped_stages=skipped_stages(branches),
    )
    # With TDA the LLM's prior knowledge still comes from the real training cards, not the synthetic
    # ones (and the real cards' answers stay cached).
    priors = real_training_priors(dataset, cache, settings) if augmented is not None else None
    mods = collect_modalities(train_ds, cache, settings, priors=priors)
    rows = _sample_rows(mods)
    train_index = [i for i, r in enumerate(rows) if r["split"] == "train"]
    if len({rows[i]["label"] for i in train_index}) < 2:
        raise DataError(f"{dataset.root}: the training split needs at least two classes with readable cards")
    encoders = build_encoders(prof.encoders)
    key = make_key(
        STAGE,
        format=FORMAT,
        samples=rows,
        replay=replay_identity(mods.replay),
        encoders=[e.identity() for e in encoders],
        profile=prof.to_dict(),
    )
    entry = None if force else cache.get(STAGE, key)
    if entry is not None:
        outcome = AlignOutcome(key, entry.path, entry.read_json("summary.json"), True)
    else:
        from asectl.models.seeding import one_cpu_thread  # torch: only when training

        with one_cpu_thread(prof.encoders.device):
            outcome = _train(cache, key, prof, mods, rows, train_index, encoders, seed)
    cache.set_pointer(
        f"align-{dataset_id(dataset)}",
        {
            "key": key,
            "profile": profile,
            "overrides": dict(overrides or {}),
            "seed": seed,
            "split_seed": dataset.split_seed,
            "augmented": str(augmented) if augmented else None,
            "settings_sources": dict(settings_sources or {}),
        },
    )
    return outcome


def encode_for_training(
    mods: Modalities,
    encoders: tuple,
    cache: Cache,
    train_index: list[int],
    seed: int,
    branches: Sequence[str] = BRANCHES,
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, Path | None]:
    """The feature matrices of ``branches`` a learning stage trains on. An image encoder that learns the
    cards is trained first, on the cards at ``train_index`` only (never a test card), and their rows are its
    own out-of-fold features (asectl.backends.encoders.CardsCNN). Returns the features, the image encoder's
    training record and weights file (None for a pretrained encoder or no image branch)."""
    image_training = image_weights = None
    if "image" in branches and getattr(encoders[0], "learns_from_cards", False):
        own, image_training, image_weights = train_image_encoder(
            [mods.samples[i] for i in train_index],
            [mods.samples[i].label for i in train_index],
            encoders[0],
            cache,
            seed,
        )
    encoded = encode_modalities(mods, encoders, cache, branches)
    if image_training is not None:
        encoded["image"][train_index] = own
    return encoded, image_training, image_weights


def _train(
    cache: Cache,
    key: str,
    prof: Any,
    mods: Modalities,
    rows: list[dict],
    train_index: list[int],
    encoders: tuple,
    seed: int,
) -> AlignOutcome:
    from safetensors.torch import save_file as torch_save_file

    from asectl.backends.encoders import save_module_state
    from asectl.models.pfa import EncoderFeatures, plan_updates, train_pfa, warmup_encoders

    enc_cfg = prof.encoders
    branches = enc_cfg.branches
    # also the "unaligned" view for reports
    encoded, image_training, image_weights = encode_for_training(mods, encoders, cache, train_index, seed, branches)
    warmup: list = []
    if enc_cfg.finetune:
        img_enc, vlm_enc, llm_enc = encoders
        tuned = {
            "image": EncoderFeatures(img_enc, [str(s.path) for s in mods.samples]),
            "vlm": EncoderFeatures(vlm_enc, mods.vlm_texts),
            "llm": EncoderFeatures(llm_enc, mods.llm_texts),
        }
        tuned = {m: f for m, f in tuned.items() if m in branches}
        features: dict[str, Any] = {**tuned, **({"stats": encoded["stats"]} if "stats" in branches else {})}
        lrs = {"image": enc_cfg.image_lr, "text": enc_cfg.text_lr}
        if enc_cfg.warmup_epochs and tuned:
            labels_all = sorted({r["label"] for r in rows})
            y = [labels_all.index(r["label"]) for r in rows]
            warmup = warmup_encoders(
                tuned,
                y,
                epochs=enc_cfg.warmup_epochs,
                seed=seed,
                train_index=train_index,
                batch_size=prof.pfa.batch_size,
                head_lr=prof.pfa.lr,
                encoder_lrs=lrs,
                device=enc_cfg.device,
            )
    else:
        features, lrs = encoded, None
    total = sum(ph["epochs"] for ph in plan_updates(prof.pfa, len(train_index))["phases"])
    with ui.progress(total, f"align ({prof.pfa.mode})") as advance:
        result = train_pfa(
            features,
            prof.pfa,
            seed,
            train_index=train_index,
            device=enc_cfg.device,
            encoder_lrs=lrs,
            stats_hidden=enc_cfg.stats_hidden,
            on_epoch=lambda stage, row: advance(
                status=f"{f'stage {stage}' if stage else 'ranking warm-up'} loss {row['loss']:.3f}"
            ),
        )

    def build(tmp: Path) -> dict[str, Any]:
        np_save_file({m: np.ascontiguousarray(a) for m, a in encoded.items()}, str(tmp / "encoded.safetensors"))
        torch_save_file(
            {k: v.contiguous() for k, v in result.stages[-1].checkpoint.items()}, str(tmp / "heads.safetensors")
        )
        for k, st in enumerate(result.stages, start=1):
            torch_save_file(
                {n: v.contiguous() for n, v in st.checkpoint.items()}, str(tmp / f"stage{k}_heads.safetensors")
            )
            np_save_file(
                {m: np.ascontiguousarray(a) for m, a in st.embeddings.items()},
                str(tmp / f"stage{k}_embeddings.safetensors"),
            )
        if image_training is not None:  # the bundle carries it, so predict replays it exactly
            (tmp / "encoders").mkdir(exist_ok=True)
            shutil.copyfile(image_weights, tmp / "encoders" / "image.safetensors")
        if enc_cfg.finetune:
            (tmp / "encoders").mkdir(exist_ok=True)
            for name, enc in zip(("image", "vlm", "llm"), encoders):
                if name in branches:
                    save_module_state(enc.module, tmp / "encoders" / f"{name}.safetensors")
        summary = {
            "format": FORMAT,
            "samples": rows,
            "dropped": mods.dropped,
            "partial": mods.partial,
            "branches": list(branches),
            "stats_fields": mods.stats_names,
            "replay": mods.replay,
            "provenance": mods.provenance,
            "profile": prof.to_dict(),
            "encoders": [e.identity() for e in encoders],
            "seed": seed,
            "pfa": result.summary(),
            "warmup": warmup,
            "image_training": image_training,
            "machine": training_machine(),  # where the heads (and the image encoder, unless cached) trained
        }
        (tmp / "summary.json").write_text(json.dumps(summary, default=str))
        return {
            "params": {"profile": prof.name, "mode": prof.pfa.mode, "strides": list(prof.pfa.strides), "seed": seed}
        }

    entry = cache.put_tree(STAGE, key, build)
    return AlignOutcome(key, entry.path, entry.read_json("summary.json"), False)


def stage_labels(outcome: AlignOutcome) -> list[str]:
    """Human names of the PFA stages, e.g. 'PFA stage 1 (20%)'."""
    pfa = outcome.summary["pfa"]
    if pfa["mode"] == "none":
        return ["no alignment (random projections)"]
    if pfa["mode"] == "direct":
        return ["direct alignment (100%)"]
    from asectl.report import pfa_stage_name

    return [pfa_stage_name(s["stage"], s["fraction"]) for s in pfa["stages"]]
