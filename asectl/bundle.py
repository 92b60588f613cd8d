"""Model bundles: everything ``predict`` needs, as safetensors weights + one JSON file. No pickle.

    bundle.json          labels, task, encoders, replay settings of ocr/describe/reason (with the LLM
                         priors), card spec, training data fingerprint, seeds, metrics, the calibration
                         temperature and the pass/defect/review rule (with the held-out cards they
                         were fitted on), file checksums
    heads.safetensors    PFA projections + temperature
    fusion-K.safetensors CMAF (or variant) + MLP classifier of cross-validation fold K (K = 0 .. folds-1);
                         the classifier averages their calibrated probabilities
    encoders/*.safetensors   fine-tuned encoders (paper profile only)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from asectl.cache import Cache, canonical_json, sha256_bytes, sha256_file
from asectl.errors import ConfigError

BUNDLE_FORMAT = 3      # 2: calibration temperature and decision rule; 3: the classifier is the fold models' average
FUSION_MEMBER = "fusion-{}.safetensors"
LATEST_POINTER = "latest-model"


@dataclass
class Bundle:
    path: Path
    config: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def digest(self) -> str:
        """Content identity: bundle.json holds the checksum of every file (verified on loading)."""
        return sha256_bytes(canonical_json(self.config).encode())

    @property
    def temperature(self) -> float:
        """Divides the fusion's logits before the softmax (temperature scaling)."""
        return float(self.config["calibration"]["temperature"])

    def decision_rule(self) -> Any:
        from asectl.models.calibration import DecisionRule

        return DecisionRule.from_dict(self.config["decision"])

    def heads(self) -> Any:
        from safetensors.torch import load_file

        from asectl.models.pfa import AlignmentHeads

        return AlignmentHeads.from_checkpoint(load_file(str(self.path / "heads.safetensors")),
                                              self.config["heads"])

    def fusion_members(self) -> list[Any]:
        """The fold models whose calibrated probabilities the classifier averages."""
        from asectl.models.cmaf import load_fusion

        members = int(self.config["fusion_members"])
        return [load_fusion(self.path / FUSION_MEMBER.format(k)) for k in range(members)]

    def encoder_state(self, name: str) -> Path | None:
        p = self.path / "encoders" / f"{name}.safetensors"
        return p if p.is_file() else None


def write_checksums(folder: Path, config: dict[str, Any], name: str = "bundle.json") -> None:
    """``config`` with the checksum of every file in ``folder``, written as ``name`` (an export: export.json)."""
    config["files"] = {p.relative_to(folder).as_posix(): sha256_file(p)
                       for p in sorted(folder.rglob("*")) if p.is_file() and p.name != name}
    (folder / name).write_text(json.dumps(config, indent=1, default=str))


def verify_files(folder: Path, files: Mapping[str, str], remedy: str) -> None:
    """Every listed file present with its checksum, before anything is deserialised; else a one-line
    ConfigError naming the file and ``remedy``."""
    for name, digest in files.items():
        f = folder / name
        if not f.is_file() or sha256_file(f) != digest:
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
    if config.get("format") != BUNDLE_FORMAT:
        raise ConfigError(f"{p}: bundle format {config.get('format')} is not {BUNDLE_FORMAT}; retrain it")
    verify_files(p, files, "export or train the model again")
    return Bundle(p, config)


def latest_bundle(cache: Cache) -> tuple[Bundle, str]:
    """The most recently trained model in this cache, and a sentence saying which it is."""
    ptr = cache.get_pointer(LATEST_POINTER)
    if not ptr:
        raise ConfigError(f"no trained model in {cache.root}; run `asectl fuse-train DATASET` or pass --model DIR")
    entry = cache.get("model", ptr["key"])
    if entry is None:
        raise ConfigError(f"the latest model ({ptr['key'][:12]}) is gone from {cache.root}; retrain it or "
                          "pass --model DIR")
    return load_bundle(entry.path), (f"model {ptr['key'][:12]} trained {ptr.get('created', '?')} on "
                                     f"{ptr.get('dataset', '?')}")


def export_bundle(bundle: Bundle, out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: folder exists and is not empty; choose another --out")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle.path, tmp, ignore=shutil.ignore_patterns("meta.json"))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
