"""Pass cuts set from a line's unlabelled cards: can a model trained on `field` pass `clean` cards without
the line's labels?

    python bench/unlabelled_cut.py [--split train|test] [--no-docs]

Reads the per-card output of bench/robustness_review.py run on this machine (bench/out/results/
robustness_review.json: the field model's calibrated probabilities of its held-out training cards, of the
field test cards and of the clean training and test cards, per seed, and its stored rule). A user has a
new line's archive of unlabelled cards; each cut below reads the archive's p(normal) only, never a label,
and replaces the stored pass threshold (every other threshold stays the model's). Cuts:

* stored: the model's own pass threshold, cut on its labelled `field` held-out cards (the baseline);
* mixture: a two-component Gaussian mixture on logit p(normal) of the archive; the cut is the (1 - miss
  target) quantile of the lower component (the defective cards' scores, as the mixture sees them);
* mixture, anchored on field: the same, shifted by how far the mixture's cut on the model's own held-out
  cards (labels hidden) lies from the stored cut there, so the mixture's bias on the source is carried;
* mixture, posterior matched to field: the lowest cut where the archive mixture's lower component has no
  more posterior weight than the held-out cards' mixture gives it at the stored cut (a line whose
  defective scores lie further from its normal ones gets a lower cut).

Each cut is judged on two lines: `clean` (archive: its training split; decided: its test split) and
`field` itself, the check that a cut which loosens on an easy line does not loosen on a hard one (archive
and decided cards: the field test split, labels hidden from the cut). ``--split train`` judges on the
archive's own labelled cards instead (the clean training split, the field held-out cards): what the
design was checked on before the test split was read. Nothing is chosen from the test split.
Results: bench/results/unlabelled_cut.json and the ``unlabelled-cut`` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from scipy.special import expit

from _common import load_raw, publish
from asectl.models.calibration import DecisionRule, decision_stats

CLIP = 1e-6  # p(normal) of 0 or 1 would give an infinite logit


def logit(p):
    """logit of p(normal), clipped away from 0 and 1 (arrays or one value)."""
    from scipy.special import logit as unclipped

    return unclipped(np.clip(p, CLIP, 1 - CLIP))


GRID = np.linspace(-12, 12, 4801)  # logit p(normal) from about 6e-6 to 1 - 6e-6


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Two Gaussian components fitted to logit p(normal): the lower one's mean and sd, and its posterior
    on GRID."""

    mean: float
    sd: float
    lower_posterior: np.ndarray

    @classmethod
    def fit(cls, p_normal: np.ndarray, seed: int = 0) -> Mixture:
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(2, n_init=5, random_state=seed).fit(logit(p_normal).reshape(-1, 1))
        low = int(np.argmin(gm.means_[:, 0]))
        sd = float(np.sqrt(gm.covariances_[low].ravel()[0]))
        return cls(float(gm.means_[low, 0]), sd, gm.predict_proba(GRID.reshape(-1, 1))[:, low])

    def tail_cut(self, miss: float) -> float:
        """The (1 - miss) quantile of the lower component, as a p(normal)."""
        from scipy.stats import norm

        return float(expit(self.mean + norm.ppf(1 - miss) * self.sd))


def posterior_matched_cut(archive: Mixture, own: Mixture, stored: float) -> float:
    """The lowest cut above the archive mixture's lower mean where the lower component's posterior is no
    larger than the posterior the model's own held-out mixture gives at the stored cut (and stays so
    above it)."""
    target = float(np.interp(logit(stored), GRID, own.lower_posterior))
    post, low_mean = archive.lower_posterior, archive.mean
    above = (GRID > low_mean) & (post <= target)
    # the first grid point from which every higher point qualifies
    bad = np.flatnonzero((GRID > low_mean) & ~above)
    start = bad[-1] + 1 if len(bad) else int(np.argmax(GRID > low_mean))
    return float(expit(GRID[min(start, len(GRID) - 1)]))


def cuts(seed_scores: dict, archive: np.ndarray, miss: float, stored: float) -> dict[str, float]:
    """Each label-free cut for a line whose unlabelled archive gives these p(normal)."""
    normal = seed_scores["classes"].index("normal")
    own = Mixture.fit(np.asarray(seed_scores["field_held_out"]["probs"])[:, normal])
    line = Mixture.fit(archive)
    shift = logit(stored) - logit(own.tail_cut(miss))
    return {
        "stored": stored,
        "mixture": line.tail_cut(miss),
        "mixture, anchored on field": float(expit(logit(line.tail_cut(miss)) + shift)),
        "mixture, posterior matched to field": posterior_matched_cut(line, own, stored),
    }


def judge(seed_scores: dict, archive_name: str, decided_name: str) -> dict:
    classes = seed_scores["classes"]
    normal = classes.index("normal")
    stored = DecisionRule.from_dict(seed_scores["rule"])
    archive = np.asarray(seed_scores[archive_name]["probs"])[:, normal]
    probs = np.asarray(seed_scores[decided_name]["probs"])
    y = np.asarray(seed_scores[decided_name]["labels"])
    out = {}
    for name, cut in cuts(seed_scores, archive, stored.max_miss_rate, stored.pass_threshold).items():
        rule = dataclasses.replace(stored, pass_threshold=cut)
        stats = decision_stats(rule.decide(probs), y, probs.argmax(axis=1), classes)
        out[name] = {"cut": cut, "decisions": stats}
    return out


LINES = {  # line: (archive, decided cards) for --split test and --split train
    "test": {"clean": ("clean_train", "clean_test"), "field": ("field_test", "field_test")},
    "train": {"clean": ("clean_train", "clean_train"), "field": ("field_held_out", "field_held_out")},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("train", "test"), default="test")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    raw = load_raw("robustness_review")
    per_seed = {seed: {line: judge(s, *names) for line, names in LINES[args.split].items()} for seed, s in raw.items()}
    rec = {"split": args.split, "seeds": list(raw), "per_seed": per_seed}
    name = "unlabelled_cut" if args.split == "test" else "unlabelled_cut_train"
    publish(name, rec, start, markdown, docs=not args.no_docs)
    print(markdown(rec))


def markdown(rec: dict) -> str:
    seeds = rec["seeds"]
    first = rec["per_seed"][seeds[0]]
    where = (
        "decided: the clean test split and the field test split"
        if rec["split"] == "test"
        else "decided: the archive's own cards (clean training split, field held-out cards)"
    )
    split = "test split" if rec["split"] == "test" else "training split: the design check"
    lines = [
        f"### Pass cuts set from a line's unlabelled cards ({split}; seeds " + ", ".join(map(str, seeds)) + ")",
        "",
        f"The field model of bench/robustness_review.py, its pass threshold replaced by each cut; {where}.",
        "",
        "| line | cut | pass cuts per seed | review | passed / normal | missed / defective |",
        "|---|---|---|---|---|---|",
    ]
    for line in first:
        for cut in first[line]:
            one = [rec["per_seed"][s][line][cut] for s in seeds]
            d = [o["decisions"] for o in one]
            n = sum(x["n"] for x in d)
            review = sum(x["counts"]["review"] for x in d)
            passed = sum(x["counts"]["pass"] for x in d)
            missed, n_def = sum(x["n_missed"] for x in d), sum(x["n_defective"] for x in d)
            n_normal = n - n_def
            lines.append(
                f"| {line} | {cut} | {', '.join(format(o['cut'], '.3f') for o in one)} | {review}/{n} = "
                f"{100 * review / n:.1f}% | {passed - missed}/{n_normal} | {missed}/{n_def} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
