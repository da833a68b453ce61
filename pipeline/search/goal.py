"""Search objectives and their directions (no heavy imports: workers and tests load this first)."""

from __future__ import annotations

from pipeline.errors import PipelineError

OBJECTIVES = {"kl": "minimize", "agreement": "maximize", "top1": "maximize"}


def better(objective: str, a: float, b: float) -> bool:
    """a is strictly better than b for this objective."""
    return a < b if OBJECTIVES[objective] == "minimize" else a > b


def direction_of(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise PipelineError(f"search.objective: unknown objective '{objective}' (choose one of {', '.join(OBJECTIVES)})")
    return OBJECTIVES[objective]
