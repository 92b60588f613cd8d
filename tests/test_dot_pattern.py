"""The dot pattern's numbers (asectl.domain.dot_pattern): each measures what it names on rendered cards of
known shape, and a card without dots is masked, not a crash."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asectl.domain.card import inside_range, record_from_points, render_card
from asectl.domain.dot_pattern import PATTERN_NAMES, pattern_vector


def _card(points: np.ndarray) -> dict[str, float]:
    points = points[inside_range(points)]
    return dict(zip(PATTERN_NAMES, pattern_vector(render_card(points, record_from_points(points)))))


def _gaussian(rng, n=400, sd=(2.5, 2.5), rho=0.0, centre=(0.0, 0.0)):
    c = rho * sd[0] * sd[1]
    return rng.multivariate_normal(centre, [[sd[0] ** 2, c], [c, sd[1] ** 2]], size=n)


def test_moments_follow_the_holes():
    rng = np.random.default_rng(0)
    pts = _gaussian(rng, sd=(3.0, 2.0), rho=0.6, centre=(2.0, -1.0))
    m = _card(pts)
    assert m["centroid_x"] == pytest.approx(pts[:, 0].mean(), abs=0.3)
    assert m["centroid_y"] == pytest.approx(pts[:, 1].mean(), abs=0.3)
    assert m["sd_x"] == pytest.approx(pts[:, 0].std(), rel=0.15)
    assert m["sd_y"] == pytest.approx(pts[:, 1].std(), rel=0.15)
    assert m["corr"] == pytest.approx(0.6, abs=0.12)
    assert _card(_gaussian(rng, rho=-0.6))["corr"] < -0.45
    assert m["holes"] == pytest.approx(400, rel=0.35)  # overlapping dots hide some holes


def test_shape_numbers_tell_clusters_and_rings_from_one_group():
    rng = np.random.default_rng(1)
    one = _card(_gaussian(rng))
    side = rng.choice([-1.0, 1.0], size=400)[:, None]
    two = _card(_gaussian(rng, sd=(1.2, 1.2)) + side * np.array([4.0, 0.0]))
    phi = rng.uniform(0, 2 * math.pi, 400)
    r = rng.normal(5.0, 0.4, 400)
    ring = _card(np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1))
    # two clusters: the projection on their axis is bimodal (kurtosis well under a Gaussian's 3)
    assert two["kurtosis_min"] < 2.0 < one["kurtosis_min"]
    # a ring: hollow in the middle, its whitened radius concentrated
    assert ring["share_r_below_0.5"] < 0.5 * one["share_r_below_0.5"]
    assert ring["radial_kurtosis"] < 0.8 < one["radial_kurtosis"]
    for m in (one, two, ring):
        shares = [v for k, v in m.items() if k.startswith("share_r_") and "_below_" not in k and "_above_" not in k]
        assert sum(shares) == pytest.approx(1.0, abs=1e-4)


def test_card_without_dots_is_masked():
    v = pattern_vector(render_card(np.zeros((0, 2)), record_from_points(np.zeros((1, 2)))))
    assert v.shape == (len(PATTERN_NAMES),) and np.isnan(v).all()


def test_setting_off_keeps_earlier_keys_and_on_is_replayed():
    from asectl.models.train_config import get_profile
    from asectl.stages.modalities import ModalitySettings, skipped_stages

    off = get_profile("quick", {"encoders.dot_pattern": False})
    on = get_profile("quick", {"encoders.dot_pattern": True})
    assert "dot_pattern" not in off.to_dict()["encoders"] and on.to_dict()["encoders"]["dot_pattern"] is True
    assert "dot_pattern" not in ModalitySettings().as_dict()
    replay = ModalitySettings(dot_pattern=True, skipped_stages=skipped_stages(("image", "vlm", "stats"))).as_dict()
    assert replay["dot_pattern"] is True and replay["skipped_stages"] == ["reason"]
    back = ModalitySettings.from_dict(replay)
    assert back.dot_pattern and back.skipped_stages == ("reason",)
    assert skipped_stages(("image", "vlm", "llm", "stats")) == ()
