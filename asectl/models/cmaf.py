"""Cross-modality attention fusion (CMAF), section 3.4 of the paper, and the classifier on top.

Eq. (6)-(8): Q = aligned VLM features, K = aligned LLM features, V = aligned image features;
multi-head cross attention ``A_i = softmax(Q_i K_i^T / sqrt(r))``, ``C = concat_i(A_i V_i)``,
``W = sigmoid(Proj(C))`` with 3 channels, ``Z_fused = W_1 Q + W_2 K + W_3 V``, then an MLP and
cross-entropy.

From maps to vectors. The paper's Proj is a 1x1 convolution on ``b x c x h x w`` maps and W is
``b x 3 x h x w``: attention runs over the h*w positions and every position gets its own three weights.
Our aligned features are 256-d vectors, so each vector is read as a sequence of ``t`` tokens of
``256 / t`` channels (default 8 tokens of 32): the tokens play the positions, a 1x1 convolution becomes
a Linear applied to every token with shared weights, attention runs over the t tokens (t x t per head),
and W is ``b x t x 3``, broadcast over the channels of each token. With t = 1 the attention would be
trivial (a softmax over one key) and W one scalar triple per sample; t > 1 keeps the paper's
"one weight triple per position" structure and lets different parts of the aligned space weigh the
modalities differently.

Variants (the paper's Table 5):

* ``cmaf``: as above, W through a sigmoid, each weight in (0, 1).
* ``cmaf-nosigmoid``: the same network with the sigmoid removed: W is the raw linear projection of C
  (unbounded, may be negative), the literal "w/o sigmoid" ablation.
* ``concat``: direct concatenation [Q, K, V] (768-d) into the same MLP, no fusion network.

Attention (``fusion.attention``):

* ``chunks`` (the above; the earlier tables): Q, K, V are the VLM, LLM and image vectors, each cut into
  ``tokens`` chunks, so attention runs across the chunks of one vector, never across modalities. It
  needs exactly those three branches.
* ``tokens``: each enabled branch (vlm, llm, image, stats; two or more) is one token, its aligned
  256-d vector plus a learned branch embedding. Q, K and V are per-token projections of the same M
  tokens (attention across modalities, ``M x M`` per head), ``C`` the attended values of each token,
  and W of Eq. (7) generalised to M modalities is one gate per modality, ``W = sigmoid(Proj(C))`` of
  shape ``b x M`` (raw with ``cmaf-nosigmoid``); Eq. (8) becomes ``Z_fused = sum_m W_m X_m``. This
  extends the paper, whose Eq. (6)-(8) fix three modalities with fixed roles.

``train_fusion`` takes aligned features {"vlm", "llm", "image"} and labels (class names or indices);
``task="binary"`` maps the five classes to normal vs defective first. With ``projections = "end-to-end"``
it takes the encoder features and the alignment's heads instead, and the model trains its own copy of the
heads with two adapters (asectl.models.adapters); such a model reads encoder features wherever it is used.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asectl.errors import ConfigError, DataError
from asectl.models.seeding import fork_rng
from asectl.models.train_config import FusionConfig

# Q, K, V of Eq. (6), in the order of W's channels in Eq. (8); then the stats branch (token attention and
# concatenation take any two or more of them, in this order).
FUSION_INPUTS = ("vlm", "llm", "image")
FUSION_ORDER = (*FUSION_INPUTS, "stats")


def ordered_inputs(branches: Any) -> tuple[str, ...]:
    """The fusion's inputs among ``branches``, in ``FUSION_ORDER``."""
    return tuple(m for m in FUSION_ORDER if m in branches)


class FusionModel(nn.Module):
    """CMAF (or plain concatenation) + MLP classifier over aligned features of ``inputs`` (the branches,
    in ``FUSION_ORDER``); ``attention`` chunks (Q = vlm, K = llm, V = image) or tokens (one per input)."""

    def __init__(
        self,
        dim: int,
        n_classes: int,
        variant: str = "cmaf",
        tokens: int = 8,
        heads: int = 4,
        reduced_dim: int = 16,
        mlp_hidden: int = 128,
        dropout: float = 0.1,
        attention: str = "chunks",
        inputs: Sequence[str] = FUSION_INPUTS,
    ):
        super().__init__()
        if variant not in ("cmaf", "cmaf-nosigmoid", "concat"):
            raise ConfigError(f"fusion variant '{variant}': use cmaf, cmaf-nosigmoid or concat")
        if attention not in ("chunks", "tokens"):
            raise ConfigError(f"fusion attention '{attention}': use chunks or tokens")
        self.inputs = ordered_inputs(inputs)
        if len(self.inputs) < 2 or len(self.inputs) != len(inputs):
            raise ConfigError(f"fusion inputs {list(inputs)}: give two or more of {', '.join(FUSION_ORDER)}")
        if variant != "concat" and attention == "chunks" and self.inputs != FUSION_INPUTS:
            raise ConfigError(
                f"fusion attention chunks attends from VLM (Q) and LLM (K) to image (V) and needs "
                f"exactly those branches (got {', '.join(self.inputs)}); use attention tokens "
                "or the concat fusion"
            )
        if attention == "chunks" and dim % tokens:
            raise ConfigError(f"fusion tokens {tokens}: must divide the feature dimension {dim}")
        self.dim, self.n_classes, self.variant, self.attention = int(dim), int(n_classes), variant, attention
        self.tokens = int(tokens) if attention == "chunks" else len(self.inputs)
        self.heads, self.reduced_dim = int(heads), int(reduced_dim)
        self.channels = self.dim // self.tokens if attention == "chunks" else self.dim
        # Aligned features are unit vectors (components ~ 1/sqrt(dim)); scaled by sqrt(dim) every
        # component is of order 1, so the fusion weights and the MLP do not have to grow to undo the scale.
        self.input_scale = math.sqrt(self.dim)
        hr = self.heads * self.reduced_dim
        if variant != "concat":
            # Proj. of Eq. (6)-(7): a per-token Linear == 1x1 convolution over the token "positions".
            self.proj_q = nn.Linear(self.channels, hr)
            self.proj_k = nn.Linear(self.channels, hr)
            self.proj_v = nn.Linear(self.channels, hr)
            self.proj_c = nn.Linear(hr, 3 if attention == "chunks" else 1)
            if attention == "tokens":  # which branch a token comes from: the projections are shared
                self.branch_embedding = nn.Parameter(torch.zeros(len(self.inputs), self.dim))
        in_dim = self.dim * len(self.inputs) if variant == "concat" else self.dim
        # mlp_hidden 0: a linear classifier (multinomial logistic regression on the fused vector), which
        # over-fits a few hundred cards less than the hidden layer does (docs/benchmarks.md).
        self.mlp = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_classes))
            if mlp_hidden == 0
            else nn.Sequential(
                nn.Linear(in_dim, mlp_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp_hidden, n_classes)
            )
        )
        self.hparams = {
            "dim": self.dim,
            "n_classes": self.n_classes,
            "variant": variant,
            "tokens": tokens,
            "heads": heads,
            "reduced_dim": reduced_dim,
            "mlp_hidden": mlp_hidden,
            "dropout": dropout,
            "attention": attention,
            "inputs": list(self.inputs),
        }
        # Trained end to end: this model's own projection heads and adapters (asectl.models.adapters), and
        # it reads encoder features; None: it reads the alignment's aligned features.
        self.projections: nn.Module | None = None

    def _tok(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.tokens, self.channels) * self.input_scale

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.reduced_dim).transpose(1, 2)  # b, h, t, r

    def _attend(self, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
        """Eq. (6)-(7): multi-head attention of query tokens over key tokens, then Proj; [b, t, channels of W]."""
        qh = self._split_heads(self.proj_q(qt))
        kh = self._split_heads(self.proj_k(kt))
        vh = self._split_heads(self.proj_v(vt))
        attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(self.reduced_dim), dim=-1)
        c = (attn @ vh).transpose(1, 2).reshape(qt.shape[0], qt.shape[1], self.heads * self.reduced_dim)
        w = self.proj_c(c)
        return torch.sigmoid(w) if self.variant == "cmaf" else w

    def _modality_tokens(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(xs, dim=1) * self.input_scale  # [b, M, dim]

    def fusion_weights(self, *xs: torch.Tensor) -> torch.Tensor:
        """W of Eq. (7): chunks [b, tokens, 3] (channels: VLM, LLM, image); tokens [b, M] (one gate per
        input, in ``inputs`` order)."""
        if self.variant == "concat":
            raise ConfigError("the concat variant has no fusion weights")
        if self.attention == "tokens":
            t = self._modality_tokens(xs) + self.branch_embedding
            return self._attend(t, t, t)[..., 0]
        q, k, v = xs
        return self._attend(self._tok(q), self._tok(k), self._tok(v))

    def fuse(self, *xs: torch.Tensor) -> torch.Tensor:
        """Z_fused of Eq. (8) (or the concatenation): [b, dim] or [b, M*dim]."""
        if self.variant == "concat":
            return torch.cat(xs, dim=-1) * self.input_scale
        w = self.fusion_weights(*xs)
        if self.attention == "tokens":
            return (w.unsqueeze(-1) * self._modality_tokens(xs)).sum(1)
        q, k, v = xs
        z = w[..., 0:1] * self._tok(q) + w[..., 1:2] * self._tok(k) + w[..., 2:3] * self._tok(v)
        return z.reshape(q.shape[0], self.dim)

    def project(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This model's inputs: encoder features through its own heads and adapters (trained end to end),
        or the aligned features as given."""
        if self.projections is None:
            return list(xs)
        return [self.projections(m, x) for m, x in zip(self.inputs, xs)]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.fuse(*self.project(xs)))


def fusion_inputs(model: FusionModel) -> tuple[str, ...]:
    """The modalities a fold model takes, in the order of its ``forward`` arguments (an export names its
    graph's inputs with them)."""
    return tuple(model.inputs)


@dataclasses.dataclass
class FusionBundle:
    """What prediction needs besides the weights: classes and the task's label mapping."""

    classes: list[str]
    task: str
    hparams: dict[str, Any]


def _inputs(features: Mapping[str, Any] | Sequence[Any], inputs: Sequence[str] | None = None) -> list[np.ndarray]:
    """The aligned feature arrays of ``inputs`` (default: every fusion input present), in order."""
    if isinstance(features, Mapping):
        inputs = ordered_inputs(features) if inputs is None else tuple(inputs)
        missing = [m for m in inputs if m not in features]
        if missing or len(inputs) < 2:
            raise DataError(
                f"fusion needs aligned features for {', '.join(inputs or FUSION_INPUTS)}; "
                f"missing {missing or 'two or more branches'}"
            )
        arrs = [np.asarray(features[m], dtype=np.float32) for m in inputs]
    else:
        arrs = [np.asarray(a, dtype=np.float32) for a in features]
        if len(arrs) < 2:
            raise DataError("fusion needs two or more feature arrays (vlm, llm, image, stats)")
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1 or arrs[0].ndim != 2:
        raise DataError(f"the fusion's features must be 2-d arrays of one shape; got {[a.shape for a in arrs]}")
    return arrs


def _encoder_inputs(features: Mapping[str, Any], inputs: Sequence[str], dims: Mapping[str, int]) -> list[np.ndarray]:
    """The encoder feature arrays of ``inputs`` for a model that projects them itself (trained end to end),
    checked against its heads' input widths."""
    missing = [m for m in inputs if m not in features or m not in dims]
    if missing:
        raise DataError(
            f"fusion trained end to end needs encoder features and projection heads for "
            f"{', '.join(inputs)}; missing {missing}"
        )
    arrs = [np.asarray(features[m], dtype=np.float32) for m in inputs]
    for m, a in zip(inputs, arrs):
        if a.ndim != 2 or a.shape[1] != dims[m]:
            raise DataError(
                f"{m} features have shape {a.shape}; the projection heads read [n, {dims[m]}] "
                "(aligned features where encoder features belong?)"
            )
    if len({len(a) for a in arrs}) != 1:
        raise DataError(f"the fusion's features need one row per sample; got {[len(a) for a in arrs]}")
    return arrs


def model_inputs(model: FusionModel, features: Mapping[str, Any] | Sequence[Any]) -> list[np.ndarray]:
    """The arrays ``model`` reads, in its input order: encoder features for a model trained end to end,
    else aligned features of its width."""
    if model.projections is not None:
        return _encoder_inputs(features, model.inputs, model.projections.dims)
    xs = _inputs(features, model.inputs) if isinstance(features, Mapping) else _inputs(features)
    if xs[0].shape[1] != model.dim:
        raise DataError(f"features are {xs[0].shape[1]}-d; this fusion model expects {model.dim}-d")
    return xs


def map_labels(
    labels: Sequence[Any], task: str = "multiclass", classes: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Class names (or indices with ``classes``) -> (indices, classes). Binary: normal vs defective."""
    from asectl.domain.dataset import binary_label, order_labels

    labels = list(labels)
    if labels and all(isinstance(x, (int, np.integer)) for x in labels):
        if classes is None:
            classes = [str(i) for i in range(int(max(labels)) + 1)]
        if task == "binary":
            labels = [classes[int(x)] for x in labels]
        else:
            idx = np.asarray(labels, dtype=np.int64)
            if idx.min() < 0 or idx.max() >= len(classes):
                raise DataError(f"label index out of range for {len(classes)} classes")
            return idx, list(classes)
    names = [str(x) for x in labels]
    if task == "binary":
        names = [binary_label(x) for x in names]
        classes = ["normal", "defective"]
    elif classes is None:
        classes = order_labels(names)
    classes = list(classes)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} are not among the classes {classes}")
    lookup = {c: i for i, c in enumerate(classes)}
    return np.asarray([lookup[x] for x in names], dtype=np.int64), classes


def train_fusion(
    features: Mapping[str, Any],
    labels: Sequence[Any],
    config: FusionConfig | None = None,
    seed: int = 0,
    *,
    classes: Sequence[str] | None = None,
    val_features: Mapping[str, Any] | None = None,
    val_labels: Sequence[Any] | None = None,
    device: str = "cpu",
    heads: Any = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[FusionModel, dict[str, Any]]:
    """Train CMAF (or a variant) + MLP with cross-entropy. Deterministic for a given seed.

    ``features``: {"vlm", "llm", "image"} (and "stats", or any two or more of them with
    ``config.attention = "tokens"`` or concat) -> float arrays [n, d] (aligned features). With
    ``config.projections = "end-to-end"`` they are the encoder features instead, and ``heads`` the
    alignment's ``AlignmentHeads``: a copy of them with two adapters trains with the fusion and becomes the
    model's ``projections`` (asectl.models.adapters); the ``heads`` given are left unchanged.
    ``labels``: class names (or indices into ``classes``); ``config.task="binary"`` maps to
    normal/defective. Returns (model, history); ``model.bundle`` holds classes and task, and history
    has one row per epoch (loss, accuracy, lr, and val_loss/val_accuracy when validation data is given)."""
    config = config or FusionConfig()
    inputs = ordered_inputs(features)
    missing = [m for m in FUSION_INPUTS if m not in inputs]
    if config.variant != "concat" and config.attention == "chunks" and missing:
        raise DataError(f"chunk attention needs aligned features for {', '.join(FUSION_INPUTS)}; missing {missing}")
    end_to_end = config.projections == "end-to-end"
    if end_to_end and heads is None:
        raise ConfigError("fusion.projections = end-to-end trains the alignment's projection heads: give them")
    read = (lambda f: _encoder_inputs(f, inputs, heads.dims)) if end_to_end else (lambda f: _inputs(f, inputs))
    xs = read(features)
    dim = heads.proj_dim if end_to_end else xs[0].shape[1]
    config.validate(dim)
    y, classes = map_labels(labels, config.task, classes)
    if len(y) != len(xs[0]):
        raise DataError(f"{len(xs[0])} feature rows but {len(y)} labels")
    if len(classes) < 2:
        raise DataError(f"fusion training needs at least two classes; got {classes}")
    val = None
    if val_features is not None and val_labels is not None:
        vxs = [torch.from_numpy(a).to(device) for a in read(val_features)]
        vy, _ = map_labels(val_labels, config.task, classes)
        val = (vxs, torch.from_numpy(vy).to(device))
    weight = None
    if config.class_weight == "balanced":
        counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
        w = np.where(counts > 0, len(y) / (len(classes) * np.maximum(counts, 1)), 0.0)
        weight = torch.tensor(w, dtype=torch.float32, device=device)
    txs = [torch.from_numpy(a).to(device) for a in xs]
    ty = torch.from_numpy(y).to(device)
    history: dict[str, Any] = {
        "classes": classes,
        "task": config.task,
        "variant": config.variant,
        "attention": config.attention,
        "projections": config.projections,
        "inputs": list(inputs),
        "seed": seed,
        "n_train": int(len(y)),
        "epochs": [],
    }
    if config.resolved_classifier() == "logistic":
        return _fit_logistic(xs, y, classes, config, inputs, dim, history, on_epoch), history
    with fork_rng(seed, device):
        model = FusionModel(
            dim,
            len(classes),
            config.variant,
            config.tokens,
            config.heads,
            config.reduced_dim,
            config.mlp_hidden,
            config.dropout,
            config.attention,
            inputs,
        ).to(device)
        params: Any = model.parameters()
        if end_to_end:
            import copy

            from asectl.models.adapters import AdaptedHeads

            params = [{"params": list(model.parameters())}]  # first group: the fusion's lr in the history
            model.projections = AdaptedHeads(copy.deepcopy(heads), config.adapter_dim).to(device)
            params += [
                {"params": model.projections.adapter_parameters()},
                {"params": model.projections.head_parameters(), "lr": config.projections_lr},
            ]
        opt = torch.optim.AdamW(
            params, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.lr_decay_every, gamma=config.lr_decay)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(1, config.epochs + 1):
            model.train()
            lr = opt.param_groups[0]["lr"]
            perm = torch.randperm(len(y), generator=gen)
            total, correct = 0.0, 0
            for s in range(0, len(y), config.batch_size):
                idx = perm[s : s + config.batch_size].to(device)
                logits = model(*(t[idx] for t in txs))
                loss = F.cross_entropy(logits, ty[idx], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                correct += int((logits.argmax(1) == ty[idx]).sum().item())
            sched.step()
            row: dict[str, float] = {"epoch": epoch, "loss": total / len(y), "accuracy": correct / len(y), "lr": lr}
            if val is not None:
                model.eval()
                with torch.no_grad():
                    vlogits = model(*val[0])
                    row["val_loss"] = float(F.cross_entropy(vlogits, val[1]).item())
                    row["val_accuracy"] = float((vlogits.argmax(1) == val[1]).float().mean().item())
            history["epochs"].append(row)
            if on_epoch:
                on_epoch(row)
    model.eval()
    model.bundle = FusionBundle(classes=list(classes), task=config.task, hparams=dict(model.hparams))
    return model, history


def _fit_logistic(
    xs: Sequence[np.ndarray],
    y: np.ndarray,
    classes: list[str],
    config: FusionConfig,
    inputs: Sequence[str],
    dim: int,
    history: dict[str, Any],
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> FusionModel:
    """``fusion.classifier = logistic``: a multinomial logistic regression with an L2 penalty
    (``fusion.logistic_c``) fitted exactly by L-BFGS (scikit-learn) on the standardized concatenation the
    concat fusion forms, then written into the fusion model's linear classifier with the standardization
    folded in, so prediction, export and calibration use it like any fusion model. Deterministic (no
    sampling). The hidden layer's AdamW training over-fits a few hundred cards (train accuracy 1.0):
    bench/choose_classifier.py compares the two on held-out training folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model = FusionModel(
        dim, len(classes), "concat", config.tokens, config.heads, config.reduced_dim, 0, 0.0, config.attention, inputs
    )
    with torch.no_grad():
        fused = model.fuse(*(torch.from_numpy(a) for a in xs))
    z = fused.double().numpy()
    scaler = StandardScaler().fit(z)
    present = np.unique(y)
    lr = LogisticRegression(
        C=config.logistic_c, max_iter=5000, class_weight="balanced" if config.class_weight == "balanced" else None
    )
    lr.fit(scaler.transform(z), y)
    coef = np.zeros((len(classes), z.shape[1]))
    bias = np.full(len(classes), -1e4)  # a class without training cards is never predicted
    if len(present) == 2:  # scikit-learn keeps one row for two classes
        coef[present[1]], bias[present[0]], bias[present[1]] = lr.coef_[0], 0.0, lr.intercept_[0]
    else:
        coef[present], bias[present] = lr.coef_, lr.intercept_
    weight = coef / scaler.scale_
    with torch.no_grad():
        linear = model.mlp[-1]
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias - weight @ scaler.mean_))
    model.eval()
    with torch.no_grad():
        logits = model.mlp(fused).double()  # the fused vectors above, through the fitted layer
    row = {
        "epoch": 1,
        "loss": float(F.cross_entropy(logits, torch.from_numpy(y)).item()),
        "accuracy": float((logits.argmax(1).numpy() == y).mean()),
        "lr": 0.0,
    }
    history["epochs"].append(row)
    history["classifier"] = {"kind": "logistic", "C": config.logistic_c, "iterations": int(np.max(lr.n_iter_))}
    if on_epoch:
        on_epoch(row)
    model.bundle = FusionBundle(classes=list(classes), task=config.task, hparams=dict(model.hparams))
    return model


def _batched(
    model: FusionModel,
    features: Mapping[str, Any],
    fn: Callable[..., torch.Tensor],
    tail_shape: tuple[int, ...],
    batch_size: int,
) -> np.ndarray:
    """Run ``fn(*inputs)`` in eval mode over the samples in batches; [n, ...] float32 array."""
    xs = model_inputs(model, features)
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(xs[0]), batch_size):
            args = [torch.from_numpy(a[s : s + batch_size]).to(device) for a in xs]
            out.append(fn(*args).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *tail_shape), np.float32)


def predict_proba(model: FusionModel, features: Mapping[str, Any], batch_size: int = 512) -> np.ndarray:
    """Class probabilities float32 [n, n_classes], columns in ``model.bundle.classes`` order."""
    return _batched(model, features, lambda *xs: torch.softmax(model(*xs), dim=-1), (model.n_classes,), batch_size)


def predict_logits(model: FusionModel, features: Mapping[str, Any], batch_size: int = 512) -> np.ndarray:
    """Logits float32 [n, n_classes] (before softmax): what temperature scaling divides; a saturated
    float32 probability (exactly 1.0) would have lost them."""
    return _batched(model, features, model, (model.n_classes,), batch_size)


def fusion_weights(model: FusionModel, features: Mapping[str, Any], batch_size: int = 512) -> np.ndarray:
    """W of Eq. (7) per sample: float32 [n, tokens, 3] (VLM, LLM, image) with chunk attention, [n, M] (one
    gate per input) with token attention. Not for ``concat``."""
    tail = (model.tokens, 3) if model.attention == "chunks" else (len(model.inputs),)
    return _batched(model, features, lambda *xs: model.fusion_weights(*model.project(xs)), tail, batch_size)


def fold_logits(members: Sequence[FusionModel], features: Mapping[str, Any], heads: Any = None) -> np.ndarray:
    """Logits float32 [members, n, classes] of fold models over encoder features: a model trained end to end
    projects them with its own heads and adapters, the others read them through the alignment's ``heads``
    (projected once)."""
    from asectl.models.pfa import align_features
    from asectl.models.trees import with_trees

    aligned = None
    out = []
    for member in members:
        if member.projections is None and aligned is None:
            aligned = align_features(heads, features)
        logits = predict_logits(member, features if member.projections is not None else aligned)
        out.append(with_trees(getattr(member, "trees", None), logits, features))
    return np.ascontiguousarray(np.stack(out))


def trees_file(path: str | Path) -> Path:
    """Where a fold model's trees member is stored, beside its weights: fusion-K.trees.safetensors."""
    path = Path(path)
    return path.with_name(path.name.replace(".safetensors", ".trees.safetensors"))


def save_fusion(model: FusionModel, path: str | Path) -> Path:
    """Weights as safetensors with classes, task and hyperparameters in the header (no pickle)."""
    from asectl.backends.encoders import save_module_state

    bundle = getattr(model, "bundle", None)
    meta = {
        "asectl_fusion": json.dumps(
            {
                "classes": bundle.classes if bundle else None,
                "task": bundle.task if bundle else None,
                "hparams": model.hparams,
                **({"projections": model.projections.meta()} if model.projections is not None else {}),
                **({"trees": trees_file(path).name} if getattr(model, "trees", None) is not None else {}),
            }
        )
    }
    if getattr(model, "trees", None) is not None:
        model.trees.save(trees_file(path))
    return save_module_state(model, path, metadata=meta)


def load_fusion(path: str | Path) -> FusionModel:
    from safetensors import safe_open

    from asectl.backends.encoders import load_module_state

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: fusion model not found; train one first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["asectl_fusion"])
    except Exception:
        raise ConfigError(f"{path}: not a fusion model file written by asectl; retrain it") from None
    model = FusionModel(**meta["hparams"])
    if meta.get("projections"):  # trained end to end: its own heads and adapters
        from asectl.models.adapters import AdaptedHeads

        model.projections = AdaptedHeads.from_meta(meta["projections"])
    load_module_state(model, path)
    model.eval()
    model.bundle = FusionBundle(classes=meta["classes"], task=meta["task"], hparams=meta["hparams"])
    if meta.get("trees"):  # a trees member beside the classifier (asectl.models.trees)
        from asectl.models.trees import load_trees

        model.trees = load_trees(path.with_name(meta["trees"]))
    return model
