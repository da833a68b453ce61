"""What every bench script shares: the result file with ratios checked against targets."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.artifacts import write_text


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (no-op on the CPU), so that a timer read next counts them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_result(result: dict, out: str | Path) -> None:
    """Add `pass` (ratio <= target for each target), write the JSON to `out`, and print it."""
    result["pass"] = {k: result["ratios"][k] <= v for k, v in result["targets"].items()}
    write_text(Path(out), json.dumps(result, indent=2) + "\n")  # atomic: temp file, then rename
    print(json.dumps(result, indent=2))
