"""OCR engines. Both run the PP-OCR ONNX models shipped inside the rapidocr wheel, so nothing is ever
downloaded: ``cnocr`` (CnOCR, the paper's choice) and ``rapidocr`` (RapidOCR directly)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from asectl.backends.identity import file_fingerprint
from asectl.errors import ConfigError
from asectl.registry import OCR_ENGINES

# The model files bundled in the rapidocr 3.9.2 wheel.
DET_MODEL = "PP-OCRv6_det_small.onnx"
REC_MODEL = "PP-OCRv6_rec_small.onnx"
CLS_MODEL = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"


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

    @classmethod
    def static_identity(cls) -> dict[str, Any]:
        """Versions and model hashes, computed without loading the engine (cache hits never load it)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        return self.static_identity()

    def read(self, image: Image.Image) -> list[TextLine]:
        """Detect and recognise every text box of a card."""
        raise NotImplementedError

    def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """Recognise single-line crops (RGB arrays) in one batch, without the detector."""
        raise NotImplementedError


@OCR_ENGINES.register("cnocr")
class CnOcrEngine(OCREngine):
    def __init__(self, threads: int | None = None) -> None:
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

    @classmethod
    def static_identity(cls) -> dict[str, Any]:
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

    def __init__(self, threads: int | None = None) -> None:
        _quiet_ocr_logs()
        self.det_path, self.rec_path = _model_file(DET_MODEL), _model_file(REC_MODEL)
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

            self._ocr = RapidOCR(params=self._params)
            _quiet_ocr_logs()
        return self._ocr

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
            self._rec = TextRecognizer(cfg.Rec)
        return self._rec

    @classmethod
    def static_identity(cls) -> dict[str, Any]:
        return {
            "engine": "rapidocr",
            "rapidocr": version("rapidocr"),
            "use_cls": False,
            "det_model": {"file": DET_MODEL, **file_fingerprint(_model_file(DET_MODEL))},
            "rec_model": {"file": REC_MODEL, **file_fingerprint(_model_file(REC_MODEL))},
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


_engines: dict[str, OCREngine] = {}


def engine_identity(name: str) -> dict[str, Any]:
    cls, _ = OCR_ENGINES.get(name)
    return cls.static_identity()


def get_engine(name: str, threads: int | None = None) -> OCREngine:
    """One loaded engine per name per process (loading costs far more than reading one card);
    ``threads`` applies when it is first loaded."""
    if name not in _engines:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _engines[name] = OCR_ENGINES.create(name, threads=threads)
    return _engines[name]
