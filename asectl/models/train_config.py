"""Training hyperparameters: two profiles (``quick`` and ``paper``) as dataclasses, every field overridable.

``paper`` is section 4.1 of the paper: ResNet-50 + BERT-base fine-tuned (30 warm-up epochs), PFA with
15 epochs per stage, 60 fusion epochs, AdamW (0.9, 0.999), eps 1e-8, lr 1e-2 decayed x0.75 every 15
epochs, batch size 10. The paper gives no learning rate for the encoders themselves; 1e-2 would wreck
pretrained ResNet/BERT weights, so the encoders use the usual fine-tuning rates (``image_lr`` 1e-4,
``text_lr`` 2e-5) while the heads (projections, temperature, fusion) use the paper's 1e-2.

``quick`` (CPU default) freezes the text encoders: their features are computed once (and cached by the
stage). Its image encoder is ``cards-cnn``, a small CNN that ``align`` trains on the training cards' dot
maps before PFA (three cross-fitted networks; about 40 CPU s on 325 cards), in place of the
paper's fine-tuned ResNet-50 (section 3.2): chosen over frozen EfficientNet-Lite0 features by
``bench/image_branch.py`` on the training split only. The PFA projections and the fusion network train
on top: seconds on ~325 samples. Its values that
the paper does not fix were chosen by ``bench/tune_profile.py`` with 3-fold cross-validation on the
training split of the default generated data (``asectl synth --seed 0``, field difficulty), never the
test split (docs/benchmarks.md, "How each default was chosen"):

* PFA: lr 1e-2 as in the paper (grid 1e-3 / 3e-3 / 1e-2), batch 32 (against the paper's 10), ranking
  warm-up 8 epochs (the fewest that find planted mismatched pairs about as well as any tried); 15 epochs
  per stage and the x0.75 decay every 15 epochs as in the paper.
* Fusion: lr 3e-3 (grid 1e-3 / 3e-3 / 1e-2), unweighted cross-entropy (against class-balanced), no
  dropout (against 0.1 and 0.3); the paper's 60 epochs, batch 10 and step decay. The best few settings
  lie within one standard error of each other: the choice is weakly determined; re-tune on real cards.
* Branches and fusion (``bench/choose_branches.py``, the same kind of cross-validation): the OCR'd numbers
  as a fourth branch (``stats``) beside image, VLM and LLM text, fused by concatenation (71.70) rather
  than CMAF with token attention (71.26, within one standard error) or the paper's three branches (68.76
  with token attention, 67.51 with the chunk attention of the earlier default). ``--fusion cmaf`` then
  attends across the four modality tokens. The paper profile keeps the paper's three branches and CMAF.
* Classifier (``bench/choose_classifier.py``, 5-fold cross-validation of the training split, 3 fold seeds):
  on the concatenation, an L2 logistic regression fitted exactly (C 1e-3) scored 74.18 against 67.79 for
  the paper's MLP, which fits every training card; ``classifier = "auto"`` keeps the MLP for CMAF and
  end-to-end heads.
* Projection heads (``bench/choose_heads.py``, the same kind of cross-validation): frozen (66.78) kept over
  training them end to end (``fusion.projections``; 67.65, +0.87 with a paired standard error of 0.78).

Overrides come from a TOML table or CLI options as a (nested or dotted) dict:
``{"pfa": {"lr": 0.01}, "fusion.epochs": 30, "pfa.stride": 0.2, "pfa.strides": [0.2, 0.6, 1]}``.
Each value is checked and converted by its field's type (``coerce_setting``; a field may name its own
parser with ``Annotated``, as ``pfa.strides`` does); an unknown key or a value of the wrong type is a
ConfigError naming the key. These sections are part of the one settings layer (asectl/settings.py,
docs/config.md): ``[pfa]``, ``[fusion]`` and ``[encoders]`` of a config file, ``--set``, and the options
bound to them (``--stride``, ``--mode``, ...).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Mapping, Sequence

from asectl.errors import ConfigError

PROFILES = ("quick", "paper")
PFA_MODES = ("progressive", "direct", "none")
ALIGN_ORDERS = ("sequential", "summed")
FUSION_VARIANTS = ("cmaf", "cmaf-nosigmoid", "concat")
# What CMAF attends over: "chunks", the 256-d aligned vectors of VLM (Q), LLM (K) and image (V) cut into
# `fusion.tokens` chunks each (attention across the chunks of one vector; earlier tables), or "tokens",
# one token per enabled branch (attention across the modalities; asectl.models.cmaf).
FUSION_ATTENTIONS = ("chunks", "tokens")
# Whether cross-entropy also trains the PFA projection heads (through two adapters; asectl.models.adapters):
# "frozen" (the heads as align left them) or "end-to-end".
FUSION_PROJECTIONS = ("frozen", "end-to-end")
# Settings that only end-to-end training reads: left out of a frozen profile's dict (TrainProfile.to_dict), so
# the cache keys and bundles of frozen models stay what they were before end-to-end training existed.
END_TO_END_FIELDS = ("projections", "projections_lr", "adapter_dim")
# The fusion's classifier: "mlp", the hidden layer trained by AdamW with the fusion network (the paper's
# "MLP and cross-entropy"), or "logistic", a multinomial logistic regression with an L2 penalty fitted
# exactly (L-BFGS, scikit-learn) on the standardized concatenated aligned features (asectl.models.cmaf).
# "auto": logistic where it applies (the concat fusion with frozen heads), else mlp.
FUSION_CLASSIFIERS = ("auto", "mlp", "logistic")
LOGISTIC_FIELDS = ("classifier", "logistic_c")
TREES_FIELDS = ("numbers_trees", "trees_weight", "trees_l2", "trees_max_leaf_nodes")
# scikit-learn's own values of the trees' regularization: a model trained with them keeps the key it had
# before the settings existed.
TREES_SKLEARN_DEFAULTS = {"trees_l2": 0.0, "trees_max_leaf_nodes": 31}
# The branches (modalities) a model can use: the card image, the VLM's description, the LLM's text, and
# the OCR'd record's numbers as a standardized vector (asectl.stages.modalities.stats_vectors).
BRANCHES = ("image", "vlm", "llm", "stats")
PAPER_BRANCHES = ("image", "vlm", "llm")
TASKS = ("multiclass", "binary")
# What the LLM-branch text encoder reads: the LLM's answer plus the OCR'd record sentence, from a prompt
# with the nearest-class hint ("composite"), or the LLM's own answer alone, from a prompt without the
# hint ("answer"; asectl.stages.reason.prompt.hint_free_prompt).
LLM_TEXTS = ("composite", "answer")
DEFAULT_LLM_TEXT = LLM_TEXTS[0]


def stride_fractions(stride: float | Sequence[float]) -> list[float]:
    """Cumulative data fractions of the stages.

    A single stride s gives s, 2s, ... up to 1.0 (the last one is 1.0 even when s does not divide 1:
    0.3 -> 0.3, 0.6, 0.9, 1.0). A list (the paper's Table 4 ``0.2/0.6/1``) is taken as given; it must rise
    strictly, lie in (0, 1] and end at 1 so that every training pair is used."""
    if isinstance(stride, (int, float)) and not isinstance(stride, bool):
        s = float(stride)
        if not 0 < s <= 1:
            raise ConfigError(f"PFA stride {stride}: must be in (0, 1]")
        n = math.ceil(round(1.0 / s, 9))
        return [min(1.0, round(k * s, 9)) for k in range(1, n + 1)]
    fr = [float(f) for f in stride]
    if not fr:
        raise ConfigError("PFA strides: give at least one fraction, e.g. 0.2/0.6/1")
    if any(not 0 < f <= 1 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise ConfigError(f"PFA strides {fr}: fractions must rise strictly within (0, 1]")
    if abs(fr[-1] - 1.0) > 1e-9:
        raise ConfigError(f"PFA strides {fr}: the last fraction must be 1 (all training data)")
    fr[-1] = 1.0
    return fr


def parse_strides(value: float | str | Sequence[float]) -> tuple[float, ...]:
    """The stage fractions from a stride (0.2), a list ([0.2, 0.6, 1]) or their text ("0.2", "0.2/0.6/1",
    "0.2,0.6,1"): the type of ``pfa.strides``, on the command line and in config files alike."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("/", ",").split(",") if p.strip()]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"setting 'pfa.strides' = {value!r}: give a stride such as 0.2 or fractions such as 0.2/0.6/1"
            ) from None
        value = numbers[0] if len(numbers) == 1 else numbers
    return tuple(stride_fractions(value))


@dataclass
class EncoderConfig:
    image: str = "efficientnet-lite0"
    image_weights: str | None = None  # resnet50: state-dict file or "torchvision:IMAGENET1K_V2"
    image_random_init: bool = False  # resnet50 only: untrained network, on purpose
    text: str = "minilm"
    text_path: str | None = None  # bert-base: local folder or hub id
    device: str = "cpu"  # cpu, cuda, cuda:N, auto
    batch_size: int = 32  # frozen features: items per forward pass on a GPU (one on a CPU: asectl.backends.encoders)
    finetune: bool = False  # paper: encoders train during warm-up and PFA
    warmup_epochs: int = 0  # paper: 30 (supervised warm-up before alignment)
    image_lr: float = 1e-4  # encoder learning rates when fine-tuning
    text_lr: float = 2e-5
    llm_text: str = DEFAULT_LLM_TEXT  # composite | answer (LLM_TEXTS)
    # cards-cnn (an image encoder trained on the training cards' dot maps in align; backends/encoders.py)
    image_epochs: int = 30
    image_train_lr: float = 3e-3
    image_folds: int = 3  # cross-fitted networks; 1 = one network on all training cards
    image_map_size: int = 88  # dot-map side in pixels (the 440-px range averaged 5 x 5)
    image_coords: bool = False  # x and y maps as extra input channels (CoordConv)
    branches: tuple[str, ...] = PAPER_BRANCHES  # which of BRANCHES the model aligns and fuses
    stats_hidden: int = 64  # the stats branch's MLP encoder width (asectl.models.pfa)
    # the dot pattern's measured numbers join the printed ones in the stats branch (asectl.domain.dot_pattern)
    dot_pattern: bool = False


@dataclass
class PFAConfig:
    mode: str = "progressive"  # progressive | direct | none
    # cumulative fractions of D_train; ``pfa.stride`` is another name for it (a single stride reads as
    # its fractions)
    strides: Annotated[tuple[float, ...], parse_strides] = (0.2, 0.4, 0.6, 0.8, 1.0)
    ALIASES: ClassVar[dict[str, str]] = {"stride": "strides"}
    epochs_per_stage: int = 15
    direct_epochs: int | None = None  # direct mode; None = as many updates as progressive (see pfa.py)
    rank_warmup_epochs: int = 8  # ITC epochs on all of D_train before stage 1 ranks the pairs
    batch_size: int = 10
    lr: float = 1e-2
    lr_decay: float = 0.75
    lr_decay_every: int = 15  # epochs, counted over the whole alignment (not per stage)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01  # AdamW's default; the paper gives none
    proj_dim: int = 256
    tau_init: float = 0.07  # CLIP/ALBEF's initial temperature
    tau_min: float = 0.01
    tau_max: float = 0.5
    align_order: str = "sequential"  # sequential: (I,LLM) step then (I,VLM) step; summed: one step
    rerank_each_stage: bool = True  # rank D_pend again with the current projections per stage

    def validate(self) -> None:
        _choice("pfa.mode", self.mode, PFA_MODES)
        _choice("pfa.align_order", self.align_order, ALIGN_ORDERS)
        self.strides = tuple(stride_fractions(self.strides))
        _positive("pfa.epochs_per_stage", self.epochs_per_stage)
        if self.direct_epochs is not None:
            _positive("pfa.direct_epochs", self.direct_epochs)
        if self.rank_warmup_epochs < 0:
            raise ConfigError(f"setting 'pfa.rank_warmup_epochs' = {self.rank_warmup_epochs}: must be 0 or more")
        _positive("pfa.batch_size", self.batch_size)
        _positive("pfa.proj_dim", self.proj_dim)
        _positive("pfa.lr", self.lr)
        _positive("pfa.lr_decay_every", self.lr_decay_every)
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"pfa.lr_decay {self.lr_decay}: must be in (0, 1]")
        if not 0 < self.tau_min <= self.tau_init <= self.tau_max:
            raise ConfigError(
                f"pfa temperature: need 0 < tau_min ({self.tau_min}) <= tau_init "
                f"({self.tau_init}) <= tau_max ({self.tau_max})"
            )


@dataclass
class FusionConfig:
    variant: str = "cmaf"  # cmaf | cmaf-nosigmoid | concat
    attention: str = "chunks"  # chunks | tokens (FUSION_ATTENTIONS); not used by concat
    task: str = "multiclass"  # multiclass | binary (normal vs defective)
    epochs: int = 60
    batch_size: int = 10
    lr: float = 1e-2
    lr_decay: float = 0.75
    lr_decay_every: int = 15
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    tokens: int = 8  # each 256-d aligned vector = 8 tokens of 32 channels
    heads: int = 4
    reduced_dim: int = 16  # r in Eq. (7), per head
    mlp_hidden: int = 128
    dropout: float = 0.1
    class_weight: str = "none"  # none | balanced
    projections: str = "frozen"  # frozen | end-to-end (FUSION_PROJECTIONS)
    projections_lr: float = 3e-4  # end-to-end: the projection heads' rate (the adapters take lr)
    adapter_dim: int = 32  # end-to-end: the adapters' bottleneck width
    classifier: str = "mlp"  # auto | mlp | logistic (FUSION_CLASSIFIERS; logistic: concat, frozen heads)
    logistic_c: float = 1e-3  # logistic: inverse L2 strength (bench/choose_classifier.py)
    # boosted trees on the stats branch's raw numbers beside the classifier in every fold model
    # (asectl.models.trees); their probabilities weigh trees_weight in the fold model's average
    numbers_trees: bool = False
    trees_weight: float = 0.5
    # the trees' L2 penalty on leaf values and their most leaves per tree (scikit-learn's l2_regularization
    # and max_leaf_nodes; these defaults are scikit-learn's)
    trees_l2: float = TREES_SKLEARN_DEFAULTS["trees_l2"]
    trees_max_leaf_nodes: int = TREES_SKLEARN_DEFAULTS["trees_max_leaf_nodes"]

    def trees_apply(self, branches: Sequence[str]) -> bool:
        """Whether fold models get the trees member: asked for, with frozen heads (the fold graphs of heads
        trained end to end read encoder features) and the stats branch (what the trees read)."""
        return self.numbers_trees and self.projections == "frozen" and "stats" in branches

    def logistic_applies(self) -> bool:
        return self.variant == "concat" and self.projections == "frozen"

    def resolved_classifier(self) -> str:
        """The classifier this configuration trains: "auto" is logistic where it applies, else mlp."""
        if self.classifier == "auto":
            return "logistic" if self.logistic_applies() else "mlp"
        return self.classifier

    def validate(self, dim: int | None = None) -> None:
        _choice("fusion.variant", self.variant, FUSION_VARIANTS)
        _choice("fusion.attention", self.attention, FUSION_ATTENTIONS)
        _choice("fusion.task", self.task, TASKS)
        _choice("fusion.class_weight", self.class_weight, ("none", "balanced"))
        _choice("fusion.projections", self.projections, FUSION_PROJECTIONS)
        _choice("fusion.classifier", self.classifier, FUSION_CLASSIFIERS)
        _positive("fusion.logistic_c", self.logistic_c)
        if not 0 < self.trees_weight < 1:
            raise ConfigError(f"fusion.trees_weight {self.trees_weight}: must be in (0, 1)")
        if self.trees_l2 < 0:
            raise ConfigError(f"fusion.trees_l2 {self.trees_l2}: must be 0 or more")
        if self.trees_max_leaf_nodes < 2:
            raise ConfigError(f"fusion.trees_max_leaf_nodes {self.trees_max_leaf_nodes}: must be 2 or more")
        if self.classifier == "logistic" and not self.logistic_applies():
            raise ConfigError(
                "fusion.classifier logistic is fitted on the concatenated aligned features: use it "
                "with fusion.variant concat and frozen projection heads"
            )
        for name in ("epochs", "batch_size", "tokens", "heads", "reduced_dim", "lr_decay_every", "adapter_dim"):
            _positive(f"fusion.{name}", getattr(self, name))
        if self.mlp_hidden < 0:
            raise ConfigError(f"fusion.mlp_hidden {self.mlp_hidden}: give 0 (a linear classifier) or a width")
        _positive("fusion.lr", self.lr)
        _positive("fusion.projections_lr", self.projections_lr)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"fusion.dropout {self.dropout}: must be in [0, 1)")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"fusion.lr_decay {self.lr_decay}: must be in (0, 1]")
        if dim is not None and dim % self.tokens:
            raise ConfigError(f"fusion.tokens {self.tokens}: must divide the aligned dimension {dim}")


@dataclass
class TrainProfile:
    name: str = "quick"
    seed: int = 0
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    pfa: PFAConfig = field(default_factory=PFAConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def validate(self) -> TrainProfile:
        self.pfa.validate()
        self.fusion.validate(self.pfa.proj_dim)
        check_llm_text(self.encoders.llm_text)
        self.encoders.branches = check_branches(self.encoders.branches)
        _positive("encoders.stats_hidden", self.encoders.stats_hidden)
        if self.encoders.warmup_epochs < 0:
            raise ConfigError("encoders.warmup_epochs: must be 0 or more")
        if self.encoders.warmup_epochs and not self.encoders.finetune:
            raise ConfigError("encoders.warmup_epochs needs encoders.finetune = true (frozen encoders cannot warm up)")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.fusion.projections == "frozen":
            for name in END_TO_END_FIELDS:
                del out["fusion"][name]
        if not self.encoders.dot_pattern:  # models trained before the option keep their keys
            del out["encoders"]["dot_pattern"]
        if not (self.fusion.numbers_trees and self.fusion.projections == "frozen"):  # earlier models keep their keys
            for name in TREES_FIELDS:
                del out["fusion"][name]
        else:
            for name, value in TREES_SKLEARN_DEFAULTS.items():  # models trained before the options keep their keys
                if out["fusion"][name] == value:
                    del out["fusion"][name]
        if self.fusion.resolved_classifier() == "mlp":  # models trained before the option keep their keys
            for name in LOGISTIC_FIELDS:
                del out["fusion"][name]
        else:
            out["fusion"]["classifier"] = "logistic"
        return out


QUICK_BRANCHES = ("image", "vlm", "llm", "stats")


def quick_profile() -> TrainProfile:
    # Branches and fusion: bench/choose_branches.py (training-split cross-validation, seed 0): the four
    # branches concatenated 71.70, with token attention 71.26, the paper's three with token / chunk
    # attention 68.76 / 67.51. Token attention is what `--fusion cmaf` uses with these branches.
    # The dot pattern's numbers and the trees member: bench/choose_numbers_trees.py (training-split
    # cross-validation, generator seeds 0 and 1, 3 fold seeds each): 77.59 against 75.26 without either,
    # ahead in all 6 runs (+0.2 to +4.9). The trees' regularization (trees_l2 1, at most 15 leaves): the same
    # cross-validation on generator seeds 0-4, 79.57 against 78.45 with scikit-learn's defaults, ahead in 13
    # of 15 runs, review share 75.8% against 76.8%.
    return TrainProfile(
        name="quick",
        encoders=EncoderConfig(image="cards-cnn", branches=QUICK_BRANCHES, dot_pattern=True),
        pfa=PFAConfig(batch_size=32),
        fusion=FusionConfig(
            lr=3e-3,
            dropout=0.0,
            variant="concat",
            attention="tokens",
            classifier="auto",
            numbers_trees=True,
            trees_l2=1.0,
            trees_max_leaf_nodes=15,
        ),
    )


def paper_profile() -> TrainProfile:
    return TrainProfile(
        name="paper",
        encoders=EncoderConfig(
            image="resnet50", text="bert-base", device="cuda", batch_size=32, finetune=True, warmup_epochs=30
        ),
        pfa=PFAConfig(),  # the paper's values; the ranking warm-up (unspecified there) as quick's
        fusion=FusionConfig(classifier="mlp"),  # the paper's "MLP and cross-entropy", also for --fusion concat
    )


def get_profile(name: str = "quick", overrides: Mapping[str, Any] | None = None) -> TrainProfile:
    """The named profile with ``overrides`` applied and validated."""
    makers = {"quick": quick_profile, "paper": paper_profile}
    if name not in makers:
        raise ConfigError(f"unknown training profile '{name}'; choose one of: {', '.join(PROFILES)}")
    profile = makers[name]()
    if overrides:
        apply_overrides(profile, overrides)
    return profile.validate()


def apply_overrides(obj: Any, overrides: Mapping[str, Any], where: str = "") -> Any:
    """Set fields of a (nested) dataclass from a dict, in place. Dotted keys reach nested sections."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = str(key).replace("-", "_").partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        elif isinstance(value, Mapping):
            nested.setdefault(head, {}).update(value)
        else:
            nested[head] = value
    hints = typing.get_type_hints(type(obj), include_extras=True)
    names = {f.name for f in dataclasses.fields(obj)}
    aliases = getattr(type(obj), "ALIASES", {})
    for key, value in nested.items():
        key = aliases.get(key, key)
        path = f"{where}{key}"
        if key not in names:
            raise ConfigError(f"unknown setting '{path}'; valid: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"setting '{path}' is a section; give a table of its keys")
            apply_overrides(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))
    return obj


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (text from --set or the environment is parsed), else a ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:  # a field with its own parser
        return hint.__metadata__[0](value)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("/", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"setting '{path}': expected a list, got {value!r}")
        item = args[0] if args else float
        return tuple(_coerce(path, v, item) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"setting '{path}': expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"setting '{path}': expected a whole number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"setting '{path}': expected a whole number, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"setting '{path}': expected a whole number, got {value!r}")
        return int(f)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"setting '{path}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"setting '{path}': expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"setting '{path}': expected text, got {value!r}")
        return value
    return value


SECTIONS = ("encoders", "pfa", "fusion")


def canonical_key(key: str) -> str:
    """A profile key as the profile names it: underscores for dashes, aliases (``pfa.stride``) resolved."""
    section, _, name = key.replace("-", "_").partition(".")
    aliases = {"pfa": PFAConfig.ALIASES}.get(section, {})
    return f"{section}.{aliases.get(name, name)}" if name else section


def is_profile_key(key: str) -> bool:
    return key.partition(".")[0] in SECTIONS


def coerce_setting(key: str, value: Any) -> Any:
    """``value`` checked and converted for profile key ``key`` (e.g. "pfa.strides", "0.2/0.6/1" ->
    (0.2, 0.6, 1.0)); a ConfigError names an unknown key or a wrong type."""
    section, _, name = canonical_key(key).partition(".")
    profile = quick_profile()
    apply_overrides(profile, {f"{section}.{name}": value})
    return getattr(getattr(profile, section), name)


def profile_settings(profile: TrainProfile) -> dict[str, Any]:
    """Every hyperparameter of ``profile`` by dotted key (``pfa.lr``, ``fusion.epochs``, ...)."""
    return {
        f"{section}.{f.name}": getattr(getattr(profile, section), f.name)
        for section in SECTIONS
        for f in dataclasses.fields(getattr(profile, section))
    }


def check_branches(value: str | Sequence[str]) -> tuple[str, ...]:
    """Branch names (a list, or text like "image,vlm,stats") -> a tuple in ``BRANCHES`` order; at least two,
    since alignment pairs one branch with the others."""
    names = value.replace("/", ",").split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in BRANCHES]
    if unknown:
        raise ConfigError(
            f"setting 'encoders.branches': unknown branch {', '.join(unknown)}; choose from {', '.join(BRANCHES)}"
        )
    if len(set(names)) < 2:
        raise ConfigError(
            f"setting 'encoders.branches' = {','.join(names) or '(none)'}: give at least two of {', '.join(BRANCHES)}"
        )
    return tuple(b for b in BRANCHES if b in names)


def check_llm_text(value: str) -> None:
    """What the LLM branch reads must be one of ``LLM_TEXTS`` (a profile's setting, or a bundle's replay)."""
    _choice("encoders.llm_text", value, LLM_TEXTS)


def _choice(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"setting '{path}' = {value!r}: choose one of {', '.join(allowed)}")


def _positive(path: str, value: float) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"setting '{path}' = {value!r}: must be greater than 0")
