"""Counting integer values (histograms of codes and bins) on any device, without a host sync.

On the CPU this is `torch.bincount`, on the calling thread. Counting chunks on a Python thread
pool (session 23) made the count itself faster but started a second OpenMP team in the pool's
thread: with more OpenMP threads than cores, libgomp stops spinning at its barriers, and every
later parallel op of the process paid a futex wake-up. On 2 cores the quantized forward ran
0.29 -> 0.40 s for 64 images after the first profile, for good (bench/bench_profile.py, session 26).
On a GPU, CUDA's `torch.bincount` reads the input's max back to the host; `scatter_count` does not.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bincount(index: Tensor, size: int) -> Tensor:
    """Counts of each value 0..size-1 in an integer tensor (any shape; values must lie in [0, size)): (size,) int64.

    Equal to `torch.bincount(index.flatten(), minlength=size)`. A non-contiguous index is copied
    once (pass a contiguous view when the order does not matter).
    """
    flat = index.reshape(-1)
    if flat.device.type != "cpu":
        return scatter_count(flat, size)
    return torch.bincount(flat, minlength=size)


def scatter_count(flat: Tensor, size: int) -> Tensor:
    """`bincount` by a scatter-add, for GPUs: CUDA's `torch.bincount` reads the input's max back to
    the host, one synchronisation per call, which on the profiler's path is several per site and batch.
    flat: (N,) integer values in [0, size). Returns (size,) int64."""
    ones = torch.ones((), dtype=torch.int64, device=flat.device).expand(flat.numel())
    return torch.zeros(size, dtype=torch.int64, device=flat.device).index_add_(0, flat, ones)
