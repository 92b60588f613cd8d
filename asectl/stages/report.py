"""``asectl report``: evaluate a trained bundle on a dataset's test split and write the report files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asectl.bundle import Bundle, heads_training
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, binary_label
from asectl.errors import ConfigError, DataError
from asectl.export import ExportedModel
from asectl.report import (
    FILES,
    CardImages,
    ReportInput,
    ReportSummary,
    pfa_stage_name,
    render_report,
    report_key_parts,
    stage_curves_from_pfa,
    write_report,
)
from asectl.stages.align import AlignOutcome
from asectl.stages.predict import Predictor
from asectl.stages.split import THRESHOLDS, TRAINING, model_split, split_summary


def bundle_alignment(bundle: Bundle | ExportedModel, cache: Cache) -> AlignOutcome | None:
    """The alignment entry the bundle was trained from, if it is still in the cache."""
    key = bundle.config["training"]["align_key"]
    entry = cache.get("align", key)
    return None if entry is None else AlignOutcome(key, entry.path, entry.read_json("summary.json"), True)


def machine_line(machine: dict) -> str:
    """One line for a recorded training machine: the CPU, the instruction set of torch's kernels and any
    switch that narrowed it, and the numeric libraries' versions (what a model's last bits depend on)."""
    switches = ", ".join(f"{k}={v}" for k, v in machine.get("instruction_set_switches", {}).items())
    libraries = ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items() if v)
    return (
        f"{machine.get('cpu')}, {machine.get('cores')} cores, torch kernels {machine.get('torch_cpu_capability')}"
        + (f" ({switches})" if switches else "")
        + f"; Python {machine.get('python')}, {libraries}"
    )


def provenance_lines(bundle: Bundle | ExportedModel) -> tuple[dict[str, str], list[str]]:
    cfg = bundle.config
    prov = dict(cfg["provenance"])
    img, vlm_enc, _ = cfg["encoders"]
    prov["image encoder"] = f"{img.get('encoder')} ({img.get('weights', '?')})"
    prov["text encoders"] = f"{vlm_enc.get('encoder')} ({vlm_enc.get('weights', '?')}), one per text branch"
    pfa = cfg["profile"]["pfa"]
    strides = "/".join(f"{s:g}" for s in pfa["strides"])
    prov["alignment"] = {
        "progressive": f"PFA, progressive, fractions {strides}",
        "direct": "direct alignment on all training data",
        "none": "no alignment (random projections)",
    }[pfa["mode"]]
    branches = cfg.get("branches") or ["image", "vlm", "llm"]
    prov["branches"] = ", ".join(branches) + (
        ""
        if "stats" not in branches
        else " (stats: the OCR'd numbers, standardized on the training cards, missing fields masked)"
    )
    attention = cfg.get("attention") or "chunks"
    prov["fusion"] = (
        f"{cfg['variant']} ({cfg['task']})"
        if cfg["variant"] == "concat"
        else f"{cfg['variant']}, attention across {'modality tokens' if attention == 'tokens' else 'chunks'} "
        f"({cfg['task']})"
    )
    if heads_training(cfg) == "end-to-end":
        e2e = cfg["projections"]
        prov["projection heads"] = (
            f"trained end to end with the fusion (lr {e2e['heads_lr']:g}), adapters on "
            f"{', '.join(e2e['adapters']) or 'no branch'} ({e2e['adapter_dim']} wide)"
        )
    else:
        prov["projection heads"] = "frozen (as the alignment left them)"
    trained_image = img.get("finetuned") and not cfg["profile"]["encoders"]["finetune"]
    prov["profile"] = cfg["profile"]["name"] + (
        " (encoders fine-tuned)"
        if cfg["profile"]["encoders"]["finetune"]
        else " (image encoder trained on the training cards, frozen text encoders)"
        if trained_image
        else " (frozen encoders, cached features)"
    )
    machine = cfg["training"].get("machine")
    if machine:  # a model from before it was recorded has none
        prov["trained on"] = machine_line(machine)
        aligned = cfg["training"].get("align_machine")
        if aligned and aligned != machine:
            prov["aligned on"] = machine_line(aligned)
        image = cfg["training"].get("image_encoder_machine")
        if image and image != (aligned or machine):
            prov["image encoder trained on"] = machine_line(image)
    if cfg["training"].get("augmented"):
        prov["training data"] = f"TDA-augmented: {cfg['training']['augmented']}"
    warnings = []
    if img.get("random_init"):
        warnings.append("the image encoder was randomly initialised (no pretrained weights)")
    if "built-in" in prov.get("descriptions", ""):
        warnings.append("descriptions came from the built-in describer, not a vision-language model")
    return prov, warnings


def cached_tsne(cache: Cache, x: Any, seed: int) -> Any:
    """t-SNE coordinates, cached by the embedding bytes and seed (the slowest part of a report)."""
    import numpy as np
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    from asectl.cache import make_key, sha256_bytes
    from asectl.report import tsne_2d, tsne_perplexity

    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    key = make_key(
        "tsne", data=sha256_bytes(arr.tobytes()), shape=list(arr.shape), seed=seed, perplexity=tsne_perplexity(len(arr))
    )
    entry = cache.get("tsne", key)
    if entry is not None:
        return st_load(entry.read_bytes("xy.safetensors"))["xy"]
    xy = np.ascontiguousarray(tsne_2d(arr, seed))
    cache.put("tsne", key, {"xy.safetensors": st_save({"xy": xy})}, {"params": {"seed": seed}})
    return xy


REPORTS_FOLDER = "asectl-report"


def default_report_dir(dataset_folder: str | Path) -> Path:
    """Where a report goes without --out: ./asectl-report/<dataset name>, outside the dataset (a report
    inside it would be read as a class of cards by the next run on a folder without labels.csv)."""
    folder = Path(dataset_folder).expanduser().resolve()
    out = Path(REPORTS_FOLDER) / folder.name
    if folder == out.resolve() or folder in out.resolve().parents:
        raise ConfigError(
            f"{out}: the default report folder would lie inside the dataset {folder}; run from "
            "another folder or pass --out DIR outside the dataset"
        )
    return out


def run_report(
    dataset: Dataset,
    bundle: Bundle | ExportedModel,
    out_dir: str | Path,
    cache: Cache | None = None,
    model_id: str | None = None,
) -> ReportSummary:
    """Evaluate ``bundle`` on the test split it was trained with (asectl.stages.split); a folder of other
    cards is evaluated on its own test split. An export (asectl.export) is evaluated the same way from its
    graphs: it carries the bundle's settings (split, calibration, decision rule, training history), so every
    part of the report is made; the provenance says it is an export and which OCR engine it read with."""
    cache = cache or Cache()
    dataset, held = model_split(dataset, bundle)
    test = dataset.split("test")
    if not test:
        raise DataError(f"{dataset.root}: no test split to evaluate; mark rows with split=test")
    classes = bundle.labels
    binary = bundle.config["task"] == "binary"
    test_ds = Dataset(test, dataset.root, dataset.source, dataset.labels)
    predictor = Predictor(bundle, cache)
    preds = predictor.classify(test_ds)
    errors = preds.dropped
    if not preds.samples:
        raise DataError(
            f"{dataset.root}: no test card could be classified (first error: {errors[0]['error'] if errors else '?'})"
        )
    truth = {s.name: (binary_label(s.label) if binary else s.label) for s in test}
    unknown = sorted({truth[s.name] for s in preds.samples} - set(classes))
    if unknown:
        raise ConfigError(
            f"test labels {unknown} are not among the model's classes {classes}; "
            "was the model trained on another dataset?"
        )
    probs = predictor.probabilities(preds.logits)  # calibrated: what predict reports
    y_true = [classes.index(truth[s.name]) for s in preds.samples]
    y_pred = probs.argmax(axis=1).tolist()

    align = bundle_alignment(bundle, cache)
    embeddings: dict[str, Any] = {}
    emb_labels: list[int] = []
    emb_split: list[str] | None = None
    curves: list = []
    if align is not None:
        pfa = align.summary["pfa"]
        raw = align.raw_features()
        view = next(m for m in ("image", "vlm", "llm", "stats") if m in raw)  # the image, unless it is off
        embeddings["unaligned"] = raw[view]
        for k, st in enumerate(pfa["stages"], start=1):
            embeddings[pfa_stage_name(st["stage"], st["fraction"], pfa["mode"])] = align.embeddings(k)[view]
        names = [binary_label(lab) if binary else lab for lab in align.labels]
        emb_labels = [classes.index(n) if n in classes else 0 for n in names]
        emb_split = align.splits
        curves = stage_curves_from_pfa(pfa)
    prov, warnings = provenance_lines(bundle)
    if isinstance(bundle, ExportedModel):
        prov.update(bundle.provenance())
    recut = bundle.config.get("recalibration")
    prov["test split"] = (
        f"the model's own: {split_summary(bundle.config['split'])}"
        if held == TRAINING
        else f"the line's cards the thresholds were not set on: {split_summary(recut['split'])}"
        if held == THRESHOLDS
        else f"cards the model never saw: this folder's test split ({dataset.split_text()})"
    )
    if recut:
        prov["decision thresholds"] = (
            f"re-set on {recut['n_cards']} labelled cards of {recut['dataset']} (asectl calibrate); the fold "
            "models and temperature are those trained on " + str(bundle.config["training"].get("dataset"))
        )
    if align is None:
        warnings.append("alignment entry not in this cache: t-SNE and PFA curves omitted (rerun `asectl align`)")
    cal = bundle.config["calibration"]
    if cal.get("held_out_errors") == 0:
        warnings.append(
            f"no held-out training card was misclassified, so temperature scaling could only sharpen "
            f"the probabilities (T = {cal['temperature']:.3f}); their calibration is untested against "
            "a single error"
        )
    if errors:
        warnings.append(
            f"{len(errors)} test card(s) could not be classified and are left out (first: {errors[0]['error']})"
        )
    rule, held = bundle.operating_point()  # the predictor's rule, with its held-out figures
    explained = rule.explain(probs)
    data = ReportInput(
        label_names=classes,
        y_true=y_true,
        y_pred=y_pred,
        image_names=[s.name for s in preds.samples],
        probs=probs,
        probs_uncalibrated=predictor.uncalibrated(preds.logits),
        calibration=bundle.config["calibration"],
        decision_rule={
            **bundle.config["decision"],
            **rule.to_dict(),
            "held_out": held,
            **({"held_out_name": "line's labelled cards"} if recut else {}),
        },
        decisions=[decision for decision, _ in explained],
        reasons=[reason for _, reason in explained],
        thumbnails=CardImages(tuple(str(s.path) for s in preds.samples)),
        embeddings=embeddings,
        embedding_labels=emb_labels,
        embedding_split=emb_split,
        pfa_curves=curves,
        fusion_curve=bundle.config.get("fusion_history", []),
        provenance=prov,
        model_id=model_id,
        dataset_fingerprint=bundle.config["training"].get("data_fingerprint"),
        seeds={"training": bundle.config["seed"]},
        warnings=warnings,
        dataset=str(dataset.root),
        tsne_seed=bundle.config["seed"],
        tsne=lambda x, seed: cached_tsne(cache, x, seed),
    )
    summary = write_report(cached_report_files(cache, data), Path(out_dir))
    if isinstance(bundle, Bundle):  # `models list` lists the bundles in this cache, with their last report
        from asectl.stages.models import record_report

        record_report(cache, bundle, str(dataset.root), summary.metrics, summary.html.parent)
    return summary


def cached_report_files(cache: Cache, data: ReportInput) -> dict[str, bytes]:
    """The rendered report files, cached by everything they depend on: the input, the code and template
    that draw them and the libraries that compute the metrics and encode the figures. A rerun only copies
    them (no scikit-learn, no matplotlib)."""
    from importlib import resources
    from importlib.metadata import version

    from asectl import report as report_code
    from asectl.cache import make_key, sha256_bytes

    # Every module of the report package (sorted, so the key is stable), then the template.
    code = (
        b"".join(p.read_bytes() for p in sorted(Path(report_code.__file__).parent.glob("*.py")))
        + resources.files("asectl").joinpath("report_template.html").read_bytes()
    )
    key = make_key(
        "report",
        input=report_key_parts(data),
        code=sha256_bytes(code),
        libraries={lib: version(lib) for lib in ("matplotlib", "pillow", "scikit-learn", "jinja2")},
    )
    entry = cache.get("report", key)
    if entry is not None:
        return {k: entry.read_bytes(name) for k, name in FILES.items() if name in entry.meta["files"]}
    files = render_report(data)
    cache.put("report", key, {FILES[k]: v for k, v in files.items()})
    return files
