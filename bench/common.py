"""What every bench script shares: the result file with ratios checked against targets."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from pipeline.artifacts import write_text


def machine() -> str:
    """The CPU model (with "AVX-512" when it has it), from /proc/cpuinfo where there is one.

    Results are recorded with it: the CPU's kernels sum in their own order, and at 6 bits a few
    images' decisions move with the last bits of a scale (docs/experiments.md, session 28).
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return name + (", AVX-512" if "avx512f" in flags else "")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (no-op on the CPU), so that a timer read next counts them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_result(result: dict, out: str | Path) -> None:
    """Add `pass` (ratio <= target for each target), write the JSON to `out`, and print it."""
    result["pass"] = {k: result["ratios"][k] <= v for k, v in result["targets"].items()}
    write_text(Path(out), json.dumps(result, indent=2) + "\n")  # atomic: temp file, then rename
    print(json.dumps(result, indent=2))
