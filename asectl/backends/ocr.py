"""OCR engines. Both run the PP-OCR ONNX models shipped inside the rapidocr wheel, so nothing is ever
downloaded: ``cnocr`` (CnOCR, the paper's choice) and ``rapidocr`` (RapidOCR directly)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from asectl.backends.identity import file_fingerprint
from asectl.errors import ConfigError
from asectl.registry import OCR_ENGINES

# The model files bundled in the rapidocr 3.9.2 wheel.
DET_MODEL = "PP-OCRv6_det_small.onnx"
REC_MODEL = "PP-OCRv6_rec_small.onnx"
CLS_MODEL = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"


@dataclass(frozen=True)
class EngineChoice:
    """An OCR engine by registered name, and where given, an ONNX PP-OCR text recogniser to run instead of
    the one in the rapidocr wheel (``asectl ocr --recogniser``; an export's cut one). Hashable and
    picklable: it travels to worker processes and Ray workers as the engine's name did."""

    name: str
    recogniser: str | None = None

    def __str__(self) -> str:
        return self.name if self.recogniser is None else f"{self.name}, recogniser {Path(self.recogniser).name}"


@dataclass
class TextLine:
    text: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "score": round(self.score, 4), "box": [round(v, 1) for v in self.box]}


def bundled_model_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("rapidocr is not installed; reinstall asectl (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _model_file(name: str) -> Path:
    p = bundled_model_dir() / name
    if not p.is_file():
        raise ConfigError(f"{p}: OCR model file missing from the rapidocr wheel; reinstall rapidocr==3.9.2")
    return p


def _quiet_ocr_logs() -> None:
    # cnocr, cnstd and RapidOCR log every model load at INFO level; users see our progress bar instead.
    for name in ("cnocr", "cnstd", "RapidOCR", "rapidocr"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ort_threads(threads: int | None) -> dict[str, int]:
    # -1: onnxruntime's default, one thread per physical core.
    return {"intra_op_num_threads": threads or -1}


def _box(points: Any) -> tuple[float, float, float, float]:
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 0].max()), float(arr[:, 1].max())


class OCREngine:
    """Interface: ``read(image) -> list[TextLine]`` on a binarised RGB card; ``identity()`` for keys.
    Constructors take ``threads``: the inference library's threads per model (None: its default); the
    results must not depend on it, since it is no part of the identity."""

    registry_name = "?"
    recogniser: str | None = None  # another text recogniser file (EngineChoice), where the engine takes one

    @classmethod
    def static_identity(cls, recogniser: str | None = None) -> dict[str, Any]:
        """Versions and model hashes, computed without loading the engine (cache hits never load it)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        return self.static_identity(self.recogniser)

    def read(self, image: Image.Image) -> list[TextLine]:
        """Detect and recognise every text box of a card."""
        raise NotImplementedError

    def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """Recognise single-line crops (RGB arrays) in one batch, without the detector."""
        raise NotImplementedError


@OCR_ENGINES.register("cnocr")
class CnOcrEngine(OCREngine):
    def __init__(self, threads: int | None = None, recogniser: str | None = None) -> None:
        self.refuse_recogniser(recogniser)
        _quiet_ocr_logs()
        self.det_path, self.rec_path = _model_file(DET_MODEL), _model_file(REC_MODEL)
        from cnocr import CnOcr

        _quiet_ocr_logs()
        more = {"engine_cfg": _ort_threads(threads)}
        # rec_lang_type "en": the printed records are ASCII; model files are given by path (no download).
        self._ocr = CnOcr(
            rec_model_name="multi_PP-OCRv6_small",
            rec_model_fp=str(self.rec_path),
            rec_lang_type="en",
            det_model_name="multi_PP-OCRv6_det_small",
            det_model_fp=str(self.det_path),
            rec_more_configs=more,
            det_more_configs=more,
        )

    @staticmethod
    def refuse_recogniser(recogniser: str | None) -> None:
        if recogniser is not None:
            raise ConfigError(
                f"{recogniser}: the cnocr engine reads with its own recogniser; pass --engine rapidocr to "
                "read with another"
            )

    @classmethod
    def static_identity(cls, recogniser: str | None = None) -> dict[str, Any]:
        cls.refuse_recogniser(recogniser)
        return {
            "engine": "cnocr",
            "cnocr": version("cnocr"),
            "cnstd": version("cnstd"),
            "rec_lang": "en",
            "det_model": {"file": DET_MODEL, **file_fingerprint(_model_file(DET_MODEL))},
            "rec_model": {"file": REC_MODEL, **file_fingerprint(_model_file(REC_MODEL))},
        }

    def read(self, image: Image.Image) -> list[TextLine]:
        out = self._ocr.ocr(image)
        return [
            TextLine(str(o["text"]), float(o["score"]), _box(o["position"]))
            for o in out
            if o.get("position") is not None
        ]

    def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        out = self._ocr.ocr_for_single_lines(crops, batch_size=16)
        return [(str(o["text"]), float(o["score"])) for o in out]


@OCR_ENGINES.register("rapidocr")
class RapidOcrEngine(OCREngine):
    """RapidOCR's PP-OCR ONNX models. Its text recogniser is made alone on first use: reading the lines cut
    out of a card (``--detector auto``, the default) needs neither the detector nor the angle classifier, whose
    imports and sessions cost a cold start about 0.3 s; the whole pipeline is made on the first ``read``."""

    def __init__(self, threads: int | None = None, recogniser: str | None = None) -> None:
        _quiet_ocr_logs()
        self.recogniser = recogniser
        self.det_path = _model_file(DET_MODEL)
        self.rec_path = _recogniser_file(recogniser)
        self.cls_path = _model_file(CLS_MODEL)
        self._params = {
            "Global.log_level": "warning",
            "Global.use_cls": False,
            "Det.model_path": str(self.det_path),
            "Rec.model_path": str(self.rec_path),
            "Cls.model_path": str(self.cls_path),
            **{f"EngineConfig.onnxruntime.{k}": v for k, v in _ort_threads(threads).items()},
        }
        self._ocr: Any = None  # the whole pipeline, made on the first read()
        self._rec: Any = None  # its text recogniser

    def _pipeline(self) -> Any:
        if self._ocr is None:
            from rapidocr import RapidOCR

            self._ocr = self._made(lambda: RapidOCR(params=self._params))
            _quiet_ocr_logs()
        return self._ocr

    def _made(self, make: Callable[[], Any]) -> Any:
        """``make()``; where it fails on a recogniser file of the user's (no PP-OCR recogniser), one line."""
        try:
            return make()
        except Exception as exc:
            if self.recogniser is None:
                raise
            raise ConfigError(
                f"{self.recogniser}: not an ONNX PP-OCR text recogniser with its character list "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); pass another --recogniser"
            ) from None

    def _recognizer(self) -> Any:
        """The recogniser RapidOCR would make, with the same settings (as ``RapidOCR._initialize`` sets them)."""
        if self._rec is None and self._ocr is not None:
            self._rec = self._ocr.text_rec
        if self._rec is None:
            import rapidocr
            from rapidocr.ch_ppocr_rec import TextRecognizer
            from rapidocr.utils.parse_parameters import ParseParams

            package = Path(rapidocr.__file__).parent
            cfg = ParseParams.update_batch(ParseParams.load(package / "config.yaml"), self._params)
            cfg.Rec.engine_cfg = cfg.EngineConfig[cfg.Rec.engine_type.value]
            cfg.Rec.font_path = cfg.Global.font_path
            cfg.Rec.model_root_dir = cfg.Global.model_root_dir or package / "models"
            _quiet_ocr_logs()
            self._rec = self._made(lambda: TextRecognizer(cfg.Rec))
        return self._rec

    @classmethod
    def static_identity(cls, recogniser: str | None = None) -> dict[str, Any]:
        rec = _recogniser_file(recogniser)
        return {
            "engine": "rapidocr",
            "rapidocr": version("rapidocr"),
            "use_cls": False,
            "det_model": {"file": DET_MODEL, **file_fingerprint(_model_file(DET_MODEL))},
            "rec_model": {"file": rec.name, **file_fingerprint(rec)},
        }

    def read(self, image: Image.Image) -> list[TextLine]:
        res = self._pipeline()(np.asarray(image.convert("RGB")))
        if res.txts is None or res.boxes is None:
            return []
        return [TextLine(str(t), float(s), _box(b)) for t, s, b in zip(res.txts, res.scores, res.boxes)]

    def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        from rapidocr.ch_ppocr_rec.typings import TextRecInput

        res = self._recognizer()(TextRecInput(img=list(crops)))
        return [(str(t), float(s)) for t, s in zip(res.txts or (), res.scores or ())]


def _recogniser_file(path: str | None) -> Path:
    """The text recogniser rapidocr reads with: the user's file (checked to exist), else the wheel's."""
    if path is None:
        return _model_file(REC_MODEL)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such text recogniser; pass an ONNX PP-OCR recogniser file (--recogniser)")
    return p


# The characters a printed record can hold: printable ASCII. PP-OCR's CTC classifier also has index 0 for
# the blank and, RapidOCR's decoder adds it, a last index for the space.
PRINTABLE = tuple(chr(c) for c in range(33, 127))


def ascii_recogniser(source: str | os.PathLike, target: str | os.PathLike) -> dict[str, Any]:
    """Write ``source`` (an ONNX PP-OCR recogniser with its character list in the metadata) with its last
    layer (the classifier's weight and bias before the softmax) and its character list cut to printable
    ASCII. Each time step's most likely character among those kept is the full model's wherever the full
    model reads ASCII, and the convolutions are untouched; the classifier over 18,710 characters and its
    softmax were about a tenth of the recogniser's CPU time (bench/ocr_recogniser.py). Needs the onnx
    package (exporting does; predicting from the written file does not). Returns what was cut."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    chars = next((p.value for p in model.metadata_props if p.key == "character"), "").splitlines()
    out = model.graph.output[0].type.tensor_type.shape.dim[-1]
    if not chars or out.dim_value != len(chars) + 2:
        raise ConfigError(f"{source}: not a PP-OCR CTC recogniser with its character list; cannot cut it")
    kept = [c for c in chars if c in PRINTABLE]
    index = np.asarray([0] + [1 + chars.index(c) for c in kept] + [len(chars) + 1])
    cut = 0
    for init in model.graph.initializer:
        if init.dims and init.dims[-1] == out.dim_value:  # the classifier's weight [hidden, chars] and bias
            a = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a[..., index]), init.name))
            cut += 1
    if cut != 2:
        raise ConfigError(f"{source}: found {cut} classifier tensors, not a weight and a bias; cannot cut it")
    out.dim_value = len(index)
    for info in model.graph.value_info:  # the classifier's intermediate outputs carry the width too
        dims = info.type.tensor_type.shape.dim
        if dims and dims[-1].dim_value == len(chars) + 2:
            dims[-1].dim_value = len(index)
    for p in model.metadata_props:
        if p.key == "character":
            p.value = "\n".join(kept)
    onnx.save(model, str(target))
    return {"characters": len(chars) + 2, "kept": len(index), "kept_set": "printable ASCII, space, CTC blank"}


_engines: dict[EngineChoice, OCREngine] = {}


def _choice(engine: EngineChoice | str) -> EngineChoice:
    return engine if isinstance(engine, EngineChoice) else EngineChoice(engine)


# An engine registered by a plugin before recognisers could be chosen takes no ``recogniser``: it is passed
# only when one is chosen (engine_identity, get_engine).
def engine_identity(engine: EngineChoice | str) -> dict[str, Any]:
    choice = _choice(engine)
    cls, _ = OCR_ENGINES.get(choice.name)
    return cls.static_identity() if choice.recogniser is None else cls.static_identity(choice.recogniser)


def get_engine(engine: EngineChoice | str, threads: int | None = None) -> OCREngine:
    """One loaded engine per choice per process (loading costs far more than reading one card);
    ``threads`` applies when it is first loaded."""
    choice = _choice(engine)
    if choice not in _engines:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        more = {} if choice.recogniser is None else {"recogniser": choice.recogniser}
        _engines[choice] = OCR_ENGINES.create(choice.name, threads=threads, **more)
    return _engines[choice]
