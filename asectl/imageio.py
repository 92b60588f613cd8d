"""Safe image loading: every failure becomes a one-line DataError naming the file and the fix."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from asectl.errors import DataError

# Cards are well under a megapixel; anything far larger is refused before it is decoded
# (a "decompression bomb" would otherwise exhaust memory).
MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# A new card is read by OCR, the describer and the image encoder (and, in a watch, by the completeness
# check): the last decoded cards are kept, so each process decodes a card once. Bounded in bytes.
DECODED_KEPT_BYTES = 64 << 20
_decoded: OrderedDict[tuple, Image.Image] = OrderedDict()
_decoded_lock = threading.Lock()


def load_image(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB. 16-bit, palette, grey and RGBA inputs are converted (alpha on white).
    Each call returns an image of its own; a file unchanged since a recent call is not decoded again."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"{p}: file not found; check the path") from None
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not an image")
    if st.st_size == 0:
        raise DataError(f"{p}: empty file; re-export the image")
    # A rewritten file has another size, modification time or inode, so it is decoded afresh.
    key = (str(p.absolute()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    with _decoded_lock:
        kept = _decoded.get(key)
        if kept is not None:
            _decoded.move_to_end(key)
            return kept.copy()
    img = _decode(p)
    size = img.width * img.height * 3
    with _decoded_lock:
        if size <= DECODED_KEPT_BYTES:
            _decoded[key] = img
            total = sum(im.width * im.height * 3 for im in _decoded.values())
            while total > DECODED_KEPT_BYTES:
                _, old = _decoded.popitem(last=False)
                total -= old.width * old.height * 3
    return img.copy()


def _decode(p: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise DataError(
                        f"{p}: image is {w}x{h} pixels, over the {MAX_PIXELS:,}-pixel limit "
                        "(possible decompression bomb); downscale it before use"
                    )
                im.load()
                return _to_rgb(im)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{p}: image is too large (possible decompression bomb); downscale it") from None
    except UnidentifiedImageError:
        raise DataError(f"{p}: not an image PIL can read; give a PNG or JPEG card") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{p}: damaged or truncated image ({exc}); re-export it") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scale high bit depth to 8 bits by its real range instead of clipping at 255.
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        scale = 65535.0 if hi > 255 else 255.0
        arr8 = np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im.copy()


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
