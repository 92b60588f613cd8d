"""The oracle: the Bayes-optimal classifier given each card's true latent generative parameters.

No method can beat it on average, because every method sees only the card drawn from those parameters.
For a card with latent parameters z it predicts the most probable label; which model applies is read
from the latent's ``shape``.

Clean cards (asectl.domain.synth.CLASS_MODELS): argmax_c P(c) p(z | c) with

- shape: "two-cluster" only occurs in type3 and "ring" only in type4, so those are certain; "gaussian"
  occurs in normal, type1 and type2;
- centre offset from the class mean ~ N(0, CENTER_JITTER^2) per axis;
- log variance multiplier ~ N(0, VAR_JITTER^2) per axis;
- correlation rho ~ N(rho_mean, rho_sd^2) (Gaussian classes);
- hole count, cluster angle: identically distributed in every class, they cancel.

Field cards (shape "field", docs/dataset.md "Field difficulty"): the oracle sees the parameters that
drew the holes (centre, per-axis variance, correlation, cluster share, ring share) and the dataset's
disagreement scale, never the severity or the class. It predicts the most probable *inspector* label,

    argmax_l  sum_c P(c) sum_m P(m | c) integral p(z | c, m, s, s2) P(l | c, m, s, s2, z) p(s) p(s2) ds ds2,

where m is the second mechanism (none, or one of the other defect classes) and, for type3/type4, whether
the card's own shape is weakly expressed; s and s2 (the two severities) are integrated on a grid.
p(z | ...) multiplies: centre ~ N(mechanism centre, CENTER_JITTER^2); log variance ~ N(log mechanism
variance, VAR_JITTER^2); rho ~ N(mechanism tilt, TILT_SD^2); cluster and ring shares from the nuisance
U(0, SHAPE_NUISANCE) plus the mechanism's gain x severity x expression. P(l | ...) is the generator's own
disagreement model (asectl.domain.synth.label_probabilities).

Approximations (also in docs/dataset.md): (1) the generator moves the centres and scales the variances
of each label group together so class averages match Table 1 (clean: centred jitter; field: label-group
centring of up to a few tenths of a unit); the oracle treats the draws as independent and uncentred.
(2) The correlation clip at +/-0.9 is ignored. (3) P(c) is the label share of the training split, not the
generating-class share. (4) Severities are integrated on a 400 x 60 grid. (5) The disagreement model
is evaluated with the hypothesised class; for normal cards its deviation is read from the (centred)
latent rather than the raw jitter.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from asectl.domain.synth import (
    CENTER_JITTER,
    CLASS_MODELS,
    DEFECTS,
    SECONDARY_MAX,
    SECONDARY_SHARE,
    SHAPE_NUISANCE,
    TABLE1,
    TILT_SD,
    VAR_JITTER,
    WEAK_EDGE,
    WEAK_SHAPE_SHARE,
    defect_borderline,
    field_design,
    label_probabilities,
    mechanism_params,
    normal_borderline,
    severity_pdf,
    shape_gain,
)

SEVERITY_GRID = 400
SECONDARY_GRID = 60


def log_likelihood(latent: Mapping, label: str) -> float:
    m = CLASS_MODELS[label]
    if latent["shape"] != m.shape:
        return -math.inf
    ll = 0.0
    for k in range(2):
        ll += _log_normal(latent["center"][k] - m.mean[k], CENTER_JITTER)
        ll += _log_normal(math.log(latent["var"][k] / m.var[k]), VAR_JITTER)
    if m.shape == "gaussian":
        ll += _log_normal(latent["rho"] - m.rho_mean, max(m.rho_sd, 1e-6))
    return ll


def _log_normal(x, sd: float):
    return -0.5 * (np.asarray(x) / sd) ** 2 - math.log(sd)


def _shape_density(share: float, gain_x_severity, weak: bool | None):
    """Density of a cluster or ring share given the mechanism's gain x severity (array); weak None = both
    expressions mixed. Share = nuisance U(0, nu) + gain x severity x expression, expression 1 (typical)
    or U(0, WEAK_EDGE) (weak)."""
    nu = SHAPE_NUISANCE
    a = np.asarray(gain_x_severity, dtype=np.float64)
    typical = ((share - a >= 0) & (share - a <= nu)) / nu
    width = a * WEAK_EDGE
    overlap = np.clip(np.minimum(width, share) - np.maximum(0.0, share - nu), 0.0, None)
    weak_d = overlap / (nu * np.maximum(width, 1e-12))
    if weak is None:
        return (1 - WEAK_SHAPE_SHARE) * typical + WEAK_SHAPE_SHARE * weak_d
    return WEAK_SHAPE_SHARE * weak_d if weak else (1 - WEAK_SHAPE_SHARE) * typical


def field_label_posterior(
    z: Mapping, prior: Mapping[str, float], labels: Sequence[str], design: dict | None = None
) -> np.ndarray:
    """P(inspector label | latent) over ``labels`` for a field card (see the module docstring)."""
    design = design or field_design()
    scale = float(z.get("disagreement_scale", 0.0))
    centre, var, rho = np.asarray(z["center"]), np.asarray(z["var"]), float(z["rho"])
    shares = {"type3": float(z["cluster_share"]), "type4": float(z["ring_share"])}
    nu = SHAPE_NUISANCE
    terms: list[tuple[np.ndarray, dict]] = []  # (log weight array, label probabilities)

    m0, v0 = np.array(TABLE1["normal"][:2]), np.array(TABLE1["normal"][2:])
    if prior.get("normal", 0) > 0:
        offset, log_mult = centre - m0, np.log(var / v0)
        ll = (
            _log_normal(offset, CENTER_JITTER).sum()
            + _log_normal(log_mult, VAR_JITTER).sum()
            + _log_normal(rho, TILT_SD)
        )
        ll += sum(math.log(1 / nu) if 0 <= shares[m] <= nu else -math.inf for m in shares)
        b, alt = normal_borderline(np.concatenate([offset / CENTER_JITTER, log_mult / VAR_JITTER]), design)
        terms.append((np.array(math.log(prior["normal"]) + ll), label_probabilities([(b, alt)], "normal", scale)))

    s = ((np.arange(SEVERITY_GRID) + 0.5) / SEVERITY_GRID)[:, None]
    log_ps = np.log(np.maximum(severity_pdf(s), 1e-300)) - math.log(SEVERITY_GRID)
    s2_grid = ((np.arange(SECONDARY_GRID) + 0.5) / SECONDARY_GRID * SECONDARY_MAX)[None, :]
    for c in DEFECTS:
        if prior.get(c, 0) <= 0:
            continue
        for c2 in (None, *[d for d in DEFECTS if d != c]):
            if c2 is None:
                s2, log_w = np.zeros((1, 1)), math.log(1 - SECONDARY_SHARE)
            else:
                s2, log_w = s2_grid, math.log(SECONDARY_SHARE / (len(DEFECTS) - 1)) - math.log(SECONDARY_GRID)
            mech = {c: s} if c2 is None else {c: s, c2: s2}
            mc, mv, tilt = mechanism_params(mech, design)
            ll = (
                _log_normal(centre[0] - mc[0], CENTER_JITTER)
                + _log_normal(centre[1] - mc[1], CENTER_JITTER)
                + _log_normal(np.log(var[0]) - np.log(mv[0]), VAR_JITTER)
                + _log_normal(np.log(var[1]) - np.log(mv[1]), VAR_JITTER)
                + _log_normal(rho - np.broadcast_to(tilt, np.broadcast(s, s2).shape), TILT_SD)
            )
            with np.errstate(divide="ignore"):
                for m in ("type3", "type4"):
                    if m in mech and m != c:
                        ll = ll + np.log(_shape_density(shares[m], shape_gain(m) * mech[m], None))
                    elif m not in mech:
                        ll = ll + (math.log(1 / nu) if 0 <= shares[m] <= nu else -math.inf)
                base = math.log(prior[c]) + log_w + log_ps + ll
                weak_states = (False, True) if c in ("type3", "type4") else (None,)
                for weak in weak_states:
                    lw = base
                    if weak is not None:
                        lw = base + np.log(_shape_density(shares[c], shape_gain(c) * s, weak))
                    probs = label_probabilities(defect_borderline(c, s, bool(weak), c2, s2), c, scale)
                    terms.append((np.broadcast_to(lw, np.broadcast(s, s2).shape), probs))
    top = max(float(np.max(lw)) for lw, _ in terms)
    post = np.zeros(len(labels))
    for lw, probs in terms:
        w = np.exp(lw - top)
        for j, lab in enumerate(labels):
            if lab in probs:
                post[j] += float((w * probs[lab]).sum())
    return post / post.sum()


def posteriors(latents: Sequence[Mapping], train_labels: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """P(inspector label | latent) per card [n, len(labels)], the prior being the training split's label
    shares. Clean cards have no label noise: their posterior is the normalised prior x likelihood."""
    prior = {c: max(list(train_labels).count(c), 1) / len(train_labels) for c in labels}
    design = field_design()
    out = np.zeros((len(latents), len(labels)))
    for i, z in enumerate(latents):
        if z.get("shape") == "field":
            out[i] = field_label_posterior(z, prior, labels, design)
            continue
        scores = np.array([math.log(prior[c]) + log_likelihood(z, c) for c in labels])
        e = np.exp(scores - scores.max())
        out[i] = e / e.sum()
    return out


def predict(latents: Sequence[Mapping], train_labels: Sequence[str], labels: Sequence[str]) -> list[str]:
    """The accuracy-optimal oracle: the most probable label of each card (Bayes for 0-1 loss, not for
    macro-F1, which rewards the rare classes more)."""
    return [labels[int(k)] for k in posteriors(latents, train_labels, labels).argmax(axis=1)]


def macro_f1_weights(post: np.ndarray, y: Sequence[int], rounds: int = 3) -> np.ndarray:
    """Class weights w (argmax of w * posterior) that maximise macro-F1 on labelled cards, by coordinate
    search on a log grid: the macro-F1 variant of the oracle, its weights chosen on training cards."""
    from asectl.metrics import macro_f1_from_codes

    y = np.asarray(y)
    k = post.shape[1]
    w = np.ones(k)
    grid = np.exp(np.linspace(-2.0, 2.0, 41))

    def score(v):
        return macro_f1_from_codes(y, (post * v).argmax(axis=1), k)

    best = score(w)
    for _ in range(rounds):
        for c in range(1, k):  # weights are relative: the first class stays at 1
            for g in grid:
                v = w.copy()
                v[c] = g
                f = score(v)
                if f > best + 1e-12:
                    best, w = f, v
    return w


def rule_on_posteriors(
    train_latents: Sequence[Mapping],
    train_labels: Sequence[str],
    test_latents: Sequence[Mapping],
    test_labels: Sequence[str],
    labels: Sequence[str],
    max_miss_rate: float = 0.01,
    max_defect_error: float = 0.05,
) -> dict:
    """The oracle's posteriors of training and test cards, asectl's decision rule
    (asectl.models.calibration.choose_rule) chosen on the training cards' posteriors, and how it decides on
    both: {"p_train", "p_test", "y_train", "y_test", "rule", "train", "test"} (the last two decision_stats)."""
    from asectl.models.calibration import choose_rule, decision_stats

    labels = list(labels)
    p_tr = posteriors(train_latents, train_labels, labels)
    p_te = posteriors(test_latents, train_labels, labels)
    y_tr = np.array([labels.index(c) for c in train_labels])
    y_te = np.array([labels.index(c) for c in test_labels])
    rule = choose_rule(p_tr, y_tr, labels, max_miss_rate, max_defect_error)
    return {
        "p_train": p_tr,
        "p_test": p_te,
        "y_train": y_tr,
        "y_test": y_te,
        "rule": rule,
        "train": decision_stats(rule.decide(p_tr), y_tr, p_tr.argmax(axis=1), labels),
        "test": decision_stats(rule.decide(p_te), y_te, p_te.argmax(axis=1), labels),
    }


def decision_floor(
    seed: int, difficulty: str = "field", max_miss_rate: float = 0.01, max_defect_error: float = 0.05
) -> dict:
    """What the oracle's own posterior allows at the line's targets: the decision rule asectl uses
    (asectl.models.calibration.choose_rule) chosen on the training cards' oracle posteriors, then applied
    to the test cards: its review share, miss rate and defect error. No decision rule of a model that sees
    only the card can, on average, send fewer cards to review at the same targets; the issue's goal is a
    model review share at most 1.5 x this one."""
    from asectl.domain.synth import sample_cards
    from asectl.metrics import macro_f1_from_codes

    labels = list(TABLE1)
    cards = sample_cards(seed, difficulty=difficulty)
    train = [c for c in cards if c.split == "train"]
    test = [c for c in cards if c.split == "test"]
    d = rule_on_posteriors(
        [c.latent for c in train],
        [c.label for c in train],
        [c.latent for c in test],
        [c.label for c in test],
        labels,
        max_miss_rate,
        max_defect_error,
    )
    p_tr, p_te, y_tr, y_te, rule = d["p_train"], d["p_test"], d["y_train"], d["y_test"], d["rule"]
    on_train, on_test = d["train"], d["test"]
    w = macro_f1_weights(p_tr, y_tr)
    return {
        "seed": seed,
        "difficulty": difficulty,
        "n_train": len(train),
        "n_test": len(test),
        "macro_f1_accuracy_optimal": macro_f1_from_codes(y_te, p_te.argmax(axis=1), len(labels)),
        "macro_f1_weights_from_train": [float(x) for x in w],
        "macro_f1_macro_tuned": macro_f1_from_codes(y_te, (p_te * w).argmax(axis=1), len(labels)),
        "rule": rule.to_dict(),
        "train": on_train,
        "test": on_test,
    }


def main() -> None:
    """Macro-F1 of the oracle on the test split of generated datasets (the ceiling bench/quality.py
    reports) and, with --decisions, the review share its own posterior allows at the line's targets."""
    import argparse
    import json

    from asectl.domain.synth import sample_cards
    from asectl.report import compute_metrics

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--difficulty", default="field", choices=["field", "clean"])
    ap.add_argument(
        "--decisions", action="store_true", help="the oracle's review share at the 1%% miss / 5%% defect-error targets"
    )
    args = ap.parse_args()
    labels = list(TABLE1)
    rows = {}
    from _common import command, save

    seeds = [int(x) for x in args.seeds.split(",")]
    if args.decisions:
        for seed in seeds:
            rows[seed] = decision_floor(seed, args.difficulty)
            t = rows[seed]["test"]
            print(
                json.dumps(
                    {
                        "seed": seed,
                        "review_share": t["review_share"],
                        "miss": [t["n_missed"], t["n_defective"]],
                        "defect_wrong": [t["n_wrong_defect"], t["n_defect_decisions"]],
                        "macro_f1": rows[seed]["macro_f1_accuracy_optimal"],
                        "macro_f1_tuned": rows[seed]["macro_f1_macro_tuned"],
                    }
                )
            )
        save(f"oracle_decisions_{args.difficulty}", {"command": command(), "seeds": rows})
        return
    for seed in seeds:
        cards = sample_cards(seed, difficulty=args.difficulty)
        train = [c.label for c in cards if c.split == "train"]
        test = [c for c in cards if c.split == "test"]
        pred = predict([c.latent for c in test], train, labels)
        m = compute_metrics(labels, [labels.index(c.label) for c in test], [labels.index(p) for p in pred])
        agree = sum(c.label == (c.generating_class or c.label) for c in test) / len(test)
        rows[seed] = {
            "macro_f1": m["multiclass"]["macro_f1"],
            "binary_macro_f1": m["binary"]["macro_f1"],
            "test_labels_equal_generating_class": agree,
        }
        print(json.dumps({"seed": seed, "difficulty": args.difficulty, **rows[seed]}))
    save(f"oracle_{args.difficulty}", {"command": command(), "seeds": rows})


if __name__ == "__main__":
    main()
