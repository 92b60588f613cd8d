"""Calibrated confidence and the decision rule a production line acts on.

The paper trains the fusion with cross-entropy and reports macro-F1 only (paper lines 171 and 208-219);
it says nothing about how far its softmax probabilities can be trusted. A probability that drives a decision must mean
what it says, so ``fuse-train`` adds two things fitted on held-out *training* cards (out-of-fold
predictions of a cross-validation on the training split; the test split is never read). The fold models
of that cross-validation are also the classifier: their calibrated probabilities are averaged, so the
thresholds apply to the models they were chosen on (bench/calibration_method.py):

* **Temperature scaling** (Guo et al., "On calibration of modern neural networks", ICML 2017): one
  scalar T > 0 divides the logits, ``p = softmax(z / T)``, chosen to minimise the negative
  log-likelihood of the held-out cards. It does not change which class is on top, only how sure the
  model says it is.
* **A decision rule** with four outcomes: ``pass`` (the card is normal and the model is sure of it),
  ``defect`` (a defect class, and the model is sure of it), ``defective`` (the model is sure the card is
  not normal but not of its type: the line can act on it, its type is to be confirmed), ``review``
  (anything else: a person looks). Its thresholds are set on the held-out cards so that few cards go to
  review while the user's targets are met:

  - ``max_miss_rate``: at most this share of defective held-out cards is passed as normal (the lowest
    pass threshold that meets it);
  - ``max_defect_error``: at most this share of held-out cards decided ``defect`` has another true class
    (a normal card, or another defect type). Lowering the defect threshold from the most confident card
    down stops at the first cut that breaks the target once one has met it; with a
    ``defect_confidence``, a cut meets the target only if the exact upper bound of its held-out error
    does (for users with enough labelled cards to afford it: with a few hundred, 0.8 grants almost no
    defect threshold and 0.9 none, bench/calibration_method.py);
  - ``max_defective_error`` (by default the same share as ``max_defect_error``) for ``defective``: among
    the held-out cards the two thresholds above leave to review, at most this share of those decided
    ``defective`` (p(defective) = 1 - p(normal) at or above the defective threshold) is a normal card, the
    threshold cut the same way (first failure). The type is what a defect decision adds; a line that needs
    it turns the decision off (``defective_decision`` False: ``--no-defective``), and those cards go to
    review as before.

Only numpy and scipy here: applying a stored rule needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from asectl.domain.dataset import NORMAL
from asectl.errors import ConfigError, DataError

DECISIONS = ("pass", "defect", "defective", "review")
DEFAULT_MAX_MISS_RATE = 0.01
DEFAULT_MAX_DEFECT_ERROR = 0.05
DEFAULT_CALIBRATION_FOLDS = 5
ECE_BINS = 15  # Guo et al. 2017 use 15 equal-width confidence bins
# log T is searched in [log 0.05, log 20]: wide enough for any model seen so far, and it keeps T finite
# when every held-out card is right (the likelihood then keeps rising as T shrinks towards 0).
TEMPERATURE_BOUNDS = (0.05, 20.0)


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities float64 [n, k] of ``logits / temperature`` (numpy only: predict imports no scipy)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def mean_softmax(member_logits: Any, temperature: float = 1.0) -> np.ndarray:
    """The classifier's probabilities float64 [n, k]: the mean over fold models of ``softmax(z / T)``
    (``member_logits`` [members, n, k]; scikit-learn's ``CalibratedClassifierCV(ensemble=True)`` averages
    the same way)."""
    return softmax(member_logits, temperature).mean(axis=0)


def nll(logits: Any, y: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes at ``temperature``."""
    from scipy.special import log_softmax

    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    y = np.asarray(y, dtype=np.int64)
    return float(-log_softmax(z, axis=-1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: Any, y: Sequence[int]) -> float:
    """The T minimising the held-out NLL (bounded 1-d search on log T; the NLL is smooth in it)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise DataError(f"temperature scaling needs [n, k] logits and n labels; got {z.shape} and {len(y)}")
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    res = minimize_scalar(
        lambda log_t: nll(z, y, math.exp(log_t)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-4}
    )
    return float(math.exp(res.x))


def reliability_bins(probs: Any, y: Sequence[int], bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width bins of top-class confidence: count, mean confidence and accuracy of each non-empty bin."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    # Bin i holds (i/bins, (i+1)/bins]; a confidence of exactly 0 cannot occur for a top class.
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append(
                {
                    "lo": b / bins,
                    "hi": (b + 1) / bins,
                    "count": int(m.sum()),
                    "confidence": float(conf[m].mean()),
                    "accuracy": float(correct[m].mean()),
                }
            )
    return out


def expected_calibration_error(probs: Any, y: Sequence[int], bins: int = ECE_BINS) -> float:
    """ECE = sum over bins of (share of cards) x |accuracy - mean confidence| (Guo et al. 2017, Eq. 3)."""
    rows = reliability_bins(probs, y, bins)
    n = sum(r["count"] for r in rows)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows)) if n else 0.0


def threshold_text(value: float | None, digits: int = 4, prefix: str = "") -> str:
    """A decision threshold as people read it: "never" where none was granted (``DecisionRule``)."""
    return "never" if value is None else f"{prefix}{value:.{digits}f}"


def compared(value: float, threshold: float) -> tuple[str, str]:
    """Both numbers with 4 decimals, or as many more as it takes to tell them apart (a probability just
    under its threshold must not read "0.9600 < 0.9600")."""
    for digits in range(4, 17):
        a, b = f"{value:.{digits}f}", f"{threshold:.{digits}f}"
        if a != b or value == threshold:
            return a, b
    return repr(value), repr(threshold)


def exact_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Two-sided exact (Clopper-Pearson) interval of a rate seen as ``k`` of ``n`` (None when n is 0):
    how far a figure measured on a few cards can be from the rate on all cards."""
    from scipy.stats import binomtest

    if n == 0:
        return None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def check_target(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"--{name.replace('_', '-')} {value}: give a share in [0, 1), e.g. 0.01 for 1%")
    return value


def check_confidence(value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"--defect-confidence {value}: give a probability in (0, 1), e.g. 0.9")
    return value


@dataclass(frozen=True)
class DecisionRule:
    """pass / defect / defective / review from calibrated probabilities. A threshold of None never grants that
    decision (no normal class to pass, or no held-out evidence that the target can be met)."""

    classes: tuple[str, ...]
    pass_threshold: float | None  # pass: top class is normal and p(normal) >= this
    defect_threshold: float | None  # defect: top class is a defect class and its p >= this
    max_miss_rate: float
    max_defect_error: float
    # The defect threshold's evidence: None, the held-out defect error itself must be at most the target;
    # c, its one-sided exact (Clopper-Pearson) upper bound at confidence c must be.
    defect_confidence: float | None = None
    # defective: a card neither passed nor decided defect whose p(defective) = 1 - p(normal) >= this
    defective_threshold: float | None = None
    # The defective decision's target; None: max_defect_error's (as every rule stored before it had).
    max_defective_error: float | None = None
    # False: the user turned the decision off (such cards go to review); rules stored before it had it on.
    defective_decision: bool = True

    def targets(self, **given: Any) -> dict[str, Any]:
        """``choose_rule``'s targets and switches: this rule's, each replaced by a value given and not None
        (max_miss_rate, max_defect_error, max_defective_error, defective_decision)."""
        own = {
            "max_miss_rate": self.max_miss_rate,
            "max_defect_error": self.max_defect_error,
            "defect_confidence": self.defect_confidence,
            "defective_decision": self.defective_decision,
            "max_defective_error": self.max_defective_error,
        }
        return {**own, **{k: v for k, v in given.items() if v is not None}}

    @property
    def defective_error_target(self) -> float:
        return self.max_defect_error if self.max_defective_error is None else self.max_defective_error

    def decide(self, probs: Any) -> list[str]:
        """Each card's decision, vectorised (the simulations and benchmarks decide many thousands of cards);
        ``explain`` writes why."""
        p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
        normal = self.classes.index(NORMAL) if NORMAL in self.classes else -1
        top, conf = p.argmax(axis=1), p.max(axis=1)
        out = np.full(len(p), "review", dtype=object)
        said_normal = top == normal
        if self.pass_threshold is not None:
            out[said_normal & (conf >= self.pass_threshold)] = "pass"
        if self.defect_threshold is not None:
            out[~said_normal & (conf >= self.defect_threshold)] = "defect"
        if normal >= 0 and self.defective_threshold is not None:
            out[(out == "review") & (1.0 - p[:, normal] >= self.defective_threshold)] = "defective"
        return out.tolist()

    def explain(self, probs: Any) -> list[tuple[str, str]]:
        """Each card's decision and its reason, the threshold it met or missed, e.g. ("review",
        "p(normal) 0.9100 < pass threshold 0.9600"): what report and predict show beside a decision."""
        p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
        normal = self.classes.index(NORMAL) if NORMAL in self.classes else -1
        out = []
        # The decisions are decide()'s; this writes why, from the same thresholds.
        for i, (k, c, decision) in enumerate(zip(p.argmax(axis=1), p.max(axis=1), self.decide(p))):
            kind, threshold, target = (
                ("pass", self.pass_threshold, "miss-rate")
                if k == normal
                else ("defect", self.defect_threshold, "defect-error")
            )
            if threshold is None:
                reason = (
                    f"p({self.classes[k]}) {c:.4f}, no {kind} threshold (no cut met the {target} target on "
                    "held-out cards)"
                )
            else:
                value, cut = compared(float(c), threshold)
                reason = f"p({self.classes[k]}) {value} {'>=' if decision == kind else '<'} {kind} threshold {cut}"
            if decision == "defective":
                value, cut = compared(1.0 - float(p[i, normal]), self.defective_threshold)
                likely = max((j for j in range(p.shape[1]) if j != normal), key=lambda j: p[i, j])
                reason = (
                    f"p(defective) {value} >= defective threshold {cut}; type to confirm (most likely "
                    f"{self.classes[likely]}, {reason})"
                )
            out.append((decision, reason))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecisionRule:
        conf = d.get("defect_confidence")
        return cls(
            tuple(d["classes"]),
            d["pass_threshold"],
            d["defect_threshold"],
            float(d["max_miss_rate"]),
            float(d["max_defect_error"]),
            None if conf is None else float(conf),
            d.get("defective_threshold"),  # None in rules stored before the decision existed
            None if d.get("max_defective_error") is None else float(d["max_defective_error"]),
            bool(d.get("defective_decision", True)),
        )


def _above(v: float) -> float:
    """The smallest float above v: a threshold that v itself does not reach."""
    return float(np.nextafter(v, np.inf))


def error_upper_bound(wrong: Any, n: Any, confidence: float) -> np.ndarray:
    """One-sided exact (Clopper-Pearson) upper bound on an error rate seen as ``wrong`` of ``n``: the rate
    below which the truth lies with probability ``confidence``."""
    from scipy.stats import beta

    wrong, n = np.broadcast_arrays(np.asarray(wrong, dtype=np.float64), np.asarray(n, dtype=np.float64))
    bound = np.ones(wrong.shape)
    some_right = wrong < n  # all wrong: the bound is 1
    bound[some_right] = beta.ppf(confidence, wrong[some_right] + 1, n[some_right] - wrong[some_right])
    return bound


def choose_rule(
    probs: Any,
    y: Sequence[int],
    classes: Sequence[str],
    max_miss_rate: float = DEFAULT_MAX_MISS_RATE,
    max_defect_error: float = DEFAULT_MAX_DEFECT_ERROR,
    defect_confidence: float | None = None,
    defective_decision: bool = True,
    max_defective_error: float | None = None,
) -> DecisionRule:
    """Thresholds that meet both targets on held-out cards (calibrated ``probs``, true ``y``): the lowest
    pass threshold that does, and the defect threshold where lowering it first breaks its target (module
    docstring). With ``defect_confidence`` c, a defect cut must meet its target with the held-out error's
    exact upper bound at confidence c, not with the error itself. With ``defective_decision``, also the
    defective threshold, cut on the cards the other two leave to review for ``max_defective_error`` (None:
    ``max_defect_error``)."""
    max_miss_rate = check_target("max_miss_rate", max_miss_rate)
    max_defect_error = check_target("max_defect_error", max_defect_error)
    if max_defective_error is not None:
        max_defective_error = check_target("max_defective_error", max_defective_error)
    if defect_confidence is not None:
        defect_confidence = check_confidence(defect_confidence)
    classes = tuple(str(c) for c in classes)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    top, conf = p.argmax(axis=1), p.max(axis=1)
    normal = classes.index(NORMAL) if NORMAL in classes else -1

    # Where a target is met by every held-out card of a kind, the threshold is the lowest confidence seen
    # among them, not 0: below it there is no held-out evidence either way, so such cards go to review.
    pass_t: float | None = None
    defective = y != normal
    said_normal = top == normal
    if normal >= 0 and defective.any() and said_normal.any():
        # Defective cards the argmax alone would pass, most confident first; `allowed` of them may pass.
        would_pass = np.sort(conf[defective & said_normal])[::-1]
        allowed = int(math.floor(max_miss_rate * int(defective.sum()) + 1e-9))
        pass_t = float(conf[said_normal].min()) if len(would_pass) <= allowed else _above(would_pass[allowed])

    # The scan stops at the first cut that breaks the target after one has met it. Taking the lowest cut
    # that meets it anywhere instead picks a place where noise dipped the running error under the target,
    # and new cards then see more errors than the target allows (tests/test_calibration.py measures both).
    defect_t = _first_failure(*defect_cuts(p, y, classes, defect_confidence), max_defect_error)
    rule = DecisionRule(
        classes,
        pass_t,
        defect_t,
        max_miss_rate,
        max_defect_error,
        defect_confidence,
        max_defective_error=max_defective_error,
        defective_decision=bool(defective_decision),
    )
    if not defective_decision or normal < 0:
        return rule
    # defective: on the held-out cards the two thresholds leave to review, cut p(defective) the same way.
    left = np.asarray(rule.decide(p)) == "review"
    defective_t = _first_failure(*_cuts(1.0 - p[left, normal], y[left] == normal, None), rule.defective_error_target)
    return replace(rule, defective_threshold=defective_t)


def _first_failure(cuts: np.ndarray, errors: np.ndarray, target: float) -> float | None:
    """The lowest of ``cuts`` (highest first) reached before the first whose error breaks ``target`` once
    one has met it; None if none meets it."""
    chosen: float | None = None
    for cut, error in zip(cuts, errors):
        if error <= target:
            chosen = float(cut)
        elif chosen is not None:
            break
    return chosen


def operating_point(
    probs: Any,
    y: Sequence[int],
    stored: DecisionRule,
    max_miss_rate: float | None = None,
    max_defect_error: float | None = None,
    max_defective_error: float | None = None,
    defective_decision: bool | None = None,
) -> tuple[DecisionRule, dict[str, Any]]:
    """Move a model's operating point without retraining: the rule ``choose_rule`` derives for other targets
    from the held-out calibrated probabilities and labels the model stores (those ``fuse-train`` chose
    ``stored`` on), and how it does on those cards (``decision_stats``: the review share it costs, its miss
    rate and defect error). A target or switch left None, and the defect confidence, stay the stored ones;
    the same cards and the same targets give exactly the thresholds ``fuse-train`` derived."""
    p = np.asarray(probs, dtype=np.float64)
    rule = choose_rule(
        p,
        y,
        stored.classes,
        **stored.targets(
            max_miss_rate=max_miss_rate,
            max_defect_error=max_defect_error,
            max_defective_error=max_defective_error,
            defective_decision=defective_decision,
        ),
    )
    return rule, decision_stats(rule.decide(p), y, p.argmax(axis=1), stored.classes)


def defect_cuts(
    probs: Any, y: Sequence[int], classes: Sequence[str], defect_confidence: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Where a defect threshold can be cut on held-out cards, from the most confident card decided
    ``defect`` down: each cut's threshold (cards with at least that confidence are admitted; a cut falls
    only between different confidences, equal ones are admitted together) and the defect error of the
    cards it admits, or with ``defect_confidence`` c its exact upper bound at confidence c."""
    classes = tuple(str(c) for c in classes)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    top, conf = p.argmax(axis=1), p.max(axis=1)
    flagged = top != (classes.index(NORMAL) if NORMAL in classes else -1)
    return _cuts(conf[flagged], top[flagged] != y[flagged], defect_confidence)


def _cuts(score: np.ndarray, wrong: np.ndarray, confidence: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Cuts of a score from the highest down: each cut's threshold (cards scoring at least it are admitted;
    equal scores together) and the share of ``wrong`` among the admitted, or its exact upper bound at
    ``confidence``."""
    order = np.argsort(-score, kind="stable")
    c_sorted = score[order]
    n_wrong = np.cumsum(np.asarray(wrong, dtype=bool)[order])
    admitted = np.arange(1, len(order) + 1)
    error = n_wrong / admitted if confidence is None else error_upper_bound(n_wrong, admitted, confidence)
    last_of_equal = np.append(c_sorted[1:] < c_sorted[:-1], True)[: len(order)]
    return c_sorted[last_of_equal], error[last_of_equal]


def decision_stats(
    decisions: Sequence[str], y: Sequence[int], top: Sequence[int], classes: Sequence[str]
) -> dict[str, Any]:
    """How a rule did on labelled cards: shares of each decision, the miss rate (defective cards passed,
    over defective cards), the defect error (decided defect with another true class, over defect
    decisions) and the defective error (normal cards decided defective, over defective decisions). Rates
    are None where their denominator is 0."""
    d = np.asarray(list(decisions))
    y = np.asarray(y, dtype=np.int64)
    top = np.asarray(top, dtype=np.int64)
    normal = list(classes).index(NORMAL) if NORMAL in classes else -1
    n = len(d)
    defective = y != normal
    n_def = int(defective.sum())
    missed = int((defective & (d == "pass")).sum())
    n_defect = int((d == "defect").sum())
    wrong_defect = int(((d == "defect") & (top != y)).sum())
    n_defective_dec = int((d == "defective").sum())
    wrong_defective = int(((d == "defective") & ~defective).sum())
    return {
        "n": n,
        **{f"{k}_share": (float((d == k).mean()) if n else None) for k in DECISIONS},
        "counts": {k: int((d == k).sum()) for k in DECISIONS},
        "n_defective": n_def,
        "n_missed": missed,
        "miss_rate": missed / n_def if n_def else None,
        "n_defect_decisions": n_defect,
        "n_wrong_defect": wrong_defect,
        "defect_error": wrong_defect / n_defect if n_defect else None,
        "n_defective_decisions": n_defective_dec,
        "n_wrong_defective": wrong_defective,
        "defective_error": wrong_defective / n_defective_dec if n_defective_dec else None,
    }


def stratified_folds(labels: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Fold number per training card (seeded, class proportions kept): scikit-learn's StratifiedKFold.
    A class with fewer cards than folds simply misses from some held-out folds; when every class has
    fewer cards than folds (a very small training split), the folds are seeded but not stratified."""
    import warnings

    from sklearn.model_selection import KFold, StratifiedKFold

    y = np.asarray([str(x) for x in labels])
    folds = int(folds)
    if folds < 2:
        raise ConfigError(f"--calibration-folds {folds}: use at least 2")
    if len(y) < folds:
        raise DataError(
            f"{len(y)} training cards are too few for {folds}-fold calibration; add training "
            "cards or lower --calibration-folds"
        )
    out = np.zeros(len(y), dtype=np.int64)
    counts = dict(zip(*np.unique(y, return_counts=True)))
    few = {c: int(n) for c, n in counts.items() if n < folds}
    if few and len(few) < len(counts):
        import logging

        logging.getLogger("asectl").warning(
            "fewer training cards than the %d calibration folds in class %s: some folds hold none of them "
            "out, so the temperature and thresholds rest on very few of them (add training cards or lower "
            "--calibration-folds)",
            folds,
            ", ".join(f"{c} ({n})" for c, n in sorted(few.items())),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        try:
            for k, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y)):
                out[held] = k
        except ValueError:  # every class has fewer cards than folds
            import logging

            logging.getLogger("asectl").warning(
                "every class has fewer than %d training cards: calibration folds are not stratified", folds
            )
            for k, (_, held) in enumerate(KFold(n_splits=folds, shuffle=True, random_state=seed).split(y)):
                out[held] = k
    return out
