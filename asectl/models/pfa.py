"""Progressive feature alignment (PFA), section 3.3 of the paper.

Projection heads map Z_image, Z_vlm and Z_llm to 256-d; the image-text contrastive (ITC) loss of
Eq. (3)-(5) aligns (image, LLM text) and (image, VLM text); a progressive training strategy (PTS) grows
the training subset stage by stage, hardest (least self-similar) pairs first.

**The stats branch (an extension of the paper).** The paper's record reaches the model only as text
g(OCR(image)) inside the LLM's prompt. Here the OCR'd numbers can also be a branch of their own,
``stats`` (asectl.stages.modalities.stats_vectors): each entry standardized with the mean and standard
deviation of the training cards (fitted here on ``train_index`` only and stored as buffers of the heads,
so a bundle replays them), a missing entry set to 0 and flagged in a mask that is appended, then a small
MLP encoder (``StatsEncoder``) and a projection to 256-d like the other branches. Eq. (5) gains a third
ITC term, L_total = L_llm + L_vlm + L_stats, with L_stats the ITC loss of (image, stats) as Eq. (4); in
``sequential`` order it is the third step of each batch. Self-similarity averages the cosines of every
pair. The set of branches is a setting (``encoders.branches``): the first of image, vlm, llm, stats
present is the anchor every other branch is aligned with (the image, when it is on, as in the paper).

Precise definitions (the paper leaves these open):

* **Projection**: one ``Linear(d_modality, 256)`` per modality (as in CLIP/ALBEF); the aligned feature
  Z_aligned is its output, L2-normalised (ITC compares directions only, Eq. (3) uses cosine similarity).
* **Temperature**: one learnable tau shared by both pairs (Eq. (3) has one), stored as log(tau) and
  clamped to [tau_min, tau_max] in the forward pass and after every optimiser step.
* **ITC loss**: ``L = 0.5 * (CE(i2t) + CE(t2i))`` with logits ``cos(I_a, T_b) / tau`` over the batch.
  The ground truth y is one-hot on the matching pair. (Texts repeated within a batch, e.g. identical
  LLM answers for cards of one class, need no special targets: identical features give identical
  logits, and the one-hot loss then equals, in value and gradient, the loss with the mass spread over
  the copies.) ``L_total = L_llm + L_vlm`` (Eq. (5)).
* **"First (I, LLM), then (I, VLM)"**: ``align_order="sequential"`` (default) makes two optimiser steps
  per batch, the first on L_llm, the second on L_vlm (recomputing the image features after the first
  step); that is the only reading in which an order exists. ``"summed"`` takes one step on L_total
  (same objective, no order). Reported losses are always L_llm, L_vlm and their sum.
* **Self-similarity**: for sample i, ``s_i = (cos(P_I z_I, P_L z_L) + cos(P_I z_I, P_V z_V)) / 2`` with the
  projections as they are when the ranking is made. Pairs are ranked lowest first (stable ties by index).
* **Ranking warm-up**: the paper ranks D_train by self-similarity before the first stage (section 3.3,
  paper lines 130 and 106, Fig. 5) but does not say in which space. Image and text encoders live in
  unrelated spaces, and cosines through untrained, randomly initialised projections are noise (a
  random "hardest 20%"). So the projections first train for ``rank_warmup_epochs`` (default 8) with the
  ITC loss on all of D_train, at the initial learning rate, and stage 1 ranks with those warmed
  projections; training then continues from them. The warm-up's optimiser steps count in the update
  budget (below). ``rank_warmup_epochs = 0`` ranks with the seeded initial projections.
* **Stages**: cumulative fractions f_k (stride 0.2 -> 0.2, 0.4, 0.6, 0.8, 1.0); stage k trains on the
  first ``ceil(f_k * n)`` training pairs (at least 1). Subsets are nested: stage k keeps stage k-1's pairs
  and adds the lowest-ranked pending ones. With ``rerank_each_stage`` (default) D_pend is ranked again
  at the start of every stage with the current projections (stage 1 uses the warmed ones); otherwise
  the ranking made before stage 1 is used for all stages. D_pend (training pairs not yet added) is
  the validation set of the stage; after the last stage it is empty and the validation loss is None.
* **Schedule**: one AdamW optimiser and one step decay (x lr_decay every lr_decay_every stage epochs)
  over the whole alignment, epochs counted across stages, so the paper's "decay every 15 epochs" with
  15 epochs per stage lowers the rate once per stage (paper line 206). ``plan_updates`` fixes every
  batch, optimiser step and decay point before training starts.
* **Modes**: ``progressive`` as above; ``direct`` trains on all pairs at once, by default for exactly as
  many optimiser steps as ``progressive`` with the same settings (warm-up included), in epochs over all
  of D_train with the last one cut short, the rate decaying after the same steps; so Table 4 compares
  the order of the data, not the amount of training (``direct_epochs`` sets whole epochs instead).
  ``none`` leaves the projections at their seeded random initialisation (untrained): a linear random
  view of each encoder space at the same 256-d width. It makes no updates, since any training of the
  projections would be an alignment (or the fusion's supervised task, which ``fuse-train`` does anyway);
  its summary records 0 updates beside the progressive budget, so tables can state the difference.
  Every result records its optimiser steps (``summary()["updates"]``).

Inputs are feature sources: precomputed arrays (quick profile, frozen encoders) or encoders with their
raw inputs (paper profile: the encoders fine-tune with the projections). ``train_pfa`` treats both alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asectl.errors import ConfigError, DataError
from asectl.models.seeding import fork_rng
from asectl.models.train_config import BRANCHES, PFAConfig, stride_fractions  # noqa: F401  (re-exported)

MODALITIES = ("image", "llm", "vlm")  # the paper's three
TEXT_MODALITIES = ("llm", "vlm")  # aligned in this order with the image: Eq. (4), section 3.3
PAIR_ORDER = ("llm", "vlm", "stats")  # the paper's order, then the stats extension


def alignment_pairs(branches: Sequence[str]) -> tuple[str, list[str]]:
    """(anchor, the branches aligned with it, in order): the image when it is a branch, else the first."""
    present = [b for b in BRANCHES if b in branches]
    anchor = "image" if "image" in present else present[0]
    return anchor, [m for m in PAIR_ORDER if m in present and m != anchor] + [
        m for m in present if m not in PAIR_ORDER and m != anchor
    ]


# ---------------------------------------------------------------------------------------------------
# Pure functions: schedule, ranking, loss


def stage_counts(n_train: int, fractions: Sequence[float]) -> list[int]:
    """Training-pair count per stage: ``ceil(f * n)`` (rounding guards float noise: 0.6 * 325 -> 195),
    at least 1, never above n. 325 pairs at stride 0.2 -> 65, 130, 195, 260, 325."""
    if n_train < 1:
        raise DataError("PFA needs at least one training pair")
    return [min(n_train, max(1, math.ceil(round(f * n_train, 6)))) for f in fractions]


def self_similarity(anchor: Any, *others: Any) -> np.ndarray:
    """Per-sample self-similarity: the mean cosine of the anchor (image) with each other branch (the
    paper: cos(image, llm) and cos(image, vlm)), row by row."""

    def unit(x: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x).float()
        return F.normalize(t, dim=-1)

    a = unit(anchor)
    cos = torch.stack([(a * unit(o)).sum(-1) for o in others])
    return cos.mean(0).detach().cpu().numpy().astype(np.float64)


def rank_lowest_first(similarity: Sequence[float]) -> np.ndarray:
    """Positions sorted by similarity, lowest (hardest, 'negative') first; ties keep their order."""
    return np.argsort(np.asarray(similarity, dtype=np.float64), kind="stable")


def itc_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, tau: torch.Tensor | float, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. (3)-(4): symmetric cross-entropy of the softmax-normalised i2t and t2i cosine similarities."""
    i = F.normalize(image_emb, dim=-1)
    t = F.normalize(text_emb, dim=-1)
    logits = i @ t.t() / tau
    if targets is None:
        targets = torch.eye(len(i), device=logits.device)
    targets = targets.to(logits.device, logits.dtype)
    i2t = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(targets.t() * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


# ---------------------------------------------------------------------------------------------------
# Modules


class StatsEncoder(nn.Module):
    """The stats branch's encoder: standardize with the training cards' mean and sd (buffers, fitted by
    ``fit``), zero and flag what OCR did not read (NaN in), then a two-layer MLP to ``hidden``."""

    def __init__(self, n_fields: int, hidden: int = 64):
        super().__init__()
        self.n_fields, self.dim = int(n_fields), int(hidden)
        self.register_buffer("mean", torch.zeros(self.n_fields))
        self.register_buffer("scale", torch.ones(self.n_fields))
        self.net = nn.Sequential(
            nn.Linear(2 * self.n_fields, self.dim), nn.ReLU(), nn.Linear(self.dim, self.dim), nn.ReLU()
        )

    def fit(self, x: np.ndarray) -> None:
        """Mean and sd per entry over the rows given (the training cards), ignoring what was not read; an
        entry never read, or constant, keeps scale 1."""
        x = np.asarray(x, dtype=np.float64)
        seen = ~np.isnan(x)
        count = seen.sum(0)
        mean = np.where(count > 0, np.nansum(x, 0) / np.maximum(count, 1), 0.0)
        var = np.where(count > 1, np.nansum((x - mean) ** 2, 0) / np.maximum(count - 1, 1), 0.0)
        sd = np.sqrt(var)
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.scale.copy_(torch.as_tensor(np.where(sd > 1e-12, sd, 1.0), dtype=torch.float32))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 2 * n_fields]: the standardized values (0 where missing) and the missing-field mask."""
        missing = torch.isnan(x)
        z = torch.where(missing, torch.zeros_like(x), (x - self.mean) / self.scale)
        return torch.cat([z, missing.to(z.dtype)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))


class AlignmentHeads(nn.Module):
    """One linear projection per branch to ``proj_dim`` (the stats branch: its MLP encoder first) and the
    learnable temperature."""

    def __init__(
        self,
        dims: Mapping[str, int],
        proj_dim: int = 256,
        tau_init: float = 0.07,
        tau_min: float = 0.01,
        tau_max: float = 0.5,
        stats_hidden: int = 64,
    ):
        super().__init__()
        unknown = [m for m in dims if m not in BRANCHES]
        if unknown or len(dims) < 2:
            raise ConfigError(
                f"alignment needs features for at least two of {', '.join(BRANCHES)}; got {', '.join(dims) or 'none'}"
            )
        # Created in the paper's order (image, llm, vlm), then stats: a seed initialises the paper's three
        # projections as it did before the stats branch existed.
        self.branches = tuple(b for b in (*MODALITIES, "stats") if b in dims)
        self.dims = {m: int(dims[m]) for m in self.branches}
        self.proj_dim = int(proj_dim)
        self.stats_hidden = int(stats_hidden)
        self.stats = StatsEncoder(self.dims["stats"], self.stats_hidden) if "stats" in self.dims else None
        self.proj = nn.ModuleDict(
            {m: nn.Linear(self.stats_hidden if m == "stats" else self.dims[m], self.proj_dim) for m in self.branches}
        )
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau_init), dtype=torch.float32))
        self.log_tau_min = math.log(tau_min)
        self.log_tau_max = math.log(tau_max)

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.clamp(self.log_tau_min, self.log_tau_max).exp()

    def clamp_(self) -> None:
        with torch.no_grad():
            self.log_tau.clamp_(self.log_tau_min, self.log_tau_max)

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Aligned (L2-normalised) 256-d features of one branch."""
        if modality == "stats":
            x = self.stats(x)
        return F.normalize(self.proj[modality](x), dim=-1)

    def meta(self) -> dict[str, Any]:
        return {
            "dims": self.dims,
            "proj_dim": self.proj_dim,
            "tau_min": math.exp(self.log_tau_min),
            "tau_max": math.exp(self.log_tau_max),
            "stats_hidden": self.stats_hidden,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> AlignmentHeads:
        """Heads of the shape ``meta()`` describes (weights still to be loaded)."""
        return cls(
            meta["dims"],
            meta["proj_dim"],
            tau_min=meta["tau_min"],
            tau_max=meta["tau_max"],
            stats_hidden=meta.get("stats_hidden", 64),
        )

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> AlignmentHeads:
        """Rebuild heads from a stage checkpoint and ``meta()`` (e.g. for prediction)."""
        heads = cls.from_meta(meta)
        heads.load_state_dict(dict(state))
        return heads


def align_features(
    heads: AlignmentHeads, features: Mapping[str, np.ndarray], batch_size: int = 1024
) -> dict[str, np.ndarray]:
    """Project precomputed encoder features with trained heads: {branch: float32 [n, proj_dim]}."""
    heads.eval()
    device = next(heads.parameters()).device
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for m in heads.branches:
            x = np.asarray(features[m], dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != heads.dims[m]:
                raise DataError(
                    f"{m} features have shape {x.shape}; the alignment expects "
                    f"[n, {heads.dims[m]}] (was the same encoder used?)"
                )
            parts = [
                heads(m, torch.from_numpy(x[s : s + batch_size]).to(device)).cpu().numpy()
                for s in range(0, len(x), batch_size)
            ]
            out[m] = np.concatenate(parts) if parts else np.zeros((0, heads.proj_dim), np.float32)
    return out


# ---------------------------------------------------------------------------------------------------
# Feature sources: precomputed arrays, or encoders with raw inputs


class FixedFeatures:
    """Precomputed (frozen-encoder) features: rows of one array."""

    trainable = False

    def __init__(self, array: Any, device: str = "cpu"):
        arr = np.asarray(array, dtype=np.float32)
        if arr.ndim != 2:
            raise DataError(f"features must be a 2-d array [n, dim]; got shape {arr.shape}")
        self.array = arr
        self.tensor = torch.from_numpy(arr).to(device)
        self.dim = arr.shape[1]

    def __len__(self) -> int:
        return len(self.array)

    def get(self, idx: Sequence[int], train: bool) -> torch.Tensor:
        return self.tensor[torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.tensor.device)]

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def lr_key(self) -> str:
        return "fixed"


class EncoderFeatures:
    """An encoder (``asectl.backends.encoders``) and its raw inputs; trains when ``trainable``."""

    def __init__(self, encoder: Any, items: Sequence[Any], trainable: bool = True):
        self.encoder = encoder
        self.items = list(items)
        self.trainable = trainable
        self.dim = encoder.dim

    def __len__(self) -> int:
        return len(self.items)

    def get(self, idx: Sequence[int], train: bool) -> torch.Tensor:
        batch = [self.items[i] for i in idx]
        if train and self.trainable:
            return self.encoder.forward_train(batch).float()  # on the encoder's device
        return torch.from_numpy(self.encoder.encode(batch))

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.encoder.module.parameters()) if self.trainable else []

    def lr_key(self) -> str:
        return getattr(self.encoder, "family", "image")


def as_source(x: Any, device: str = "cpu") -> FixedFeatures | EncoderFeatures:
    if isinstance(x, (FixedFeatures, EncoderFeatures)):
        return x
    return FixedFeatures(x, device)


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass
class PFAStage:
    index: int  # 1-based; 0 for mode "none"
    fraction: float  # cumulative fraction of D_train
    train_indices: list[int]  # positions (in the full feature arrays) trained on
    pend_indices: list[int]  # D_pend: training positions not yet added (validation)
    added_indices: list[int]  # added at this stage, lowest self-similarity first
    added_similarity: list[float]  # their self-similarity when ranked
    epochs: int
    curve: list[dict[str, float]]  # per epoch: loss (L_total), loss_<branch> per aligned pair, lr, tau
    val_loss: float | None  # ITC L_total on D_pend; None when D_pend is empty
    val_loss_llm: float | None  # None also when the branch is off
    val_loss_vlm: float | None
    val_note: str | None
    tau: float
    checkpoint: dict[str, torch.Tensor]  # projections + log_tau (state dict, CPU)
    embeddings: dict[str, np.ndarray]  # aligned features of ALL samples after the stage
    updates: int = 0  # optimiser steps taken in this stage
    val_loss_stats: float | None = None  # the stats extension's ITC term on D_pend

    @property
    def n_train(self) -> int:
        return len(self.train_indices)

    def summary(self) -> dict[str, Any]:
        """JSON-ready record of the stage (no tensors, no embeddings)."""
        return {
            "stage": self.index,
            "fraction": self.fraction,
            "n_train": self.n_train,
            "n_pend": len(self.pend_indices),
            "epochs": self.epochs,
            "updates": self.updates,
            "tau": self.tau,
            "final_loss": self.curve[-1]["loss"] if self.curve else None,
            "val_loss": self.val_loss,
            "val_loss_llm": self.val_loss_llm,
            "val_loss_vlm": self.val_loss_vlm,
            "val_loss_stats": self.val_loss_stats,
            "val_note": self.val_note,
            "curve": self.curve,
        }


@dataclass
class PFAResult:
    mode: str
    stages: list[PFAStage]
    heads: AlignmentHeads  # final projections + temperature
    fractions: list[float]
    counts: list[int]
    seed: int
    config: dict[str, Any]
    train_indices: list[int]
    # Per training pair: the self-similarity stage 1 ranked by (progressive: after the ranking warm-up;
    # other modes: the initial projections).
    initial_similarity: list[float] = field(default_factory=list)
    rank_warmup: dict[str, Any] = field(default_factory=dict)  # epochs, updates, curve (progressive)
    plan: dict[str, Any] = field(default_factory=dict)  # plan_updates() for this run

    @property
    def embeddings(self) -> dict[str, np.ndarray]:
        return self.stages[-1].embeddings

    @property
    def updates(self) -> int:
        """Optimiser steps of the whole alignment, ranking warm-up included."""
        return self.rank_warmup.get("updates", 0) + sum(s.updates for s in self.stages)

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "branches": list(self.heads.branches),
            "fractions": self.fractions,
            "counts": self.counts,
            "n_train": len(self.train_indices),
            "tau": self.stages[-1].tau,
            "heads": self.heads.meta(),
            "config": self.config,
            "rank_warmup": self.rank_warmup,
            "updates": {
                "total": self.updates,
                "rank_warmup": self.rank_warmup.get("updates", 0),
                "stages": [s.updates for s in self.stages],
                "per_batch": self.plan.get("updates_per_batch"),
                "progressive_budget": self.plan.get("progressive_updates"),
            },
            "stages": [s.summary() for s in self.stages],
        }


# ---------------------------------------------------------------------------------------------------
# Training


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive batches; a trailing batch of one joins the previous (a 1-item batch has no negatives)."""
    out = [list(order[s : s + size]) for s in range(0, len(order), size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2].extend(out.pop())
    return out


def plan_updates(config: PFAConfig, n_train: int, n_pairs: int = 2) -> dict[str, Any]:
    """Every phase's epochs and batches, the optimiser steps, and the decay points, before training.

    Phases: ``{"stage", "n_pairs", "epochs", "batches", "last_epoch_batches"}``, stage 0 being the ranking
    warm-up. ``decay_after``: batch counts (cumulative, whole alignment) after which the rate is
    multiplied by ``lr_decay``. ``updates``: optimiser steps (one per aligned pair and batch with
    ``sequential`` order: two for the paper's pairs, three with the stats branch).
    ``progressive_updates``: what ``progressive`` with the same settings takes, the budget of ``direct``."""
    per_batch = n_pairs if config.align_order == "sequential" else 1
    n_batches = lambda m: len(_batches(range(m), config.batch_size))  # noqa: E731
    counts = stage_counts(n_train, list(config.strides))
    prog = [{"stage": 0, "n_pairs": n_train, "epochs": config.rank_warmup_epochs}]
    prog += [{"stage": k, "n_pairs": c, "epochs": config.epochs_per_stage} for k, c in enumerate(counts, 1)]
    prog_decays, done, stage_epochs = [], 0, 0
    for ph in prog:
        ph["batches"], ph["last_epoch_batches"] = ph["epochs"] * n_batches(ph["n_pairs"]), n_batches(ph["n_pairs"])
        for _ in range(ph["epochs"]):
            done += n_batches(ph["n_pairs"])
            if ph["stage"]:  # the warm-up runs at the initial rate
                stage_epochs += 1
                if stage_epochs % config.lr_decay_every == 0:
                    prog_decays.append(done)
    prog_batches = done
    if config.mode == "progressive":
        phases, decays = prog, prog_decays
    elif config.mode == "none":
        phases, decays = [], []
    elif config.direct_epochs is not None:
        nb = n_batches(n_train)
        phases = [
            {
                "stage": 1,
                "n_pairs": n_train,
                "epochs": config.direct_epochs,
                "batches": config.direct_epochs * nb,
                "last_epoch_batches": nb,
            }
        ]
        decays = [e * nb for e in range(config.lr_decay_every, config.direct_epochs + 1, config.lr_decay_every)]
    else:
        nb = n_batches(n_train)
        full, rest = divmod(prog_batches, nb)
        phases = [
            {
                "stage": 1,
                "n_pairs": n_train,
                "epochs": full + (rest > 0),
                "batches": prog_batches,
                "last_epoch_batches": rest or nb,
            }
        ]
        decays = prog_decays
    batches = sum(ph["batches"] for ph in phases)
    return {
        "mode": config.mode,
        "phases": phases,
        "decay_after": decays,
        "batches": batches,
        "updates_per_batch": per_batch,
        "updates": batches * per_batch,
        "progressive_updates": prog_batches * per_batch,
    }


class _Aligner:
    """Holds sources, heads, optimiser and scheduler; runs epochs and evaluations."""

    def __init__(
        self,
        sources: dict[str, Any],
        config: PFAConfig,
        seed: int,
        device: str,
        encoder_lrs: Mapping[str, float] | None,
        decay_after: Sequence[int] = (),
        train: Sequence[int] = (),
        stats_hidden: int = 64,
    ):
        self.sources = sources
        self.config = config
        self.device = device
        self.anchor, self.pairs = alignment_pairs(list(sources))
        self.heads = AlignmentHeads(
            {m: s.dim for m, s in sources.items()},
            config.proj_dim,
            config.tau_init,
            config.tau_min,
            config.tau_max,
            stats_hidden,
        ).to(device)
        if "stats" in sources:  # standardization from the training cards only
            self.heads.stats.fit(sources["stats"].array[np.asarray(train, dtype=np.int64)])
        param_groups = [{"params": list(self.heads.parameters()), "lr": config.lr}]
        seen = {id(p) for p in self.heads.parameters()}
        for m in self.heads.branches:
            params = [p for p in sources[m].parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                lr = (encoder_lrs or {}).get(sources[m].lr_key(), config.lr)
                param_groups.append({"params": params, "lr": lr})
        self.trainable_encoders = len(param_groups) > 1
        self.optimizer = torch.optim.AdamW(
            param_groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
        )
        # Step decay by batch count (plan_updates), so a direct run can decay where progressive does.
        self.decay_after = set(decay_after)
        self.batches = 0
        self.updates = 0  # optimiser steps so far
        self.epoch = 0

    def _pair_loss(self, modality: str, idx: list[int], train: bool) -> torch.Tensor:
        img = self.heads(self.anchor, self.sources[self.anchor].get(idx, train).to(self.device))
        txt = self.heads(modality, self.sources[modality].get(idx, train).to(self.device))
        return itc_loss(img, txt, self.heads.tau)

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.heads.clamp_()
        self.updates += 1

    def train_epoch(
        self, indices: Sequence[int], generator: torch.Generator, max_batches: int | None = None
    ) -> dict[str, float]:
        """One pass over ``indices`` in a seeded random order (only its first ``max_batches`` batches
        when given: the cut-short last epoch of a direct run)."""
        self.heads.train()
        perm = torch.randperm(len(indices), generator=generator).tolist()
        order = [indices[p] for p in perm]
        totals = {m: 0.0 for m in self.pairs}
        count = 0
        lr = self.optimizer.param_groups[0]["lr"]
        for idx in _batches(order, self.config.batch_size)[:max_batches]:
            if self.config.align_order == "sequential":
                for m in self.pairs:  # first (I, LLM), then (I, VLM), then (I, stats)
                    loss = self._pair_loss(m, idx, train=True)
                    self._step(loss)
                    totals[m] += loss.item() * len(idx)
            else:
                losses = {m: self._pair_loss(m, idx, train=True) for m in self.pairs}
                self._step(sum(losses.values()))
                for m in self.pairs:
                    totals[m] += losses[m].item() * len(idx)
            count += len(idx)
            self.batches += 1
            if self.batches in self.decay_after:
                for group in self.optimizer.param_groups:
                    group["lr"] *= self.config.lr_decay
        self.epoch += 1
        losses = {f"loss_{m}": t / max(count, 1) for m, t in totals.items()}
        return {
            "epoch": self.epoch,
            "loss": sum(losses.values()),
            **losses,
            "lr": lr,
            "tau": float(self.heads.tau.item()),
            "pairs": count,
            "updates": self.updates,
        }

    @torch.no_grad()
    def evaluate(self, indices: Sequence[int]) -> tuple[float, dict[str, float]] | None:
        """ITC losses on ``indices`` (sorted, batches of the training batch size), sample-weighted: the
        total and one per aligned pair."""
        if not indices:
            return None
        self.heads.eval()
        totals = {m: 0.0 for m in self.pairs}
        for idx in _batches(sorted(indices), self.config.batch_size):
            for m in self.pairs:
                totals[m] += self._pair_loss(m, idx, train=False).item() * len(idx)
        per = {m: t / len(indices) for m, t in totals.items()}
        return sum(per.values()), per

    @torch.no_grad()
    def embed(self, indices: Sequence[int] | None = None, batch: int = 256) -> dict[str, np.ndarray]:
        self.heads.eval()
        n = len(self.sources[self.anchor])
        indices = list(range(n)) if indices is None else list(indices)
        out = {}
        for m in self.heads.branches:
            parts = [
                self.heads(m, self.sources[m].get(indices[s : s + batch], train=False).to(self.device)).cpu().numpy()
                for s in range(0, len(indices), batch)
            ]
            out[m] = np.concatenate(parts) if parts else np.zeros((0, self.heads.proj_dim), np.float32)
        return out

    def similarity(self, indices: Sequence[int]) -> np.ndarray:
        e = self.embed(indices)
        return self_similarity(e[self.anchor], *(e[m] for m in self.pairs))

    def checkpoint(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.heads.state_dict().items()}


def train_pfa(
    features: Mapping[str, Any],
    config: PFAConfig | None = None,
    seed: int = 0,
    *,
    train_index: Sequence[int] | None = None,
    device: str = "cpu",
    encoder_lrs: Mapping[str, float] | None = None,
    stats_hidden: int = 64,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> PFAResult:
    """Align image, LLM-text and VLM-text features (PFA), and the stats vectors when given (the
    extension above). Deterministic for a given seed.

    ``features``: {branch: a float array [N, d]} (frozen features, quick profile; "stats": raw record
    vectors, NaN where not read), or an ``EncoderFeatures`` (encoder + raw inputs; fine-tuned with the
    heads, paper profile), for two or more of ``BRANCHES`` (the paper: image, llm, vlm).
    ``train_index``: positions of D_train among the N samples (default: all); embeddings are returned
    for all N (test samples included) after every stage. ``encoder_lrs``: {"image": lr, "text": lr}
    for trainable encoders. ``on_epoch(stage_index, curve_row)`` reports progress (stage 0: the
    ranking warm-up). The optimiser steps follow ``plan_updates(config, len(train_index))``."""
    config = config or PFAConfig()
    config.validate()
    unknown = [m for m in features if m not in BRANCHES]
    if unknown or len(features) < 2:
        raise ConfigError(
            f"alignment needs features for at least two of {', '.join(BRANCHES)}; got {', '.join(features) or 'none'}"
        )
    sources = {m: as_source(features[m], device) for m in BRANCHES if m in features}
    if "stats" in sources and not isinstance(sources["stats"], FixedFeatures):
        raise ConfigError("the stats branch takes the record vectors as an array")
    n = len(next(iter(sources.values())))
    if any(len(s) != n for s in sources.values()):
        raise DataError(
            "every branch's features must have one row per sample; got "
            + ", ".join(f"{m}={len(s)}" for m, s in sources.items())
        )
    train = list(range(n)) if train_index is None else [int(i) for i in train_index]
    if not train:
        raise DataError("PFA needs at least one training sample")
    if len(set(train)) != len(train) or min(train) < 0 or max(train) >= n:
        raise DataError(f"train_index must hold distinct positions in 0..{n - 1}")

    fractions = list(config.strides) if config.mode == "progressive" else [1.0]
    counts = stage_counts(len(train), fractions)
    plan = plan_updates(config, len(train), len(alignment_pairs(list(sources))[1]))
    warmup: dict[str, Any] = {}
    with fork_rng(seed, device):
        aligner = _Aligner(sources, config, seed, device, encoder_lrs, plan["decay_after"], train, stats_hidden)
        generator = torch.Generator().manual_seed(seed)
        if config.mode == "progressive":
            # Rank in a space that means something: projections warmed with ITC on all of D_train.
            curve = _run_epochs(aligner, train, config.rank_warmup_epochs, generator, 0, on_epoch)
            warmup = {"epochs": config.rank_warmup_epochs, "updates": aligner.updates, "curve": curve}
        initial_sim = aligner.similarity(train)
        stages: list[PFAStage] = []
        if config.mode == "none":
            val = aligner.evaluate(train)
            stages.append(
                _stage_record(
                    aligner,
                    0,
                    0.0,
                    [],
                    train,
                    [],
                    [],
                    0,
                    [],
                    val,
                    "mode none: projections untrained; loss over all of D_train",
                    0,
                )
            )
        elif config.mode == "direct":
            phase = plan["phases"][0]
            curve = _run_epochs(
                aligner, train, phase["epochs"], generator, 1, on_epoch, last_epoch_batches=phase["last_epoch_batches"]
            )
            stages.append(
                _stage_record(
                    aligner,
                    1,
                    1.0,
                    train,
                    [],
                    train,
                    [float(s) for s in initial_sim],
                    len(curve),
                    curve,
                    None,
                    "direct: all training data at once; D_pend empty",
                    aligner.updates,
                )
            )
        else:
            order = [train[i] for i in rank_lowest_first(initial_sim)]
            order_sim = {train[i]: float(initial_sim[i]) for i in range(len(train))}
            current: list[int] = []
            for k, (frac, count) in enumerate(zip(fractions, counts), start=1):
                taken = set(current)
                pending = [i for i in order if i not in taken]
                if config.rerank_each_stage and k > 1 and pending:
                    sim = aligner.similarity(pending)
                    pending = [pending[i] for i in rank_lowest_first(sim)]
                    order_sim = {p: float(s) for p, s in zip(pending, np.sort(sim, kind="stable"))}
                added = pending[: count - len(current)]
                current = current + added
                rest = pending[len(added) :]
                before = aligner.updates
                curve = _run_epochs(aligner, current, config.epochs_per_stage, generator, k, on_epoch)
                val = aligner.evaluate(rest)
                note = None if rest else "D_pend is empty at the last stage: no validation loss"
                stages.append(
                    _stage_record(
                        aligner,
                        k,
                        frac,
                        current,
                        rest,
                        added,
                        [order_sim[a] for a in added],
                        config.epochs_per_stage,
                        curve,
                        val,
                        note,
                        aligner.updates - before,
                    )
                )
    return PFAResult(
        mode=config.mode,
        stages=stages,
        heads=aligner.heads,
        fractions=fractions,
        counts=counts if config.mode != "none" else [0],
        seed=seed,
        config=_config_dict(config),
        train_indices=train,
        initial_similarity=[float(s) for s in initial_sim],
        rank_warmup=warmup,
        plan=plan,
    )


def _run_epochs(
    aligner: _Aligner,
    indices: list[int],
    epochs: int,
    generator: torch.Generator,
    stage: int,
    on_epoch,
    last_epoch_batches: int | None = None,
) -> list[dict[str, float]]:
    curve = []
    for e in range(epochs):
        row = aligner.train_epoch(indices, generator, last_epoch_batches if e == epochs - 1 else None)
        curve.append(row)
        if on_epoch:
            on_epoch(stage, row)
    return curve


def _stage_record(
    aligner: _Aligner,
    index: int,
    fraction: float,
    train: list[int],
    pend: list[int],
    added: list[int],
    added_sim: list[float],
    epochs: int,
    curve,
    val,
    note,
    updates: int,
) -> PFAStage:
    return PFAStage(
        index=index,
        fraction=fraction,
        train_indices=list(train),
        pend_indices=list(pend),
        added_indices=list(added),
        added_similarity=list(added_sim),
        epochs=epochs,
        curve=curve,
        val_loss=val[0] if val else None,
        val_loss_llm=val[1].get("llm") if val else None,
        val_loss_vlm=val[1].get("vlm") if val else None,
        val_loss_stats=val[1].get("stats") if val else None,
        val_note=note,
        tau=float(aligner.heads.tau.item()),
        checkpoint=aligner.checkpoint(),
        embeddings=aligner.embed(),
        updates=updates,
    )


def _config_dict(config: PFAConfig) -> dict[str, Any]:
    import dataclasses

    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------
# Paper profile: supervised warm-up of the encoders before alignment


def warmup_encoders(
    sources: Mapping[str, EncoderFeatures],
    labels: Sequence[int],
    *,
    epochs: int,
    seed: int = 0,
    train_index: Sequence[int] | None = None,
    batch_size: int = 10,
    head_lr: float = 1e-2,
    encoder_lrs: Mapping[str, float] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    device: str = "cpu",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune each encoder for ``epochs`` with a temporary linear classifier on the training labels.

    The paper warms up "those three encoders" for 30 epochs before alignment without naming the
    objective; this uses the task's own cross-entropy (one linear head per encoder, discarded after),
    which moves each encoder towards features that separate the classes. The encoders are changed in
    place. Returns the per-epoch mean loss of each encoder."""
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    n_classes = int(labels_t.max().item()) + 1
    n = len(labels_t)
    train = list(range(n)) if train_index is None else [int(i) for i in train_index]
    lrs = {"image": 1e-4, "text": 2e-5, **(encoder_lrs or {})}
    history = []
    with fork_rng(seed, device):
        heads = nn.ModuleDict({m: nn.Linear(s.dim, n_classes) for m, s in sources.items()}).to(device)
        groups = [{"params": list(heads.parameters()), "lr": head_lr}]
        seen: set[int] = set()
        for s in sources.values():
            params = [p for p in s.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "lr": lrs.get(s.lr_key(), head_lr)})
        opt = torch.optim.AdamW(groups, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(1, epochs + 1):
            heads.train()
            perm = torch.randperm(len(train), generator=gen).tolist()
            totals = {m: 0.0 for m in sources}
            for idx in _batches([train[p] for p in perm], batch_size):
                y = labels_t[idx].to(device)
                losses = {
                    m: F.cross_entropy(heads[m](s.get(idx, train=True).to(device)), y) for m, s in sources.items()
                }
                opt.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                opt.step()
                for m, loss in losses.items():
                    totals[m] += loss.item() * len(idx)
            row = {"epoch": epoch, **{f"loss_{m}": t / len(train) for m, t in totals.items()}}
            history.append(row)
            if on_epoch:
                on_epoch(row)
    for s in sources.values():
        s.encoder.module.eval()
    return history
