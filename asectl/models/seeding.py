"""Seeded torch randomness and thread settings for one block of code, restored afterwards."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fork_rng(seed: int, device: str):
    """Seed torch (CPU and the used CUDA device) inside the block; restore the previous state after."""
    devices = []
    if str(device).startswith("cuda") and torch.cuda.is_available():
        devices = [torch.device(device).index or 0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def one_cpu_thread(device: str):
    """One thread on a CPU inside the block, for torch and for the BLAS and OpenMP pools scikit-learn and
    numpy use (threadpoolctl); the caller's thread counts are restored after.

    Training and frozen encoding run under it: a CPU kernel's result depends on how many threads split its
    sums, so without it a model or a cached feature would depend on the machine's cores and on
    OMP_NUM_THREADS (bench/reproducibility.py), and more threads only oversubscribe a 2-core machine with
    these small models."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    cpu = str(device) == "cpu"
    if cpu:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1) if cpu else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(threads)
