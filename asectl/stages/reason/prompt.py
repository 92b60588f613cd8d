"""The ``reason`` prompt: versioned templates in ``asectl/prompts``, the card's record as text (g(.) in the
paper's Eq. 1), the JSON answer schema, and the text form of an answer that the text encoder reads."""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from asectl.cache import sha256_bytes
from asectl.domain.card import number_text
from asectl.errors import ConfigError
from asectl.stages.reason.priors import (
    FIELD_WORDS,
    SHOWN_FEATURES,
    card_features,
    class_distances,
    deviation_scale,
    field_text,
    is_number,
    near_far_intervals,
    radius_counts,
    z_score,
)

PROMPTS_DIR = Path(__file__).resolve().parent.parent.parent / "prompts"
DEFAULT_PROMPT = "reason-v2"
VERDICTS = ("normal", "defective")
DEVIATION_KINDS = ("none", "shift", "spread", "tilt", "cluster", "ring", "other")
AXES = ("x", "y", "both", "none")
SEVERITIES = ("low", "medium", "high")
RATIONALE_MAX_CHARS = 48  # a few words: every character of free text costs the small model a decode call
ANSWER_KEYS = ("verdict", "deviation_kind", "axis", "severity", "closest_class", "rationale")
PLACEHOLDERS = ("card", "card_levels", "record", "deviation", "priors", "n_train", "labels")
# Differ per card: kept at the end of the prompt.
CARD_PLACEHOLDERS = ("card", "card_levels", "record", "deviation")
# Carry a class judgement computed from the training labels (nearest class profiles, class distances):
# a prompt for an answer-only LLM branch must not use them (``hint_free_prompt``).
HINT_PLACEHOLDERS = ("card", "deviation")
HINT_FREE_PROMPT = "reason-v3"


# --- prompt templates --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplate:
    name: str  # e.g. "reason-v1": recorded as prompt_version
    ref: str  # what to pass back to load_prompt to get it again (name or file path)
    sha256: str  # hash of the file bytes: part of the cache identity
    system: string.Template
    user: string.Template

    def messages(self, **values: Any) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system.substitute(values).strip()},
            {"role": "user", "content": self.user.substitute(values).strip()},
        ]

    def placeholders(self) -> set[str]:
        return set(self.system.get_identifiers()) | set(self.user.get_identifiers())

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
        raise ConfigError(
            f"--prompt {text_name}: no such prompt; use one of {', '.join(prompt_names())} "
            "or the path of a .txt template (see docs/reason.md)"
        )
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
            raise ConfigError(
                f"{path}: [{part}] uses an unknown or malformed placeholder ({exc}); "
                f"allowed: {', '.join('$' + k for k in PLACEHOLDERS)}"
            ) from None
    return PromptTemplate(path.stem, ref, sha256_bytes(raw), system, user)


# --- answer schema -----------------------------------------------------------------------------------
def answer_schema(labels: Sequence[str]) -> dict[str, Any]:
    """The JSON schema answers are decoded within (asectl.backends.json_decode). Property order is the
    order the model writes them in: the categorical judgement first, the rationale last (it then explains
    the choices made)."""
    enum = lambda values: {"type": "string", "enum": list(values)}  # noqa: E731
    props = {
        "verdict": enum(VERDICTS),
        "deviation_kind": enum(DEVIATION_KINDS),
        "axis": enum(AXES),
        "severity": enum(SEVERITIES),
        "closest_class": enum(labels),
        "rationale": {"type": "string", "minLength": 1, "maxLength": RATIONALE_MAX_CHARS},
    }
    return {"type": "object", "properties": props, "required": list(ANSWER_KEYS), "additionalProperties": False}


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def parse_answer(
    raw: str, labels: Sequence[str], finish_reason: str | None = None, max_tokens: int | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
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
    allowed = {
        "verdict": VERDICTS,
        "deviation_kind": DEVIATION_KINDS,
        "axis": AXES,
        "severity": SEVERITIES,
        "closest_class": tuple(labels),
    }
    bad = [k for k, values in allowed.items() if obj.get(k) not in values]
    rationale = obj.get("rationale")
    if not isinstance(rationale, str):
        bad.append("rationale")
    if bad:
        return None, warnings + [f"LLM answer lacks valid {', '.join(bad)}; raw text kept in 'raw'"]
    answer = {k: obj[k] for k in ANSWER_KEYS}
    answer["rationale"] = " ".join(_CONTROL.sub(" ", rationale).split())
    return answer, warnings


def answer_only_text(answer: dict[str, Any] | None) -> str:
    """The LLM's own answer as text: its judgement and rationale, nothing else (``encoders.llm_text =
    "answer"``). An unusable answer reads as one fixed sentence."""
    if answer is None:
        return "No usable answer."
    kind = answer["deviation_kind"]
    pattern = (
        "no deviation"
        if kind == "none"
        else f"{kind} deviation"
        + ("" if answer["axis"] == "none" else f" along {'both axes' if answer['axis'] == 'both' else answer['axis']}")
    )
    rationale = answer["rationale"].rstrip(".")
    return (
        f"Verdict: {answer['verdict']}, {pattern}, {answer['severity']} severity, closest to "
        f"{answer['closest_class']}. {rationale}."
    )


def answer_text(answer: dict[str, Any] | None, record_sentence: str) -> str:
    """The composite text used downstream by default: the answer's text, then the record as a sentence."""
    if answer is None:
        return f"Record: {record_sentence}"
    return f"{answer_only_text(answer)} Record: {record_sentence}"


def hint_free_prompt(prompt: str) -> str:
    """The prompt to use when the LLM branch encodes the answer only: the default template becomes
    ``reason-v3`` (no nearest-class line); any other must not use $card or $deviation."""
    if prompt == DEFAULT_PROMPT:
        return HINT_FREE_PROMPT
    used = sorted(load_prompt(prompt).placeholders() & set(HINT_PLACEHOLDERS))
    if used:
        raise ConfigError(
            f"prompt {prompt} gives the LLM a class hint ({', '.join('$' + u for u in used)}); "
            f"with encoders.llm_text = answer use --prompt {HINT_FREE_PROMPT} or a template "
            "without those placeholders ($card_levels gives the card without the hint)"
        )
    return prompt


# --- g(.): the record as text ------------------------------------------------------------------------
def record_sentence(fields: Mapping[str, Any], bin_edges: Sequence[float]) -> str:
    """g(OCR(image)): the parsed record written out; fields OCR could not read say so."""

    def val(f: str) -> str:
        return field_text(fields[f], f) if is_number(fields.get(f)) else "not read"

    # Compact on purpose: a small model's tokenizer spends one token per digit, and the card-specific
    # part of the prompt is evaluated for every card.
    parts = [f"N {val('N')} holes", f"mean x {val('mu_x')}, y {val('mu_y')}", f"sd x {val('sd_x')}, y {val('sd_y')}"]
    bins = radius_counts(fields, bin_edges)
    if bins is not None:
        intervals = " ".join(
            f"{number_text(lo)}-{number_text(hi)}:{c}" for lo, hi, c in zip(bin_edges, bin_edges[1:], bins)
        )
        parts.append(f"holes by radius {intervals}")
    elif bin_edges:
        parts.append("holes by radius not read")
    return "; ".join(parts) + "."


def priors_text(priors: Mapping[str, Any]) -> str:
    """One line per class: typical value ± spread of each shown feature. N is kept in the priors dict but
    not shown: it says nothing about where the holes are."""
    nf = near_far_intervals(priors["bin_edges"])
    edges = priors["bin_edges"]
    lines = []
    if nf is not None:
        lines.append(
            f"(near = share of holes at radius < {number_text(edges[nf[0]])}, "
            f"far = share at radius >= {number_text(edges[nf[1]])})"
        )
    for label, c in priors["classes"].items():
        stats = ", ".join(
            f"{FIELD_WORDS[f]} {field_text(c['mean'][f], f)}±{field_text(deviation_scale(priors, c, f), f)}"
            for f in SHOWN_FEATURES
            if f in c["mean"]
        )
        tag = " = normal cards" if label == priors.get("normal_label") and label != "normal" else ""
        lines.append(f"- {label}{tag} ({c['cards']} card{'s' * (c['cards'] != 1)}): {stats}")
    return "\n".join(lines)


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
            z = z_score(feats[f], priors, normal, f)
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


def card_levels(fields: Mapping[str, Any], priors: Mapping[str, Any]) -> str:
    """g(OCR(image)) in words without any class judgement ($card_levels): each shown feature as a level
    against normal training cards."""
    return _levels_line(fields, priors) or "No statistic was read."


def _levels_line(fields: Mapping[str, Any], priors: Mapping[str, Any]) -> str:
    feats = card_features(fields, priors["bin_edges"])
    normal = priors["classes"].get(priors.get("normal_label") or "")
    parts = []
    for f in SHOWN_FEATURES:
        if normal and f in feats and f in normal["mean"]:
            parts.append(f"{FIELD_WORDS[f]} {_level(z_score(feats[f], priors, normal, f))}")
        elif f not in feats:
            parts.append(f"{FIELD_WORDS[f]} not read")
    return ", ".join(parts) + "." if parts else ""


def card_summary(fields: Mapping[str, Any], priors: Mapping[str, Any], nearest: int = 3) -> str:
    """g(OCR(image)) in words ($card): ``card_levels``, and the ``nearest`` class profiles by distance.
    Compact on purpose: it is evaluated for every card."""
    levels = _levels_line(fields, priors)
    lines = [levels] if levels else []
    feats = card_features(fields, priors["bin_edges"])
    ranked = sorted(class_distances(feats, priors).items(), key=lambda kv: (kv[1], kv[0]))[:nearest]
    if ranked:
        lines.append("Nearest class profiles: " + ", then ".join(lab for lab, _ in ranked) + ".")
    return "\n".join(lines) if lines else "No statistic was read."
