"""The process's environment: variables read as on/off switches (``ASECTL_ALLOW_DOWNLOAD``,
``HF_HUB_OFFLINE``, ...), parsed one way everywhere, and the machine and libraries a model is trained with,
recorded in it."""

from __future__ import annotations

import functools
import os

ON_WORDS = ("1", "true", "yes", "on")
# The libraries whose CPU kernels set a trained model's last bits, and each one's switch for the instruction
# set its kernels may use: torch's ATen dispatch, oneDNN's JIT, MKL, OpenBLAS's core type. Two machines
# with other CPUs (AVX-512 against AVX2, an Intel against an AMD one, even with these switches set alike)
# train models that differ in their last bits, and the small training runs carry that into other
# thresholds (docs/benchmarks.md, "Reproducibility").
INSTRUCTION_SET_SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE")
# MKL's conditional numerical reproducibility: one code branch on every CPU that has it (MKL's own switch
# for the same results across CPUs), recorded beside the instruction-set switches.
RECORDED_SWITCHES = (*INSTRUCTION_SET_SWITCHES, "MKL_CBWR")
# The libraries whose versions a trained model's bits depend on.
TRAINING_LIBRARIES = ("torch", "numpy", "scikit-learn", "llama_cpp_python")


def env_flag(name: str) -> bool:
    """True when environment variable ``name`` is 1, true, yes or on (any case, spaces around ignored)."""
    return os.environ.get(name, "").strip().lower() in ON_WORDS


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def package_versions(dists: tuple[str, ...]) -> dict[str, str | None]:
    """Each installed distribution's version; None for one that is not installed."""
    from importlib.metadata import PackageNotFoundError, version  # here: every command imports this module

    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (Linux; {} elsewhere), read once per process."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():  # the end of the first processor's block
                    break
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module says."""
    import platform

    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


# The CPU's vector and matrix extensions that pick kernels in torch, oneDNN, MKL, OpenBLAS and llama.cpp
# (as /proc/cpuinfo names them): a virtual machine's model name can be as plain as "Intel Xeon Processor".
KERNEL_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")


def cpu_features() -> list[str]:
    """Which of KERNEL_FEATURES the CPU has (Linux: /proc/cpuinfo's flags; elsewhere an empty list)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [k for k in KERNEL_FEATURES if k in flags]


def training_machine() -> dict:
    """What a model's bits depend on beyond its inputs, settings and seeds: the CPU and its kernel
    features, the instruction set torch's CPU kernels use on it, the instruction-set switches set, the
    core count, and the versions of Python and the numeric libraries. Recorded in a model, so two models
    of the same inputs that differ can be told apart by where they were trained."""
    import platform

    import torch

    return {
        "cpu": cpu_name(),
        "cpu_features": cpu_features(),
        "cores": usable_cores(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "instruction_set_switches": {k: os.environ[k] for k in RECORDED_SWITCHES if k in os.environ},
        "python": platform.python_version(),
        "libraries": package_versions(TRAINING_LIBRARIES),
    }
