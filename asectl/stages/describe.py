"""``describe``: one vision-language description per card (paper section 3.2, VLM's answer).

    from asectl.domain.dataset import load_inputs
    from asectl.stages.describe import run_describe

    result = run_describe(load_inputs(["data/"]), vlm="instructblip", model="/models/instructblip-vicuna-7b")
    # or: run_describe(dataset, DescribeSettings(vlm="instructblip", model=...))
    result.by_image()["images/0001.png"]["text"]

Records are cached per image under (image bytes, backend, model content hash, prompt, numeric settings,
generation parameters); ``describe_identity`` returns exactly that, so later stages (predict, model
bundles) can store it and rebuild the same backend with ``asectl.backends.vlm.vlm_from_identity``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from asectl.backends.vlm import DEFAULT_PROMPT, VLM, make_vlm
from asectl.cache import Cache
from asectl.domain.dataset import Dataset, Sample
from asectl.errors import ConfigError, DataError
from asectl.executors import Executor, resolve
from asectl.imageio import load_image
from asectl.settings import environment_switch, environment_value
from asectl.stages.common import Remote, StageResult, run_per_image
from asectl.stages.settings import REPLAY_ONLY, StageSettings

STAGE = "describe"
# Bump when the record layout changes; it is part of every cache key.
RECORD_FORMAT = 1
DEFAULT_BATCH_SIZE = 4
# Worker processes: cards each describes per round (the round's records are cached when its last is in),
# and the fewest cards to describe for which they start at all (a worker's start costs about 30 cards).
CARDS_PER_WORKER_ROUND = 32
SMALL_RUN = 32
_worker: dict[str, Any] = {}


@dataclass(frozen=True)
class DescribeSettings(StageSettings):
    """What ``describe`` runs with; the defaults of ``asectl describe`` live here only. ``vlm`` None:
    ``instructblip`` when a model is configured (``model`` or ASECTL_VLM_MODEL), else ``builtin``.
    ``generation`` overrides generation parameters (max_new_tokens, num_beams, ...)."""

    STAGE = STAGE
    vlm: str | None = None
    model: str | None = None
    prompt: str = DEFAULT_PROMPT
    generation: dict[str, Any] | None = None
    device: str = "auto"
    load_8bit: bool = False
    allow_download: bool | None = None
    # A replay (predict from a bundle) refuses any other model (content hash).
    expect_model_hash: str | None = field(default=None, metadata=REPLAY_ONLY)

    def backend(self) -> VLM:
        """The backend; a model or download permission left unset comes from the environment (the settings
        layer, asectl/settings.py: ASECTL_VLM_MODEL, ASECTL_ALLOW_DOWNLOAD), here rather than in the backend."""
        model = self.model or environment_value("describe.vlm_model")
        allow = self.allow_download
        if allow is None:
            allow = environment_switch("describe.allow_download")
        return make_vlm(
            self.vlm,
            model,
            device=self.device,
            generation=self.generation,
            load_8bit=self.load_8bit,
            allow_download=allow,
        )

    def resolved(self, backend: VLM) -> DescribeSettings:
        """These settings with the backend actually chosen (not the default rule) and the model's
        resolved location: what a later stage on the same dataset must use to get the same texts."""
        ident = backend.identity()
        if ident["backend"] == "builtin":
            return DescribeSettings(vlm="builtin", prompt=self.prompt)
        folder = getattr(backend, "folder", None)
        return self.replace(vlm=ident["backend"], model=str(folder) if folder is not None else ident["model"]["id"])

    @classmethod
    def replay(cls, params: Mapping[str, Any]) -> DescribeSettings:
        """The settings that repeat a run from its ``StageResult.params`` (as a trained bundle stores
        them): same backend, model (checked by content hash), prompt and generation."""
        vlm = params["vlm"]
        if vlm["backend"] == "builtin":
            return cls(vlm="builtin", prompt=params["prompt"], expect_model_hash=vlm["model"]["hash"])
        return cls(
            vlm=vlm["backend"],
            prompt=params["prompt"],
            expect_model_hash=vlm["model"]["hash"],
            model=vlm["model"]["id"],
            generation=dict(vlm.get("generation") or {}),
            load_8bit=vlm.get("quantization") == "8bit",
        )


def describe_identity(
    vlm: str | VLM | None = None,
    prompt: str = DEFAULT_PROMPT,
    *,
    model: str | os.PathLike | None = None,
    device: str = "auto",
    generation: dict[str, Any] | None = None,
    load_8bit: bool = False,
) -> dict[str, Any]:
    """What a description depends on: the backend identity plus the prompt and the record format.

    ``vlm`` is a backend or the same choice ``run_describe`` takes (creating a backend only hashes the
    model; weights load on first use). Store the result in a model bundle;
    ``asectl.backends.vlm.vlm_from_identity(identity["vlm"])`` rebuilds the backend and checks the hash."""
    backend = (
        vlm
        if isinstance(vlm, VLM)
        else DescribeSettings(
            vlm=vlm,
            model=None if model is None else str(model),
            device=device,
            generation=generation,
            load_8bit=load_8bit,
        ).backend()
    )
    return {"record_format": RECORD_FORMAT, "vlm": backend.identity(), "prompt": _check_prompt(prompt)}


def _cache_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The cache key leaves out where the model lives (its id/path): moving a model folder keeps the
    cache, because the content hash stays."""
    vlm = dict(identity["vlm"])
    vlm["model"] = {"hash": vlm["model"]["hash"]}
    return {**identity, "vlm": vlm}


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("--prompt is empty; give the question to ask about each card")
    return prompt


def run_describe(
    dataset: Dataset,
    settings: DescribeSettings | None = None,
    *,
    backend: VLM | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    cache: Cache | None = None,
    force: bool = False,
    strict: bool = False,
    remember: bool = True,
    executor: Executor | None = None,
    **choices: Any,
) -> StageResult:
    """Describe every image of ``dataset`` with a VLM backend.

    ``settings`` (or single ``choices`` such as ``vlm="instructblip", model=PATH``) say what runs; a run
    on a dataset folder is remembered for the later stages on it (``remember=False``: a replay, which
    leaves them). ``backend``: an already created backend to reuse (e.g. to keep a loaded model between
    calls) instead of making one from the settings.
    A bad image becomes an error record; a configuration problem raises ConfigError before anything is
    cached. ``executor``: where the misses are described (asectl.executors; default local). ``workers``:
    processes describing the cards, each with its own backend (default: one per core for a model-free
    describer, else this process alone); they change the speed, not the records."""
    if isinstance(choices.get("vlm"), VLM):  # a backend object given where a name may go
        backend = choices.pop("vlm")
    settings = (settings or DescribeSettings()).replace(**choices)
    prompt = _check_prompt(settings.prompt)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    backend = backend or settings.backend()
    expect_model_hash = settings.expect_model_hash
    cache = cache or Cache()
    identity = describe_identity(backend, prompt)
    vlm_id = identity["vlm"]
    if expect_model_hash and vlm_id["model"]["hash"] != expect_model_hash:
        raise ConfigError(
            f"{vlm_id['backend']} model {vlm_id['model']['id']} (hash {vlm_id['model']['hash'][:12]}) "
            f"is not the one the results were made with ({expect_model_hash[:12]}); pass the "
            "original model with --vlm-model"
        )
    base = {
        "backend": vlm_id["backend"],
        "model": dict(vlm_id["model"]),
        "prompt": prompt,
        "generation": dict(vlm_id.get("generation") or {}),
    }

    def compute(sample: Sample) -> dict[str, Any]:
        out = describe_cards(backend, prompt, base, [sample])[0]
        if isinstance(out, DataError):
            raise out
        return out

    from asectl.environment import usable_cores
    from asectl.workers import WorkerPool

    executor = resolve(executor)
    n_workers = workers or (usable_cores() if getattr(backend, "model_free", False) else 1)
    pool = (
        WorkerPool(
            n_workers,
            _worker_init,
            (settings.resolved(backend), prompt, base),
            name="a describe worker",
            fix="rerun with fewer workers (asectl describe --workers N)",
        )
        if n_workers > 1 and not executor.distributed
        else None
    )

    def describe_here(samples: list[Sample]) -> list[dict[str, Any] | DataError]:
        return describe_cards(backend, prompt, base, samples)

    def compute_batch(samples: list[Sample]) -> list[dict[str, Any] | DataError]:
        # The first round is the whole run when it is shorter than a full one (a round >= SMALL_RUN).
        if pool is None:
            return describe_here(samples)
        return pool.run_cards(_worker_describe, samples, describe_here, SMALL_RUN)

    try:
        records = run_per_image(
            STAGE,
            dataset.samples,
            _cache_identity(identity),
            compute,
            cache,
            force=force,
            strict=strict,
            description=f"describe ({vlm_id['backend']})",
            meta={"vlm": vlm_id},
            status=backend.status,
            batch=compute_batch,
            batch_size=CARDS_PER_WORKER_ROUND * n_workers if pool else batch_size,
            executor=executor,
            remote=Remote(
                "a describe worker",
                _cluster_describer,
                (settings.resolved(backend), prompt, base, identity),
                batch_size=batch_size,
            ),
        )
    finally:
        if pool:
            pool.close()
    # A hit may come from the same model stored elsewhere: report where it is now.
    records = [r if r.get("error") else {**r, "model": dict(vlm_id["model"])} for r in records]
    params = {**identity, "backend": vlm_id["backend"], "model": dict(vlm_id["model"]), "batch_size": batch_size}
    if remember:
        settings.resolved(backend).remember(cache, dataset)
    return StageResult(STAGE, records, params=params, cache_summary=cache.summary(STAGE))


def describe_cards(
    backend: VLM, prompt: str, base: dict[str, Any], samples: list[Sample]
) -> list[dict[str, Any] | DataError]:
    """The records of a batch of cards, described together; a card that cannot be loaded gets its
    DataError in its place."""
    loaded: list[Any] = []
    for s in samples:
        try:
            loaded.append(load_image(s.path))
        except DataError as exc:  # this card gets an error record; the others are described together
            loaded.append(exc)
    images = [im for im in loaded if not isinstance(im, DataError)]
    texts = backend.describe(images, prompt) if images else []
    measured = getattr(backend, "last_measurements", None)  # the built-in describer's numbers behind its texts
    described = iter(range(len(texts)))
    out: list[dict[str, Any] | DataError] = []
    for im in loaded:
        if isinstance(im, DataError):
            out.append(im)
            continue
        i = next(described)
        out.append({**base, "text": texts[i], **({"measurements": measured[i]} if measured is not None else {})})
    return out


def _worker_init(settings: DescribeSettings, prompt: str, base: dict[str, Any]) -> None:
    _worker.update(backend=settings.backend(), prompt=prompt, base=base)


def _worker_describe(sample: Sample) -> dict[str, Any] | DataError:
    """In a worker process: one card's record (``describe_cards``) with this worker's backend."""
    from asectl.workers import crash_test_hook

    crash_test_hook(sample.path.name)
    return describe_cards(_worker["backend"], _worker["prompt"], _worker["base"], [sample])[0]


def _cluster_describer(settings: DescribeSettings, prompt: str, base: dict[str, Any], identity: dict[str, Any]):
    """A Ray worker's describer (asectl.executors): the backend made once per worker, checked to be the
    driver's (model content hash, dtype, generation), describing batches of cards."""
    from asectl.executors import check_same

    backend = settings.backend()
    here = _cache_identity(describe_identity(backend, prompt))["vlm"]
    check_same(f"the {identity['vlm']['backend']} describer", here, _cache_identity(identity)["vlm"])
    return lambda samples: describe_cards(backend, prompt, base, samples)


__all__ = ["run_describe", "describe_identity", "DescribeSettings", "DEFAULT_PROMPT", "STAGE", "RECORD_FORMAT"]
