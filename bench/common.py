"""What every bench script shares: the result file with ratios checked against targets."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(result: dict, out: str | Path) -> None:
    """Add `pass` (ratio <= target for each target), write the JSON to `out`, and print it."""
    result["pass"] = {k: result["ratios"][k] <= v for k, v in result["targets"].items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
