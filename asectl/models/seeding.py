"""Seeded torch randomness for one block of code, without disturbing the caller's global state."""

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
