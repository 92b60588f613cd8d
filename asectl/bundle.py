"""Model bundles: everything ``predict`` needs, as safetensors weights + one JSON file. No pickle.

bundle.json          labels, task, encoders, replay settings of ocr/describe/reason (with the LLM
                     priors), card spec, training data fingerprint, seeds, metrics, the calibration
                     temperature and the pass/defect/defective/review rule (with the held-out cards they
                     were fitted on), file checksums
heads.safetensors    PFA projections + temperature
fusion-K.safetensors CMAF (or variant) + MLP classifier of cross-validation fold K (K = 0 .. folds-1);
                     the classifier averages their calibrated probabilities. Trained end to end (format 5):
                     also the fold's own projection heads and adapters, which replace heads.safetensors
fusion-K.trees.safetensors  the fold model's trees member on the stats numbers, when it has one (format 6;
                     asectl.models.trees)
held-out.safetensors the held-out calibrated probabilities and true class indices the decision rule was
                     chosen on, so ``predict --max-miss-rate`` can move the operating point
encoders/*.safetensors   fine-tuned encoders (paper profile only)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from asectl.cache import Cache, canonical_json, new_folder, sha256_bytes, sha256_file, sha256_file_kept
from asectl.errors import ConfigError

# 2: calibration temperature and decision rule; 3: the classifier is the fold models' average; 4: the split
# (every card of the dataset, its split and sha256) the model was trained and is to be tested on
BUNDLE_FORMAT = 4
# 5: as 4, with fold models trained end to end, each carrying its own projection heads and adapters
# (asectl.models.adapters). Frozen-head models stay format 4, so their cache keys and bundles are unchanged
# and an older asectl, which would read the fold models without their heads, refuses the new ones.
END_TO_END_FORMAT = 5
# 6: as 4, each fold model with a trees member on the stats numbers (asectl.models.trees), which an older
# asectl would leave out of the fold model's answer, so it refuses these.
TREES_FORMAT = 6
READABLE_FORMATS = (BUNDLE_FORMAT, END_TO_END_FORMAT, TREES_FORMAT)
FUSION_MEMBER = "fusion-{}.safetensors"
HELD_OUT_SCORES = "held-out.safetensors"
LATEST_POINTER = "latest-model"


class DecisionSource:
    """What a bundle and an export share: the stored decision rule and the held-out scores it was chosen on,
    so either can move its operating point (``path`` and ``config`` come from the subclass)."""

    path: Path
    config: dict[str, Any]

    def decision_rule(self) -> Any:
        """The stored rule (``operating_point`` with no targets)."""
        return self.operating_point()[0]

    def _lacks_defective(self) -> bool:
        return "defective_threshold" not in self.config["decision"] and (self.path / HELD_OUT_SCORES).is_file()

    def held_out_scores(self) -> tuple[Any, Any]:
        """(calibrated probabilities float64 [n, classes], true class indices int64 [n]) of the held-out
        training cards the decision rule was chosen on."""
        from safetensors.numpy import load_file

        path = self.path / HELD_OUT_SCORES
        if not path.is_file():
            raise ConfigError(
                f"{self.path}: this model stores no held-out scores ({HELD_OUT_SCORES}), so its "
                "operating point cannot move; retrain it with `asectl fuse-train`, or drop "
                "--max-miss-rate, --max-defect-error, --max-defective-error and --no-defective"
            )
        arrays = load_file(str(path))
        return arrays["probabilities"], arrays["labels"]

    def operating_point(self, **targets: Any) -> tuple[Any, dict[str, Any]]:
        """(decision rule, its held-out decision stats) for these ``targets`` (keywords of
        asectl.models.calibration.operating_point: max_miss_rate, max_defect_error, max_defective_error,
        defective_decision): the stored rule when none is given (None), else re-derived from the held-out
        scores."""
        from asectl.models.calibration import DecisionRule, operating_point

        given = {k: v for k, v in targets.items() if v is not None}
        stored = DecisionRule.from_dict(self.config["decision"])
        # A model stored before the ``defective`` decision existed gets the defective threshold fuse-train now
        # derives from the same held-out scores and targets (the other thresholds come out as stored).
        if given or self._lacks_defective():
            return operating_point(*self.held_out_scores(), stored, **given)
        return stored, self.config["decision"]["held_out"]


@dataclass
class Bundle(DecisionSource):
    path: Path
    config: dict[str, Any]

    def __post_init__(self) -> None:
        # Content identity, as loaded (bundle.json holds the checksum of every file, verified on loading): a
        # model told where its LLM is now (relocate_llm) is the same model, with the same cached predictions.
        self.digest = sha256_bytes(canonical_json(self.config).encode())

    @property
    def labels(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def temperature(self) -> float:
        """Divides the fusion's logits before the softmax (temperature scaling)."""
        return float(self.config["calibration"]["temperature"])

    def heads(self) -> Any:
        from safetensors.torch import load_file

        from asectl.models.pfa import AlignmentHeads

        return AlignmentHeads.from_checkpoint(load_file(str(self.path / "heads.safetensors")), self.config["heads"])

    def fusion_members(self) -> list[Any]:
        """The fold models whose calibrated probabilities the classifier averages."""
        from asectl.models.cmaf import load_fusion

        members = int(self.config["fusion_members"])
        return [load_fusion(self.path / FUSION_MEMBER.format(k)) for k in range(members)]

    def encoder_state(self, name: str) -> Path | None:
        p = self.path / "encoders" / f"{name}.safetensors"
        return p if p.is_file() else None


def bundle_format(end_to_end: bool, trees: bool = False) -> int:
    """The format a bundle is written in: ``END_TO_END_FORMAT`` for fold models trained end to end,
    ``TREES_FORMAT`` for fold models with a trees member (the two are not combined: validated)."""
    return END_TO_END_FORMAT if end_to_end else TREES_FORMAT if trees else BUNDLE_FORMAT


def heads_training(config: Mapping[str, Any]) -> str:
    """How a bundle's projection heads were trained: "frozen" (as align left them) or "end-to-end"."""
    return (config.get("projections") or {}).get("training", "frozen")


def write_held_out_scores(folder: Path, probabilities: Any, labels: Any) -> None:
    """Store the held-out calibrated probabilities and true class indices (``Bundle.held_out_scores``)."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file(
        {
            "probabilities": np.ascontiguousarray(probabilities, dtype=np.float64),
            "labels": np.ascontiguousarray(labels, dtype=np.int64),
        },
        str(folder / HELD_OUT_SCORES),
    )


def write_checksums(folder: Path, config: dict[str, Any], name: str = "bundle.json") -> None:
    """``config`` with the checksum of every file in ``folder``, written as ``name`` (an export: export.json)."""
    config["files"] = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != name
    }
    (folder / name).write_text(json.dumps(config, indent=1, default=str))


def verify_files(folder: Path, files: Mapping[str, str], remedy: str) -> None:
    """Every listed file present with its checksum, before anything is deserialised; else a one-line
    ConfigError naming the file and ``remedy``."""
    for name, digest in files.items():
        f = folder / name
        if not f.is_file() or sha256_file_kept(f) != digest:
            raise ConfigError(f"{f}: missing or damaged (checksum mismatch); {remedy}")


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle folder, verifying every file's checksum before anything is deserialised."""
    p = Path(path)
    cfg_file = p / "bundle.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{p}: not a model bundle (no bundle.json); train one with `asectl fuse-train`")
    try:
        config = json.loads(cfg_file.read_text())
        files = config["files"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{cfg_file}: unreadable bundle description; export the model again") from None
    if config.get("format") not in READABLE_FORMATS:
        raise ConfigError(
            f"{p}: bundle format {config.get('format')} is not one of "
            f"{', '.join(map(str, READABLE_FORMATS))}; retrain it, or use the asectl that trained it"
        )
    verify_files(p, files, "export or train the model again")
    return Bundle(p, config)


def relocate_llm(model: Any, llm_model: str | Path | None) -> Any:
    """``model`` (a bundle or an export) with its LLM read from ``llm_model``, where the GGUF it was trained
    with is now (moved since, or on another machine); None leaves it as recorded. The file must be that
    GGUF: its sha256 is checked here, before any card is read. Changes the loaded model, not its folder."""
    if llm_model is None:
        return model
    from asectl.backends.identity import model_fingerprint

    path = Path(llm_model).expanduser().resolve()
    replay = model.config["replay"]
    reason = replay.get("reason") or {}
    if "reason" in (replay.get("skipped_stages") or ()) or not reason:
        raise ConfigError(f"--llm-model {path}: this model has no llm branch and reads no LLM; leave the option out")
    if not path.is_file():
        raise ConfigError(f"--llm-model {path}: no such file; give the GGUF file the model was trained with")
    expected, found = reason.get("expect_model_hash"), model_fingerprint(path)
    if expected and found != expected:
        raise ConfigError(
            f"--llm-model {path}: not the LLM this model was trained with (sha256 {found[:12]} != "
            f"{expected[:12]}); give that GGUF file, or train the model with this one"
        )
    model.config = {**model.config, "replay": {**replay, "reason": {**reason, "llm_model": str(path)}}}
    return model


def latest_bundle(cache: Cache) -> tuple[Bundle, str]:
    """The most recently trained model in this cache, and a sentence saying which it is."""
    ptr = cache.get_pointer(LATEST_POINTER)
    if not ptr:
        raise ConfigError(f"no trained model in {cache.root}; run `asectl fuse-train DATASET` or pass --model DIR")
    entry = cache.get("model", ptr["key"])
    if entry is None:
        raise ConfigError(
            f"the latest model ({ptr['key'][:12]}) is gone from {cache.root}; retrain it or pass --model DIR"
        )
    return load_bundle(entry.path), pointer_text(ptr)


def pointer_text(ptr: dict[str, Any]) -> str:
    """Which model a pointer names, e.g. "model 1a2b3c4d5e6f trained 2026-01-01T10:00:00+0000 on data"."""
    return f"model {ptr['key'][:12]} trained {ptr.get('created', '?')} on {ptr.get('dataset', '?')}"


def export_bundle(bundle: Bundle, out: str | Path) -> Path:
    with new_folder(out) as tmp:
        shutil.copytree(bundle.path, tmp, ignore=shutil.ignore_patterns("meta.json"), dirs_exist_ok=True)
    return Path(out)
