"""Counting integer values (histograms of codes and bins) on every CPU thread torch may use.

`torch.bincount` runs on one thread on the CPU, while the elementwise passes around it use all
of torch's intra-op threads; on the profiler's hot path (a code histogram of every site of every
batch) that one-thread count was the largest single cost. `bincount` splits a large input into
one contiguous chunk per torch thread, counts the chunks on a small thread pool (torch releases
the GIL inside the op) and adds the counts: the same int64 result as `torch.bincount`, exactly.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

CHUNK_MIN = 2**17
"""Values per chunk below which splitting costs more than it saves (one thread-pool round trip is ~50 us)."""

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a fresh pool there when one is needed."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _workers(count: int) -> ThreadPoolExecutor:
    """A process-wide pool with at least `count` threads (grown, never shrunk, if torch's thread count rises)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=count, thread_name_prefix="bincount"), count
        return _pool


def bincount(index: Tensor, size: int) -> Tensor:
    """Counts of each value 0..size-1 in an integer tensor (any shape; values must lie in [0, size)): (size,) int64.

    Equal to `torch.bincount(index.flatten(), minlength=size)`. On the CPU, an index of at least
    2 * CHUNK_MIN values is counted in up to `torch.get_num_threads()` chunks in parallel. A
    non-contiguous index is copied once (pass a contiguous view when the order does not matter).
    """
    flat = index.reshape(-1)
    if flat.device.type != "cpu":
        return scatter_count(flat, size)
    chunks = min(torch.get_num_threads(), flat.numel() // CHUNK_MIN)
    if chunks < 2:
        return torch.bincount(flat, minlength=size)
    parts = flat.chunk(chunks)
    futures = [_workers(chunks - 1).submit(torch.bincount, part, None, size) for part in parts[1:]]
    total = torch.bincount(parts[0], minlength=size)
    for future in futures:
        total.add_(future.result())
    return total


def scatter_count(flat: Tensor, size: int) -> Tensor:
    """`bincount` by a scatter-add, for GPUs: CUDA's `torch.bincount` reads the input's max back to
    the host, one synchronisation per call, which on the profiler's path is several per site and batch.
    flat: (N,) integer values in [0, size). Returns (size,) int64."""
    ones = torch.ones((), dtype=torch.int64, device=flat.device).expand(flat.numel())
    return torch.zeros(size, dtype=torch.int64, device=flat.device).index_add_(0, flat, ones)
