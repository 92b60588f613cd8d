"""Progressive feature alignment: schedule, ranking, ITC loss, training, modes, profiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asectl.errors import ConfigError, DataError
from asectl.models.pfa import (
    AlignmentHeads,
    align_features,
    itc_loss,
    plan_updates,
    rank_lowest_first,
    self_similarity,
    stage_counts,
    stride_fractions,
    train_pfa,
)
from asectl.models.train_config import PFAConfig, get_profile


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def correlated_features(n: int = 60, seed: int = 0, shared_vlm: bool = False) -> dict[str, np.ndarray]:
    """Three views of one latent: image, LLM and VLM features that can be aligned."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 8))
    views = {}
    for name, dim in (("image", 40), ("llm", 24), ("vlm", 32)):
        views[name] = (latent @ rng.normal(size=(8, dim)) + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    if shared_vlm:  # only 3 distinct VLM texts, as when answers repeat per class
        base = rng.normal(size=(3, 32)).astype(np.float32)
        views["vlm"] = base[np.arange(n) % 3]
    return views


# -- schedule ----------------------------------------------------------------------------------------


def test_stride_schedule_is_exact():
    assert stride_fractions(0.2) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert stage_counts(325, stride_fractions(0.2)) == [65, 130, 195, 260, 325]
    assert stage_counts(650, stride_fractions(0.2)) == [130, 260, 390, 520, 650]
    # Table 4's custom schedule; ceil, with float noise (0.6 * 325 = 195.00000000000003) kept out.
    assert stride_fractions([0.2, 0.6, 1]) == [0.2, 0.6, 1.0]
    assert stage_counts(325, [0.2, 0.6, 1.0]) == [65, 195, 325]
    assert stage_counts(7, stride_fractions(0.2)) == [2, 3, 5, 6, 7]  # ceil(1.4)=2, ceil(2.8)=3, ...
    assert stride_fractions(0.3) == [0.3, 0.6, 0.9, 1.0]
    assert stride_fractions(1.0) == [1.0]
    assert stage_counts(3, [0.2, 1.0]) == [1, 3]


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, [0.5, 0.4, 1.0], [0.2, 0.6], [], [0.0, 1.0]])
def test_bad_strides_are_config_errors(bad):
    with pytest.raises(ConfigError):
        stride_fractions(bad)


def test_ranking_is_lowest_first_and_stable():
    sim = [0.5, -0.2, 0.9, -0.2, 0.1]
    assert rank_lowest_first(sim).tolist() == [1, 3, 4, 0, 2]
    img = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    llm = np.array([[1, 0], [0, 1], [0, 2]], np.float32)
    vlm = np.array([[0, 1], [0, 1], [0, 3]], np.float32)
    s = self_similarity(img, llm, vlm)
    np.testing.assert_allclose(s, [0.5, 0.0, 1.0], atol=1e-6)
    assert rank_lowest_first(s).tolist() == [1, 0, 2]


def test_itc_loss_is_the_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    tau = 0.1
    logits = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).t() / tau
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert torch.allclose(itc_loss(img, txt, tau), expected, atol=1e-6)
    # A perfectly aligned batch at a low temperature has near-zero loss.
    assert itc_loss(img, img, 0.01).item() < 1e-3
    # Explicit one-hot ground truth y is the default.
    assert torch.allclose(itc_loss(img, txt, tau, torch.eye(6)), expected, atol=1e-6)


# -- training -----------------------------------------------------------------------------------------


def test_progressive_alignment_trains_and_reports_per_stage():
    feats = correlated_features(60)
    train = list(range(50))
    cfg = PFAConfig(batch_size=10, lr=1e-2, epochs_per_stage=4)
    res = train_pfa(feats, cfg, seed=0, train_index=train)
    assert [s.n_train for s in res.stages] == [10, 20, 30, 40, 50]
    assert res.counts == [10, 20, 30, 40, 50]
    for s in res.stages:
        assert set(s.train_indices).isdisjoint(s.pend_indices)
        assert sorted(s.train_indices + s.pend_indices) == train
        assert len(s.curve) == 4
        for m in ("image", "llm", "vlm"):
            assert s.embeddings[m].shape == (60, 256)  # all samples, test ones included
            np.testing.assert_allclose(np.linalg.norm(s.embeddings[m], axis=1), 1.0, atol=1e-5)
        assert set(s.checkpoint) >= {"log_tau", "proj.image.weight", "proj.llm.weight", "proj.vlm.weight"}
    # Nested subsets: each stage keeps the previous one's pairs.
    for a, b in zip(res.stages, res.stages[1:]):
        assert set(a.train_indices) < set(b.train_indices)
        assert b.added_indices == [i for i in b.train_indices if i not in a.train_indices]
    # ITC loss falls: on the training curve, and on D_pend compared with the untrained projections.
    # (from the first epoch of the ranking warm-up, which trains the same projections before stage 1)
    first, last = (res.rank_warmup.get("curve") or res.stages[0].curve)[0]["loss"], res.stages[-1].curve[-1]["loss"]
    assert last < 0.5 * first
    untrained = train_pfa(feats, PFAConfig(mode="none", batch_size=10), seed=0, train_index=train)
    pend = res.stages[3].pend_indices
    assert res.stages[3].val_loss < untrained.stages[0].val_loss
    assert pend and res.stages[3].val_loss_llm + res.stages[3].val_loss_vlm == pytest.approx(res.stages[3].val_loss)
    # The last stage has no D_pend and says so.
    assert res.stages[-1].val_loss is None and "empty" in res.stages[-1].val_note
    # The temperature is learnt: it moved from its initial 0.07 and stays within its clamp.
    assert abs(res.stages[-1].tau - 0.07) > 1e-3
    assert cfg.tau_min <= res.stages[-1].tau <= cfg.tau_max
    assert res.stages[-1].checkpoint["log_tau"].item() == pytest.approx(math.log(res.stages[-1].tau), abs=1e-6)
    summary = res.summary()
    assert summary["stages"][0]["n_train"] == 10 and summary["stages"][-1]["val_loss"] is None


def test_alignment_is_deterministic_for_a_seed():
    feats = correlated_features(30)
    cfg = PFAConfig(batch_size=8, epochs_per_stage=2, strides=(0.5, 1.0))
    a = train_pfa(feats, cfg, seed=3)
    b = train_pfa(feats, cfg, seed=3)
    c = train_pfa(feats, cfg, seed=4)
    for sa, sb in zip(a.stages, b.stages):
        assert sa.train_indices == sb.train_indices
        np.testing.assert_array_equal(sa.embeddings["image"], sb.embeddings["image"])
        assert [r["loss"] for r in sa.curve] == [r["loss"] for r in sb.curve]
    assert not np.array_equal(a.embeddings["image"], c.embeddings["image"])


def test_first_stage_takes_the_lowest_self_similarity_pairs():
    feats = correlated_features(40)
    train = list(range(5, 40))
    cfg = PFAConfig(batch_size=8, epochs_per_stage=1, strides=(0.2, 0.6, 1.0), rerank_each_stage=False)
    res = train_pfa(feats, cfg, seed=1, train_index=train)
    order = [train[i] for i in rank_lowest_first(res.initial_similarity)]
    assert res.counts == [7, 21, 35]
    assert res.stages[0].train_indices == order[:7]
    assert res.stages[1].train_indices == order[:21]  # without re-ranking: the stage-1 order
    assert res.stages[0].added_similarity == sorted(res.stages[0].added_similarity)
    # The ranking similarity is the definition: mean of the two image-text cosines of the projections
    # after the ranking warm-up (the heads of a run with no stage epochs, same seed).
    warm_only = train_pfa(feats, PFAConfig(batch_size=8, strides=(1.0,), epochs_per_stage=1), seed=1, train_index=train)
    assert warm_only.rank_warmup["epochs"] == cfg.rank_warmup_epochs == len(warm_only.rank_warmup["curve"]) > 0
    np.testing.assert_allclose(warm_only.initial_similarity, res.initial_similarity, atol=1e-6)
    # With no warm-up, stage 1 ranks with the seeded initial projections.
    cold = train_pfa(
        feats, PFAConfig(batch_size=8, epochs_per_stage=1, rank_warmup_epochs=0), seed=1, train_index=train
    )
    heads = AlignmentHeads({"image": 40, "llm": 24, "vlm": 32})
    heads.load_state_dict(train_pfa(feats, PFAConfig(mode="none"), seed=1, train_index=train).stages[0].checkpoint)
    e = align_features(heads, {m: f[train] for m, f in feats.items()})
    np.testing.assert_allclose(self_similarity(e["image"], e["llm"], e["vlm"]), cold.initial_similarity, atol=1e-5)
    # With re-ranking (default), later stages rank D_pend with the current projections: still lowest first.
    rr = train_pfa(
        feats, PFAConfig(batch_size=8, epochs_per_stage=1, strides=(0.2, 0.6, 1.0)), seed=1, train_index=train
    )
    assert rr.stages[1].added_similarity == sorted(rr.stages[1].added_similarity)


def test_direct_and_none_modes():
    feats = correlated_features(30)
    cfg = dict(batch_size=10, epochs_per_stage=2, rank_warmup_epochs=2)
    progressive = train_pfa(feats, PFAConfig(**cfg), seed=0)
    direct = train_pfa(feats, PFAConfig(mode="direct", **cfg), seed=0)
    assert len(direct.stages) == 1 and direct.stages[0].n_train == 30
    # As many optimiser steps as progressive: 2 warm-up epochs x 3 batches + 2 epochs x (1+2+2+3+3)
    # stage batches = 28 batches, two steps each; over all 30 pairs: 9 epochs of 3 batches and one of 1.
    assert progressive.updates == direct.updates == 56
    assert direct.stages[0].epochs == 10 == len(direct.stages[0].curve)
    assert direct.stages[0].curve[-1]["pairs"] == 10 and direct.stages[0].curve[-2]["pairs"] == 30
    assert direct.stages[0].val_loss is None
    explicit = train_pfa(feats, PFAConfig(mode="direct", direct_epochs=3, **cfg), seed=0)
    assert explicit.updates == 3 * 3 * 2 and explicit.summary()["updates"]["progressive_budget"] == 56
    none = train_pfa(feats, PFAConfig(mode="none"), seed=0)
    assert none.stages[0].curve == [] and none.stages[0].n_train == 0
    assert none.stages[0].tau == pytest.approx(0.07)
    assert none.stages[0].val_loss is not None  # loss of the untrained heads on D_train
    assert none.summary()["mode"] == "none"
    assert none.summary()["updates"]["total"] == 0 and none.summary()["updates"]["progressive_budget"] > 0


@pytest.mark.parametrize(
    "n, cfg",
    [
        (325, dict(batch_size=32)),  # the quick profile's shape
        (37, dict(batch_size=10, strides=(0.2, 0.6, 1.0), epochs_per_stage=3, lr_decay_every=2)),
        (50, dict(batch_size=7, epochs_per_stage=2, align_order="summed", rank_warmup_epochs=1)),
    ],
)
def test_direct_gets_the_progressive_update_budget_and_decay_points(n, cfg):
    """Table 4 compares the order of the data, not the amount of training: the plan fixes the steps."""
    rng = np.random.default_rng(0)
    feats = {m: rng.normal(size=(n, d)).astype(np.float32) for m, d in (("image", 12), ("llm", 6), ("vlm", 8))}
    cfg = {"epochs_per_stage": 1, **cfg}
    runs = {
        mode: train_pfa(feats, PFAConfig(mode=mode, proj_dim=16, **cfg), seed=0) for mode in ("progressive", "direct")
    }
    plans = {mode: plan_updates(PFAConfig(mode=mode, **cfg), n) for mode in runs}
    assert plans["direct"]["updates"] == plans["progressive"]["updates"] == plans["direct"]["progressive_updates"]
    assert plans["direct"]["decay_after"] == plans["progressive"]["decay_after"]
    for mode, res in runs.items():
        assert res.updates == plans[mode]["updates"]  # what ran is what was planned
        assert res.summary()["updates"]["total"] == res.updates
        curve = res.rank_warmup.get("curve", []) + [r for s in res.stages for r in s.curve]
        assert curve[-1]["updates"] == res.updates
    # The rate ends at the same value: the decays fall after the same optimiser steps.
    last_lr = {mode: res.stages[-1].curve[-1]["lr"] for mode, res in runs.items()}
    assert last_lr["direct"] == pytest.approx(last_lr["progressive"])


def planted_difficulty(n: int = 200, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Image-text pairs of known difficulty: each pair's texts describe a blend of its own card and a
    random other card, with the other card's share (the planted difficulty) uniform in [0, 1]: 0 is a
    faithful pair, 1 a mismatched one."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 8))
    difficulty = rng.uniform(size=n)
    other = latent[(np.arange(n) + rng.integers(1, n, size=n)) % n]  # never the card itself
    text_latent = (1 - difficulty)[:, None] * latent + difficulty[:, None] * other
    feats = {"image": latent @ rng.normal(size=(8, 40))}
    for name, dim in (("llm", 24), ("vlm", 32)):
        feats[name] = text_latent @ rng.normal(size=(8, dim))
    return {m: (f + 0.1 * rng.normal(size=f.shape)).astype(np.float32) for m, f in feats.items()}, difficulty


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_stage_picks_the_planted_hardest_pairs(seed):
    """Stage 1 must take the pairs whose texts fit their image least (paper Fig. 5, line 130). With the
    quick profile's settings the ranking after the warm-up follows the planted difficulty (Spearman
    -0.78 to -0.82 and 53-65% of the 40 hardest pairs in stage 1 on seeds 0-5, chance 20%); the
    ranking by untrained, randomly initialised projections (warm-up 0, the earlier behaviour) is at
    chance (|Spearman| <= 0.19, overlap <= 23%) and fails the same bounds."""
    from scipy.stats import spearmanr

    feats, difficulty = planted_difficulty(seed=seed)
    hardest = set(np.argsort(-difficulty)[: math.ceil(0.2 * len(difficulty))].tolist())
    chance = len(hardest) / len(difficulty)

    def first_stage(**over):
        cfg = get_profile("quick", {"pfa.epochs_per_stage": 1, **over}).pfa
        res = train_pfa(feats, cfg, seed=seed)
        rho = spearmanr(res.initial_similarity, difficulty).correlation
        overlap = len(hardest & set(res.stages[0].train_indices)) / len(hardest)
        return rho, overlap

    rho, overlap = first_stage()
    assert rho < -0.6 and overlap > 2 * chance, (rho, overlap)  # low self-similarity = hard pair
    rho0, overlap0 = first_stage(**{"pfa.rank_warmup_epochs": 0})
    assert rho0 > -0.3 and overlap0 < 1.75 * chance, (rho0, overlap0)


def test_sequential_and_summed_orders_differ_but_both_train():
    feats = correlated_features(30, shared_vlm=True)
    base = dict(mode="direct", batch_size=10, epochs_per_stage=1, lr=1e-2)
    seq = train_pfa(feats, PFAConfig(**base, align_order="sequential"), seed=0)
    summed = train_pfa(feats, PFAConfig(**base, align_order="summed"), seed=0)
    for r in (seq, summed):
        curve = r.stages[0].curve
        assert curve[-1]["loss"] < curve[0]["loss"]
        assert curve[0]["loss"] == pytest.approx(curve[0]["loss_llm"] + curve[0]["loss_vlm"])
    assert not np.array_equal(seq.embeddings["image"], summed.embeddings["image"])


def test_bad_inputs_are_reported():
    feats = correlated_features(10)
    with pytest.raises(ConfigError, match="at least two"):
        train_pfa({"image": feats["image"]}, PFAConfig())
    with pytest.raises(ConfigError, match="at least two"):
        train_pfa({**feats, "audio": feats["llm"]}, PFAConfig())
    with pytest.raises(DataError):
        train_pfa({**feats, "vlm": feats["vlm"][:5]}, PFAConfig())
    with pytest.raises(DataError):
        train_pfa(feats, PFAConfig(), train_index=[0, 0, 1])
    with pytest.raises(ConfigError):
        train_pfa(feats, PFAConfig(mode="sideways"))


def test_heads_checkpoint_round_trips_through_safetensors(tmp_path):
    from asectl.backends.encoders import load_module_state, save_module_state

    feats = correlated_features(20)
    res = train_pfa(feats, PFAConfig(mode="direct", epochs_per_stage=1), seed=0)
    path = save_module_state(res.heads, tmp_path / "heads.safetensors", metadata={"kind": "pfa"})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and b"log_tau" in raw[8 : 8 + header_len]  # safetensors, not a pickle
    fresh = AlignmentHeads.from_checkpoint(
        {k: torch.zeros_like(v) for k, v in res.stages[-1].checkpoint.items()}, res.heads.meta()
    )
    load_module_state(fresh, path)
    again = align_features(fresh, feats)
    np.testing.assert_allclose(again["image"], res.embeddings["image"], atol=1e-6)


# -- profiles ------------------------------------------------------------------------------------------


def test_profiles_and_overrides():
    paper = get_profile("paper")
    assert paper.encoders.image == "resnet50" and paper.encoders.text == "bert-base"
    assert paper.encoders.finetune and paper.encoders.warmup_epochs == 30
    assert paper.pfa.epochs_per_stage == 15 and paper.pfa.batch_size == 10 and paper.pfa.lr == 1e-2
    assert paper.pfa.betas == (0.9, 0.999) and paper.pfa.eps == 1e-8
    assert paper.pfa.lr_decay == 0.75 and paper.pfa.lr_decay_every == 15
    assert paper.fusion.epochs == 60 and paper.fusion.batch_size == 10
    assert paper.pfa.strides == (0.2, 0.4, 0.6, 0.8, 1.0)
    quick = get_profile(
        "quick",
        {"pfa": {"lr": 0.01}, "fusion.epochs": 30, "pfa.stride": "0.2/0.6/1", "seed": 7, "encoders.finetune": "false"},
    )
    assert quick.pfa.lr == 0.01 and quick.fusion.epochs == 30 and quick.seed == 7
    assert quick.pfa.strides == (0.2, 0.6, 1.0)
    assert get_profile("quick", {"pfa.stride": 0.25}).pfa.strides == (0.25, 0.5, 0.75, 1.0)
    assert plan_updates(get_profile("quick").pfa, 325)["phases"][1:] == [
        {"stage": k, "n_pairs": c, "epochs": 15, "batches": 15 * b, "last_epoch_batches": b}
        for k, (c, b) in enumerate(zip((65, 130, 195, 260, 325), (2, 5, 7, 9, 11)), start=1)
    ]
    with pytest.raises(ConfigError, match="pfa.lrr"):
        get_profile("quick", {"pfa.lrr": 1})
    with pytest.raises(ConfigError, match="pfa.epochs_per_stage"):
        get_profile("quick", {"pfa": {"epochs_per_stage": "many"}})
    with pytest.raises(ConfigError):
        get_profile("quick", {"fusion.tokens": 7})  # must divide 256
    with pytest.raises(ConfigError):
        get_profile("fastest")


# -- paper profile: encoders fine-tuned with the heads ---------------------------------------------------


def test_encoders_fine_tune_in_warmup_and_alignment(tmp_path, small_dataset):
    import importlib.util
    from pathlib import Path

    # The tiny-BERT builder lives with the encoder tests; load it from there rather than copy it.
    spec = importlib.util.spec_from_file_location("asectl_test_encoders", Path(__file__).with_name("test_encoders.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    card_paths, make_tiny_bert = helpers.card_paths, helpers.make_tiny_bert

    from asectl.backends.encoders import image_encoder, text_encoder
    from asectl.models.pfa import EncoderFeatures, warmup_encoders

    paths = card_paths(small_dataset, 6)
    bert = make_tiny_bert(tmp_path / "bert")
    img = image_encoder("efficientnet-lite0", input_size=64)  # small input: a fast CPU test
    llm_enc = text_encoder("bert-base", path=bert)  # f_text^LLM and f_text^VLM: two separate copies
    vlm_enc = text_encoder("bert-base", path=bert)
    llm_texts = [
        "the drilling looks normal",
        "the distribution is shifted to the right",
        "two separate clusters of holes",
        "the drilling looks normal",
        "pink dots form a ring around the centre",
        "the drilling looks defective",
    ]
    vlm_texts = [
        "pink dots in the centre",
        "dots to the right",
        "two clusters",
        "dots in the centre",
        "a ring of dots",
        "dots spread out",
    ]
    sources = {
        "image": EncoderFeatures(img, paths),
        "llm": EncoderFeatures(llm_enc, llm_texts),
        "vlm": EncoderFeatures(vlm_enc, vlm_texts),
    }

    def snapshot():
        return {
            "image": img.module._conv_stem.weight.detach().clone(),
            "llm": llm_enc.module.embeddings.word_embeddings.weight.detach().clone(),
            "vlm": vlm_enc.module.embeddings.word_embeddings.weight.detach().clone(),
        }

    start = snapshot()
    history = warmup_encoders(
        sources, [0, 1, 2, 0, 3, 1], epochs=1, batch_size=3, seed=0, encoder_lrs={"image": 1e-3, "text": 1e-3}
    )
    assert len(history) == 1 and set(history[0]) == {"epoch", "loss_image", "loss_llm", "loss_vlm"}
    warmed = snapshot()
    for m in start:
        assert not torch.equal(start[m], warmed[m]), m
    cfg = PFAConfig(strides=(0.5, 1.0), epochs_per_stage=1, batch_size=3)
    res = train_pfa(sources, cfg, seed=0, encoder_lrs={"image": 1e-3, "text": 1e-3})
    aligned = snapshot()
    for m in start:
        assert not torch.equal(warmed[m], aligned[m]), m
    assert [s.n_train for s in res.stages] == [3, 6]
    assert res.stages[0].val_loss is not None and res.stages[-1].val_loss is None
    assert res.embeddings["image"].shape == (6, 256) and res.embeddings["llm"].shape == (6, 256)
    assert res.stages[-1].tau != pytest.approx(0.07)
    # After training the encoders are back in eval mode, so features are deterministic again.
    np.testing.assert_array_equal(llm_enc.encode(llm_texts[:2]), llm_enc.encode(llm_texts[:2]))
