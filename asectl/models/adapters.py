"""Fusion trained end to end (``fusion.projections = "end-to-end"``): the fusion's cross-entropy also trains
the PFA projection heads (asectl.models.pfa), through two adapters.

The paper keeps its VLM and LLM frozen and, "to mitigate the risk of catastrophic forgetting and maintain
zero-shot capabilities", trains "two adapters tailored to the ASE dataset" (section 3.2, paper line 115),
without saying where they sit or what they are. Here:

* **Which two.** The paper's adapters belong to its two language models, so the two adapters sit on the two
  text branches: one on the VLM's description, one on the LLM's text (``ADAPTED_BRANCHES``). The image and
  stats branches get none (a model without text branches has no adapter); their heads fine-tune all the same.
* **What an adapter is.** A residual bottleneck (Houlsby et al., 2019, "Parameter-efficient transfer learning
  for NLP"): ``a(h) = W_up relu(W_down h)``, ``fusion.adapter_dim`` wide, on the branch's aligned vector h;
  the fusion reads ``normalize(h + a(h))``, L2-normalised like every aligned feature. ``W_up`` and its bias
  start at zero, so an untrained model is exactly the frozen path: the alignment's features, unchanged.
* **The heads.** Each fold model starts from a copy of the alignment's heads and fine-tunes them at
  ``fusion.projections_lr`` (3e-4 by default, a tenth of the quick profile's fusion rate): the alignment is
  the starting point and moves slowly, which is what the adapters guard, while the adapters and the fusion
  network train at ``fusion.lr``. The ITC temperature is not trained (no contrastive loss here), and the
  stats branch's standardization (the training cards' mean and sd) stays as align fitted it.
* **Encoders.** The encoder features stay align's cached, frozen ones. A profile whose encoders fine-tune in
  align (``encoders.finetune``, the paper profile) is refused: its cached features are not those of its
  tuned encoders (asectl.stages.fuse).

A fold model trained end to end carries its heads and adapters (``FusionModel.projections``, saved in its
fusion-K.safetensors) and reads encoder features; a frozen one reads the alignment's aligned features.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from asectl.models.pfa import AlignmentHeads

# The paper's two adapters: one per language model's text (module docstring).
ADAPTED_BRANCHES = ("vlm", "llm")


class ResidualAdapter(nn.Module):
    """``a(h) = W_up relu(W_down h)`` with ``W_up`` and its bias zero at the start: a(h) = 0."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(int(dim), int(bottleneck))
        self.up = nn.Linear(int(bottleneck), int(dim))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(h)))


class AdaptedHeads(nn.Module):
    """The alignment's projection heads with an adapter on each text branch; read like ``AlignmentHeads``
    (``branches``, ``dims``, ``proj_dim``, ``stats``, ``heads(branch, x)``), so ``align_features`` and the
    ONNX export take either."""

    def __init__(self, heads: AlignmentHeads, adapter_dim: int = 32):
        super().__init__()
        self.alignment = heads
        self.adapter_dim = int(adapter_dim)
        self.adapters = nn.ModuleDict(
            {m: ResidualAdapter(heads.proj_dim, self.adapter_dim) for m in ADAPTED_BRANCHES if m in heads.branches}
        )

    @property
    def branches(self) -> tuple[str, ...]:
        return self.alignment.branches

    @property
    def dims(self) -> dict[str, int]:
        return self.alignment.dims

    @property
    def proj_dim(self) -> int:
        return self.alignment.proj_dim

    @property
    def stats(self) -> Any:
        return self.alignment.stats

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """The branch's aligned feature, through its adapter where it has one, L2-normalised."""
        h = self.alignment(modality, x)
        if modality in self.adapters:
            h = F.normalize(h + self.adapters[modality](h), dim=-1)
        return h

    def head_parameters(self) -> list[nn.Parameter]:
        """What trains at ``fusion.projections_lr``: the projections (and the stats encoder), not the ITC
        temperature."""
        return [p for name, p in self.alignment.named_parameters() if name != "log_tau"]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def meta(self) -> dict[str, Any]:
        return {"alignment": self.alignment.meta(), "adapter_dim": self.adapter_dim, "adapters": list(self.adapters)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> AdaptedHeads:
        """Heads and adapters of the shape ``meta()`` describes (weights still to be loaded)."""
        return cls(AlignmentHeads.from_meta(meta["alignment"]), meta["adapter_dim"])
