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
def cpu_training_threads(device: str):
    """One torch thread while training small heads on a CPU (more only oversubscribes a 2-core
    machine); the caller's thread count is restored after."""
    threads = torch.get_num_threads()
    if str(device) == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
