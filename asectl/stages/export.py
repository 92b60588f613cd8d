"""``asectl export``: a trained bundle as a folder that classifies cards without torch or transformers
(the folder's layout and how it is read: asectl/export.py; docs/export.md).

The encoders, the PFA projections (paper section 3.3) and each fold model of the fusion classifier
(section 3.4) are traced into ONNX graphs; the calibration temperature, the decision rule and every
setting ``predict`` replays (OCR engine and card spec, describer, LLM file, prompt and priors) are copied
from the bundle. Before the folder is written, two generated cards and a few texts go through both the
torch models and the graphs, and the export is refused unless their probabilities agree within
``PARITY_TOLERANCE``; the measured difference is kept in the manifest.

OCR: CnOCR imports torch. Where the bundle read its cards with ``cnocr``, the export reads them with
``rapidocr``, which runs the same PP-OCR ONNX models: bench/ocr_accuracy.py found both engines' records
identical on every card of the clean and the field benchmarks (455 cards each, 6370 of 6370 numbers,
docs/benchmarks.md), so the fields, the LLM's prompts and the texts the encoders read are the same.
It reads with the wheel's PP-OCR recogniser cut to printable ASCII (asectl.backends.ocr.ascii_recogniser,
written into the export), about 11% less recogniser CPU time per card, where the card spec prints ASCII only:
bench/ocr_recogniser.py found its records identical to the full recogniser's on every card of the clean and
the field benchmarks (``RECOGNISER_EVIDENCE``). A recogniser the model was trained with (``asectl ocr
--recogniser``) is copied in as it is."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn

from asectl import __version__
from asectl.bundle import FUSION_MEMBER, HELD_OUT_SCORES, Bundle, write_checksums
from asectl.cache import new_folder
from asectl.environment import package_versions
from asectl.errors import AsectlError, ConfigError
from asectl.export import MANIFEST, ExportedModel, export_format
from asectl.stages.predict import bundle_encoders

OPSET = 17
EXPORT_LIBRARIES = ("torch", "onnx", "onnxruntime", "tokenizers", "transformers")  # versions in export.json
PARITY_TOLERANCE = 1e-4  # largest probability difference between the bundle and its export
# OCR engines that import torch -> the ONNX engine an export reads with instead (records identical on the
# benchmarks: module docstring).
ENGINE_WITHOUT_TORCH = {"cnocr": "rapidocr"}
ENGINE_EVIDENCE = (
    "bench/ocr_accuracy.py: the cnocr and rapidocr records are identical on every card of the "
    "clean and field benchmarks (455 cards each, 6370/6370 numbers; docs/benchmarks.md)"
)
# The ASCII-cut recogniser in an export, and the evidence that it reads the same records as the full one.
LINE_RECOGNISER = "ocr/rec-ascii.onnx"
RECOGNISER_EVIDENCE = (
    "bench/ocr_recogniser.py: the recogniser cut to printable ASCII reads the same record as the full one on "
    "every card of the clean and field benchmarks (455 cards each; docs/benchmarks.md)"
)
# Texts of several lengths for the parity check (padding, and truncation at the encoder's max length).
PROBE_TEXTS = (
    "",
    "The card looks normal: dots evenly spread inside the circle.",
    " ".join(["The record shows a cluster of dots near the rim and a wider spread than usual."] * 40),
)


@dataclass
class ExportSummary:
    path: Path
    graphs: int
    ocr: dict[str, Any]
    llm: dict[str, Any]
    parity: dict[str, Any]


def run_export(bundle: Bundle, out: str | Path, *, copy_llm: bool = False) -> ExportSummary:
    """Write ``bundle`` as an export folder at ``out`` (must not exist or be empty). ``copy_llm``: copy the
    LLM's GGUF file in, so the folder is all a station needs; else its path is stored and its hash checked."""
    out = Path(out)
    with new_folder(out) as tmp:
        replay = json.loads(json.dumps(bundle.config["replay"]))
        describer = (replay.get("describe") or {}).get("vlm")
        if describer != "builtin":
            raise ConfigError(
                f"the model's describer is {describer}, which needs torch; an export replays the built-in "
                "describer only: train with `asectl describe --vlm builtin`, or predict with the bundle"
            )
        (tmp / "encoders").mkdir()
        graphs = write_graphs(bundle, tmp)
        ocr = export_ocr(replay, bundle, tmp)
        llm = export_llm(replay, tmp, copy_llm)
        if (bundle.path / HELD_OUT_SCORES).is_file():  # so `predict --max-miss-rate` moves an export's rule too
            shutil.copyfile(bundle.path / HELD_OUT_SCORES, tmp / HELD_OUT_SCORES)
        model = {k: v for k, v in bundle.config.items() if k != "files"}
        model["replay"] = replay
        manifest = {
            "format": export_format(graphs),
            "asectl_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "bundle": {
                "path": str(bundle.path),
                "digest": bundle.digest,
                "asectl_version": bundle.config.get("asectl_version"),
            },
            "opset": OPSET,
            "versions": package_versions(EXPORT_LIBRARIES),
            "ocr": ocr,
            "llm": llm,
            "graphs": graphs,
            "model": model,
        }
        manifest["parity"] = check_parity(bundle, ExportedModel(tmp, manifest, model, graphs))
        write_checksums(tmp, manifest, MANIFEST)
    encoder_graphs = {s["graph"] for s in graphs["encoders"].values()}
    return ExportSummary(
        out, bool(graphs["heads"]) + len(graphs["fusion"]) + len(encoder_graphs), ocr, llm, manifest["parity"]
    )


# --- graphs --------------------------------------------------------------------------------------------
def write_graphs(bundle: Bundle, folder: Path) -> dict[str, Any]:
    """The ONNX graphs of the encoders, the projections and the fold models, and what each one reads. Fold
    models trained end to end carry their own heads and adapters: their graphs read the encoder features and
    there is no shared heads graph (``heads`` None)."""
    from asectl.models.cmaf import fusion_inputs, trees_file

    encoders = modality_encoders(bundle)
    specs: dict[str, dict[str, Any]] = {}
    written: dict[int, dict[str, Any]] = {}  # one graph per encoder instance (frozen branches share one)
    for modality, enc in encoders.items():
        if id(enc) not in written:
            written[id(enc)] = encoder_graph(enc, folder, modality)
        specs[modality] = written[id(enc)]
    members = bundle.fusion_members()
    shared = None
    if any(member.projections is None for member in members):
        heads = bundle.heads()
        names = list(heads.dims)
        export_graph(
            _Heads(heads, names),
            [_zeros(heads.dims[m]) for m in names],
            folder / "heads.onnx",
            names,
            [f"{m}_aligned" for m in names],
        )
        shared = "heads.onnx"
    fusion, trees = [], []
    for k, member in enumerate(members):
        inputs = list(fusion_inputs(member))
        graph = Path(FUSION_MEMBER.format(k)).with_suffix(".onnx").name
        widths = member.projections.dims if member.projections is not None else dict.fromkeys(inputs, member.dim)
        export_graph(_Positional(member), [_zeros(widths[m]) for m in inputs], folder / graph, inputs, ["logits"])
        fusion.append(graph)
        if getattr(member, "trees", None) is not None:  # arrays, evaluated with numpy (no graph)
            name = trees_file(FUSION_MEMBER.format(k)).name
            member.trees.save(folder / name)
            trees.append(name)
    return {"encoders": specs, "heads": shared, "fusion": fusion, **({"trees": trees} if trees else {})}


def modality_encoders(bundle: Bundle) -> dict[str, Any]:
    """The bundle's encoders (checked against its identities, fine-tuned states loaded) by modality."""
    return dict(zip(("image", "vlm", "llm"), bundle_encoders(bundle)))


def encoder_graph(enc: Any, folder: Path, modality: str) -> dict[str, Any]:
    """One encoder as an ONNX graph under ``folder``/encoders, and the spec ``asectl.export`` feeds it by."""
    ident = enc.identity()
    base = {"dim": int(enc.dim), "identity": ident}
    if enc.family == "image":
        prep = enc.preprocessing()
        graph = f"encoders/{modality}.onnx"
        size = int(prep["input_size"])
        channels = int(prep.get("channels", 3))
        export_graph(
            _ImageFeatures(enc),
            [np.zeros((1, channels, size, size), np.float32)],
            folder / graph,
            ["pixels"],
            ["features"],
            dynamic={"pixels": {0: "batch"}},
        )
        return {"kind": "image", "graph": graph, "preprocessing": prep, **base}
    if enc.family == "text":
        tok = enc.tokenizer
        if not getattr(tok, "is_fast", False):
            raise ConfigError(
                f"text encoder {ident.get('encoder')}: its tokenizer has no fast (tokenizers) "
                "version, which an export needs; use a model folder with tokenizer.json"
            )
        tokenizer = f"encoders/{modality}-tokenizer.json"
        tok.backend_tokenizer.save(str(folder / tokenizer))
        inputs = [n for n in tok.model_input_names if n in ("input_ids", "attention_mask", "token_type_ids")]
        sample = tok(["a b c"], return_tensors="np")
        graph = f"encoders/{modality}.onnx"
        export_graph(
            _TextFeatures(enc, inputs),
            [np.asarray(sample[n], np.int64) for n in inputs],
            folder / graph,
            inputs,
            ["features"],
            dynamic={n: {0: "batch", 1: "tokens"} for n in inputs},
        )
        return {
            "kind": "text",
            "graph": graph,
            "tokenizer": tokenizer,
            "max_length": int(enc.max_length),
            "pad_id": int(tok.pad_token_id),
            "pad_token": str(tok.pad_token),
            **base,
        }
    raise ConfigError(f"encoder family {enc.family!r} ({ident.get('encoder')}): no ONNX export for it yet")


def export_graph(
    module: Any,
    args: Sequence[np.ndarray],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
) -> None:
    """Trace ``module`` (eval mode) on ``args`` into ``path``; the first axis of every input and output
    is the batch unless ``dynamic`` says more."""
    import torch

    module.eval()
    axes = {n: {0: "batch"} for n in (*inputs, *outputs)}
    axes.update(dynamic or {})
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter: it needs only the onnx package (torch's dynamo exporter needs onnxscript).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(a) for a in args),
            str(path),
            dynamo=False,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )


def _zeros(dim: int) -> np.ndarray:
    return np.zeros((2, int(dim)), np.float32)


class _Heads(nn.Module):
    """The PFA projections as one graph: one input and one aligned output per modality, in ``names`` order."""

    def __init__(self, heads: Any, names: Sequence[str]):
        super().__init__()
        self.heads, self.names = heads, list(names)

    def forward(self, *features: Any) -> tuple[Any, ...]:
        return tuple(self.heads(m, x) for m, x in zip(self.names, features))


class _Positional(nn.Module):
    """A fold model fed by named inputs (the graph's), in the order its forward takes them."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, *features: Any) -> Any:
        return self.model(*features)


class _ImageFeatures(nn.Module):
    def __init__(self, enc: Any):
        super().__init__()
        self.net, self.enc = enc.module, enc

    def forward(self, pixels: Any) -> Any:
        return self.enc.pooled(pixels)


class _TextFeatures(nn.Module):
    def __init__(self, enc: Any, inputs: Sequence[str]):
        super().__init__()
        self.net, self.enc, self.inputs = enc.module, enc, list(inputs)

    def forward(self, *tensors: Any) -> Any:
        named = dict(zip(self.inputs, tensors))
        return self.enc.pool(self.net(**named).last_hidden_state, named["attention_mask"])


# --- settings ------------------------------------------------------------------------------------------
def export_ocr(replay: dict[str, Any], bundle: Bundle, folder: Path) -> dict[str, Any]:
    """The OCR settings of the export (in ``replay``): an engine without torch, the card spec copied in, and
    the text recogniser it reads with copied in (module docstring)."""
    from asectl.domain.card import default_spec, load_spec

    ocr = replay.setdefault("ocr", {})
    trained = ocr.get("engine") or "cnocr"
    engine = ENGINE_WITHOUT_TORCH.get(trained, trained)
    ocr["engine"] = engine
    spec = default_spec()
    if ocr.get("spec"):  # a user's card spec: the export carries its own copy (the built-in one ships with asectl)
        (folder / "card-spec.toml").write_text(bundle.config["card_spec"]["toml"])
        ocr["spec"] = "./card-spec.toml"
        spec = load_spec(folder / "card-spec.toml")
    summary = {
        "engine": engine,
        "trained_engine": trained,
        "why": ENGINE_EVIDENCE if engine != trained else "the engine the model was trained with",
    }
    if engine == "rapidocr":
        summary["recogniser"] = export_recogniser(ocr, spec, folder)
    return summary


def export_recogniser(ocr: dict[str, Any], spec: Any, folder: Path) -> dict[str, Any]:
    """The text recogniser of an export (``ocr["recogniser"]`` set to its copy): the model's own, copied in;
    else the wheel's cut to printable ASCII where the card spec prints nothing else; else the wheel's."""
    from asectl.backends.ocr import PRINTABLE, REC_MODEL, ascii_recogniser, bundled_model_dir

    if ocr.get("recogniser"):
        source = Path(ocr["recogniser"])
        if not source.is_file():
            raise ConfigError(
                f"{source}: the text recogniser the model was trained with is missing; put it back there to export"
            )
        (folder / "ocr").mkdir(exist_ok=True)
        shutil.copyfile(source, folder / "ocr" / source.name)
        ocr["recogniser"] = f"./ocr/{source.name}"
        return {"file": ocr["recogniser"], "why": "the recogniser the model was trained with"}
    templates = [f.template or "" for f in spec.fields] + [spec.bin_template or ""]
    printed = {ch for t in templates for ch in t if ch != " "}
    if not printed <= set(PRINTABLE):
        return {
            "file": None,
            "why": f"the card spec prints {''.join(sorted(printed - set(PRINTABLE)))[:20]!r}: the full recogniser",
        }
    (folder / LINE_RECOGNISER).parent.mkdir(exist_ok=True)
    cut = ascii_recogniser(bundled_model_dir() / REC_MODEL, folder / LINE_RECOGNISER)
    ocr["recogniser"] = f"./{LINE_RECOGNISER}"
    return {"file": ocr["recogniser"], **cut, "why": RECOGNISER_EVIDENCE}


def export_llm(replay: dict[str, Any], folder: Path, copy_llm: bool) -> dict[str, Any]:
    """The LLM settings of the export (in ``replay``): its GGUF file copied in or referred to by path (checked
    by hash when predicting either way), a prompt template file copied in. A model without the llm branch
    needs no LLM: nothing is copied or referred to."""
    if "reason" in (replay.get("skipped_stages") or ()):
        return {"file": None, "copied": False, "not_needed": "the model has no llm branch"}
    reason = replay.get("reason") or {}
    source = Path(str(reason.get("llm_model")))
    if copy_llm:
        if reason.get("expect_model_hash"):
            from asectl.backends.llm import replay_model_path  # trained with the package installed elsewhere

            source = replay_model_path(source, reason["expect_model_hash"]) or source
        if not source.is_file():
            raise ConfigError(
                f"{source}: the model's LLM file is not here to copy; pass --llm-model with where it is now, "
                "export without --copy-llm, or put the file back"
            )
        (folder / "llm").mkdir()
        shutil.copyfile(source, folder / "llm" / source.name)
        reason["llm_model"] = f"./llm/{source.name}"
    prompt = Path(str(reason.get("prompt")))
    if prompt.suffix == ".txt" and prompt.is_file():
        shutil.copyfile(prompt, folder / "prompt.txt")
        reason["prompt"] = "./prompt.txt"
    return {
        "file": reason.get("llm_model"),
        "sha256": reason.get("expect_model_hash"),
        "copied": copy_llm,
        "prompt": reason.get("prompt"),
        "prompt_sha256": reason.get("expect_prompt_sha256"),
    }


# --- parity --------------------------------------------------------------------------------------------
def check_parity(bundle: Bundle, exported: ExportedModel) -> dict[str, Any]:
    """Two generated cards and ``PROBE_TEXTS`` through the bundle's torch models and the export's graphs:
    the largest feature, logit and probability differences; refused above ``PARITY_TOLERANCE``."""
    import tempfile

    from asectl.domain.synth import generate
    from asectl.models.calibration import mean_softmax
    from asectl.models.cmaf import fold_logits

    encoders = modality_encoders(bundle)
    with tempfile.TemporaryDirectory(prefix="asectl-export-") as tmp:
        generate(Path(tmp) / "cards", seed=0, counts="1,1,1,0,0")
        cards = sorted(str(p) for p in (Path(tmp) / "cards" / "images").glob("*.png"))
        # Every card with every text, each text branch in another order: the fusion sees mixed inputs.
        n = len(cards) * len(PROBE_TEXTS)
        probes = {
            "image": [cards[i // len(PROBE_TEXTS)] for i in range(n)],
            "text": [PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(n)],
        }
        inputs = {m: probes[enc.family][k:] + probes[enc.family][:k] for k, (m, enc) in enumerate(encoders.items())}
        torch_feats = {m: encoders[m].encode(inputs[m]) for m in encoders}
        heads = bundle.heads()  # the stats standardization: the same in every fold model's heads
        if heads.stats is not None:  # the record's numbers around the training cards' mean, a field unread
            rng = np.random.default_rng(0)
            numbers = heads.stats.mean.numpy() + heads.stats.scale.numpy() * rng.normal(size=(n, heads.dims["stats"]))
            numbers = numbers.astype(np.float32)
            numbers[::2, 1] = np.nan
            inputs["stats"] = torch_feats["stats"] = numbers
        onnx_feats = exported.encode(inputs)
    torch_logits = fold_logits(bundle.fusion_members(), torch_feats, heads)
    onnx_logits = exported.fold_logits(onnx_feats)
    t = bundle.temperature
    diff = {
        "cases": n,
        "features": max(float(np.abs(torch_feats[m] - onnx_feats[m]).max()) for m in encoders),
        "logits": float(np.abs(torch_logits - onnx_logits).max()),
        "probabilities": float(np.abs(mean_softmax(torch_logits, t) - mean_softmax(onnx_logits, t)).max()),
    }
    if not diff["probabilities"] <= PARITY_TOLERANCE:
        raise AsectlError(
            f"the exported graphs' probabilities differ from the bundle's by {diff['probabilities']:.2e} "
            f"(tolerance {PARITY_TOLERANCE:g}) on generated cards; not exported. Report this with "
            f"the versions of torch and onnxruntime ({package_versions(EXPORT_LIBRARIES)})"
        )
    return {**diff, "tolerance": PARITY_TOLERANCE}
