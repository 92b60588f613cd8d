"""Vision-language backends for the ``describe`` stage (paper section 3.2: VLM(prompt, image) -> text).

One small interface, registered in ``asectl.registry.VLMS``::

    vlm = VLMS.create("instructblip", model="/models/instructblip-vicuna-7b")
    vlm.identity()                      # what its answers depend on (backend, model id + hash, params)
    vlm.describe([img1, img2], prompt)  # one text per image

* ``instructblip``: transformers' InstructBLIP from a local folder (or a Hugging Face cache entry), fp16/bf16
  and batched generation on CUDA, optional 8-bit weights, a slow but working CPU path.
* ``builtin``: a deterministic, model-free describer that measures the pink dots and writes sentences about
  their distribution and shape. Its texts say plainly that no VLM wrote them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from asectl.cache import canonical_json
from asectl.errors import ConfigError
from asectl.registry import VLMS
from asectl.settings import ENVIRONMENT

log = logging.getLogger("asectl")

# The paper's VLM prompt (section 3.2), verbatim.
DEFAULT_PROMPT = "Please comprehensively describe the distribution and shape of the image"
# Named in messages; read by the settings layer (asectl/settings.py), which passes the values down.
MODEL_ENV = ENVIRONMENT["describe.vlm_model"]
DEVICES = ("auto", "cuda", "cpu")


class VLM:
    """The interface every describe backend implements."""

    registry_name = "?"

    def identity(self) -> dict[str, Any]:
        """Everything the answers depend on: backend, model {id, hash}, numeric settings, generation."""
        raise NotImplementedError

    def describe(self, images: Sequence[Any], prompt: str) -> list[str]:
        """One description per PIL image, in order."""
        raise NotImplementedError

    def status(self) -> str:
        """A short progress note (e.g. tokens/s); empty when there is nothing to say."""
        return ""


def default_vlm_name(model: str | os.PathLike | None = None) -> str:
    """``instructblip`` when a model is given, otherwise ``builtin``."""
    return "instructblip" if model else "builtin"


def make_vlm(
    name: str | None = None,
    model: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    generation: dict[str, Any] | None = None,
    load_8bit: bool = False,
    allow_download: bool | None = None,
) -> VLM:
    """Create a backend by registry name (None: see ``default_vlm_name``)."""
    name = name or default_vlm_name(model)
    cls, _ = VLMS.get(name)
    if name == "builtin" or getattr(cls, "model_free", False):
        if model:
            raise ConfigError(f"--vlm {name} uses no model; drop --vlm-model or choose --vlm instructblip")
        if generation:
            raise ConfigError(f"--vlm {name} has no generation settings; drop --max-new-tokens/--num-beams")
        if load_8bit:
            raise ConfigError(f"--vlm {name} has no weights to load in 8 bits; drop --load-8bit")
        return VLMS.create(name)
    from asectl.backends import warm

    return warm.kept(
        "vlm",
        lambda: VLMS.create(
            name, model=model, device=device, generation=generation, load_8bit=load_8bit, allow_download=allow_download
        ),
        name=name,
        model=str(model),
        device=device,
        generation=generation,
        load_8bit=load_8bit,
    )


def vlm_from_identity(
    identity: dict[str, Any],
    model: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    allow_download: bool | None = None,
) -> VLM:
    """Rebuild the backend a recorded ``identity`` describes (e.g. from a model bundle) and check that the
    model files are the same ones (content hash). ``model`` overrides the recorded path or id."""
    try:
        name = identity["backend"]
        recorded = identity.get("model") or {}
    except (TypeError, KeyError):
        raise ConfigError("recorded VLM identity lacks a 'backend'; the bundle or record is damaged") from None
    if name == "builtin":
        vlm = make_vlm("builtin")
    else:
        vlm = make_vlm(
            name,
            model or recorded.get("id"),
            device=device,
            generation=identity.get("generation"),
            load_8bit=identity.get("quantization") == "8bit",
            allow_download=allow_download,
        )
    now = vlm.identity()["model"]
    if recorded.get("hash") and now.get("hash") != recorded["hash"]:
        raise ConfigError(
            f"VLM model {now.get('id')} has content hash {str(now.get('hash'))[:12]}, but the "
            f"results were made with {str(recorded['hash'])[:12]} ({recorded.get('id')}); "
            "pass the same model with --vlm-model"
        )
    return vlm


# =====================================================================================================
# InstructBLIP


# Defaults follow the InstructBLIP model card's generation example (beam search, no sampling).
DEFAULT_GENERATION: dict[str, Any] = {
    "max_new_tokens": 256,
    "num_beams": 5,
    "do_sample": False,
    "repetition_penalty": 1.5,
    "length_penalty": 1.0,
}
_GENERATION_TYPES: dict[str, type] = {
    "max_new_tokens": int,
    "min_new_tokens": int,
    "num_beams": int,
    "do_sample": bool,
    "repetition_penalty": float,
    "length_penalty": float,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "no_repeat_ngram_size": int,
    "seed": int,
}


def generation_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults plus checked overrides (None values are ignored); the dict is recorded with every text."""
    params = dict(DEFAULT_GENERATION)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _GENERATION_TYPES:
            raise ConfigError(f"unknown generation setting '{key}'; use one of: {', '.join(sorted(_GENERATION_TYPES))}")
        kind = _GENERATION_TYPES[key]
        try:
            value = kind(value) if kind is not bool else bool(value)
        except (TypeError, ValueError):
            raise ConfigError(f"generation setting {key}={value!r} must be a {kind.__name__}") from None
        if key in ("max_new_tokens", "num_beams") and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, not {value}")
        params[key] = value
    if params.get("do_sample"):
        params.setdefault("seed", 0)  # sampled answers must still be reproducible
    return params


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not any(c in text for c in "\\:")


def resolve_model_folder(model: str | os.PathLike | None, allow_download: bool = False) -> tuple[str, Path]:
    """(model id as given, local folder). A hub id is looked up in the local Hugging Face cache and is
    only downloaded when ``allow_download`` is set."""
    if not model:
        raise ConfigError(
            f"no InstructBLIP model given; pass --vlm-model PATH (or set {MODEL_ENV}), or use --vlm builtin"
        )
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        # The absolute path, so a model bundle can replay it from any working directory.
        return str(path.resolve()), path.resolve()
    if not _looks_like_hub_id(text):
        raise ConfigError(
            f"{path}: InstructBLIP model folder not found; check --vlm-model (or {MODEL_ENV}) or use --vlm builtin"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise ConfigError(f"{text}: not a local folder and huggingface_hub is not installed") from None
    try:
        folder = snapshot_download(text, local_files_only=not allow_download)
    except Exception as exc:  # LocalEntryNotFoundError, network and auth errors
        if allow_download:
            raise ConfigError(
                f"{text}: download failed ({type(exc).__name__}); check the model id and the "
                "network, or give a local folder"
            ) from None
        raise ConfigError(
            f"{text}: not a local folder and not in the Hugging Face cache; download it once "
            f"(hf download {text}) or pass --allow-download, or give a local folder"
        ) from None
    return text, Path(folder).resolve()


def check_instructblip_folder(folder: Path) -> dict[str, Any]:
    """Read config.json and refuse anything that is not an InstructBLIP checkpoint, before loading."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: is a file; --vlm-model needs an InstructBLIP model folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(
            f"{folder}: no config.json, so not a transformers model folder; pass an InstructBLIP "
            "model folder (e.g. a local copy of Salesforce/instructblip-vicuna-7b)"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: unreadable ({type(exc).__name__}); re-download the model") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type != "instructblip":
        raise ConfigError(
            f"{folder}: config.json has model_type '{model_type}', not 'instructblip'; pass an "
            "InstructBLIP model folder or use --vlm builtin"
        )
    return cfg


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@VLMS.register("instructblip")
class InstructBlipVLM(VLM):
    """InstructBLIP through transformers. The model loads on the first ``describe`` call, so a run whose
    every image is cached never touches the weights."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        generation: dict[str, Any] | None = None,
        load_8bit: bool = False,
        allow_download: bool | None = None,
    ):
        from asectl.backends.identity import model_fingerprint

        if device not in DEVICES:
            raise ConfigError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
        self.generation = generation_params(generation)
        self.model_id, self.folder = resolve_model_folder(model, bool(allow_download))
        self.config = check_instructblip_folder(self.folder)
        cuda = _cuda_available()
        if device == "cuda" and not cuda:
            raise ConfigError(
                "--device cuda: no CUDA device is available to torch; use --device cpu "
                "(slow for InstructBLIP) or run on a machine with an NVIDIA GPU"
            )
        self.device = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
        self.load_8bit = bool(load_8bit)
        if self.load_8bit:
            if self.device != "cuda":
                raise ConfigError(
                    "--load-8bit needs a CUDA device (bitsandbytes 8-bit kernels); drop --load-8bit on the CPU"
                )
            missing = [p for p in ("bitsandbytes", "accelerate") if importlib.util.find_spec(p) is None]
            if missing:
                raise ConfigError(
                    f"--load-8bit needs the {' and '.join(missing)} package(s); "
                    f"pip install {' '.join(missing)}, or drop --load-8bit"
                )
        self.dtype = self._pick_dtype()
        self.model_hash = model_fingerprint(self.folder)
        self._model = None
        self._processor = None
        self._tokens = 0
        self._gen_seconds = 0.0

    def _pick_dtype(self) -> str:
        if self.device == "cpu":
            return "float32"  # half precision on the CPU is slower and less accurate
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"

    def identity(self) -> dict[str, Any]:
        return {
            "backend": "instructblip",
            "model": {"id": self.model_id, "hash": self.model_hash},
            "dtype": self.dtype,
            "quantization": "8bit" if self.load_8bit else None,
            "generation": dict(self.generation),
        }

    # -- loading ------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        import transformers
        from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

        dtype = getattr(torch, self.dtype)
        # transformers 4.56 renamed torch_dtype to dtype.
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        kwargs: dict[str, Any] = {dtype_kw: dtype, "local_files_only": True}
        if self.load_8bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # asectl draws its own progress; keep stderr to one bar
        t0 = time.perf_counter()
        try:
            processor = InstructBlipProcessor.from_pretrained(self.folder, local_files_only=True)
            model = InstructBlipForConditionalGeneration.from_pretrained(self.folder, **kwargs)
            if not self.load_8bit:
                model = model.to(self.device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise ConfigError(
                f"CUDA out of memory loading {self.model_id}; use --load-8bit or a GPU with more memory"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            # transformers' messages run to several sentences about the hub; the first names the problem.
            text = str(exc).strip()
            first = text.splitlines()[0].split(". ")[0][:200] if text else type(exc).__name__
            raise ConfigError(
                f"{self.folder}: could not load the InstructBLIP model ({first}); check that the "
                "folder is a complete checkpoint (config, weights, tokenizers, processor)"
            ) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model.eval()
        if getattr(processor, "num_query_tokens", None) is None:
            # Older processor configs lack it; the model config has the authoritative value.
            processor.num_query_tokens = model.config.num_query_tokens
        processor.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        self._processor, self._model = processor, model
        log.info(
            "loaded InstructBLIP %s on %s (%s%s) in %.1f s",
            self.model_id,
            self.device,
            self.dtype,
            ", 8-bit" if self.load_8bit else "",
            time.perf_counter() - t0,
        )
        if self.device == "cpu":
            log.warning(
                "running InstructBLIP on the CPU: expect minutes per image for a 7B model; use a CUDA "
                "machine, or --vlm builtin for quick model-free descriptions"
            )

    # -- generation ---------------------------------------------------------------------------------
    def describe(self, images: Sequence[Any], prompt: str) -> list[str]:
        import torch

        if not images:
            return []
        self._load()
        processor, model = self._processor, self._model
        gen = dict(self.generation)
        seed = gen.pop("seed", None)
        if seed is not None:
            torch.manual_seed(seed)
        inputs = processor(images=list(images), text=[prompt] * len(images), return_tensors="pt", padding=True)
        model_dtype = next(model.parameters()).dtype if not self.load_8bit else getattr(torch, self.dtype)
        inputs = {
            k: (v.to(self.device, model_dtype) if k == "pixel_values" else v.to(self.device)) for k, v in inputs.items()
        }
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = model.generate(**inputs, **gen)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise ConfigError(
                f"CUDA out of memory describing {len(images)} images at once; lower --batch-size "
                f"(now {len(images)}) or use --load-8bit"
            ) from None
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            text = str(exc).strip()
            first = text.splitlines()[0][:200] if text else type(exc).__name__
            raise ConfigError(
                f"InstructBLIP generation failed with {self.model_id} ({first}); check that the model "
                "folder is complete and the generation settings are valid"
            ) from None
        if not model.config.text_config.is_encoder_decoder:
            # Decoder-only language models return the prompt tokens before the answer.
            out = out[:, inputs["input_ids"].shape[1] :]
        self._gen_seconds += time.perf_counter() - t0
        pad = processor.tokenizer.pad_token_id
        self._tokens += int((out != pad).sum()) if pad is not None else int(out.numel())
        return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]

    def status(self) -> str:
        return f"{self._tokens / self._gen_seconds:.1f} tok/s" if self._gen_seconds > 0 else ""


# =====================================================================================================
# Built-in describer


BUILTIN_NOTE = "[Built-in describer: measured from the pink dot pixels, not written by a vision-language model.]"


@dataclass(frozen=True)
class BuiltinParams:
    """Every threshold the built-in describer uses (docs/describe.md explains each; values were calibrated
    on generated cards). Part of the identity, so changing one invalidates cached texts."""

    version: int = 1
    min_dot_pixels: int = 40  # fewer pink pixels than about two dots: "no dots found"
    centred_below: float = 1.0  # centroid offset (units) below which the cloud is "centred"
    shifted_from: float = 2.0  # offsets in [centred_below, shifted_from) are "slightly off-centre"
    axis_share: float = 0.35  # an axis is named when |offset_axis| >= share * offset ...
    axis_named_from: float = 1.0  # ... or when |offset_axis| >= this many units
    slight_axis_share: float = 0.55  # a named axis is "slightly" when below this share of the larger one
    compact_below: float = 2.6  # mean pixel spread (units) below which the cloud is "compact"
    broad_below: float = 3.4  # ...below this "moderately broad", else "broad"
    axis_ratio_named: float = 1.15  # sd_x / sd_y beyond which "wider horizontally/vertically" is said
    round_below: float = 1.25  # major/minor spread ratio below which the cloud is "round"
    elongated_from: float = 1.6  # ...ratios in between are "slightly elongated"
    tilt_corr: float = 0.15  # |x-y correlation| from which a tilt direction is stated
    ring_inner_ratio: float = 0.45  # inner fill / densest shell fill below which the centre is hollow
    density_sigma_px: float = 3.0  # blur of the dot mask before inverting coverage to density
    density_clip: float = 0.98  # coverage cap before -log(1 - coverage) (saturated areas)
    profile_bin: float = 0.25  # projection profile bin (units)
    profile_sigma: float = 0.5  # projection profile smoothing (units)
    cluster_dip: float = 0.74  # valley / smaller peak below which the profile has two clusters
    cluster_min_gap: float = 2.0  # the two peaks must be at least this far apart (units)
    cluster_peak_share: float = 0.3  # each peak must reach this share of the profile maximum
    outlier_distance: float = 4.0  # Mahalanobis distance beyond which a dot is an isolated outlier

    def digest(self) -> str:
        return hashlib.sha256(canonical_json({"describer": "asectl.builtin", **asdict(self)}).encode()).hexdigest()


@lru_cache(maxsize=8)
def _range_grid(shape: tuple[int, int], geometry) -> tuple[np.ndarray, np.ndarray]:
    """(in-range mask over the image, unit coordinates of the in-range pixels) for one image size."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w]
    units = geometry.to_units(np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64))
    inside = np.hypot(units[:, 0], units[:, 1]) <= geometry.range_units
    return inside.reshape(h, w), units[inside]


@lru_cache(maxsize=4)
def _dot_area(dot_radius: int) -> int:
    """Pixels one rendered dot covers (a 5-px disc is 21 px)."""
    from PIL import Image, ImageDraw

    d = dot_radius
    im = Image.new("L", (4 * d + 8, 4 * d + 8), 0)
    c = 2 * d + 4
    ImageDraw.Draw(im).ellipse([c - d, c - d, c + d, c + d], fill=255)
    return max(int((np.asarray(im) > 0).sum()), 1)


def measure_dots(img, params: BuiltinParams | None = None, geometry=None) -> dict[str, Any]:
    """Pixel statistics of the pink dots inside the circular range (units: x right, y up).

    Dots are 5-px discs that overlap in dense areas, so everything here works on pixel moments and on a
    coverage-corrected density map, never on connected components (a dense core is one blob)."""
    from asectl.domain.card import GEOMETRY, dot_mask

    p = params or BuiltinParams()
    g = geometry or GEOMETRY
    mask_img = dot_mask(img)
    inside, grid = _range_grid(mask_img.shape, g)
    mask = mask_img[inside]
    pts = grid[mask]
    n_px = int(len(pts))
    area = _dot_area(g.dot_radius)
    m: dict[str, Any] = {"dot_pixels": n_px}
    if n_px < p.min_dot_pixels:
        return {**m, "found": False}
    centroid = pts.mean(axis=0)
    cov = np.cov(pts.T, bias=True) + np.eye(2) * 1e-9
    evals, evecs = np.linalg.eigh(cov)
    major = evecs[:, 1]
    angle = math.degrees(math.atan2(major[1], major[0]))
    angle = (angle + 90.0) % 180.0 - 90.0  # major-axis direction in [-90, 90)
    sd = np.sqrt(np.diag(cov))
    corr = float(cov[0, 1] / (sd[0] * sd[1])) if sd.all() else 0.0
    inv = np.linalg.inv(cov)
    d = grid - centroid
    maha = np.sqrt(np.einsum("ij,jk,ik->i", d, inv, d))
    # Hollow centre: share of pink pixels near the centroid against the densest shell around it.
    shells = []
    for lo, hi in ((0.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 2.0)):
        sel = (maha >= lo) & (maha < hi)
        shells.append(float(mask[sel].mean()) if sel.any() else 0.0)
    inner_ratio = shells[0] / max(shells) if max(shells) > 0 else 1.0
    ring_radius = float(np.hypot(*(pts - centroid).T).mean())
    # Outliers: pink pixels far outside the main group, as a number of dots.
    outlier_px = int(mask[maha > p.outlier_distance].sum())
    clusters = _two_cluster_profile(mask_img, inside, grid, centroid, p)
    return {
        **m,
        "found": True,
        "centroid": [round(float(centroid[0]), 3), round(float(centroid[1]), 3)],
        "offset": round(float(np.hypot(*centroid)), 3),
        "sd": [round(float(sd[0]), 3), round(float(sd[1]), 3)],
        "spread": round(float(math.sqrt((sd[0] ** 2 + sd[1] ** 2) / 2)), 3),
        "axis_ratio": round(float(math.sqrt(evals[1] / max(evals[0], 1e-12))), 3),
        "major_axis_deg": round(angle, 1),
        "corr": round(corr, 3),
        "inner_fill_ratio": round(float(inner_ratio), 3),
        "ring_radius": round(ring_radius, 3),
        "outlier_dots": int(round(outlier_px / area)),
        **clusters,
    }


def _two_cluster_profile(
    mask_img: np.ndarray, inside: np.ndarray, grid: np.ndarray, centroid: np.ndarray, p: BuiltinParams
) -> dict[str, Any]:
    """Deepest valley between two peaks of the dot-density profile, over projection directions.

    Pink coverage saturates where dots pile up, which flattens peaks. Inverting the Boolean-model
    coverage (density ~ -log(1 - coverage)) of the blurred mask gives back a density that keeps them."""
    from scipy import ndimage

    cover = ndimage.gaussian_filter(mask_img.astype(np.float32), p.density_sigma_px)[inside]
    density = -np.log1p(-np.clip(cover, 0.0, p.density_clip))
    keep = density > 1e-4
    w, xy = density[keep].astype(np.float64), grid[keep] - centroid
    edges = np.arange(-20.0 - p.profile_bin, 20.0 + 2 * p.profile_bin, p.profile_bin)
    half = int(math.ceil(3 * p.profile_sigma / p.profile_bin))
    kern = np.exp(-0.5 * (np.arange(-half, half + 1) * p.profile_bin / p.profile_sigma) ** 2)
    kern /= kern.sum()
    best = {"cluster_dip": 1.0, "cluster_axis_deg": None, "cluster_gap": None, "cluster_centres": None}
    for deg in range(0, 180, 5):
        u = np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])
        # Equal-width bins given by count and range: numpy bins them by arithmetic, not by sorting the
        # projection for each direction (the sort was half of a card's description time).
        hist, _ = np.histogram(xy @ u, len(edges) - 1, (edges[0], edges[-1]), weights=w)
        prof = np.convolve(hist, kern, mode="same")
        top = prof.max()
        peaks = [
            i
            for i in range(1, len(prof) - 1)
            if prof[i] >= prof[i - 1] and prof[i] > prof[i + 1] and prof[i] >= p.cluster_peak_share * top
        ]
        if len(peaks) < 2:
            continue
        a, b = sorted(sorted(peaks, key=lambda i: -prof[i])[:2])
        gap = (b - a) * p.profile_bin
        if gap < p.cluster_min_gap:
            continue
        dip = float(prof[a : b + 1].min() / min(prof[a], prof[b]))
        if dip < best["cluster_dip"]:
            centres = [(edges[i] + p.profile_bin / 2) * u + centroid for i in (a, b)]
            best = {
                "cluster_dip": round(dip, 3),
                "cluster_axis_deg": float((deg + 90) % 180 - 90),
                "cluster_gap": round(gap, 2),
                "cluster_centres": [[round(float(c[0]), 2), round(float(c[1]), 2)] for c in centres],
            }
    return best


def _direction(dx: float, dy: float, p: BuiltinParams) -> str:
    r = math.hypot(dx, dy)
    big = max(abs(dx), abs(dy))
    words = []
    for value, pos, neg in ((dx, "right", "left"), (dy, "up", "down")):
        if abs(value) >= min(p.axis_share * r, p.axis_named_from):
            word = pos if value > 0 else neg
            words.append(("slightly " if abs(value) < p.slight_axis_share * big else "") + word)
    return " and ".join(words)


def _tilt_words(angle: float) -> str:
    if abs(angle) < 15:
        return "lying almost horizontally"
    if abs(angle) > 75:
        return "standing almost vertically"
    return (
        f"rising to the right at about {abs(angle):.0f} degrees"
        if angle > 0
        else f"falling to the right at about {abs(angle):.0f} degrees"
    )


def compose_description(m: dict[str, Any], p: BuiltinParams | None = None) -> str:
    """Sentences about the distribution and shape, each decided by one measurement (docs/describe.md)."""
    p = p or BuiltinParams()
    if not m.get("found"):
        return (
            f"{BUILTIN_NOTE} No pink hole-position dots were found inside the circular range "
            f"({m.get('dot_pixels', 0)} pink pixels), so nothing can be said about their distribution or shape."
        )
    s = [BUILTIN_NOTE]
    cx, cy = m["centroid"]
    off = m["offset"]
    where = f"(centroid at x={cx:+.1f}, y={cy:+.1f} units, {off:.1f} units from the centre)"
    if off < p.centred_below:
        s.append(f"The pink dots are centred on the centre of the circular range {where}.")
    elif off < p.shifted_from:
        s.append(f"The pink dots are slightly off-centre, shifted {_direction(cx, cy, p)} {where}.")
    else:
        s.append(f"The pink dots are shifted {_direction(cx, cy, p)} from the centre of the range {where}.")
    sdx, sdy = m["sd"]
    spread = m["spread"]
    size = "compact" if spread < p.compact_below else "moderately broad" if spread < p.broad_below else "broad"
    axes = ""
    if sdx > p.axis_ratio_named * sdy:
        axes = ", wider horizontally than vertically"
    elif sdy > p.axis_ratio_named * sdx:
        axes = ", taller vertically than horizontally"
    s.append(
        f"The spread is {size}: standard deviation about {sdx:.1f} units horizontally and {sdy:.1f} "
        f"vertically (the range radius is 20){axes}."
    )
    ring = m["inner_fill_ratio"] < p.ring_inner_ratio
    two = (not ring) and m["cluster_dip"] < p.cluster_dip
    ratio, corr = m["axis_ratio"], m["corr"]
    if ring:
        s.append(
            f"The dots form a ring around a hollow centre: few dots lie near the middle of the group, "
            f"most lie about {m['ring_radius']:.1f} units from it."
        )
    elif two:
        c1, c2 = m["cluster_centres"]
        s.append(
            f"The dots form two clusters, {m['cluster_gap']:.1f} units apart along a line "
            f"{_tilt_words(m['cluster_axis_deg'])}, around ({c1[0]:+.1f}, {c1[1]:+.1f}) and "
            f"({c2[0]:+.1f}, {c2[1]:+.1f}), with fewer dots between them."
        )
    else:
        s.append("The dots form a single group, densest in the middle and thinning out towards the edges.")
    if ratio < p.round_below:
        s.append(f"Its outline is roughly round (long/short spread ratio {ratio:.2f}).")
    else:
        shape = "slightly elongated" if ratio < p.elongated_from else "elongated"
        if abs(corr) >= p.tilt_corr:
            s.append(
                f"It is {shape} (ratio {ratio:.2f}) and tilted, its long axis "
                f"{_tilt_words(m['major_axis_deg'])} (x-y correlation {corr:+.2f})."
            )
        else:
            s.append(f"It is {shape} (ratio {ratio:.2f}), its long axis {_tilt_words(m['major_axis_deg'])}.")
    k = m["outlier_dots"]
    if k:
        s.append(
            f"About {k} isolated dot{'s' if k > 1 else ''} lie{'s' if k == 1 else ''} far from the main "
            f"group (more than {p.outlier_distance:g} spreads away)."
        )
    else:
        s.append("There are no isolated outliers.")
    return " ".join(s)


@VLMS.register("builtin")
class BuiltinDescriber(VLM):
    """Deterministic, model-free descriptions from the dot pixels (no weights, no randomness)."""

    model_free = True

    def __init__(self, params: BuiltinParams | None = None):
        self.params = params or BuiltinParams()
        self.last_measurements: list[dict[str, Any]] = []

    def identity(self) -> dict[str, Any]:
        return {
            "backend": "builtin",
            "model": {"id": f"asectl-builtin-describer-v{self.params.version}", "hash": self.params.digest()},
            "generation": {},
        }

    def measure(self, image) -> dict[str, Any]:
        return measure_dots(image, self.params)

    def describe(self, images: Sequence[Any], prompt: str) -> list[str]:
        # The prompt is recorded but cannot steer a fixed describer.
        self.last_measurements = [self.measure(im) for im in images]
        return [compose_description(m, self.params) for m in self.last_measurements]


__all__ = [
    "VLM",
    "DEFAULT_PROMPT",
    "MODEL_ENV",
    "DEFAULT_GENERATION",
    "InstructBlipVLM",
    "BuiltinDescriber",
    "BuiltinParams",
    "make_vlm",
    "vlm_from_identity",
    "default_vlm_name",
    "generation_params",
    "measure_dots",
    "compose_description",
    "resolve_model_folder",
    "check_instructblip_folder",
]
