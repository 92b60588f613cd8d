"""What a per-image stage ran with, as one typed object per stage (``OcrSettings``, ``DescribeSettings``,
``ReasonSettings``, each defined in its stage's module).

A settings object holds the stage's defaults (the only place they are written), is what the stage's
``run_*`` takes, and is how the stage is remembered and replayed:

- ``remember``: every ``run_*`` on a dataset folder stores the settings it ran with, under the stage's
  name, so ``asectl reason D --llm-model X.gguf && asectl align D`` aligns X's answers;
- ``recall``: the learning stages and ``predict`` read them back through the same class;
- a bundle stores ``as_dict()`` of the settings each stage ran with (with the model hashes it expects),
  and ``from_dict`` rebuilds them, so ``predict`` repeats exactly what training saw.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, TypeVar

from asectl.cache import Cache
from asectl.domain.dataset import Dataset

S = TypeVar("S", bound="StageSettings")

# Field metadata: a replay-only check (an expected model hash) that is stored in bundles but not
# remembered as a user's choice for the next command on the dataset.
REPLAY_ONLY = {"replay_only": True}
# Field metadata: a setting added after models were trained, stored only when set, so the stored settings
# (and the keys made from them) of earlier models stay what they were.
STORED_WHEN_SET = {"stored_when_set": True}


@dataclasses.dataclass(frozen=True)
class StageSettings:
    STAGE: ClassVar[str] = ""

    def replace(self: S, **changes: Any) -> S:
        """A copy with ``changes``; ``None`` values keep the current setting (an option left unset)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in self._stored_fields()}

    def _stored_fields(self) -> list[dataclasses.Field]:
        return [
            f
            for f in dataclasses.fields(self)
            if not (f.metadata.get("stored_when_set") and getattr(self, f.name) is None)
        ]

    @classmethod
    def from_dict(cls: type[S], values: Mapping[str, Any] | None) -> S:
        """Settings from a stored dict; keys this version does not know (an older bundle's) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})

    def choices(self) -> dict[str, Any]:
        """The user's choices, without replay-only checks: what is remembered for a dataset."""
        return {
            f.name: _plain(getattr(self, f.name)) for f in self._stored_fields() if not f.metadata.get("replay_only")
        }

    def remember(self, cache: Cache, dataset: Dataset) -> None:
        """Store these settings for later stages on the same dataset folder (no-op for loose images)."""
        if dataset.root is not None:
            cache.set_pointer(_pointer(dataset, self.STAGE), self.choices())

    @classmethod
    def recall(cls: type[S], cache: Cache, dataset: Dataset) -> S:
        """The settings this stage last ran with on ``dataset`` (the defaults if it never ran)."""
        return cls.from_dict(cache.get_pointer(_pointer(dataset, cls.STAGE)) if dataset.root is not None else None)


def _pointer(dataset: Dataset, stage: str) -> str:
    from asectl.stages.common import dataset_id

    return f"settings-{dataset_id(dataset)}-{stage}"


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


__all__ = ["StageSettings", "REPLAY_ONLY", "STORED_WHEN_SET"]
