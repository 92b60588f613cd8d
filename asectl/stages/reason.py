"""``asectl reason``: an LLM reasons over a card's OCR'd record, Eq. (1) of the paper:

    LLM's answer = LLM(prompt_LLM, g(OCR(image)))

``g`` is the data preparation: the parsed record as a sentence, plus prior knowledge from the training
split (per-class typical statistics) and the record's deviation from it. The answer is a JSON object
decoded within a JSON schema (verdict, deviation kind, axis, severity, closest class, rationale);
its text form is what the text encoder reads downstream. Prompts are versioned files in
``asectl/prompts``; results are cached per image under everything they depend on.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from asectl.cache import Cache, canonical_json, make_key, sha256_bytes
from asectl.dataset import NORMAL, Dataset, Sample, order_labels
from asectl.errors import ConfigError, DataError
from asectl.stages.common import StageResult, run_per_image

log = logging.getLogger("asectl")

STAGE = "reason"
# Answers by prompt: the answer is a function of the messages, model, schema, decoder and sampling (its
# seed is set per answer), and cards whose summaries read alike share one prompt, so they share one answer.
ANSWER_STAGE = "reason-answer"
RECORD_FORMAT = 1                       # bump when the record layout changes (part of the cache identity)
DECODER = "asectl-json/1"               # how answers are decoded (asectl.backends.json_decode): in the identity
PRIORS_FORMAT = "asectl-priors/1"
PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
DEFAULT_PROMPT = "reason-v2"
DEFAULT_MAX_TOKENS = 400
SCALAR_FIELDS = ("N", "mu_x", "mu_y", "sd_x", "sd_y")
SHARE_FEATURES = ("near", "far")            # share of holes near the centre / far out (from the radius counts)
PRIOR_FEATURES = SCALAR_FIELDS + SHARE_FEATURES
SHOWN_FEATURES = PRIOR_FEATURES[1:]         # N is not a shape feature: kept in priors, not compared
FIELD_WORDS = {"N": "N", "mu_x": "mean x", "mu_y": "mean y", "sd_x": "sd x", "sd_y": "sd y",
               "near": "near", "far": "far"}

VERDICTS = ("normal", "defective")
DEVIATION_KINDS = ("none", "shift", "spread", "tilt", "cluster", "ring", "other")
AXES = ("x", "y", "both", "none")
SEVERITIES = ("low", "medium", "high")
RATIONALE_MAX_CHARS = 48      # a few words: every character of free text costs the small model a decode call
ANSWER_KEYS = ("verdict", "deviation_kind", "axis", "severity", "closest_class", "rationale")
PLACEHOLDERS = ("card", "record", "deviation", "priors", "n_train", "labels")
CARD_PLACEHOLDERS = ("card", "record", "deviation")   # differ per card: kept at the end of the prompt


# --- sampling ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """Generation parameters, passed on every call and recorded. Defaults are deterministic (greedy)."""

    temperature: float = 0.0
    seed: int = 0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature {self.temperature}: must be 0 (greedy, deterministic) or more")
        if self.max_tokens < 32:
            raise ConfigError(f"--max-tokens {self.max_tokens}: too few for a JSON answer; use at least 32 "
                              f"(default {DEFAULT_MAX_TOKENS})")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: must be 0 (off) or more")
        if not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1:
            raise ConfigError(f"top_p {self.top_p} / min_p {self.min_p}: top_p must be in (0, 1], min_p in [0, 1)")
        if self.repeat_penalty <= 0:
            raise ConfigError(f"repeat_penalty {self.repeat_penalty}: must be positive (1.0 = off)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- prompt templates --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplate:
    name: str            # e.g. "reason-v1": recorded as prompt_version
    ref: str             # what to pass back to load_prompt to get it again (name or file path)
    sha256: str          # hash of the file bytes: part of the cache identity
    system: string.Template
    user: string.Template

    def messages(self, **values: Any) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system.substitute(values).strip()},
                {"role": "user", "content": self.user.substitute(values).strip()}]

    def shared_prefix(self, **values: Any) -> list[dict[str, str]]:
        """The messages cut where the first card-specific value ($card, $record, $deviation) begins: the part
        every card's prompt shares, which the LLM evaluates once."""
        mark = "\ue000"
        msgs = self.messages(**{**values, **{k: mark for k in CARD_PLACEHOLDERS}})
        out = []
        for m in msgs:
            if mark in m["content"]:
                out.append({**m, "content": m["content"].split(mark, 1)[0]})
                break
            out.append(m)
        return out


def prompt_names() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("reason-*.txt"))


def load_prompt(name: str | Path = DEFAULT_PROMPT) -> PromptTemplate:
    """A built-in template by name (``reason-v1``) or a template file of the same format by path."""
    text_name = str(name)
    path = Path(text_name).expanduser()
    if path.suffix == ".txt" and path.is_file():
        ref = str(path.resolve())
    elif re.fullmatch(r"[\w.-]+", text_name) and (PROMPTS_DIR / f"{text_name}.txt").is_file():
        path, ref = PROMPTS_DIR / f"{text_name}.txt", text_name
    else:
        raise ConfigError(f"--prompt {text_name}: no such prompt; use one of {', '.join(prompt_names())} "
                          "or the path of a .txt template (see docs/reason.md)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: prompt template is not UTF-8 text") from None
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("##"):
            continue
        tag = line.strip().lower()
        if tag in ("[system]", "[user]"):
            current = tag[1:-1]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    if set(sections) != {"system", "user"}:
        raise ConfigError(f"{path}: a prompt template needs a [system] and a [user] section (see docs/reason.md)")
    system, user = (string.Template("\n".join(sections[k])) for k in ("system", "user"))
    for part, tpl in (("system", system), ("user", user)):
        try:
            tpl.substitute({k: "" for k in PLACEHOLDERS})
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{path}: [{part}] uses an unknown or malformed placeholder ({exc}); "
                              f"allowed: {', '.join('$' + k for k in PLACEHOLDERS)}") from None
    return PromptTemplate(path.stem, ref, sha256_bytes(raw), system, user)


# --- answer schema -----------------------------------------------------------------------------------
def answer_schema(labels: Sequence[str]) -> dict[str, Any]:
    """The JSON schema answers are decoded within (asectl.backends.json_decode). Property order is the order the model writes them in:
    the categorical judgement first, the rationale last (it then explains the choices made)."""
    enum = lambda values: {"type": "string", "enum": list(values)}  # noqa: E731
    props = {"verdict": enum(VERDICTS), "deviation_kind": enum(DEVIATION_KINDS), "axis": enum(AXES),
             "severity": enum(SEVERITIES), "closest_class": enum(labels),
             "rationale": {"type": "string", "minLength": 1, "maxLength": RATIONALE_MAX_CHARS}}
    return {"type": "object", "properties": props, "required": list(ANSWER_KEYS), "additionalProperties": False}


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def parse_answer(raw: str, labels: Sequence[str], finish_reason: str | None = None,
                 max_tokens: int | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """(answer, warnings). Never raises: an unusable answer is None plus a warning (raw text is kept)."""
    warnings = []
    if finish_reason == "length":
        warnings.append(f"answer cut off at --max-tokens {max_tokens}; raise --max-tokens")
    try:
        # strict=False: tolerate control characters in strings (the decoder never writes them, a hand edit may).
        obj = json.loads(raw, strict=False)
    except ValueError as exc:
        return None, warnings + [f"LLM output is not valid JSON ({exc}); raw text kept in 'raw'"]
    if not isinstance(obj, dict):
        return None, warnings + ["LLM output is JSON but not an object; raw text kept in 'raw'"]
    allowed = {"verdict": VERDICTS, "deviation_kind": DEVIATION_KINDS, "axis": AXES, "severity": SEVERITIES,
               "closest_class": tuple(labels)}
    bad = [k for k, values in allowed.items() if obj.get(k) not in values]
    rationale = obj.get("rationale")
    if not isinstance(rationale, str):
        bad.append("rationale")
    if bad:
        return None, warnings + [f"LLM answer lacks valid {', '.join(bad)}; raw text kept in 'raw'"]
    answer = {k: obj[k] for k in ANSWER_KEYS}
    answer["rationale"] = " ".join(_CONTROL.sub(" ", rationale).split())
    return answer, warnings


def answer_text(answer: dict[str, Any] | None, record_sentence: str) -> str:
    """The free text used downstream: the judgement and rationale, then the record as a sentence."""
    if answer is None:
        return f"Record: {record_sentence}"
    kind = answer["deviation_kind"]
    pattern = "no deviation" if kind == "none" else f"{kind} deviation" + (
        "" if answer["axis"] == "none" else f" along {'both axes' if answer['axis'] == 'both' else answer['axis']}")
    rationale = answer["rationale"].rstrip(".")
    return (f"Verdict: {answer['verdict']}, {pattern}, {answer['severity']} severity, closest to "
            f"{answer['closest_class']}. {rationale}. Record: {record_sentence}")


# --- g(.): the record as text ------------------------------------------------------------------------
def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _fmt(value: Any, field: str) -> str:
    if field == "N":
        return str(round(value))
    if field in SHARE_FEATURES:
        return f"{value:.0%}"
    return f"{float(value):.2f}"


def _usable(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bins(fields: Mapping[str, Any], edges: Sequence[float]) -> list[int] | None:
    bins = fields.get("bins")
    if isinstance(bins, list) and len(bins) == len(edges) - 1 and all(_usable(b) for b in bins):
        return [int(b) for b in bins]
    return None


def record_sentence(fields: Mapping[str, Any], bin_edges: Sequence[float]) -> str:
    """g(OCR(image)): the parsed record written out; fields OCR could not read say so."""
    def val(f: str) -> str:
        return _fmt(fields[f], f) if _usable(fields.get(f)) else "not read"

    # Compact on purpose: a small model's tokenizer spends one token per digit, and the card-specific
    # part of the prompt is evaluated for every card.
    parts = [f"N {val('N')} holes", f"mean x {val('mu_x')}, y {val('mu_y')}", f"sd x {val('sd_x')}, y {val('sd_y')}"]
    bins = _bins(fields, bin_edges)
    if bins is not None:
        intervals = " ".join(f"{_num(lo)}-{_num(hi)}:{c}" for lo, hi, c in zip(bin_edges, bin_edges[1:], bins))
        parts.append(f"holes by radius {intervals}")
    elif bin_edges:
        parts.append("holes by radius not read")
    return "; ".join(parts) + "."


def _near_far(edges: Sequence[float]) -> tuple[int, int] | None:
    """Radius intervals summarised as "near the centre" (the first two) and "far out" (the last three),
    when the spec has five or more: the full radius profile is too long for a small model's prompt."""
    return (2, len(edges) - 4) if len(edges) - 1 >= 5 else None


def card_features(fields: Mapping[str, Any], edges: Sequence[float]) -> dict[str, float]:
    """The numbers priors and comparisons use: the readable scalar fields, plus the share of holes near
    the centre and far out (from the radius counts)."""
    out = {f: float(fields[f]) for f in SCALAR_FIELDS if _usable(fields.get(f))}
    bins, nf = _bins(fields, edges), _near_far(edges)
    if bins is not None and nf is not None and sum(bins) > 0:
        total = float(sum(bins))
        out["near"] = sum(bins[:nf[0]]) / total
        out["far"] = sum(bins[nf[1]:]) / total
    return out


# --- priors ------------------------------------------------------------------------------------------
def _r(x: float) -> float:
    return round(float(x), 4)


def build_priors(records: Sequence[Mapping[str, Any]], labels: Sequence[str],
                 bin_edges: Sequence[float] | None = None, normal_label: str | None = NORMAL) -> dict[str, Any]:
    """Per-class typical statistics of training records (OCR'd fields), as a plain JSON-able dict.

    For each label: number of cards, mean and standard deviation of every field (and of the near-centre
    and far-out shares of holes), and the mean share of holes per radius interval. ``pooled_sd`` is the
    within-class spread over all classes, the scale for a class with a single card. A trained model
    bundle stores this dict so that ``reason`` on new images (outside any dataset) uses the same prior
    knowledge."""
    if len(records) != len(labels):
        raise ConfigError(f"build_priors: {len(records)} records but {len(labels)} labels")
    if bin_edges is None:
        from asectl.card import default_spec

        bin_edges = default_spec().bin_edges
    edges = [float(e) for e in bin_edges]
    feats = [card_features(r or {}, edges) for r in records]
    classes: dict[str, Any] = {}
    for label in order_labels(labels):
        idx = [i for i, lab in enumerate(labels) if lab == label and feats[i]]
        if not idx:
            continue
        mean, sd, n_values = {}, {}, {}
        for f in PRIOR_FEATURES:
            vals = np.array([feats[i][f] for i in idx if f in feats[i]], dtype=np.float64)
            if len(vals):
                mean[f] = _r(vals.mean())
                sd[f] = _r(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                n_values[f] = int(len(vals))
        shares = [np.array(b, dtype=np.float64) / sum(b)
                  for b in (_bins(records[i], edges) for i in idx) if b and sum(b) > 0]
        classes[label] = {"cards": len(idx), "mean": mean, "sd": sd, "values": n_values,
                          "bin_share": [_r(x) for x in np.mean(shares, axis=0)] if shares else None}
    if not classes:
        raise ConfigError("build_priors: no usable training record; the priors need OCR'd training cards")
    pooled = {}
    for f in PRIOR_FEATURES:
        groups = [c for c in classes.values() if c["values"].get(f, 0) > 1]
        dof = sum(c["values"][f] - 1 for c in groups)
        if dof:
            pooled[f] = _r(math.sqrt(sum((c["values"][f] - 1) * c["sd"][f] ** 2 for c in groups) / dof))
        else:  # one card per class: the spread between cards is the only scale there is
            vals = [feat[f] for feat in feats if f in feat]
            if len(vals) > 1:
                pooled[f] = _r(np.std(vals, ddof=1))
    return {"format": PRIORS_FORMAT, "normal_label": normal_label if normal_label in classes else None,
            "features": list(PRIOR_FEATURES), "bin_edges": edges, "classes": classes, "pooled_sd": pooled,
            "cards": sum(c["cards"] for c in classes.values())}


def check_priors(priors: Any, where: str = "priors") -> dict[str, Any]:
    """Validate a priors dict (e.g. read back from a bundle or a --priors file)."""
    if not isinstance(priors, dict) or priors.get("format") != PRIORS_FORMAT:
        raise ConfigError(f"{where}: not asectl priors (expected format '{PRIORS_FORMAT}'); write them with "
                          "`asectl reason DATASET --priors-out FILE.json` or build_priors()")
    rebuild = "rebuild them from a labelled training split (--priors-out)"
    classes = priors.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise ConfigError(f"{where}: priors have no 'classes'; {rebuild}")
    edges = priors.get("bin_edges")
    if not isinstance(edges, list) or not all(_usable(e) for e in edges):
        raise ConfigError(f"{where}: priors lack numeric 'bin_edges'; {rebuild}")
    pooled = priors.get("pooled_sd", {})
    if not isinstance(pooled, dict) or not all(k in PRIOR_FEATURES and _usable(v) for k, v in pooled.items()):
        raise ConfigError(f"{where}: priors have a malformed 'pooled_sd'; {rebuild}")
    for label, c in classes.items():
        ok = (isinstance(label, str) and label and isinstance(c, dict) and isinstance(c.get("cards"), int)
              and all(isinstance(c.get(k), dict) and set(c[k]) <= set(PRIOR_FEATURES)
                      and all(_usable(v) for v in c[k].values()) for k in ("mean", "sd", "values"))
              and set(c["sd"]) == set(c["mean"])
              and (c.get("bin_share") is None or (isinstance(c["bin_share"], list)
                                                  and len(c["bin_share"]) == len(edges) - 1
                                                  and all(_usable(v) for v in c["bin_share"]))))
        if not ok:
            raise ConfigError(f"{where}: priors of class '{label}' are malformed (need cards, and mean, sd and "
                              f"values per feature); {rebuild}")
    return priors


def priors_sha256(priors: Mapping[str, Any]) -> str:
    return sha256_bytes(canonical_json(priors).encode())


def _scale(priors: Mapping[str, Any], c: Mapping[str, Any], f: str) -> float:
    """The spread a deviation is measured in: the class's own sd when it has two or more values, else the
    pooled sd; never zero."""
    own = c["sd"].get(f, 0.0) if c["values"].get(f, 0) > 1 else 0.0
    floor = 0.01 if f in SHARE_FEATURES else 0.05
    return max(own or priors.get("pooled_sd", {}).get(f, 0.0), floor)


def _z(value: float, priors: Mapping[str, Any], c: Mapping[str, Any], f: str) -> float:
    return (value - c["mean"][f]) / _scale(priors, c, f)


def priors_text(priors: Mapping[str, Any]) -> str:
    """One line per class: typical value ± spread of each shown feature. N is kept in the priors dict but
    not shown: it says nothing about where the holes are."""
    nf = _near_far(priors["bin_edges"])
    edges = priors["bin_edges"]
    lines = []
    if nf is not None:
        lines.append(f"(near = share of holes at radius < {_num(edges[nf[0]])}, "
                     f"far = share at radius >= {_num(edges[nf[1]])})")
    for label, c in priors["classes"].items():
        stats = ", ".join(f"{FIELD_WORDS[f]} {_fmt(c['mean'][f], f)}±{_fmt(_scale(priors, c, f), f)}"
                          for f in SHOWN_FEATURES if f in c["mean"])
        tag = " = normal cards" if label == priors.get("normal_label") and label != "normal" else ""
        lines.append(f"- {label}{tag} ({c['cards']} card{'s' * (c['cards'] != 1)}): {stats}")
    return "\n".join(lines)


def class_distances(features: Mapping[str, float], priors: Mapping[str, Any]) -> dict[str, float]:
    """Root mean square z-score of a card's features against each class's typical statistics."""
    out = {}
    for label, c in priors["classes"].items():
        zs = [_z(v, priors, c, f) for f, v in features.items() if f in SHOWN_FEATURES and f in c["mean"]]
        if zs:
            out[label] = round(float(np.sqrt(np.mean(np.square(zs)))), 2)
    return out


def deviation_text(fields: Mapping[str, Any], priors: Mapping[str, Any]) -> str:
    """The record against the priors (part of the data preparation g): each feature against normal
    cards in units of their spread, and the distance to every class's typical statistics."""
    feats = card_features(fields, priors["bin_edges"])
    parts = []
    normal = priors["classes"].get(priors.get("normal_label") or "")
    if normal:
        for f in SHOWN_FEATURES:
            if f not in feats or f not in normal["mean"]:
                continue
            z = _z(feats[f], priors, normal, f)
            # The normal range itself is in the priors above; repeating it per card only costs tokens.
            how = "" if abs(z) <= 1.5 else f" {'far ' if abs(z) > 3 else ''}{'above' if z > 0 else 'below'}"
            parts.append(f"{FIELD_WORDS[f]} {z:+.1f} sd{how}")
    lines = [f"vs normal: {', '.join(parts)}"] if parts else []
    dist = class_distances(feats, priors)
    if dist:
        ranked = sorted(dist.items(), key=lambda kv: (kv[1], kv[0]))
        lines.append("distance to each class (smaller is closer): " + ", ".join(f"{lab} {d:.1f}" for lab, d in ranked))
    return "\n".join(lines) if lines else "no comparison possible (no field was read)"


def _level(z: float) -> str:
    """A z-score as the word a small model reads in one token or two (thresholds as in deviation_text)."""
    if abs(z) <= 1.5:
        return "typical"
    return ("very " if abs(z) > 3 else "") + ("high" if z > 0 else "low")


def card_summary(fields: Mapping[str, Any], priors: Mapping[str, Any], nearest: int = 3) -> str:
    """g(OCR(image)) in words ($card): each shown feature as a level against normal training cards, and
    the ``nearest`` class profiles by distance. Compact on purpose: it is evaluated for every card."""
    feats = card_features(fields, priors["bin_edges"])
    normal = priors["classes"].get(priors.get("normal_label") or "")
    parts = []
    for f in SHOWN_FEATURES:
        if normal and f in feats and f in normal["mean"]:
            parts.append(f"{FIELD_WORDS[f]} {_level(_z(feats[f], priors, normal, f))}")
        elif f not in feats:
            parts.append(f"{FIELD_WORDS[f]} not read")
    lines = [", ".join(parts) + "."] if parts else []
    ranked = sorted(class_distances(feats, priors).items(), key=lambda kv: (kv[1], kv[0]))[:nearest]
    if ranked:
        lines.append("Nearest class profiles: " + ", then ".join(lab for lab, _ in ranked) + ".")
    return "\n".join(lines) if lines else "No statistic was read."


def _check_train_split(dataset: Dataset) -> list[Sample]:
    train = dataset.split("train")
    if not train or any(s.label is None for s in train):
        raise ConfigError("reason needs prior knowledge from a labelled training split: pass a dataset folder "
                          "(labels.csv with split=train rows), or priors from an earlier run "
                          "(--priors FILE.json written with --priors-out, or a trained model bundle)")
    return train


def priors_from_dataset(dataset: Dataset, stats: Mapping[str, Mapping[str, Any]],
                        bin_edges: Sequence[float]) -> dict[str, Any]:
    """Priors from the training split of a labelled dataset (never the test split)."""
    train = _check_train_split(dataset)
    recs, labels, skipped = [], [], []
    for s in train:
        rec = stats.get(s.name) or {}
        if not rec.get("fields"):  # partly read records count: build_priors skips missing fields
            skipped.append(s.name)
            continue
        recs.append(rec["fields"])
        labels.append(s.label)
    if skipped:
        log.warning("priors: %d training card(s) without a record were left out (first: %s)",
                    len(skipped), skipped[0])
    if not recs:
        raise DataError("no training card has a readable record; check the cards with `asectl ocr`")
    return build_priors(recs, labels, bin_edges, NORMAL)


# --- the stage ---------------------------------------------------------------------------------------
def _stats_from_ocr(dataset: Dataset, engine: str, card_spec: Any, cache: Cache, strict: bool,
                    detector: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    from asectl.stages.ocr import run_ocr

    result = run_ocr(dataset, engine=engine, spec=card_spec, cache=cache, strict=strict, detector=detector)
    return result.by_image(), {"source": "ocr", "ocr": result.params}


def run_reason(
    dataset: Dataset,
    llm_model: str | Path | None = None,
    *,
    chat_format: str = "auto",
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    n_ctx: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int = 40,
    top_p: float = 0.95,
    min_p: float = 0.05,
    repeat_penalty: float = 1.0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt: str | Path = DEFAULT_PROMPT,
    priors: Mapping[str, Any] | None = None,
    fields: Mapping[str, Mapping[str, Any]] | None = None,
    engine: str = "cnocr",
    detector: str = "auto",
    spec: str | Path | None = None,
    cache: Cache | None = None,
    force: bool = False,
    strict: bool = False,
    expect_model_hash: str | None = None,
    expect_prompt_sha256: str | None = None,
    workers: int | None = None,
) -> StageResult:
    """Reason over every card's record with a GGUF LLM (default: SmolLM2-135M-Instruct).

    Stats come from the OCR stage (``engine``, ``spec``), or from ``fields`` (image name -> record
    fields, e.g. a generated dataset's printed truth) when given. ``priors`` default to the dataset's
    training split; pass stored priors for images outside a dataset. ``expect_*`` make a replay (predict
    from a model bundle) refuse a model file or prompt that differs from the one it was trained with."""
    from asectl.backends.json_decode import object_fields
    from asectl.backends.llm import DEFAULT_N_CTX, LlamaCppLLM, LLMPool, default_workers
    from asectl.card import load_spec

    cache = cache or Cache()
    sampling = Sampling(temperature, seed, top_k, top_p, min_p, repeat_penalty, max_tokens)
    template = load_prompt(prompt)
    if expect_prompt_sha256 and template.sha256 != expect_prompt_sha256:
        raise ConfigError(f"prompt {template.ref} changed since the model was trained (sha256 {template.sha256[:12]} "
                          f"!= {expect_prompt_sha256[:12]}); retrain, or restore that prompt file")
    # Validate the model before anything is computed or cached.
    llm = LlamaCppLLM(llm_model, chat_format=chat_format, n_ctx=n_ctx or DEFAULT_N_CTX, n_threads=n_threads,
                      n_gpu_layers=n_gpu_layers, seed=seed)
    if expect_model_hash and llm.hash != expect_model_hash:
        raise ConfigError(f"{llm.path}: this is not the LLM the model was trained with (sha256 {llm.hash[:12]} != "
                          f"{expect_model_hash[:12]}); pass --llm-model with the original GGUF")
    if priors is None:
        _check_train_split(dataset)  # before OCR: fail in a second, not after reading every card
    card_spec = load_spec(spec)
    edges = list(card_spec.bin_edges)
    if fields is not None:
        stats = {s.name: {"image": s.name, "fields": dict(fields[s.name])} for s in dataset.samples
                 if s.name in fields}
        given = {s.name: fields.get(s.name) for s in dataset.samples}
        stats_identity = {"source": "given", "sha256": sha256_bytes(canonical_json(given).encode())}
    else:
        stats, stats_identity = _stats_from_ocr(dataset, engine, card_spec, cache, strict, detector)
    if priors is None:
        priors = priors_from_dataset(dataset, stats, edges)
    else:
        priors = check_priors(dict(priors))
        if [float(e) for e in priors["bin_edges"]] != [float(e) for e in edges]:
            raise ConfigError(f"the priors' radius intervals {priors['bin_edges']} differ from the card spec's "
                              f"{edges}; use priors built with the same --spec")
    labels = list(priors["classes"])
    schema = answer_schema(labels)
    fields_spec = object_fields(schema)
    p_hash = priors_sha256(priors)
    identity = {"record_format": RECORD_FORMAT, "backend": llm.identity(),
                "prompt": {"name": template.name, "sha256": template.sha256}, "priors": p_hash,
                "schema": sha256_bytes(canonical_json(schema).encode()), "decoder": DECODER,
                "sampling": sampling.as_dict(),
                "stats": stats_identity}
    p_text = priors_text(priors)
    n_train = priors.get("cards", 0)
    model_rec = {"id": llm.model_id, "hash": llm.hash, "chat_format": llm.chat_format}
    tally = {"completion": 0, "seconds": 0.0, "answers": 0}

    def prepare(sample: Sample) -> tuple[list[dict[str, str]], list[dict[str, str]], str, dict[str, Any]]:
        rec = stats.get(sample.name)
        if rec is None:
            raise DataError(f"{sample.path}: no record given for this card")
        if strict and rec.get("error"):
            raise DataError(rec["error"])
        f = rec.get("fields") or {}
        if not any(_usable(f.get(k)) for k in SCALAR_FIELDS) and _bins(f, edges) is None:
            # A partly read record (OCR reports an error but has fields) is still reasoned about.
            raise DataError(f"{rec['error']} (reason needs the card's record)" if rec.get("error") else
                            f"{sample.path}: OCR read no field of the record; check the card with `asectl ocr`")
        sentence = record_sentence(f, edges)
        values = {"priors": p_text, "n_train": n_train, "labels": ", ".join(labels)}
        messages = template.messages(card=card_summary(f, priors), record=sentence,
                                     deviation=deviation_text(f, priors), **values)
        return messages, template.shared_prefix(**values), sentence, rec

    answer_identity = {k: identity[k] for k in ("backend", "schema", "decoder", "sampling")}
    answers: dict[str, dict[str, Any]] = {}   # backend outputs by prompt key
    used: set[str] = set()                    # keys a card has already taken (or an earlier run computed)

    def answer_key(prep: tuple) -> str:
        return make_key(ANSWER_STAGE, messages=prep[0], prefix=prep[1], **answer_identity)

    def known_answer(key: str) -> dict[str, Any] | None:
        if key not in answers and not force:
            hit = cache.get_json(ANSWER_STAGE, key)
            if hit is not None:
                answers[key] = hit
                used.add(key)
        return answers.get(key)

    def remember(key: str, out: dict[str, Any]) -> None:
        cache.put_json(ANSWER_STAGE, key, out, {"params": answer_identity})
        answers[key] = out
        tally["answers"] += 1

    def finish(prep: tuple, key: str) -> dict[str, Any]:
        _, _, sentence, rec = prep
        out = answers[key]
        shared = key in used   # computed for another card: no time spent on this one
        used.add(key)
        answer, warnings = parse_answer(out["raw"], labels, out["finish_reason"], sampling.max_tokens)
        missing = list(rec.get("missing") or [])
        if not shared:
            tally["completion"] += out["tokens"]["completion"]
            tally["seconds"] += out["seconds"]
        return {"text": answer_text(answer, sentence), "json": answer, "raw": out["raw"],
                "warnings": [f"OCR did not read: {', '.join(missing)}"] * bool(missing)
                + list(rec.get("warnings", [])) + warnings,
                "fields": rec.get("fields") or {}, "backend": "llama-cpp", "model": model_rec,
                "prompt_version": template.name, "prompt_sha256": template.sha256, "priors_sha256": p_hash,
                "sampling": sampling.as_dict(), "tokens": out["tokens"], "timing": out["timing"],
                "finish_reason": out["finish_reason"], "answer_shared": shared,
                "seconds": 0.0 if shared else round(out["seconds"], 4)}

    def compute(sample: Sample) -> dict[str, Any]:
        prep = prepare(sample)
        key = answer_key(prep)
        if known_answer(key) is None:
            remember(key, llm.answer(prep[0], fields_spec, sampling.as_dict(), prefix_messages=prep[1]))
        return finish(prep, key)

    n_workers = workers or default_workers(n_threads, n_gpu_layers)
    pool = LLMPool(llm, n_workers, fields_spec) if n_workers > 1 else None   # processes start on first use

    def compute_batch(samples: list[Sample]) -> list[dict[str, Any] | DataError]:
        preps: list[Any] = []
        for s in samples:
            try:
                preps.append(prepare(s))
            except DataError as exc:
                preps.append(exc)
        keys = [answer_key(p) if isinstance(p, tuple) else None for p in preps]
        todo = {k: p for k, p in zip(keys, preps) if k is not None and known_answer(k) is None}
        if todo:   # each distinct prompt once
            for k, out in zip(todo, pool.answer_many([(p[0], sampling.as_dict(), p[1]) for p in todo.values()])):
                remember(k, out)
        return [p if k is None else finish(p, k) for k, p in zip(keys, preps)]

    def status() -> str:
        return f"{tally['completion'] / tally['seconds']:.1f} tok/s" if tally["seconds"] > 0 else ""

    try:
        records = run_per_image(STAGE, dataset.samples, identity, compute, cache, force=force, strict=strict,
                                description=f"reason ({llm.model_id})", status=status,
                                meta={"model_path": str(llm.path)},
                                batch=compute_batch if pool else None, batch_size=4 * n_workers)
    finally:
        llm.close()
        if pool:
            pool.close()
    params = {"identity": identity, "backend": llm.identity(with_path=True),
              "chat_format_reason": llm.chat_format_reason,
              "prompt": {"name": template.name, "ref": template.ref, "sha256": template.sha256},
              "sampling": sampling.as_dict(), "priors": priors, "priors_sha256": p_hash,
              "stats": {**stats_identity, "engine": engine if fields is None else None,
                        "detector": detector if fields is None else None,
                        "spec_path": str(spec) if spec else None},
              "n_ctx": llm.n_ctx, "generated_tokens": tally["completion"], "generate_seconds": tally["seconds"],
              "answers_generated": tally["answers"]}
    return StageResult(STAGE, records, params, cache.summary(STAGE))


def replay_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """``run_reason`` keyword arguments that repeat a run from its ``StageResult.params`` (as a trained
    bundle stores them), refusing a different model file or prompt."""
    stats = params.get("stats") or {}
    return {"llm_model": params["backend"]["path"], "chat_format": params["backend"]["chat_format"],
            "prompt": params["prompt"]["ref"], "priors": params["priors"], "n_ctx": params.get("n_ctx"),
            "engine": stats.get("engine") or "cnocr", "spec": stats.get("spec_path"),
            "detector": stats.get("detector") or "auto",
            "expect_model_hash": params["backend"]["hash"], "expect_prompt_sha256": params["prompt"]["sha256"],
            **params["sampling"]}
