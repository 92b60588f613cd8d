"""Exported models: a folder that classifies cards with ONNX graphs, onnxruntime and the OCR and LLM engines
alone, without torch or transformers (``asectl export``, docs/export.md). Written by
``asectl.stages.export.run_export`` from a trained bundle (asectl/bundle.py); read here, and copied here with
new model settings (``copy_export``: ``asectl calibrate`` re-sets an export's thresholds into a new one).

    export.json             manifest: asectl version, the bundle it came from, the model's settings (classes,
                            task, calibration temperature, decision rule with its held-out cards, the replay
                            settings of OCR, describer and LLM with its priors), the graph of each modality
                            and what its encoder reads, the parity measured at export time, every file's
                            checksum
    encoders/*.onnx         one graph per encoder: image -> pooled features; token ids -> pooled features
    encoders/*.json         the text encoders' tokenizers (the ``tokenizers`` library's format)
    heads.onnx              the PFA projections (paper section 3.3), one named input and output per modality
    fusion-K.onnx           fold model K: CMAF + MLP (section 3.4), aligned features by modality -> logits;
                            trained end to end (format 2): its own heads and adapters too, encoder features by
                            modality -> logits, and no heads.onnx
    card-spec.toml          the card spec the OCR'd record is parsed with
    llm/*.gguf, prompt.txt  the LLM and a prompt template file, when they were copied in (``--copy-llm``)

Every graph takes a dict of named inputs, one per modality, so a model with another modality exports and
runs without a change here: each modality names its encoder kind (``ENCODER_KINDS``) and its graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from asectl.bundle import Bundle, DecisionSource, load_bundle, verify_files, write_checksums
from asectl.cache import canonical_json, new_folder, sha256_bytes
from asectl.errors import ConfigError

EXPORT_FORMAT = 1
# 2: fold models trained end to end, each graph with its own projection heads and adapters (no heads.onnx);
# an older asectl would feed them aligned features, so it is refused. Frozen-head exports stay format 1.
END_TO_END_EXPORT_FORMAT = 2
# 3: as 1, each fold model with a trees member on the stats numbers (``graphs["trees"]``, safetensors arrays
# evaluated with numpy, asectl.models.trees), which an older asectl would leave out, so it is refused.
TREES_EXPORT_FORMAT = 3
READABLE_FORMATS = (EXPORT_FORMAT, END_TO_END_EXPORT_FORMAT, TREES_EXPORT_FORMAT)
MANIFEST = "export.json"


def is_export(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_model(path: str | Path) -> tuple[Bundle | ExportedModel, str]:
    """A model folder, bundle or export (``is_export``), and a few words saying which, for messages."""
    if is_export(path):
        return load_export(path), f"exported model {path}"
    return load_bundle(path), f"model {path}"


def load_export(path: str | Path) -> ExportedModel:
    """Open an export folder, verifying every file's checksum first."""
    p = Path(path)
    manifest_file = p / MANIFEST
    if not manifest_file.is_file():
        raise ConfigError(f"{p}: not an exported model (no {MANIFEST}); write one with `asectl export --out DIR`")
    try:
        manifest = json.loads(manifest_file.read_text())
        files, model, graphs = manifest["files"], manifest["model"], manifest["graphs"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{manifest_file}: unreadable manifest; export the model again") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise ConfigError(
            f"{p}: export format {manifest.get('format')} is not one of "
            f"{', '.join(map(str, READABLE_FORMATS))}; export the model again with this asectl"
        )
    verify_files(p, files, "export the model again with `asectl export`")
    return ExportedModel(p, manifest, model, graphs)


def export_format(graphs: Mapping[str, Any]) -> int:
    """The format an export with these graphs is written in: without a shared heads graph, its fold models
    were trained end to end; with trees files, its fold models have a trees member."""
    if any(graphs.get("trees") or ()):
        return TREES_EXPORT_FORMAT
    return EXPORT_FORMAT if graphs.get("heads") else END_TO_END_EXPORT_FORMAT


def resolve_replay(folder: Path, replay: Mapping[str, Any]) -> dict[str, Any]:
    """The stored replay settings with the export's own files (card spec, a copied LLM or prompt) made
    absolute; paths outside the export (an LLM that was not copied) stay as stored."""
    out = json.loads(json.dumps(replay))
    for stage, key in (("ocr", "spec"), ("ocr", "recogniser"), ("reason", "llm_model"), ("reason", "prompt")):
        value = (out.get(stage) or {}).get(key)
        if isinstance(value, str) and value.startswith("./"):
            out[stage][key] = str(folder / value[2:])
    return out


@dataclass
class ExportedModel(DecisionSource):
    """An export folder, read like a bundle by ``asectl.stages.predict.Predictor`` (``labels``,
    ``temperature``, ``decision_rule()``, ``config``), with ``class_logits`` in place of torch models.
    Sessions are created on first use and kept."""

    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]  # the bundle's settings, replay resolved to this folder
    graphs: dict[str, Any]
    _sessions: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.config = {**self.config, "replay": resolve_replay(self.path, self.config["replay"])}

    @property
    def labels(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def digest(self) -> str:
        """Content identity: the manifest holds the checksum of every file (verified on loading)."""
        return sha256_bytes(canonical_json(self.manifest).encode())

    @property
    def source_digest(self) -> str:
        """The digest of the bundle it was exported from."""
        return str(self.manifest["bundle"]["digest"])

    def provenance(self) -> dict[str, str]:
        """What the export changes in a report's provenance: which model, and the OCR engine it reads with."""
        ocr = self.manifest.get("ocr") or {}
        out = {"exported model": f"{self.path} (from bundle {self.source_digest[:12]}, asectl export)"}
        if ocr.get("engine") and ocr.get("engine") != ocr.get("trained_engine"):
            out["ocr"] = f"{ocr['engine']} in place of {ocr['trained_engine']} ({ocr.get('why', '')})"
        return out

    @property
    def temperature(self) -> float:
        return float(self.config["calibration"]["temperature"])

    @property
    def modalities(self) -> list[str]:
        """The model's inputs by name, in the order the graphs list them."""
        return list(self.graphs["encoders"])

    def session(self, name: str) -> Any:
        if name not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # onnxruntime's own warnings are not the user's business
            try:
                self._sessions[name] = ort.InferenceSession(
                    str(self.path / name), opts, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # a graph that passed its checksum but does not load: wrong onnxruntime
                raise ConfigError(
                    f"{self.path / name}: onnxruntime cannot load it ({type(exc).__name__}: "
                    f"{str(exc)[:160]}); install onnxruntime>=1.16 or export again"
                ) from None
        return self._sessions[name]

    def load(self) -> None:
        """Create every session now (``--watch`` warms up before its first card)."""
        for spec in self.graphs["encoders"].values():
            self.session(spec["graph"])
            if spec.get("tokenizer"):
                self.tokenizer(spec)
        if self.graphs.get("heads"):
            self.session(self.graphs["heads"])
        for g in self.graphs["fusion"]:
            self.session(g)

    def tokenizer(self, spec: Mapping[str, Any]) -> Any:
        key = "tokenizer:" + spec["tokenizer"]
        if key not in self._sessions:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.path / spec["tokenizer"]))
            tok.enable_truncation(int(spec["max_length"]))
            # Not dead with one text per run: the saved file may pad every text to a fixed length (128 for
            # MiniLM's); this pads to the longest text of the call, the text itself, as the bundle's encoder.
            tok.enable_padding(pad_id=int(spec["pad_id"]), pad_token=spec["pad_token"])
            self._sessions[key] = tok
        return self._sessions[key]

    # -- inference --------------------------------------------------------------------------------
    def encode(self, inputs: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
        """Encoder features by modality, float32 [n, dim], from what each encoder reads (``inputs``:
        modality -> card images or texts, asectl.stages.modalities.modality_inputs)."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ConfigError(f"{self.path}: the model needs inputs for {', '.join(missing)}")
        unknown = sorted({s["kind"] for s in self.graphs["encoders"].values()} - set(ENCODER_KINDS))
        if unknown:
            raise ConfigError(
                f"{self.path}: encoder kind {', '.join(unknown)} is unknown to this asectl; install "
                "the version that exported it"
            )
        features = {
            m: ENCODER_KINDS[spec["kind"]](self, spec, inputs[m]) for m, spec in self.graphs["encoders"].items()
        }
        if inputs.get("stats") is not None:  # the record's numbers: no encoder graph, the heads take them
            features["stats"] = np.asarray(inputs["stats"], dtype=np.float32)
        return features

    def align(self, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The PFA projections: aligned, L2-normalised features by modality (the graph's outputs are in the
        order of its inputs)."""
        sess = self.session(self.graphs["heads"])
        names = [i.name for i in sess.get_inputs()]
        feeds = {m: np.ascontiguousarray(features[m], dtype=np.float32) for m in names}
        return dict(zip(names, sess.run(None, feeds)))

    def fold_logits(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Logits float32 [fold models, n, classes] before calibration, from the encoder features: through the
        heads graph, or, for fold models trained end to end, through each fold graph's own heads."""
        from asectl.models.trees import with_trees

        inputs = self.align(features) if self.graphs.get("heads") else features
        trees = self.graphs.get("trees") or [None] * len(self.graphs["fusion"])
        out = []
        for graph, trees_name in zip(self.graphs["fusion"], trees):
            sess = self.session(graph)
            feeds = {i.name: np.ascontiguousarray(inputs[i.name], dtype=np.float32) for i in sess.get_inputs()}
            logits = sess.run(None, feeds)[0]
            # the fold model's trees member on the stats numbers, where it has one (asectl.models.trees)
            out.append(with_trees(self.trees(trees_name) if trees_name else None, logits, features))
        return np.ascontiguousarray(np.stack(out), dtype=np.float32)

    def trees(self, name: str) -> Any:
        """A fold model's trees member, loaded once."""
        key = "trees:" + name
        if key not in self._sessions:
            from asectl.models.trees import load_trees

            self._sessions[key] = load_trees(self.path / name)
        return self._sessions[key]

    def class_logits(self, inputs: Mapping[str, Sequence[Any]]) -> np.ndarray:
        """Encoders, projections and fold models over the cards' inputs: logits [members, n, classes]."""
        return self.fold_logits(self.encode(inputs))


def copy_export(
    parent: ExportedModel, out: str | Path, model: Mapping[str, Any], write_files: Callable[[Path], None]
) -> ExportedModel:
    """A copy of the export ``parent`` at ``out`` (written whole or not at all) whose model settings are
    ``model`` and whose files ``write_files(folder)`` may replace; graphs, tokenizers and the LLM are copied
    as they are, and the manifest's checksums are written again."""
    import shutil
    import time

    with new_folder(out) as tmp:
        shutil.copytree(parent.path, tmp, ignore=shutil.ignore_patterns(MANIFEST), dirs_exist_ok=True)
        write_files(tmp)
        manifest = {
            **json.loads(json.dumps(parent.manifest)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": dict(model),
        }
        write_checksums(tmp, manifest, MANIFEST)
    return load_export(out)


def image_features(model: ExportedModel, spec: Mapping[str, Any], items: Sequence[Any]) -> np.ndarray:
    """Card images (samples with ``.path``, paths, PIL images) through the image encoder's graph, one per
    run (``_one_per_run``)."""
    from asectl.backends.encoders import prepare_image

    sess = model.session(spec["graph"])
    name = sess.get_inputs()[0].name
    runs = (
        sess.run(None, {name: prepare_image(getattr(it, "path", it), **spec["preprocessing"])[None]})[0] for it in items
    )
    return _one_per_run(runs, spec)


def text_features(model: ExportedModel, spec: Mapping[str, Any], texts: Sequence[str]) -> np.ndarray:
    """Texts through the tokenizer and the text encoder's graph (pooling inside the graph), one per run
    (``_one_per_run``): no padding to a batch-mate's length."""
    sess = model.session(spec["graph"])
    tok = model.tokenizer(spec)
    wanted = {i.name for i in sess.get_inputs()}

    def run(text: str) -> np.ndarray:
        e = tok.encode(str(text))
        feeds = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
        return sess.run(None, {k: np.asarray([v], dtype=np.int64) for k, v in feeds.items() if k in wanted})[0]

    return _one_per_run(map(run, texts), spec)


def _one_per_run(runs: Iterable[np.ndarray], spec: Mapping[str, Any]) -> np.ndarray:
    """float32 [n, dim] from one graph run per item. One item per run, as the bundle's encoders take on a
    CPU: a card's features are the same bits whichever cards arrive with it (a text padded to a longer
    batch-mate's length came out up to 1e-7 apart), and on the quickstart's cards batches of 16 images or
    32 texts were no faster over all: images about 4% faster, texts slower (docs/export.md)."""
    return np.concatenate([np.zeros((0, int(spec["dim"])), np.float32), *runs]).astype(np.float32, copy=False)


# What each kind of encoder reads and how its graph is fed; a new modality's encoder kind is added here.
ENCODER_KINDS: dict[str, Callable[[ExportedModel, Mapping[str, Any], Sequence[Any]], np.ndarray]] = {
    "image": image_features,
    "text": text_features,
}
